//! SIGINT and SIGTERM for the long-running commands (`train`, `compare`, `cache`, `sample`).
//!
//! What the first signal does is the command's choice ([`FirstSignal`]): ask the run to stop at
//! its next checkpoint (the flag of [`Interrupt::flag`]), or exit at once when everything finished
//! is already on disk. A second signal always exits at once. A command stopped by a signal exits
//! with the shell's convention, 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), which
//! job schedulers and `timeout` read: see [`Interrupted`] and [`exit_code`].
//!
//! Exiting from the signal thread uses `_exit`: `exit` would run libtorch's static destructors
//! while the main thread still runs torch ops, which then fail inside a half-destroyed torch
//! (seen as panics such as "Invalid (backend, op) pair" after two SIGINTs 10 ms apart). Nothing
//! is lost by skipping them: files are written atomically (a checkpoint being written stays a temp
//! folder, which resume ignores) and the folder lock is the OS's.
pub use crate::error::{Interrupted, Signal};
use anyhow::Result;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

/// What the first signal does to a command.
#[derive(Debug, Clone, Copy)]
pub enum FirstSignal {
    /// Sets the flag: the command stops at its next safe point (says which) and returns
    /// [`Interrupted`].
    Stop(&'static str),
    /// Exits at once with the signal's code; says what is kept (what a rerun takes up).
    Exit(&'static str),
}

/// The exit status for a command's error: a signal's code for [`Interrupted`], 1 otherwise.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    error
        .downcast_ref::<Interrupted>()
        .map_or(1, Interrupted::exit_code)
}

/// The installed handler: the stop flag and the first signal received.
pub struct Interrupt {
    flag: Arc<AtomicBool>,
    signal: Arc<AtomicI32>,
}

impl Interrupt {
    /// Handles SIGINT and SIGTERM for `command` from now on, on a thread of its own.
    pub fn install(command: &'static str, first: FirstSignal) -> Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        let signal = Arc::new(AtomicI32::new(0));
        let mut signals = Signals::new([SIGINT, SIGTERM])?;
        let (thread_flag, thread_signal) = (flag.clone(), signal.clone());
        std::thread::Builder::new()
            .name("difftune-signals".into())
            .spawn(move || {
                for number in signals.forever() {
                    let Some(received) = Signal::from_raw(number) else {
                        continue;
                    };
                    let _ = thread_signal.compare_exchange(
                        0,
                        number,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    );
                    on_signal(
                        command,
                        first,
                        received,
                        thread_flag.swap(true, Ordering::SeqCst),
                    );
                }
            })?;
        Ok(Self { flag, signal })
    }

    /// Set once a signal arrived: the run stops at its next safe point.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }

    /// The error for a run that stopped on an interrupt, saying how to go on.
    pub fn stopped(&self, message: String) -> anyhow::Error {
        Interrupted {
            signal: Signal::from_raw(self.signal.load(Ordering::SeqCst)),
            message,
        }
        .into()
    }
}

/// Reports `received` and exits when it is the second signal or the command exits at once.
fn on_signal(command: &str, first: FirstSignal, received: Signal, repeated: bool) {
    let code = i32::from(received.exit_code());
    if repeated {
        eprintln!("difftune {command}: second signal ({received}), exiting now without saving");
        signal_hook::low_level::exit(code);
    }
    match first {
        FirstSignal::Stop(what) => eprintln!(
            "difftune {command}: {received} received, {what} (a second signal exits at once)"
        ),
        FirstSignal::Exit(kept) => {
            eprintln!("difftune {command}: {received} received, exiting now; {kept}");
            signal_hook::low_level::exit(code);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_exits_with_128_plus_its_number() {
        assert_eq!(Signal::Interrupt.exit_code(), 130);
        assert_eq!(Signal::Terminate.exit_code(), 143);
        let stopped = |signal| {
            anyhow::Error::from(Interrupted {
                signal,
                message: "stopped".into(),
            })
            .context("train")
        };
        assert_eq!(exit_code(&stopped(Some(Signal::Terminate))), 143);
        assert_eq!(exit_code(&stopped(None)), 130);
        assert_eq!(exit_code(&anyhow::anyhow!("bad input")), 1);
    }
}
