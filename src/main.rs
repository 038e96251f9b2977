use anyhow::Result;
use clap::Parser;

fn main() -> Result<()> {
    let cli = difftune::cli::Cli::parse();
    difftune::cli::run(cli)
}
