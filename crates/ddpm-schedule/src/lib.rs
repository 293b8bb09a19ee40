//! Noise schedules for denoising diffusion models.
//!
//! A diffusion model is trained against a fixed sequence of noise levels `beta_1..beta_T`
//! (DDPM, Ho et al. 2020, section 2). Everything else the forward process and the samplers need
//! (`alpha_t`, the cumulative products `abar_t`, the posterior variance of DDPM eq. 7, the SNR)
//! derives from those betas. This crate computes all of it once, in `f64`, and hands it out as
//! `f32` tensors on the device you choose, with a per-sample gather for batched timesteps.
//!
//! The schedules match `diffusers`' `DDPMScheduler` (`linear`, `scaled_linear`,
//! `squaredcos_cap_v2`, `sigmoid`, and `rescale_betas_zero_snr`) to float32 precision.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use ddpm_schedule::{Schedule, ScheduleConfig, Table};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The seed's schedule: linear betas from 1e-4 to 0.02 over T = 300 steps.
//! let schedule = Schedule::new(ScheduleConfig::seed_linear())?;
//! assert_eq!(schedule.num_train_timesteps(), 300);
//! assert!(schedule.alphas_cumprod()[299] < schedule.alphas_cumprod()[0]);
//!
//! // Upload the tables and gather sqrt(abar_t) for a batch of timesteps: [B] -> [B, 1, 1, 1].
//! let tables = schedule.tensors(&Device::Cpu)?;
//! let t = Tensor::new(&[0u32, 150, 299], &Device::Cpu)?;
//! let coef = tables.gather(Table::SqrtAlphasCumprod, &t)?;
//! assert_eq!(coef.dims(), &[3, 1, 1, 1]);
//!
//! // A timestep outside 0..T is an error naming it, never a panic.
//! let bad = Tensor::new(&[300u32], &Device::Cpu)?;
//! let err = tables.gather(Table::Betas, &bad).unwrap_err();
//! assert!(err.to_string().contains("300"));
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod config;
mod posterior;
mod tables;

pub use config::{
    BetaSchedule, DIFFUSERS_BETA_SCHEDULES, MAX_TIMESTEPS, ScheduleConfig, ScheduleError,
};
pub use posterior::PosteriorCoefficients;
pub use tables::{Schedule, ScheduleTensors, Table};
