//! Fine-tuning the U-Net: run configuration, the objective and single step, AdamW, checkpoints,
//! metrics and the training loop.
pub mod batches;
pub mod checkpoint;
pub mod config;
pub mod divergence;
pub mod ema;
pub mod flops;
pub mod metrics;
pub mod optim;
pub mod precision;
pub mod prefetch;
pub mod step;
pub mod tensorboard;
pub mod timed_step;
pub mod trainer;
pub mod validation;

pub use config::{RunConfig, TrainConfig};
pub use trainer::{train, train_in, Resume, TrainOptions, TrainSummary};
