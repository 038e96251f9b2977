//! Run-parallel ranks (`[study] parallel = "run"`): under a launcher (torchrun, srun) each rank
//! is one of the cooperating invocations on the study folder (see [`super::claim`]), doing whole
//! units alone (a group of one) on its own device: `cuda:LOCAL_RANK` in CUDA jobs, on the CPU its
//! share of the node's cores as torch threads. A unit runs exactly as one process at that thread
//! count runs it, so the results are those of one process.
//!
//! The report is written by the last rank to leave the folder, by the cooperating invocations'
//! rule, rather than by rank 0 after the barrier: the rule already writes it exactly once among
//! every process on the folder, which may include others than this launch's ranks (a job array,
//! a second launch), where rank 0 could not know whether they are done. The ranks then meet at a
//! barrier on the launcher's group, so that the launcher sees them finish together, and rank 0
//! alone returns the results (prints the tables) — by then the report is written.
//!
//! The training runs of a method with `ranks` above 1 (by default full fine-tuning of a large
//! U-Net on GPUs) are data-parallel over teams of ranks, c10d sub-groups (see [`super::teams`]).
use super::machine::cores;
use super::runner::{run_on, CompareOptions, Outcome};
use super::teams::Teams;
use super::workers::threads_per_worker;
use crate::dist::ProcessGroup;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use tch::Device;

/// Runs this rank's share of the study in `opts` as one of the cooperating invocations on its
/// folder, on this rank's device, with teams of the methods' `widths` (see
/// [`super::teams::widths`]), and waits at the end for the other ranks of `group`. Rank 0 gets
/// the results, the others [`Outcome::FinishedOnMainRank`]; every rank gets
/// [`Outcome::Interrupted`] when it was stopped.
pub fn run_whole_units(
    opts: &CompareOptions,
    group: &ProcessGroup,
    widths: BTreeMap<String, usize>,
) -> Result<Outcome> {
    let device = group.local_device(opts.config.train.device.resolve()?);
    let threads = match device {
        Device::Cpu => {
            share_cores(group);
            format!(" with {} torch thread(s)", tch::get_num_threads())
        }
        _ => String::new(),
    };
    eprintln!(
        "compare: rank {} of {} does whole units on {device:?}{threads}",
        group.rank(),
        group.world_size(),
    );
    let teams = Teams::form(group, widths).context("forming the teams of data-parallel runs")?;
    for team in teams.iter() {
        let members = team.first..team.first + team.width;
        eprintln!(
            "compare: rank {} trains data-parallel runs with ranks {members:?}",
            group.rank()
        );
    }
    let outcome = run_on(opts, &ProcessGroup::single(), device, &teams)?;
    group
        .barrier()
        .context("waiting for the other ranks at the end of the study")?;
    Ok(match outcome {
        Outcome::Finished(_) if !group.is_main() => Outcome::FinishedOnMainRank,
        outcome => outcome,
    })
}

/// Gives torch this rank's share of the node's cores (at least one thread), unless
/// `OMP_NUM_THREADS` chooses (torchrun sets it to 1 for several ranks a node unless it is set).
fn share_cores(group: &ProcessGroup) {
    if std::env::var_os("OMP_NUM_THREADS").is_some() {
        return;
    }
    let local_ranks = group.launch().and_then(|l| l.local_world_size).unwrap_or(1);
    tch::set_num_threads(threads_per_worker(cores(), local_ranks) as i32);
}
