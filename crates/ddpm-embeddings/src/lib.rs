//! Timestep embeddings for diffusion U-Nets.
//!
//! A denoiser learns one function for every noise level, so it is told the timestep `t`. The
//! usual encoding is the Transformer's sinusoidal position embedding (Vaswani et al. 2017,
//! section 3.5; DDPM appendix B), followed by a small MLP. This crate has:
//!
//! - [`timestep_embedding`], diffusers' `get_timestep_embedding` with its `flip_sin_to_cos` and
//!   `downscale_freq_shift` options. The seed tutorial's `SinusoidalPositionEmbeddings` is
//!   `flip_sin_to_cos = false, downscale_freq_shift = 1` ([`SinusoidalConfig::seed`]).
//! - [`SinusoidalEmbedding`], the same as a [`candle_nn::Module`].
//! - [`SeedTimeMlp`], the seed's `time_mlp`: sinusoidal embedding, `Linear`, `ReLU`.
//! - [`TimestepEmbedding`], diffusers' `TimestepEmbedding`: `linear_1`, SiLU, `linear_2`.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use ddpm_embeddings::{timestep_embedding, SinusoidalConfig};
//!
//! # fn main() -> candle_core::Result<()> {
//! let t = Tensor::new(&[0u32, 17, 299], &Device::Cpu)?;
//! let emb = timestep_embedding(&t, &SinusoidalConfig::seed(32))?;
//! assert_eq!(emb.dims(), &[3, 32]);
//! // At t = 0 every sine is 0 and every cosine is 1.
//! let first: Vec<f32> = emb.get(0)?.to_vec1()?;
//! assert_eq!(&first[..16], &[0.0; 16]);
//! assert_eq!(&first[16..], &[1.0; 16]);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

use candle_core::{DType, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde::{Deserialize, Serialize};

/// The options of diffusers' `get_timestep_embedding`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinusoidalConfig {
    /// The embedding width. An odd width gets one zero column at the end, as in diffusers.
    pub dim: usize,
    /// Put the cosines first (`[cos, sin]`) instead of `[sin, cos]`.
    pub flip_sin_to_cos: bool,
    /// `s` in the frequency exponent `-ln(max_period) * i / (dim/2 - s)`. The seed uses 1
    /// (`i / (half - 1)`), diffusers' `UNet2DModel` defaults to 0.
    pub downscale_freq_shift: f64,
    /// A factor on `t` before the sines.
    pub scale: f64,
    /// The longest period, 10000 in every model we know of.
    pub max_period: f64,
}

impl SinusoidalConfig {
    /// The seed's `SinusoidalPositionEmbeddings(dim)`: `[sin, cos]`, shift 1.
    pub fn seed(dim: usize) -> Self {
        Self::diffusers(dim, false, 1.0)
    }

    /// diffusers' `Timesteps(dim, flip_sin_to_cos, downscale_freq_shift)`, as `UNet2DModel` uses it
    /// (`flip_sin_to_cos` and `freq_shift` in its `config.json`).
    pub fn diffusers(dim: usize, flip_sin_to_cos: bool, downscale_freq_shift: f64) -> Self {
        Self {
            dim,
            flip_sin_to_cos,
            downscale_freq_shift,
            scale: 1.0,
            max_period: 10000.0,
        }
    }

    /// The `dim / 2` frequencies, computed in `f32` in the order PyTorch does, so embeddings agree
    /// with diffusers to a few ulp.
    fn frequencies(&self) -> candle_core::Result<Vec<f32>> {
        let half = self.dim / 2;
        let denom = half as f32 - self.downscale_freq_shift as f32;
        if half == 0 || denom == 0.0 {
            candle_core::bail!(
                "timestep embedding dim {} with downscale_freq_shift {} divides by zero",
                self.dim,
                self.downscale_freq_shift
            );
        }
        let log_period = -(self.max_period.ln()) as f32;
        Ok((0..half)
            .map(|i| (log_period * i as f32 / denom).exp())
            .collect())
    }
}

/// Sinusoidal embeddings of a `[B]` tensor of timesteps (any numeric dtype), shaped `[B, dim]`,
/// `f32`. diffusers' `get_timestep_embedding`.
pub fn timestep_embedding(t: &Tensor, cfg: &SinusoidalConfig) -> candle_core::Result<Tensor> {
    if t.rank() != 1 {
        candle_core::bail!("timesteps must be a [B] tensor, got shape {:?}", t.dims());
    }
    let freqs = cfg.frequencies()?;
    let half = freqs.len();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let t = t.to_dtype(DType::F32)?.unsqueeze(1)?;
    let mut args = t.broadcast_mul(&freqs)?;
    if cfg.scale != 1.0 {
        args = (args * cfg.scale)?;
    }
    let (sin, cos) = (args.sin()?, args.cos()?);
    let mut emb = if cfg.flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if cfg.dim % 2 == 1 {
        emb = emb.pad_with_zeros(1, 0, 1)?;
    }
    Ok(emb)
}

/// [`timestep_embedding`] as a module (the seed's `SinusoidalPositionEmbeddings`, diffusers'
/// `Timesteps`). It has no weights.
#[derive(Debug, Clone)]
pub struct SinusoidalEmbedding {
    cfg: SinusoidalConfig,
}

impl SinusoidalEmbedding {
    /// A module computing [`timestep_embedding`] with `cfg`.
    pub fn new(cfg: SinusoidalConfig) -> Self {
        Self { cfg }
    }

    /// The configuration.
    pub fn config(&self) -> &SinusoidalConfig {
        &self.cfg
    }
}

impl Module for SinusoidalEmbedding {
    fn forward(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        timestep_embedding(t, &self.cfg)
    }
}

/// The seed's `time_mlp`: `Sequential(SinusoidalPositionEmbeddings(dim), Linear(dim, dim), ReLU)`.
///
/// Its weights sit at `1.weight` and `1.bias` under the `VarBuilder` given (index 1 of the
/// PyTorch `Sequential`), so `vb.pp("time_mlp")` loads a seed `state_dict` unchanged.
#[derive(Debug, Clone)]
pub struct SeedTimeMlp {
    embedding: SinusoidalEmbedding,
    linear: Linear,
}

impl SeedTimeMlp {
    /// Builds the MLP for a `dim`-wide embedding.
    pub fn new(dim: usize, vb: VarBuilder<'_>) -> candle_core::Result<Self> {
        Ok(Self {
            embedding: SinusoidalEmbedding::new(SinusoidalConfig::seed(dim)),
            linear: candle_nn::linear(dim, dim, vb.pp("1"))?,
        })
    }
}

impl Module for SeedTimeMlp {
    /// `[B]` timesteps to `[B, dim]` features, in the dtype of the weights.
    fn forward(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        let features = self
            .embedding
            .forward(t)?
            .to_dtype(self.linear.weight().dtype())?;
        self.linear.forward(&features)?.relu()
    }
}

/// diffusers' `TimestepEmbedding`: `linear_1` (in -> hidden), SiLU, `linear_2` (hidden -> out).
///
/// It takes the sinusoidal features, not the timesteps; weights at `linear_1.*`, `linear_2.*`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    /// `in_channels` sinusoidal features to `out_dim` through a hidden width `time_embed_dim`
    /// (diffusers passes `out_dim = time_embed_dim` in `UNet2DModel`).
    pub fn new(
        in_channels: usize,
        time_embed_dim: usize,
        out_dim: usize,
        vb: VarBuilder<'_>,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            linear_1: candle_nn::linear(in_channels, time_embed_dim, vb.pp("linear_1"))?,
            linear_2: candle_nn::linear(time_embed_dim, out_dim, vb.pp("linear_2"))?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}
