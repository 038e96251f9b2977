//! `difftune compare`: the study in one command. Trains every tuning method on the same data and
//! budget (several runs each, at a learning rate chosen per method on held-out training images
//! when asked), samples the same prompts and seeds with each (and with the base model, and along
//! each run's budget), scores them with FID, KID, precision and recall (and a content classifier
//! on synthetic data), times every method's step interleaved with the others, and writes the
//! study's tables, plots and sample grids.
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
pub mod claim;
pub mod config;
pub mod content;
pub mod grid;
mod lr_search;
pub mod machine;
mod outputs;
pub mod plots;
mod prepare;
pub mod presets;
pub mod ranks;
pub mod report;
mod results;
pub mod runner;
mod sampling;
pub mod score;
pub mod split;
mod stage;
pub mod teams;
pub mod timing;
pub mod tiny_vae;
mod training;
pub mod units;
mod wave_progress;
pub mod workers;

pub use config::CompareConfig;
pub use report::StudyResults;
use runner::Study;
pub use runner::{run, CompareOptions, Outcome};
