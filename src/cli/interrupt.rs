//! Ctrl-C and SIGTERM for the long-running commands: the first asks the run to stop at its next
//! checkpoint (the returned flag), the second exits at once.
use anyhow::Result;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Installs the handler for `command`; `first` says what the first interrupt does.
pub fn install(command: &'static str, first: &'static str) -> Result<Arc<AtomicBool>> {
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            // A checkpoint being written stays a temp folder, which resume ignores.
            eprintln!("difftune {command}: second interrupt, exiting now without saving");
            std::process::exit(130);
        }
        eprintln!(
            "difftune {command}: interrupt received (SIGINT or SIGTERM), {first} (interrupt again to exit at once)"
        );
    })?;
    Ok(interrupt)
}
