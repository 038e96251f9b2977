//! Summary statistics of measurements.

/// The median of `values` (sorted in place); 0 for none.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() {
        0 => 0.0,
        n if n.is_multiple_of(2) => 0.5 * (values[mid - 1] + values[mid]),
        _ => values[mid],
    }
}

/// The 2.5th and 97.5th percentiles of `values`, a 95% interval (linear interpolation between
/// order statistics, as numpy's default); `(NaN, NaN)` for none.
pub fn interval_95(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let position = q * (sorted.len() - 1) as f64;
        let (below, fraction) = (position.floor() as usize, position.fract());
        let above = (below + 1).min(sorted.len() - 1);
        sorted[below] + fraction * (sorted[above] - sorted[below])
    };
    (at(0.025), at(0.975))
}

#[cfg(test)]
mod tests {
    use super::{interval_95, median};

    #[test]
    fn the_interval_interpolates_like_numpy() {
        let values: Vec<f64> = (0..41).map(f64::from).collect();
        assert_eq!(interval_95(&values), (1.0, 39.0));
        assert_eq!(interval_95(&[1.0, 0.0]), (0.025, 0.975));
        assert_eq!(interval_95(&[5.0]), (5.0, 5.0));
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }
}
