//! A study as units of work. Every unit has explicit inputs (a job: the settings, model and
//! data paths it reads), a stage key (what its result is computed from) and a result recorded in
//! `state/STAGE.json`; a unit reads nothing but its job, the study's resolved settings and the
//! files of the units it depends on, so it can run in another thread, process or rank. The units,
//! in dependency order (each wave's units are independent of each other):
//!
//! 1. the data (each synthetic domain), the tiny model, the pre-training run and the merged base
//!    model (one after another: each needs the one before);
//! 2. the validation split of the target's training images, then each method's learning-rate
//!    candidates' runs, their validation samples and scores (when a method searches);
//! 3. the final runs: every method's runs `0..study.runs` (at its chosen learning rate), the
//!    timing pass and the content classifier;
//! 4. the sample sets: the base model's, and every final run's at its end and at each of
//!    `eval.at_steps`;
//! 5. the scores of every sample set; then the report, assembled from the records.
//!
//! [`serial`] runs each wave's units one after another in this process, skipping those that
//! cooperating processes on the same folder are doing (see [`super::claim`]); `compare --jobs K`
//! runs K such processes.
use super::claim::{deferring, UnitHeld};
use super::wave_progress::WaveProgress;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Which training run of a method.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    /// Run `r` of the study (seed `train.seed + r`), on all the training images.
    Final(usize),
    /// A learning-rate candidate's run, on the training images less the validation split.
    Candidate(f64),
}

/// A training run of the study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunId {
    pub method: String,
    pub kind: RunKind,
}

impl RunId {
    pub fn final_run(method: &str, run: usize) -> Self {
        Self {
            method: method.to_string(),
            kind: RunKind::Final(run),
        }
    }

    /// Its name, which is its folder under `runs/` and its stage's name: the method's for run 0
    /// (as a one-run study names it), `METHOD-rR` for run R, `METHOD-lrLR` for a candidate
    /// (`lora-lr3e-3`).
    pub fn name(&self) -> String {
        match self.kind {
            RunKind::Final(0) => self.method.clone(),
            RunKind::Final(r) => format!("{}-r{r}", self.method),
            RunKind::Candidate(lr) => format!("{}-lr{lr:e}", self.method),
        }
    }
}

/// A set of generated images: the base model's (no run), or a run's at one of its steps (`None`:
/// its end).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetId {
    pub run: Option<RunId>,
    pub step: Option<usize>,
}

impl SetId {
    pub fn base() -> Self {
        Self {
            run: None,
            step: None,
        }
    }

    /// Its name, which is its folder under `samples/` and its stages': `base`, the run's name for
    /// its end, `RUN-stepS` at step S.
    pub fn name(&self) -> String {
        match (&self.run, self.step) {
            (None, _) => super::report::BASE_ROW.to_string(),
            (Some(run), None) => run.name(),
            (Some(run), Some(step)) => format!("{}-step{step}", run.name()),
        }
    }
}

/// How often a process with only held units left looks whether one is free.
const HELD_POLL: Duration = Duration::from_millis(500);

/// Runs the units of one wave with `execute`, which returns `None` when interrupted: then the wave
/// stops (`None`), keeping what is done. A unit another process holds (see [`super::claim`]) is
/// skipped and come back to once the others are done; when only held units are left, this waits
/// until one is let go (its record is then reused, or a unit whose holder was killed taken over).
/// The results are in the units' order.
pub fn serial<U, T>(
    units: impl IntoIterator<Item = U>,
    mut execute: impl FnMut(&U) -> anyhow::Result<Option<T>>,
) -> anyhow::Result<Option<Vec<T>>> {
    let mut left: Vec<(usize, U)> = units.into_iter().enumerate().collect();
    let mut done: Vec<(usize, T)> = Vec::with_capacity(left.len());
    let mut progress = WaveProgress::new(left.len());
    let mut held_before = 0;
    while !left.is_empty() {
        let mut held = Vec::new();
        let mut holds = Vec::new();
        for (index, unit) in left {
            let started = Instant::now();
            let (outcome, claimed) = deferring(|| execute(&unit));
            match outcome {
                Ok(Some(result)) => {
                    let elsewhere = holds.len().max(held_before);
                    progress.unit_done(claimed.as_deref(), started.elapsed(), elsewhere);
                    done.push((index, result));
                }
                Ok(None) => return Ok(None),
                Err(e) => match e.downcast::<UnitHeld>() {
                    Ok(hold) => {
                        held.push((index, unit));
                        holds.push(hold);
                    }
                    Err(e) => return Err(e),
                },
            }
        }
        if !holds.is_empty() {
            let names: Vec<&str> = holds.iter().map(|h| h.unit.as_str()).collect();
            eprintln!(
                "compare: waiting for {}, which other processes are doing",
                names.join(", ")
            );
            while !holds.iter().any(UnitHeld::is_free) {
                std::thread::sleep(HELD_POLL);
            }
        }
        held_before = holds.len();
        left = held;
    }
    done.sort_by_key(|(index, _)| *index);
    Ok(Some(done.into_iter().map(|(_, result)| result).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_a_one_run_study_s_and_tell_the_others_apart() {
        assert_eq!(RunId::final_run("lora", 0).name(), "lora");
        assert_eq!(RunId::final_run("lora", 2).name(), "lora-r2");
        let candidate = RunId {
            method: "lora".into(),
            kind: RunKind::Candidate(3e-3),
        };
        assert_eq!(candidate.name(), "lora-lr3e-3");
        let at = SetId {
            run: Some(RunId::final_run("full", 1)),
            step: Some(100),
        };
        assert_eq!(at.name(), "full-r1-step100");
        assert_eq!(SetId::base().name(), "base");
    }
}
