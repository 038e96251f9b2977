//! Which training timesteps a sampling run visits: diffusers' `timestep_spacing`, computed once
//! for every scheduler (descending, as the schedulers step through them).
use super::config::TimestepSpacing;
use super::numpy;

/// The `n` timesteps of `train` training timesteps, descending. `linspace` values are left
/// fractional (the Euler schedulers interpolate at them); `leading` ones are shifted by
/// `steps_offset`.
pub fn descending(spacing: TimestepSpacing, train: usize, n: usize, steps_offset: i64) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => {
            let mut t = numpy::linspace(0.0, (train - 1) as f64, n);
            t.reverse();
            t
        }
        TimestepSpacing::Leading => {
            let ratio = (train / n) as i64;
            (0..n as i64)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => trailing(train, train as f64 / n as f64),
    }
}

/// [`descending`] rounded to whole timesteps (half to even, as numpy), for the schedulers that
/// index their tables by timestep.
pub fn integral_descending(
    spacing: TimestepSpacing,
    train: usize,
    n: usize,
    steps_offset: i64,
) -> Vec<f64> {
    descending(spacing, train, n, steps_offset)
        .into_iter()
        .map(f64::round_ties_even)
        .collect()
}

/// DPM-Solver's variant: `n + 1` points with the final one (timestep 0) dropped, so the last
/// step lands on the final sigma instead.
pub fn dpm_descending(
    spacing: TimestepSpacing,
    train: usize,
    n: usize,
    steps_offset: i64,
) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => numpy::linspace(0.0, (train - 1) as f64, n + 1)
            .iter()
            .rev()
            .take(n)
            .map(|t| t.round_ties_even())
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (train / (n + 1)) as i64;
            (1..=n as i64)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => trailing(train, train as f64 / n as f64),
    }
}

/// `train, train - step, ...` above 0, rounded, minus one.
fn trailing(train: usize, step: f64) -> Vec<f64> {
    numpy::arange(train as f64, 0.0, -step)
        .iter()
        .map(|t| t.round_ties_even() - 1.0)
        .collect()
}
