//! The precomputed tables and their per-sample gather.

use candle_core::{DType, Device, Tensor};

use crate::{PosteriorCoefficients, ScheduleConfig, ScheduleError};

/// One precomputed per-timestep quantity. `t` runs over `0..T`; `abar_t` is `alphas_cumprod[t]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Table {
    /// `beta_t`.
    Betas,
    /// `alpha_t = 1 - beta_t`.
    Alphas,
    /// `abar_t = prod_{s <= t} alpha_s`.
    AlphasCumprod,
    /// `abar_{t-1}`, with `abar_{-1} = 1`.
    AlphasCumprodPrev,
    /// `sqrt(abar_t)`: the signal coefficient of DDPM eq. 4.
    SqrtAlphasCumprod,
    /// `sqrt(1 - abar_t)`: the noise coefficient of DDPM eq. 4.
    SqrtOneMinusAlphasCumprod,
    /// `1 / sqrt(alpha_t)` (the seed's `sqrt_recip_alphas`, DDPM eq. 11).
    SqrtRecipAlphas,
    /// `1 / sqrt(abar_t)` (infinite at a zero-SNR final step).
    SqrtRecipAlphasCumprod,
    /// `sqrt(1 / abar_t - 1)` (infinite at a zero-SNR final step).
    SqrtRecipm1AlphasCumprod,
    /// `beta_t (1 - abar_{t-1}) / (1 - abar_t)`: the variance of q(x_{t-1} | x_t, x_0), DDPM eq. 7.
    /// Exactly 0 at `t = 0` (diffusers clamps it to 1e-20 there; both add no noise).
    PosteriorVariance,
    /// `log` of the posterior variance, with `t = 0` taking the value at `t = 1` so it stays finite
    /// (improved-diffusion's `posterior_log_variance_clipped`).
    PosteriorLogVarianceClipped,
    /// `beta_t sqrt(abar_{t-1}) / (1 - abar_t)`: the weight of `x_0` in the posterior mean (eq. 7).
    PosteriorMeanCoef1,
    /// `(1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)`: the weight of `x_t` in the posterior mean.
    PosteriorMeanCoef2,
    /// The signal-to-noise ratio `abar_t / (1 - abar_t)`.
    Snr,
}

impl Table {
    /// Every table, in declaration order.
    pub const ALL: [Table; 14] = [
        Table::Betas,
        Table::Alphas,
        Table::AlphasCumprod,
        Table::AlphasCumprodPrev,
        Table::SqrtAlphasCumprod,
        Table::SqrtOneMinusAlphasCumprod,
        Table::SqrtRecipAlphas,
        Table::SqrtRecipAlphasCumprod,
        Table::SqrtRecipm1AlphasCumprod,
        Table::PosteriorVariance,
        Table::PosteriorLogVarianceClipped,
        Table::PosteriorMeanCoef1,
        Table::PosteriorMeanCoef2,
        Table::Snr,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// A noise schedule with every [`Table`] precomputed in `f64` on the host.
#[derive(Debug, Clone)]
pub struct Schedule {
    config: ScheduleConfig,
    tables: Vec<Vec<f64>>,
}

impl Schedule {
    /// Computes the betas and every derived table. Fails with an error naming the value when a
    /// parameter is out of range (see [`ScheduleError`]).
    pub fn new(config: ScheduleConfig) -> Result<Self, ScheduleError> {
        let betas = config.betas()?;
        let n = betas.len();
        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        let mut acc = 1.0;
        let mut abar: Vec<f64> = alphas
            .iter()
            .map(|a| {
                acc *= a;
                acc
            })
            .collect();
        if config.rescale_betas_zero_snr {
            // Exactly zero, rather than the cumulative product's rounding residue.
            abar[n - 1] = 0.0;
        }
        Ok(Self::from_parts(config, betas, alphas, abar))
    }

    fn from_parts(
        config: ScheduleConfig,
        betas: Vec<f64>,
        alphas: Vec<f64>,
        abar: Vec<f64>,
    ) -> Self {
        let n = betas.len();
        let abar_prev: Vec<f64> = (0..n)
            .map(|t| if t == 0 { 1.0 } else { abar[t - 1] })
            .collect();
        let map = |f: &dyn Fn(usize) -> f64| (0..n).map(f).collect::<Vec<f64>>();
        let posterior: Vec<PosteriorCoefficients> = (0..n)
            .map(|t| PosteriorCoefficients::new(abar[t], abar_prev[t]))
            .collect();
        let posterior_variance = map(&|t| posterior[t].variance);
        let log_clip_source = |t: usize| {
            if t > 0 {
                posterior_variance[t]
            } else if n > 1 {
                posterior_variance[1]
            } else {
                betas[0]
            }
        };
        let mut tables = vec![Vec::new(); Table::ALL.len()];
        let mut set = |table: Table, v: Vec<f64>| tables[table.index()] = v;
        set(Table::SqrtAlphasCumprod, map(&|t| abar[t].sqrt()));
        set(
            Table::SqrtOneMinusAlphasCumprod,
            map(&|t| (1.0 - abar[t]).sqrt()),
        );
        set(Table::SqrtRecipAlphas, map(&|t| 1.0 / alphas[t].sqrt()));
        set(
            Table::SqrtRecipAlphasCumprod,
            map(&|t| 1.0 / abar[t].sqrt()),
        );
        set(
            Table::SqrtRecipm1AlphasCumprod,
            map(&|t| (1.0 / abar[t] - 1.0).sqrt()),
        );
        set(
            Table::PosteriorLogVarianceClipped,
            map(&|t| log_clip_source(t).ln()),
        );
        set(Table::PosteriorMeanCoef1, map(&|t| posterior[t].x0));
        set(Table::PosteriorMeanCoef2, map(&|t| posterior[t].x_t));
        set(Table::Snr, map(&|t| abar[t] / (1.0 - abar[t])));
        set(Table::PosteriorVariance, posterior_variance);
        set(Table::AlphasCumprodPrev, abar_prev);
        set(Table::AlphasCumprod, abar);
        set(Table::Alphas, alphas);
        set(Table::Betas, betas);
        Self { config, tables }
    }

    /// The configuration this schedule was built from.
    pub fn config(&self) -> &ScheduleConfig {
        &self.config
    }

    /// `T`, the number of training timesteps.
    pub fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    /// One table, `T` values in `f64`.
    pub fn table(&self, table: Table) -> &[f64] {
        &self.tables[table.index()]
    }

    /// `beta_t` for `t` in `0..T`.
    pub fn betas(&self) -> &[f64] {
        self.table(Table::Betas)
    }

    /// `abar_t` for `t` in `0..T`.
    pub fn alphas_cumprod(&self) -> &[f64] {
        self.table(Table::AlphasCumprod)
    }

    /// The posterior variance of DDPM eq. 7 for `t` in `0..T`.
    pub fn posterior_variance(&self) -> &[f64] {
        self.table(Table::PosteriorVariance)
    }

    /// The SNR `abar_t / (1 - abar_t)` for `t` in `0..T`.
    pub fn snr(&self) -> &[f64] {
        self.table(Table::Snr)
    }

    /// Uploads every table to `device` as an `f32` tensor of shape `[T]`.
    pub fn tensors(&self, device: &Device) -> candle_core::Result<ScheduleTensors> {
        let tables = self
            .tables
            .iter()
            .map(|values| {
                let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
                Tensor::from_vec(v, values.len(), device)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(ScheduleTensors {
            num_train_timesteps: self.num_train_timesteps(),
            tables,
        })
    }
}

/// The tables of a [`Schedule`] as `f32` tensors on one device, ready to gather per sample.
#[derive(Debug, Clone)]
pub struct ScheduleTensors {
    num_train_timesteps: usize,
    tables: Vec<Tensor>,
}

impl ScheduleTensors {
    /// `T`, the number of training timesteps.
    pub fn num_train_timesteps(&self) -> usize {
        self.num_train_timesteps
    }

    /// The device the tables live on.
    pub fn device(&self) -> &Device {
        self.tables[0].device()
    }

    /// One table as an `f32` tensor of shape `[T]`.
    pub fn get(&self, table: Table) -> &Tensor {
        &self.tables[table.index()]
    }

    /// The seed's `get_index_from_list`: picks `table[t[i]]` for each sample and shapes the result
    /// `[B, 1, 1, 1]`, so it broadcasts against an NCHW batch.
    ///
    /// `t` is a `[B]` tensor of an integer dtype. A timestep outside `0..T` is an error naming it.
    pub fn gather(&self, table: Table, t: &Tensor) -> candle_core::Result<Tensor> {
        self.gather_rank(table, t, 4)
    }

    /// Like [`ScheduleTensors::gather`], shaped `[B, 1, ..., 1]` with `rank` dimensions in all, to
    /// broadcast against tensors of that rank.
    pub fn gather_rank(
        &self,
        table: Table,
        t: &Tensor,
        rank: usize,
    ) -> candle_core::Result<Tensor> {
        let idx = self.checked_index(t)?;
        let b = idx.dims1()?;
        let mut shape = vec![1usize; rank.max(1)];
        shape[0] = b;
        self.get(table).index_select(&idx, 0)?.reshape(shape)
    }

    /// Validates `t` (rank 1, integer dtype, every value in `0..T`) and returns it as `u32`.
    fn checked_index(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        if t.rank() != 1 {
            candle_core::bail!("timesteps must be a [B] tensor, got shape {:?}", t.dims());
        }
        let values: Vec<i64> = match t.dtype() {
            DType::U8 | DType::U32 | DType::I64 => t.to_dtype(DType::I64)?.to_vec1()?,
            other => candle_core::bail!("timesteps must be an integer tensor, got dtype {other:?}"),
        };
        let n = self.num_train_timesteps as i64;
        if let Some(bad) = values.iter().find(|&&v| v < 0 || v >= n) {
            candle_core::bail!("timestep {bad} out of range 0..{n}");
        }
        t.to_dtype(DType::U32)?.to_device(self.device())
    }
}
