//! Image-quality evaluation: FID and KID computed exactly as pytorch-fid (and, for KID,
//! torch-fidelity / clean-fid) compute them, from image folders, image tensors or saved
//! statistics.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use difftune::eval::{frechet_distance, resolve_weights, FidModel, Statistics};
//! let model = FidModel::load(&resolve_weights(None)?, tch::Device::Cpu, 2048)?;
//! let real = difftune::eval::images::list_images("real".as_ref())?;
//! let fake = difftune::eval::images::list_images("fake".as_ref())?;
//! let a = Statistics::from_features(model.features_of_images(&real)?.as_ref())?;
//! let b = Statistics::from_features(model.features_of_images(&fake)?.as_ref())?;
//! println!("FID {}", frechet_distance(&a, &b)?);
//! # Ok(()) }
//! ```
pub mod bootstrap;
pub mod classifier;
pub mod features;
pub mod fid;
pub mod images;
pub mod inception;
pub mod kid;
pub mod precision_recall;
pub mod stats;

pub use bootstrap::{Bootstrap, Estimate};
pub use features::{default_weights_path, resolve_weights, FidModel};
pub use fid::frechet_distance;
pub use kid::{kid, Kid};
pub use stats::Statistics;
