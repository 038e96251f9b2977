//! The numpy routines diffusers builds its timestep and sigma tables with, reproduced operation
//! for operation so the tables match bit for bit (a one-off timestep changes the whole sample).
//! Rounding is numpy's round-half-to-even: use `f64::round_ties_even` on the results.

/// `numpy.linspace(start, stop, num)` (endpoint included), in f64.
pub(crate) fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut values: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if let Some(last) = values.last_mut() {
        *last = stop;
    }
    values
}

/// `numpy.arange(start, stop, step)` with a float step: numpy sizes it as
/// `ceil((stop - start) / step)` and fills `start + i * delta` with `delta` re-derived from the
/// first two values.
pub(crate) fn arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `numpy.interp(x, numpy.arange(len(fp)), fp)` for one point (the knots are 1 apart, so the
/// slope is the difference of neighbours).
pub(crate) fn interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    let (lo, hi) = (fp[j] as f64, fp[j + 1] as f64);
    if j as f64 == x {
        return lo;
    }
    (hi - lo) * (x - j as f64) + lo
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arange_length_follows_numpy() {
        // numpy.arange(1000, 0, -1000 / 3) == [1000, 666.67, 333.33]
        assert_eq!(arange(1000.0, 0.0, -1000.0 / 3.0).len(), 3);
        assert_eq!(arange(0.0, 5.0, 1.0), vec![0.0, 1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn linspace_ends_exactly() {
        assert_eq!(linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(linspace(0.0, 999.0, 1), vec![0.0]);
    }

    #[test]
    fn interp_between_and_outside() {
        let fp = [1.0f32, 3.0, 7.0];
        assert_eq!(interp(0.5, &fp), 2.0);
        assert_eq!(interp(1.25, &fp), 4.0);
        assert_eq!(interp(-1.0, &fp), 1.0);
        assert_eq!(interp(9.0, &fp), 7.0);
    }
}
