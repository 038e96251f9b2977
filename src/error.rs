//! The errors a caller branches on, typed: settings that cannot run (fix them, do not retry), a
//! damaged checkpoint (resume from another), a lost rank (relaunch), an interrupted run (resume).
//! They travel as `anyhow::Error` like every other error; reach them with
//! [`anyhow::Error::downcast_ref`], which sees through the context added on the way up:
//!
//! ```
//! use difftune::error::SettingsError;
//! let err = difftune::peft::MethodSettings::parse("lora", "rnak = 8").unwrap_err();
//! assert!(matches!(
//!     err.downcast_ref::<SettingsError>(),
//!     Some(SettingsError::Method { method, .. }) if method == "lora"
//! ));
//! ```
//!
//! Every other error (I/O, a tensor kernel, a malformed image) stays an untyped message.
use std::path::PathBuf;
use thiserror::Error;

/// Settings that cannot run, found before any work starts.
#[derive(Debug, Error)]
pub enum SettingsError {
    /// A tuning method name that is not registered.
    #[error("unknown tuning method `{name}` (known: {known})")]
    UnknownMethod { name: String, known: String },
    /// A method's own settings: an unknown key, a value of the wrong type or out of range.
    #[error("settings of method `{method}`: {reason}")]
    Method { method: String, reason: String },
    /// Any other setting: `setting` is its dotted name (`train.steps`), the section or file that
    /// holds it, or the option that gave it (`--data`).
    #[error("{setting}: {reason}")]
    Invalid { setting: String, reason: String },
}

impl SettingsError {
    /// [`SettingsError::Invalid`] for `setting`, with `reason` (anything that displays: a message,
    /// or the error of the parser or check that refused it, shown with its causes).
    pub fn invalid(setting: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self::Invalid {
            setting: setting.into(),
            reason: format!("{reason:#}"),
        }
    }

    /// The setting (or section, or option) at fault.
    pub fn setting(&self) -> &str {
        match self {
            Self::UnknownMethod { .. } => "method",
            Self::Method { method, .. } => method,
            Self::Invalid { setting, .. } => setting,
        }
    }
}

/// A checkpoint whose files cannot be trusted.
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// One of its files differs from the checksum recorded when it was written.
    #[error("{file} does not match its checksum (damaged)")]
    Damaged { file: String },
    /// It has no checksums (written by a difftune that recorded none), so it cannot be verified.
    #[error(
        "it has no SHA256SUMS: written by a difftune that recorded no checkpoint checksums, \
         it cannot be verified (to vouch for it: cd {} && sha256sum {files} > SHA256SUMS)",
        dir.display()
    )]
    Unverified { dir: PathBuf, files: String },
    /// A run folder holds checkpoints, none of which verifies: the run cannot resume.
    #[error(
        "no checkpoint in {} can be trusted, so the run cannot resume:\n{}\n(move them away to start the run over)",
        root.display(),
        rejected.iter().map(|(dir, why)| format!("  {}: {why}", dir.display())).collect::<Vec<_>>().join("\n")
    )]
    NoneTrusted {
        root: PathBuf,
        /// Each checkpoint folder with why it was refused.
        rejected: Vec<(PathBuf, String)>,
    },
}

/// A collective operation of a data-parallel group failed: a rank died, stopped answering or
/// timed out. Relaunching the run (`--resume`) continues from its last checkpoint.
#[derive(Debug, Error)]
#[error("{op} failed on rank {rank} of {world_size}: {peers}. c10d: {message}")]
pub struct LostRank {
    pub op: String,
    /// The rank that saw the failure.
    pub rank: usize,
    pub world_size: usize,
    /// Which peers no longer answer, as far as this rank could tell.
    pub peers: String,
    /// c10d's own message.
    pub message: String,
}

/// A training run stopped because a step's loss or gradient norm was not finite: nothing of that
/// step was applied or saved, and the message says which checkpoint to resume from (with a lower
/// learning rate). `compare` counts a learning-rate candidate that diverges as one not to choose.
#[derive(Debug, Error)]
#[error("{message}")]
pub struct Diverged {
    /// The step whose loss or gradient norm was not finite.
    pub step: usize,
    pub message: String,
}

/// The signals that stop a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT: Ctrl-C.
    Interrupt,
    /// SIGTERM: `timeout`, SLURM, `docker stop`, Kubernetes, torchrun stopping its workers.
    Terminate,
}

impl Signal {
    /// The signal of number `number`, when it is one that stops a run.
    pub fn from_raw(number: i32) -> Option<Self> {
        match number {
            signal_hook::consts::SIGINT => Some(Self::Interrupt),
            signal_hook::consts::SIGTERM => Some(Self::Terminate),
            _ => None,
        }
    }

    pub fn raw(self) -> i32 {
        match self {
            Self::Interrupt => signal_hook::consts::SIGINT,
            Self::Terminate => signal_hook::consts::SIGTERM,
        }
    }

    /// The exit status of a process this signal stopped: 128 + its number, the shell's
    /// convention that job schedulers and `timeout` read (130 for SIGINT, 143 for SIGTERM).
    pub fn exit_code(self) -> u8 {
        128 + self.raw() as u8
    }
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Interrupt => "SIGINT",
            Self::Terminate => "SIGTERM",
        })
    }
}

/// A run stopped early on SIGINT or SIGTERM, its work saved: running the same command again
/// (`train --resume`, `compare` with the same folder) continues it. The command exits with
/// [`Interrupted::exit_code`].
#[derive(Debug, Error)]
#[error("{message}")]
pub struct Interrupted {
    /// The signal this process received; `None` when the stop came from another rank's.
    pub signal: Option<Signal>,
    /// What stopped, and how to resume from where.
    pub message: String,
}

impl Interrupted {
    /// 128 + the signal's number; a rank stopped by another rank's interrupt exits as SIGINT's.
    pub fn exit_code(&self) -> u8 {
        self.signal.unwrap_or(Signal::Interrupt).exit_code()
    }
}
