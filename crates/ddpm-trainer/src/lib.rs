//! Training diffusion models on candle.
//!
//! [`Trainer`] holds a run's complete state (model, EMA of the weights, AdamW moments, RNG
//! state, data position, step) and takes one optimizer step at a time: DDPM algorithm 1 with
//! the loss ([`Loss`]: the seed's L1, L2 or Huber), objective (eps, x0 or v) and optional
//! min-SNR weighting of [`TrainConfig`], gradient accumulation, global-norm clipping, linear
//! warmup then constant or cosine learning rate, and diffusers' EMA warmup schedule.
//!
//! Checkpoints are single safetensors files written atomically; [`Trainer::resume`] continues a
//! run bit for bit. [`run`] drives a whole run with a progress bar, JSON-lines metrics, a loss
//! curve and sample grids drawn with the EMA weights.
//!
//! ```
//! use std::sync::Arc;
//! use candle_core::Device;
//! use ddpm_data::ImageSet;
//! use ddpm_trainer::{run, TrainConfig, Trainer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The default recipe is `TrainConfig::preset("mnist")` on the embedded digits at 16x16
//! // (minutes); here the `tiny` one, 4 steps on 64 digits (a second).
//! let mut config = TrainConfig::preset("tiny")?;
//! config.steps = 4;
//! let data = Arc::new(ImageSet::embedded_mnist()?.take(64).resize_to(16));
//! let mut trainer = Trainer::new(config, data, "embedded mnist", &Device::Cpu)?;
//! let out = tempfile::tempdir()?;
//! let summary = run(&mut trainer, out.path(), false)?;
//! assert_eq!(summary.steps, 4);
//! assert!(summary.checkpoint.is_file() && summary.samples.is_file());
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod checkpoint;
mod config;
mod lock;
pub mod quality;
mod run;
mod trainer;

pub use checkpoint::{
    CHECKPOINT_FORMAT, Checkpoint, atomic_write, checkpoint_name, list_checkpoints,
};
pub use config::{AdamWConfig, EmaConfig, Loss, LrSchedule, RECIPES, TrainConfig};
pub use lock::{LOCK_FILE, RunLock};
pub use run::{
    GoodCheckpoint, RunPaths, RunSummary, draw_loss_curve, run, run_locked, sample_ema,
    sample_labels,
};
pub use trainer::{AdamW, StepMetrics, TrainError, Trainer, ema_step};
