//! `compare --jobs K` on one machine: K worker processes on the study folder, each one of the
//! cooperating invocations of [`super::claim`] with its share of the cores as torch threads.
//!
//! Processes rather than threads because torch's intra-op thread count is process-global
//! (`at::set_num_threads`): K units run by threads of one process would all share one pool of
//! N threads (over-subscribed, or each unit at a count that depends on what else runs), so a
//! unit's speed and its floating-point reduction order would depend on the others. A worker
//! process runs each unit exactly as one process at N/K threads does, its crash or `kill -9`
//! loses only its unit (which the others take over), and it is the same code path as a SLURM job
//! array or a second terminal.
use anyhow::{Context, Result};
use std::ffi::OsString;
use std::process::{Child, Command, Stdio};

/// The environment variable naming a worker (1..K; this process is worker 0): its progress lines
/// say which worker they are from.
pub const WORKER_VAR: &str = "DIFFTUNE_WORKER";

/// Torch threads per worker when `jobs` workers share `cores` cores: an even share, at least one.
pub fn threads_per_worker(cores: usize, jobs: usize) -> usize {
    (cores / jobs.max(1)).max(1)
}

/// This process's worker number: 0 unless started by [`Workers::spawn`].
pub fn worker_index() -> usize {
    std::env::var(WORKER_VAR)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The workers this process started, besides itself.
pub struct Workers {
    children: Vec<Child>,
}

impl Workers {
    /// Starts `jobs - 1` copies of this command (its arguments `args`, the program's name first,
    /// without `--jobs`), each with `threads` torch threads and its stdout discarded.
    pub fn spawn(args: &[OsString], jobs: usize, threads: usize) -> Result<Self> {
        let program = std::env::current_exe().context("finding the difftune executable")?;
        let args = without_jobs(&args[1..]);
        let mut children = Vec::new();
        for worker in 1..jobs {
            let child = Command::new(&program)
                .args(&args)
                .env("OMP_NUM_THREADS", threads.to_string())
                .env(WORKER_VAR, worker.to_string())
                // This process prints the tables; the workers' progress goes to stderr.
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("starting worker {worker} ({})", program.display()))?;
            children.push(child);
        }
        Ok(Self { children })
    }

    /// Waits for every worker; an error naming those that failed.
    pub fn wait(mut self) -> Result<()> {
        let mut failed = Vec::new();
        for (index, child) in self.children.iter_mut().enumerate() {
            let status = child.wait().context("waiting for a worker")?;
            if !status.success() {
                failed.push(format!("worker {} ({status})", index + 1));
            }
        }
        self.children.clear();
        match failed.is_empty() {
            true => Ok(()),
            false => anyhow::bail!("{} failed", failed.join(", ")),
        }
    }
}

impl Drop for Workers {
    /// Workers still running when this process gives up (an error) are stopped, by PID.
    fn drop(&mut self) {
        for child in &mut self.children {
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// `args` less `--jobs K` / `--jobs=K`.
fn without_jobs(args: &[OsString]) -> Vec<OsString> {
    let mut kept = Vec::new();
    let mut skip_value = false;
    for arg in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        match arg.to_str() {
            Some("--jobs") => skip_value = true,
            Some(a) if a.starts_with("--jobs=") => {}
            _ => kept.push(arg.clone()),
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_get_the_command_without_jobs_and_an_even_share_of_the_cores() {
        let args: Vec<OsString> = [
            "compare", "--jobs", "2", "--out", "x", "--jobs=3", "--set", "a=1",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        assert_eq!(
            without_jobs(&args),
            ["compare", "--out", "x", "--set", "a=1"].map(OsString::from)
        );
        assert_eq!(threads_per_worker(16, 4), 4);
        assert_eq!(threads_per_worker(2, 2), 1);
        assert_eq!(threads_per_worker(2, 3), 1);
    }
}
