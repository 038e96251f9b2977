//! `difftune compare`: the study in one command. Trains every tuning method on the same data and
//! budget, samples the same prompts and seeds with each (and with the base model), scores them
//! with FID/KID, measures their costs and writes the study's tables, plots and sample grids.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use difftune::compare::{run, CompareOptions, Outcome};
//! let options = CompareOptions {
//!     config: difftune::settings::compare::preset("tiny", &[])?,
//!     out: "runs/compare-tiny".into(),
//!     progress: false,
//!     interrupt: Default::default(),
//! };
//! if let Outcome::Finished(results) = run(&options)? {
//!     println!("{}", results.table1());
//! }
//! # Ok(()) }
//! ```
pub mod config;
pub mod grid;
pub mod machine;
mod outputs;
pub mod plots;
mod prepare;
pub mod presets;
pub mod report;
pub mod runner;
mod sampling;
pub mod score;
mod stage;
pub mod tiny_vae;
mod training;

pub use config::CompareConfig;
pub use report::StudyResults;
use runner::Study;
pub use runner::{run, CompareOptions, Outcome};
