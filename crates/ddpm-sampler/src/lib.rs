//! Sampling from a trained diffusion model: DDPM ancestral sampling and DDIM.
//!
//! - [`DdpmSampler`]: DDPM algorithm 2 / eq. 11, the seed's `sample_timestep`, with diffusers'
//!   `DDPMScheduler` options: `fixed_small` or `fixed_large` variance, clipping of the predicted
//!   `x_0`, epsilon / sample / v prediction, and optionally fewer steps than `T`.
//! - [`DdimSampler`]: DDIM eq. 12 with `eta`, `leading` / `trailing` / `linspace` spacing,
//!   `steps_offset`, `set_alpha_to_one`, as diffusers' `DDIMScheduler`.
//! - [`SchedulerConfig`]: a diffusers `scheduler_config.json`, so a model folder from the hub
//!   samples with the schedule it was trained with.
//! - [`sample`]: the loop. One model call per step for the whole batch; every random number
//!   comes from a seeded [`NoiseSource`], so a seed, a model and settings give the same image
//!   on every run and thread count; each step is reported to a callback that may keep any `x_t`
//!   (a cheap reference-counted handle) without slowing the plain path. Nothing is copied to
//!   the host along the way.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use ddpm_forward::NoiseSource;
//! use ddpm_sampler::{sample, DdimConfig, DdimSampler, Scheduler};
//! use ddpm_schedule::{Schedule, ScheduleConfig};
//!
//! # fn main() -> candle_core::Result<()> {
//! let schedule = Schedule::new(ScheduleConfig::ddpm_linear())?;
//! let ddim = DdimSampler::new(&schedule, DdimConfig::new(10, 0.0))?;
//! assert_eq!(ddim.timesteps(), &[900, 800, 700, 600, 500, 400, 300, 200, 100, 0]);
//!
//! // Any `Fn(&Tensor, &Tensor) -> Result<Tensor>` is a model; a U-Net is one too.
//! let model = |x: &Tensor, _t: &Tensor| x.zeros_like();
//! let mut rng = NoiseSource::new(0);
//! let init = rng.randn((2, 1, 8, 8), &Device::Cpu)?;
//! let mut seen = Vec::new();
//! let out = sample(&model, &ddim, init, &mut rng, |p| seen.push(p.timestep))?;
//! assert_eq!(out.dims(), &[2, 1, 8, 8]);
//! assert_eq!(seen.len(), 10);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod config;

use candle_core::{DType, Tensor};
use ddpm_forward::{NoiseSource, Prediction};
use ddpm_schedule::{PosteriorCoefficients, Schedule};

/// What [`sample`] calls: any model with a prediction from `x_t` and `t` (a closure, your own
/// network, or `ddpm-unet`'s U-Nets).
pub use ddpm_forward::Denoiser;

pub use config::{
    DdimConfig, DdpmConfig, SamplerKind, SchedulerConfig, TimestepSpacing, VarianceType,
    spaced_timesteps,
};

/// What one reverse step produces.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// `x_{t-1}` (or the sample at the next timestep of a shortened schedule).
    pub prev_sample: Tensor,
    /// The model's estimate of `x_0` at this step (after clipping, if on).
    pub pred_original_sample: Tensor,
}

/// A reverse process over a fixed list of timesteps.
pub trait Scheduler {
    /// The timesteps visited, in order (descending).
    fn timesteps(&self) -> &[usize];

    /// The step at position `index` of [`Scheduler::timesteps`], drawing any noise it needs
    /// from `rng` (and none when it needs none, so the stream stays aligned).
    fn step(
        &self,
        index: usize,
        model_output: &Tensor,
        sample: &Tensor,
        rng: &mut NoiseSource,
    ) -> candle_core::Result<StepOutput>;
}

/// `x_0` and `eps` estimates from a model output, with `abar_t` on the host
/// ([`ddpm_forward::x0_and_eps`]).
fn predict(
    prediction: Prediction,
    model_output: &Tensor,
    sample: &Tensor,
    abar_t: f64,
    need_eps: bool,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    if model_output.dims() != sample.dims() {
        candle_core::bail!(
            "the model returned shape {:?} for a sample of shape {:?}",
            model_output.dims(),
            sample.dims()
        );
    }
    let (a, s) = (abar_t.sqrt(), (1.0 - abar_t).sqrt());
    ddpm_forward::x0_and_eps(prediction, model_output, sample, (&a, &s), need_eps)
}

fn timestep_at(timesteps: &[usize], index: usize) -> candle_core::Result<usize> {
    timesteps.get(index).copied().ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "step index {index} out of range 0..{}",
            timesteps.len()
        ))
    })
}

/// Standard normal noise shaped like `sample` when `needed`, drawing nothing otherwise so the
/// stream stays aligned.
fn draw_noise(
    needed: bool,
    sample: &Tensor,
    rng: &mut NoiseSource,
) -> candle_core::Result<Option<Tensor>> {
    if needed {
        Ok(Some(
            rng.randn(sample.shape(), sample.device())?
                .to_dtype(sample.dtype())?,
        ))
    } else {
        Ok(None)
    }
}

fn clip(x0: Tensor, on: bool, range: f64) -> candle_core::Result<Tensor> {
    if on {
        x0.clamp(-range as f32, range as f32)
    } else {
        Ok(x0)
    }
}

fn check_range(what: &str, v: f64) -> candle_core::Result<()> {
    if !(v.is_finite() && v > 0.0) {
        candle_core::bail!("{what} must be a positive number, got {v}");
    }
    Ok(())
}

/// DDPM ancestral sampling (DDPM eq. 11, algorithm 2): diffusers' `DDPMScheduler.step`.
#[derive(Debug, Clone)]
pub struct DdpmSampler {
    abar: Vec<f64>,
    config: DdpmConfig,
    timesteps: Vec<usize>,
}

impl DdpmSampler {
    /// A sampler over `schedule`'s timesteps (all of them, or `num_inference_steps` spaced).
    pub fn new(schedule: &Schedule, config: DdpmConfig) -> candle_core::Result<Self> {
        let t_max = schedule.num_train_timesteps();
        check_range("clip_sample_range", config.clip_sample_range)?;
        let timesteps = match config.num_inference_steps {
            None => (0..t_max).rev().collect(),
            Some(n) => spaced_timesteps(t_max, n, config.timestep_spacing, config.steps_offset)?,
        };
        Ok(Self {
            abar: schedule.alphas_cumprod().to_vec(),
            config,
            timesteps,
        })
    }

    /// The settings.
    pub fn config(&self) -> &DdpmConfig {
        &self.config
    }

    /// The step at `index` with caller-given `noise` (`None` adds none; it is ignored at
    /// `t = 0`, where DDPM adds no noise).
    pub fn step_with_noise(
        &self,
        index: usize,
        model_output: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> candle_core::Result<StepOutput> {
        let c = &self.config;
        let t = timestep_at(&self.timesteps, index)?;
        let abar_t = self.abar[t];
        let abar_prev = match self.timesteps.get(index + 1) {
            Some(&p) => self.abar[p],
            None => 1.0,
        };
        let posterior = PosteriorCoefficients::new(abar_t, abar_prev);
        let (x0, _) = predict(c.prediction, model_output, sample, abar_t, false)?;
        let x0 = clip(x0, c.clip_sample, c.clip_sample_range)?;
        // DDPM eq. 7: the posterior mean.
        let mut prev = ((&x0 * posterior.x0)? + (sample * posterior.x_t)?)?;
        if t > 0
            && let Some(noise) = noise
        {
            let variance = match c.variance_type {
                VarianceType::FixedSmall => posterior.variance.max(1e-20),
                VarianceType::FixedLarge => 1.0 - abar_t / abar_prev,
            };
            prev = (prev + (noise * variance.sqrt())?)?;
        }
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: x0,
        })
    }
}

impl Scheduler for DdpmSampler {
    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn step(
        &self,
        index: usize,
        model_output: &Tensor,
        sample: &Tensor,
        rng: &mut NoiseSource,
    ) -> candle_core::Result<StepOutput> {
        // DDPM adds no noise at t = 0, so draws none there.
        let needed = self.timesteps.get(index).is_some_and(|&t| t > 0);
        let noise = draw_noise(needed, sample, rng)?;
        self.step_with_noise(index, model_output, sample, noise.as_ref())
    }
}

/// DDIM sampling (Song et al. 2021, eq. 12): diffusers' `DDIMScheduler.step`.
#[derive(Debug, Clone)]
pub struct DdimSampler {
    abar: Vec<f64>,
    final_abar: f64,
    step_ratio: usize,
    config: DdimConfig,
    timesteps: Vec<usize>,
}

impl DdimSampler {
    /// A sampler over `config.num_inference_steps` of `schedule`'s timesteps. More steps than
    /// `T`, zero steps, a negative or non-finite `eta` are errors.
    pub fn new(schedule: &Schedule, config: DdimConfig) -> candle_core::Result<Self> {
        if !(config.eta.is_finite() && config.eta >= 0.0) {
            candle_core::bail!("DDIM eta must be >= 0, got {}", config.eta);
        }
        check_range("clip_sample_range", config.clip_sample_range)?;
        let t_max = schedule.num_train_timesteps();
        let timesteps = spaced_timesteps(
            t_max,
            config.num_inference_steps,
            config.timestep_spacing,
            config.steps_offset,
        )?;
        let abar = schedule.alphas_cumprod().to_vec();
        Ok(Self {
            final_abar: if config.set_alpha_to_one {
                1.0
            } else {
                abar[0]
            },
            abar,
            step_ratio: t_max / config.num_inference_steps,
            config,
            timesteps,
        })
    }

    /// The settings.
    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    /// The step at `index` with caller-given `noise` (used only when `eta > 0`).
    pub fn step_with_noise(
        &self,
        index: usize,
        model_output: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> candle_core::Result<StepOutput> {
        let c = &self.config;
        let t = timestep_at(&self.timesteps, index)?;
        // As diffusers: the previous timestep is t - T / n, whatever the spacing.
        let abar_t = self.abar[t];
        let abar_prev = match t.checked_sub(self.step_ratio) {
            Some(p) => self.abar[p],
            None => self.final_abar,
        };
        let beta_prod_t = 1.0 - abar_t;
        let (x0, eps) = predict(c.prediction, model_output, sample, abar_t, true)?;
        let x0 = clip(x0, c.clip_sample, c.clip_sample_range)?;
        let eps = if c.use_clipped_model_output {
            ((sample - (&x0 * abar_t.sqrt())?)? / beta_prod_t.sqrt())?
        } else {
            eps.expect("asked for eps")
        };
        // DDIM eq. 16: sigma_t^2 = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev),
        // the DDPM posterior's variance.
        let variance = PosteriorCoefficients::new(abar_t, abar_prev).variance;
        let std_dev = c.eta * variance.sqrt();
        let direction = (1.0 - abar_prev - std_dev * std_dev).max(0.0).sqrt();
        let mut prev = ((&x0 * abar_prev.sqrt())? + (eps * direction)?)?;
        if c.eta > 0.0 {
            let noise = noise
                .ok_or_else(|| candle_core::Error::Msg("DDIM with eta > 0 needs noise".into()))?;
            prev = (prev + (noise * std_dev)?)?;
        }
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: x0,
        })
    }
}

impl Scheduler for DdimSampler {
    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn step(
        &self,
        index: usize,
        model_output: &Tensor,
        sample: &Tensor,
        rng: &mut NoiseSource,
    ) -> candle_core::Result<StepOutput> {
        let noise = draw_noise(self.config.eta > 0.0, sample, rng)?;
        self.step_with_noise(index, model_output, sample, noise.as_ref())
    }
}

/// Where the loop stands, handed to the callback after each step.
#[derive(Debug)]
pub struct Progress<'a> {
    /// 0-based index of the step just taken.
    pub index: usize,
    /// Steps in all.
    pub num_steps: usize,
    /// The timestep of the step just taken.
    pub timestep: usize,
    /// The sample after the step. Cloning it is cheap (a shared handle), so keep the ones you
    /// want for a denoising-progression picture.
    pub sample: &'a Tensor,
    /// The model's `x_0` estimate at this step.
    pub pred_original_sample: &'a Tensor,
}

/// Runs the reverse process from `init` (`x_T`, e.g. `rng.randn(..)` or noise you pinned):
/// one model call per step for the whole batch, step noise from `rng`, `on_step` after each
/// step. Returns the final sample (not clamped).
///
/// The loop knows nothing of the model but [`Denoiser`]. A model may offer something to hold
/// while it runs with fixed weights: `ddpm-unet`'s `Unet::freeze_weights` makes its
/// convolutions transform their kernels once, not once per step (the same bits either way).
pub fn sample<D, S>(
    model: &D,
    scheduler: &S,
    init: Tensor,
    rng: &mut NoiseSource,
    mut on_step: impl FnMut(&Progress<'_>),
) -> candle_core::Result<Tensor>
where
    D: Denoiser + ?Sized,
    S: Scheduler + ?Sized,
{
    let batch = init.dim(0)?;
    let device = init.device().clone();
    let timesteps = scheduler.timesteps();
    let mut x = init;
    for (index, &t) in timesteps.iter().enumerate() {
        let t_batch = Tensor::full(t as u32, batch, &device)?;
        let model_output = model.predict(&x, &t_batch)?.to_dtype(DType::F32)?;
        let out = scheduler.step(index, &model_output, &x, rng)?;
        x = out.prev_sample;
        on_step(&Progress {
            index,
            num_steps: timesteps.len(),
            timestep: t,
            sample: &x,
            pred_original_sample: &out.pred_original_sample,
        });
    }
    Ok(x)
}
