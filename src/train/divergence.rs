//! A run whose loss or gradient norm is not finite stops before applying the step, sets aside
//! the checkpoints of the weights the step was computed on (or later) and names where to resume.
//! It records the step in `checkpoints/divergence.json`, so that a resumed run which diverges at
//! that step again is told that the lower learning rate did not help and given an older
//! checkpoint to resume from (`--resume-from`): its weights are damaged already (or the step's
//! data is), which a lower learning rate cannot undo.
use super::checkpoint::{self, Checkpoint, SetAside};
use crate::util::fs::{read_json, write_json};
use anyhow::{anyhow, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The record of a run's last divergence, in the checkpoints folder.
pub const RECORD_FILE: &str = "divergence.json";

/// A step whose loss or gradient norm was not finite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Divergence {
    /// The step (1-based) whose loss was not finite: computed on the weights of `step - 1`.
    pub step: usize,
    /// The run's learning rate (`train.learning_rate`).
    pub learning_rate: f64,
    /// The checkpoint step the diverging invocation resumed from; `None` for a new run.
    pub resumed_from: Option<usize>,
}

/// Stops the run of `divergence` on the main rank: sets aside the checkpoints under `root` of
/// step `divergence.step - 1` or later, records it, and returns the error that names where to
/// resume. `what` says what was not finite.
pub fn stop(root: &Path, divergence: &Divergence, what: &str) -> anyhow::Error {
    let weights = divergence.step - 1;
    match advise(root, divergence) {
        Ok(advice) => anyhow!(
            "{what}, computed on the weights of step {weights}: stopping without applying or saving the update{advice}"
        ),
        Err(e) => e.context(format!(
            "{what}: stopping; setting aside the checkpoints of the weights of step {weights}"
        )),
    }
}

/// Sets aside, records, and says what was set aside and where to resume.
fn advise(root: &Path, divergence: &Divergence) -> Result<String> {
    let previous: Option<Divergence> = match root.join(RECORD_FILE).is_file() {
        true => read_json(&root.join(RECORD_FILE)).ok(),
        false => None,
    };
    let (set_aside, left) =
        checkpoint::set_aside_from(root, divergence.step - 1, SetAside::NonFinite)?;
    if root.is_dir() {
        write_json(&root.join(RECORD_FILE), divergence)?;
    }
    let set_aside = match set_aside.as_slice() {
        [] => String::new(),
        dirs => format!(
            "; set aside the checkpoint(s) of those weights: {}",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let repeated = previous.filter(|p| p.step == divergence.step);
    let next = match (repeated, divergence.resumed_from) {
        (Some(previous), Some(resumed)) => again(root, divergence, &previous, resumed)?,
        _ => first_time(left),
    };
    Ok(format!("{set_aside}; {next}"))
}

/// Where to go on after a divergence that is not a repeat: the newest checkpoint left, at a
/// lower learning rate.
fn first_time(left: Option<Checkpoint>) -> String {
    match left {
        Some(found) => format!(
            "resume from {} (step {}, weights with a finite loss) with --resume and a lower learning rate (--lr); \
             learning_rate, lr_schedule, lr_warmup_steps and max_grad_norm may change on resume",
            found.dir.display(),
            found.state.step
        ),
        None => "no earlier checkpoint is left: start again with a lower learning rate (--lr), or check the data".into(),
    }
}

/// Where to go on when a run resumed from step `resumed` diverged at the step where the last
/// one did: an older checkpoint than `resumed`.
fn again(
    root: &Path,
    divergence: &Divergence,
    previous: &Divergence,
    resumed: usize,
) -> Result<String> {
    let step = divergence.step;
    let (lr, before) = (divergence.learning_rate, previous.learning_rate);
    let verdict = match lr < before {
        true => format!("a lower learning rate did not help ({lr} after {before})"),
        false => format!("at learning rate {lr} as at {before} before"),
    };
    let damaged = format!(
        "the loss is not finite at step {step} again, which the last run reached too: {verdict}. The weights of step \
         {resumed} this run resumed from are likely damaged already (or the data of step {step} is)"
    );
    let older = checkpoint::older_than(root, resumed)?;
    let Some(newest) = older.first() else {
        return Ok(format!(
            "{damaged}, and no older checkpoint is left: start again (another --out) with a lower learning rate, \
             or check the data"
        ));
    };
    let others: Vec<String> = older[1..]
        .iter()
        .map(|c| checkpoint::folder_name(c.state.step))
        .collect();
    Ok(format!(
        "{damaged}: resume from an older checkpoint, {} (step {}), with --resume-from {}{}",
        newest.dir.display(),
        newest.state.step,
        checkpoint::folder_name(newest.state.step),
        match others.is_empty() {
            true => String::new(),
            false => format!(" (older ones: {})", others.join(", ")),
        }
    ))
}
