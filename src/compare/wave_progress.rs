//! The study's progress through a wave of units (see [`super::units::serial`]), one plain line
//! each time this process finishes a unit it worked on, naming the process (the worker of
//! `--jobs`, the rank under a launcher, or the PID of an independent invocation):
//!
//! ```text
//! compare [worker 1]: run-lora-r1 done in 42 s; wave: 5/12 units done, 2 running elsewhere, 5 left, ~1 minute left
//! ```
//!
//! The time left is the mean time of the units this process did in the wave, times the units
//! left, shared by this process and those running the others. Units found done (by another
//! process or an earlier invocation) count as done without a line. Lines rather than a bar: a
//! unit draws its own bars (training, sampling), and a unit's end is rare enough for a line.
use indicatif::HumanDuration;
use std::time::Duration;

/// Units that take less than this were found done, not worked on.
const REUSED_UNDER: Duration = Duration::from_millis(500);

pub struct WaveProgress {
    total: usize,
    done: usize,
    worked: Vec<Duration>,
    who: String,
}

impl WaveProgress {
    pub fn new(total: usize) -> Self {
        let launch = crate::dist::Launch::from_env().ok().flatten();
        let who = match (super::workers::worker_index(), launch) {
            (0, Some(launch)) => format!("rank {}", launch.rank),
            (0, None) => format!("PID {}", std::process::id()),
            (worker, _) => format!("worker {worker}"),
        };
        Self {
            total,
            done: 0,
            worked: Vec::new(),
            who,
        }
    }

    /// `unit` is done here after `took`, with `held` units running in other processes.
    pub fn unit_done(&mut self, unit: Option<&str>, took: Duration, held: usize) {
        self.done += 1;
        if took < REUSED_UNDER {
            return;
        }
        self.worked.push(took);
        let left = self.total - self.done;
        let mut line = format!(
            "compare [{}]: {} done in {}; wave: {}/{} units done, {held} running elsewhere, {left} left",
            self.who,
            unit.unwrap_or("a unit"),
            HumanDuration(took),
            self.done,
            self.total,
        );
        if left > 0 {
            let mean = self.worked.iter().sum::<Duration>() / self.worked.len() as u32;
            let estimate = mean * left as u32 / (held as u32 + 1);
            line.push_str(&format!(", ~{} left", HumanDuration(estimate)));
        }
        eprintln!("{line}");
    }
}
