use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = difftune::cli::Cli::parse();
    match difftune::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // As `main() -> Result` prints it: the message and its causes.
            eprintln!("Error: {error:?}");
            ExitCode::from(difftune::cli::exit_code(&error))
        }
    }
}
