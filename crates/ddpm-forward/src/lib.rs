//! The DDPM forward process and the quantities training and sampling derive from it.
//!
//! - [`ForwardProcess::q_sample`]: `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps` with a timestep
//!   per sample (DDPM eq. 4), the closed form that makes training one step per example.
//! - The three things a network can be trained to predict ([`Prediction`]): the noise `eps`, the
//!   clean image `x_0`, or the velocity `v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0`
//!   (Salimans and Ho 2022, section 4), and conversions between them.
//! - The posterior `q(x_{t-1} | x_t, x_0)` of DDPM eqs. 6 and 7, which ancestral sampling draws from.
//! - [`NoiseSource`], a seeded normal generator that gives the same numbers on every device and
//!   thread count (candle's CPU `randn` cannot be seeded), with a state that can be saved and
//!   restored for exact resume.
//! - [`Denoiser`], the one thing a sampler needs of a model: a prediction from `x_t` and `t`.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use ddpm_forward::{ForwardProcess, NoiseSource, Prediction};
//! use ddpm_schedule::{Schedule, ScheduleConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = Device::Cpu;
//! let schedule = Schedule::new(ScheduleConfig::seed_linear())?;
//! let forward = ForwardProcess::new(&schedule, &device)?;
//! let mut rng = NoiseSource::new(42);
//!
//! let x0 = Tensor::zeros((2, 1, 8, 8), candle_core::DType::F32, &device)?;
//! let batch = forward.training_batch(&x0, &mut rng)?;
//! assert_eq!(batch.x_t.dims(), &[2, 1, 8, 8]);
//! // With x0 = 0, x_t is the noise scaled by sqrt(1 - abar_t).
//! let target = forward.target(Prediction::Epsilon, &x0, &batch.noise, &batch.t)?;
//! assert_eq!(target.dims(), batch.noise.dims());
//!
//! // The same seed gives the same noise, bit for bit.
//! let a = NoiseSource::new(7).randn((3, 4), &device)?.to_vec2::<f32>()?;
//! let b = NoiseSource::new(7).randn((3, 4), &device)?.to_vec2::<f32>()?;
//! assert_eq!(a, b);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod denoiser;
mod noise;

use candle_core::{Device, Tensor};
use ddpm_schedule::{Schedule, ScheduleTensors, Table};
use serde::{Deserialize, Serialize};

pub use denoiser::Denoiser;
pub use noise::{NoiseSource, NoiseState};

/// The diffusers version whose schedulers, `UNet2DModel` and file layouts the ddpm crates
/// were checked against (and which the configs they write name as `_diffusers_version`).
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// What a denoising network predicts (diffusers' `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Prediction {
    /// The noise `eps` that was added (DDPM; diffusers `epsilon`).
    #[serde(rename = "epsilon")]
    Epsilon,
    /// The clean sample `x_0` (diffusers `sample`).
    #[serde(rename = "sample")]
    Sample,
    /// The velocity `v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0` (diffusers `v_prediction`).
    #[serde(rename = "v_prediction")]
    VPrediction,
}

impl Prediction {
    /// The diffusers name: `epsilon`, `sample` or `v_prediction`.
    pub fn as_str(self) -> &'static str {
        match self {
            Prediction::Epsilon => "epsilon",
            Prediction::Sample => "sample",
            Prediction::VPrediction => "v_prediction",
        }
    }
}

impl std::str::FromStr for Prediction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "epsilon" | "eps" => Ok(Prediction::Epsilon),
            "sample" | "x0" => Ok(Prediction::Sample),
            "v_prediction" | "v" => Ok(Prediction::VPrediction),
            other => Err(format!(
                "unknown prediction type {other:?} (expected epsilon, sample or v_prediction)"
            )),
        }
    }
}

/// A coefficient of the forward process, `sqrt(abar_t)` or `sqrt(1 - abar_t)`: one host scalar
/// for the whole batch (a sampling step), or a tensor `[B, 1, 1, 1]` per sample (training).
pub trait Coefficient {
    /// `x` times the coefficient.
    fn times(&self, x: &Tensor) -> candle_core::Result<Tensor>;
    /// `x` over the coefficient.
    fn divide(&self, x: &Tensor) -> candle_core::Result<Tensor>;
}

impl Coefficient for f64 {
    fn times(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x * *self
    }
    fn divide(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x / *self
    }
}

impl Coefficient for Tensor {
    fn times(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_mul(self)
    }
    fn divide(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_div(self)
    }
}

/// The `x_0` and (when `need_eps`) noise estimates from a model's output, whatever it predicts,
/// given `x_t`'s coefficients `a = sqrt(abar_t)` and `s = sqrt(1 - abar_t)` (diffusers'
/// formulas, in its order of operations):
/// - eps: `x_0 = (x_t - s eps) / a`;
/// - `x_0`: `eps = (x_t - a x_0) / s`;
/// - v: `x_0 = a x_t - s v`, `eps = a v + s x_t`.
///
/// The one copy of these conversions: the sampler's steps call it with host scalars, the
/// [`ForwardProcess`] conversions with per-sample tensors.
pub fn x0_and_eps<C: Coefficient>(
    prediction: Prediction,
    model_output: &Tensor,
    x_t: &Tensor,
    (a, s): (&C, &C),
    need_eps: bool,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    same_shape("the model's output and x_t", model_output, x_t)?;
    Ok(match prediction {
        Prediction::Epsilon => {
            let x0 = a.divide(&(x_t - s.times(model_output)?)?)?;
            (x0, need_eps.then(|| model_output.clone()))
        }
        Prediction::Sample => {
            let eps = if need_eps {
                Some(s.divide(&(x_t - a.times(model_output)?)?)?)
            } else {
                None
            };
            (model_output.clone(), eps)
        }
        Prediction::VPrediction => {
            let x0 = (a.times(x_t)? - s.times(model_output)?)?;
            let eps = if need_eps {
                Some((a.times(model_output)? + s.times(x_t)?)?)
            } else {
                None
            };
            (x0, eps)
        }
    })
}

/// A noised training batch: what [`ForwardProcess::training_batch`] returns.
#[derive(Debug, Clone)]
pub struct TrainingBatch {
    /// The timestep of each sample, `[B]`, `u32`, uniform over `0..T`.
    pub t: Tensor,
    /// The standard normal noise that was added, shaped like `x_0`.
    pub noise: Tensor,
    /// `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise`.
    pub x_t: Tensor,
}

/// The posterior `q(x_{t-1} | x_t, x_0)` (DDPM eqs. 6 and 7).
#[derive(Debug, Clone)]
pub struct Posterior {
    /// `coef1_t x_0 + coef2_t x_t`, shaped like `x_t`.
    pub mean: Tensor,
    /// `beta_t (1 - abar_{t-1}) / (1 - abar_t)`, `[B, 1, 1, 1]`; exactly 0 at `t = 0`.
    pub variance: Tensor,
    /// Its logarithm with `t = 0` clipped to the `t = 1` value, `[B, 1, 1, 1]`.
    pub log_variance_clipped: Tensor,
}

/// The forward process of one schedule, its tables resident on one device.
#[derive(Debug, Clone)]
pub struct ForwardProcess {
    tables: ScheduleTensors,
}

impl ForwardProcess {
    /// Uploads `schedule`'s tables to `device`.
    pub fn new(schedule: &Schedule, device: &Device) -> candle_core::Result<Self> {
        Ok(Self::from_tensors(schedule.tensors(device)?))
    }

    /// Wraps tables already on a device.
    pub fn from_tensors(tables: ScheduleTensors) -> Self {
        Self { tables }
    }

    /// The schedule's tables.
    pub fn tables(&self) -> &ScheduleTensors {
        &self.tables
    }

    /// `T`, the number of training timesteps.
    pub fn num_train_timesteps(&self) -> usize {
        self.tables.num_train_timesteps()
    }

    fn coef(&self, table: Table, t: &Tensor, like: &Tensor) -> candle_core::Result<Tensor> {
        self.tables.gather_rank(table, t, like.rank())
    }

    /// `a_t * x + b_t * y` with per-sample coefficients from two tables.
    fn combine(
        &self,
        (ta, x): (Table, &Tensor),
        (tb, y): (Table, &Tensor),
        t: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let a = self.coef(ta, t, x)?;
        let b = self.coef(tb, t, y)?;
        x.broadcast_mul(&a)?.add(&y.broadcast_mul(&b)?)
    }

    /// DDPM eq. 4: `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise`, `t` a `[B]` integer tensor.
    /// This is diffusers' `add_noise`.
    pub fn q_sample(&self, x0: &Tensor, t: &Tensor, noise: &Tensor) -> candle_core::Result<Tensor> {
        same_shape("q_sample", x0, noise)?;
        self.combine(
            (Table::SqrtAlphasCumprod, x0),
            (Table::SqrtOneMinusAlphasCumprod, noise),
            t,
        )
    }

    /// Draws a timestep per sample uniformly from `0..T` and standard normal noise from `rng`, and
    /// noises `x0`: one training example per sample (DDPM algorithm 1).
    pub fn training_batch(
        &self,
        x0: &Tensor,
        rng: &mut NoiseSource,
    ) -> candle_core::Result<TrainingBatch> {
        let b = x0.dim(0)?;
        let t = rng.timesteps(b, self.num_train_timesteps(), x0.device())?;
        let noise = rng.randn(x0.shape(), x0.device())?;
        let x_t = self.q_sample(x0, &t, &noise)?;
        Ok(TrainingBatch { t, noise, x_t })
    }

    /// The velocity `v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0`.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        same_shape("velocity", x0, noise)?;
        let a = self.coef(Table::SqrtAlphasCumprod, t, noise)?;
        let s = self.coef(Table::SqrtOneMinusAlphasCumprod, t, x0)?;
        noise.broadcast_mul(&a)?.sub(&x0.broadcast_mul(&s)?)
    }

    /// The regression target for `prediction`: the noise, `x_0`, or the velocity.
    pub fn target(
        &self,
        prediction: Prediction,
        x0: &Tensor,
        noise: &Tensor,
        t: &Tensor,
    ) -> candle_core::Result<Tensor> {
        match prediction {
            Prediction::Epsilon => Ok(noise.clone()),
            Prediction::Sample => Ok(x0.clone()),
            Prediction::VPrediction => self.velocity(x0, noise, t),
        }
    }

    /// `sqrt(abar_t)` and `sqrt(1 - abar_t)` per sample, shaped to broadcast against `like`.
    fn coefs(&self, t: &Tensor, like: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.coef(Table::SqrtAlphasCumprod, t, like)?,
            self.coef(Table::SqrtOneMinusAlphasCumprod, t, like)?,
        ))
    }

    /// `x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)` (DDPM eq. 15, diffusers' order).
    pub fn x0_from_eps(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        eps: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.pred_x0(Prediction::Epsilon, x_t, t, eps)
    }

    /// `eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)`.
    pub fn eps_from_x0(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        x0: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.pred_eps(Prediction::Sample, x_t, t, x0)
    }

    /// `x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v`.
    pub fn x0_from_v(&self, x_t: &Tensor, t: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        self.pred_x0(Prediction::VPrediction, x_t, t, v)
    }

    /// `eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t`.
    pub fn eps_from_v(&self, x_t: &Tensor, t: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        self.pred_eps(Prediction::VPrediction, x_t, t, v)
    }

    /// The model's `x_0` estimate from its output, whatever it predicts ([`x0_and_eps`]).
    pub fn pred_x0(
        &self,
        prediction: Prediction,
        x_t: &Tensor,
        t: &Tensor,
        model_output: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (a, s) = self.coefs(t, x_t)?;
        Ok(x0_and_eps(prediction, model_output, x_t, (&a, &s), false)?.0)
    }

    /// The model's noise estimate from its output, whatever it predicts ([`x0_and_eps`]).
    pub fn pred_eps(
        &self,
        prediction: Prediction,
        x_t: &Tensor,
        t: &Tensor,
        model_output: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (a, s) = self.coefs(t, x_t)?;
        let (_, eps) = x0_and_eps(prediction, model_output, x_t, (&a, &s), true)?;
        Ok(eps.expect("asked for eps"))
    }

    /// The seed tutorial's forward-process picture: one image `[1, C, H, W]` noised with one
    /// draw of noise (from `seed`) at `frames` timesteps evenly spaced over `0..T` (the first
    /// 0, the last `T - 1`), clamped to [-1, 1]: `[frames, C, H, W]`.
    pub fn strip(&self, image: &Tensor, frames: usize, seed: u64) -> candle_core::Result<Tensor> {
        if frames == 0 {
            candle_core::bail!("a strip needs at least 1 frame, got 0");
        }
        if image.rank() != 4 || image.dim(0)? != 1 {
            candle_core::bail!(
                "a strip takes one image [1, C, H, W], got {:?}",
                image.dims()
            );
        }
        let t_max = self.num_train_timesteps();
        let ts: Vec<u32> = (0..frames)
            .map(|i| {
                if frames == 1 {
                    0
                } else {
                    (i * (t_max - 1) / (frames - 1)) as u32
                }
            })
            .collect();
        let x0 = image.repeat((frames, 1, 1, 1))?;
        let noise = NoiseSource::new(seed)
            .randn(image.dims()[1..].to_vec(), image.device())?
            .unsqueeze(0)?
            .repeat((frames, 1, 1, 1))?;
        let t = Tensor::new(ts.as_slice(), image.device())?;
        self.q_sample(&x0, &t, &noise)?.clamp(-1f32, 1f32)
    }

    /// The posterior `q(x_{t-1} | x_t, x_0)`: mean `coef1_t x_0 + coef2_t x_t` and variance
    /// `beta_t (1 - abar_{t-1}) / (1 - abar_t)` (DDPM eqs. 6, 7).
    pub fn posterior(
        &self,
        x0: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
    ) -> candle_core::Result<Posterior> {
        same_shape("posterior", x0, x_t)?;
        let mean = self.combine(
            (Table::PosteriorMeanCoef1, x0),
            (Table::PosteriorMeanCoef2, x_t),
            t,
        )?;
        Ok(Posterior {
            mean,
            variance: self.coef(Table::PosteriorVariance, t, x_t)?,
            log_variance_clipped: self.coef(Table::PosteriorLogVarianceClipped, t, x_t)?,
        })
    }
}

fn same_shape(op: &str, a: &Tensor, b: &Tensor) -> candle_core::Result<()> {
    if a.dims() != b.dims() {
        candle_core::bail!("{op}: shapes differ, {:?} and {:?}", a.dims(), b.dims());
    }
    Ok(())
}
