//! Progress of long work on stderr, for every command that has some (training, cache encoding,
//! sampling, FID features, compare's stages).
//!
//! On a terminal it is an indicatif bar. Where stderr is not a terminal (SLURM, `nohup`, CI: a
//! file) indicatif draws nothing, so plain lines are printed instead, each when another tenth of
//! the work is done or [`INTERVAL_ENV`] (default 30 s) has passed since the last one:
//!
//! ```text
//! difftune cache: 120/240 images (50%), 0.61 images/s, 3 minutes left
//! ```
use indicatif::{HumanDuration, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Seconds between plain progress lines when stderr is not a terminal (default 30; fractions
/// allowed).
pub const INTERVAL_ENV: &str = "DIFFTUNE_PROGRESS_INTERVAL";

const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);

/// A progress display: a bar on a terminal, plain lines elsewhere, nothing when hidden.
pub struct Progress {
    bar: ProgressBar,
    /// Set when progress goes to a stderr that is not a terminal.
    lines: Option<Mutex<PlainLines>>,
    label: String,
    unit: &'static str,
}

impl Progress {
    /// Progress through `total` `unit`s (e.g. "steps", "images") of `label`'s work (e.g. "train",
    /// "cache"), shown when `visible` (the main rank of a job, a command that asked for it).
    pub fn new(label: &str, total: u64, unit: &'static str, visible: bool) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let target = match visible && terminal {
            true => ProgressDrawTarget::stderr(),
            false => ProgressDrawTarget::hidden(),
        };
        let bar = ProgressBar::with_draw_target(Some(total), target).with_style(
            ProgressStyle::with_template(&format!(
                "{{prefix}} {{bar:30}} {{pos}}/{{len}} {unit} {{msg}} [{{elapsed}} < {{eta}}, {{per_sec}}]"
            ))
            .expect("valid progress template"),
        );
        bar.set_prefix(label.to_string());
        let lines = (visible && !terminal).then(|| Mutex::new(PlainLines::new(interval(), 0, 0)));
        Self {
            bar,
            lines,
            label: label.to_string(),
            unit,
        }
    }

    /// Progress that shows nothing.
    pub fn hidden() -> Self {
        Self::new("", 0, "", false)
    }

    /// Starts from `position` (work done before, e.g. by the run this one resumes): the rate and
    /// the time left count from here.
    pub fn start_at(&self, position: u64) {
        self.bar.set_position(position);
        self.bar.reset_eta();
        if let Some(lines) = &self.lines {
            *lines.lock().unwrap_or_else(|e| e.into_inner()) =
                PlainLines::new(interval(), position, self.tenth(position));
        }
    }

    pub fn set_position(&self, position: u64) {
        self.bar.set_position(position);
        self.report();
    }

    pub fn inc(&self, delta: u64) {
        self.bar.inc(delta);
        self.report();
    }

    pub fn set_length(&self, total: u64) {
        self.bar.set_length(total);
    }

    /// A note shown after the counts (e.g. `loss 0.1234`).
    pub fn set_message(&self, message: String) {
        self.bar.set_message(message);
    }

    /// Runs `f` (which prints) with the bar out of the way.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    /// Done: the bar stays on the terminal.
    pub fn finish(&self) {
        self.bar.finish();
    }

    /// Done: the bar is removed from the terminal.
    pub fn finish_and_clear(&self) {
        self.bar.finish_and_clear();
    }

    /// Stopped early (an error, an interrupt): the bar stays where it was.
    pub fn abandon(&self) {
        self.bar.abandon();
    }

    /// The tenth of the work `position` is in (10 when done).
    fn tenth(&self, position: u64) -> u64 {
        let total = self.bar.length().unwrap_or(0);
        (position.min(total) * 10).checked_div(total).unwrap_or(0)
    }

    /// Prints a plain line when one is due.
    fn report(&self) {
        let Some(lines) = &self.lines else {
            return;
        };
        let position = self.bar.position();
        let now = Instant::now();
        let mut lines = lines.lock().unwrap_or_else(|e| e.into_inner());
        if lines.due(self.tenth(position), now) {
            eprintln!("{}", self.line(position, lines.rate(position, now)));
        }
    }

    /// `difftune LABEL: DONE/TOTAL UNIT (P%), RATE UNIT/s, TIME left[, MESSAGE]`, with `rate`
    /// units per second.
    fn line(&self, position: u64, rate: Option<f64>) -> String {
        let total = self.bar.length().unwrap_or(0);
        let mut line = format!("difftune {}: {position}/{total} {}", self.label, self.unit);
        if let Some(percent) = (position.min(total) * 100).checked_div(total) {
            line += &format!(" ({percent}%)");
        }
        if let Some(rate) = rate {
            line += &format!(", {} {}/s", significant(rate), self.unit);
            if position < total {
                let left = Duration::from_secs_f64((total - position) as f64 / rate);
                line += &format!(", {} left", HumanDuration(left));
            }
        }
        let message = self.bar.message();
        if !message.is_empty() {
            line += &format!(", {message}");
        }
        line
    }
}

/// `value` with three significant digits (0.0123, 1.23, 123).
fn significant(value: f64) -> String {
    let decimals = (2 - value.abs().log10().floor() as i32).clamp(0, 6) as usize;
    format!("{value:.decimals$}")
}

/// The interval between plain lines: [`INTERVAL_ENV`] or 30 s.
fn interval() -> Duration {
    std::env::var(INTERVAL_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(DEFAULT_INTERVAL, Duration::from_secs_f64)
}

/// When plain lines are due (at each new tenth of the work, and once the interval has passed
/// since the last line) and the rate they report (the mean since the start).
struct PlainLines {
    interval: Duration,
    started: Instant,
    start_position: u64,
    last_line: Instant,
    last_tenth: u64,
}

impl PlainLines {
    fn new(interval: Duration, position: u64, tenth: u64) -> Self {
        let now = Instant::now();
        Self {
            interval,
            started: now,
            start_position: position,
            last_line: now,
            last_tenth: tenth,
        }
    }

    /// Whether a line is due at `now` with the work in tenth `tenth`; if so, it counts as printed.
    fn due(&mut self, tenth: u64, now: Instant) -> bool {
        let due = tenth > self.last_tenth || now.duration_since(self.last_line) >= self.interval;
        if due {
            self.last_line = now;
            self.last_tenth = self.last_tenth.max(tenth);
        }
        due
    }

    /// Units per second since the start, once some are done.
    fn rate(&self, position: u64, now: Instant) -> Option<f64> {
        let seconds = now.duration_since(self.started).as_secs_f64();
        let done = position.saturating_sub(self.start_position);
        (done > 0 && seconds > 0.0).then(|| done as f64 / seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_due_at_each_tenth_and_after_the_interval() {
        let mut lines = PlainLines::new(Duration::from_secs(30), 0, 0);
        let start = lines.started;
        let at = |s| start + Duration::from_secs(s);
        assert!(!lines.due(0, at(10)));
        assert!(lines.due(1, at(11)), "a new tenth");
        assert!(!lines.due(1, at(20)));
        assert!(lines.due(1, at(41)), "30 s after the last line");
        assert!(!lines.due(1, at(42)));
        assert!(lines.due(3, at(43)), "tenths skipped at once give one line");
        assert!(!lines.due(3, at(44)));
        assert!(lines.due(10, at(45)), "done");
    }

    #[test]
    fn the_rate_counts_from_the_start_position() {
        let lines = PlainLines::new(Duration::from_secs(30), 100, 1);
        let later = lines.started + Duration::from_secs(20);
        assert_eq!(lines.rate(100, later), None);
        assert_eq!(lines.rate(140, later), Some(2.0));
    }

    #[test]
    fn a_plain_line_has_counts_rate_time_left_and_message() {
        let progress = Progress::new("cache", 240, "images", false);
        assert_eq!(progress.line(0, None), "difftune cache: 0/240 images (0%)");
        progress.set_message("loss 0.1234".into());
        assert_eq!(
            progress.line(120, Some(2.0)),
            "difftune cache: 120/240 images (50%), 2.00 images/s, 60 seconds left, loss 0.1234"
        );
        assert_eq!(
            progress.line(240, Some(0.012345)),
            "difftune cache: 240/240 images (100%), 0.0123 images/s, loss 0.1234"
        );
        assert_eq!(significant(1234.5), "1234");
    }
}
