//! Tensor helpers shared by tests, parity checks and tools.
use tch::{Kind, Tensor};

/// ||a - b|| / ||b||, in f64: the parity measure used against reference implementations.
pub fn relative_l2(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let num = (&a - &b).norm().double_value(&[]);
    let den = b.norm().double_value(&[]);
    if den == 0.0 {
        num
    } else {
        num / den
    }
}
