//! Tensors rebuilt over their storages' bytes, each view checked to lie inside its storage.
use super::value::{StorageRef, TensorRef, Value};
use anyhow::{ensure, Result};
use std::collections::HashMap;
use tch::Tensor;

/// Replaces every [`Value::TensorRef`] by a CPU tensor read from its storage.
pub(super) fn materialize(
    value: Value,
    read: &mut dyn FnMut(&StorageRef) -> Result<Vec<u8>>,
    cache: &mut HashMap<String, Tensor>,
) -> Result<Value> {
    Ok(match value {
        Value::TensorRef(t) => Value::Tensor(rebuild(&t, read, cache)?),
        Value::List(v) => Value::List(
            v.into_iter()
                .map(|x| materialize(x, read, cache))
                .collect::<Result<_>>()?,
        ),
        Value::Tuple(v) => Value::Tuple(
            v.into_iter()
                .map(|x| materialize(x, read, cache))
                .collect::<Result<_>>()?,
        ),
        Value::Dict(v) => Value::Dict(
            v.into_iter()
                .map(|(k, x)| Ok((k, materialize(x, read, cache)?)))
                .collect::<Result<_>>()?,
        ),
        other => other,
    })
}

fn rebuild(
    t: &TensorRef,
    read: &mut dyn FnMut(&StorageRef) -> Result<Vec<u8>>,
    cache: &mut HashMap<String, Tensor>,
) -> Result<Tensor> {
    let s = &t.storage;
    ensure!(
        t.size.len() == t.stride.len(),
        "tensor over storage {}: size {:?} and stride {:?} differ in rank",
        s.key,
        t.size,
        t.stride
    );
    // The view must stay inside the storage: as_strided does not check.
    let empty = t.size.contains(&0);
    let valid = t.offset >= 0
        && t.size.iter().all(|&d| d >= 0)
        && t.stride.iter().all(|&d| d >= 0)
        && (empty
            || t.size
                .iter()
                .zip(&t.stride)
                .try_fold(t.offset, |acc, (&d, &st)| {
                    acc.checked_add((d - 1).checked_mul(st)?)
                })
                .is_some_and(|last| last < s.numel));
    ensure!(
        valid,
        "tensor with size {:?}, stride {:?} and offset {} does not fit its storage {} of {} elements",
        t.size,
        t.stride,
        t.offset,
        s.key,
        s.numel
    );
    if !cache.contains_key(&s.key) {
        let bytes = read(s)?;
        let need = s.numel as usize * s.kind.elt_size_in_bytes();
        ensure!(
            bytes.len() >= need,
            "storage {} has {} bytes, expected {need}",
            s.key,
            bytes.len()
        );
        let flat = Tensor::f_from_data_size(&bytes[..need], &[s.numel], s.kind)?;
        cache.insert(s.key.clone(), flat);
    }
    let flat = &cache[&s.key];
    Ok(flat
        .f_as_strided(&t.size, &t.stride, Some(t.offset))?
        .contiguous())
}
