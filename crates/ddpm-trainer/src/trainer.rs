//! The training state and one optimizer step.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{CpuStorage, DType, Device, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ddpm_data::{Batches, DataPosition, ImageSet};
use ddpm_forward::{ForwardProcess, NoiseSource, NoiseState, Prediction};
use ddpm_schedule::{Schedule, Table};
use ddpm_unet::{Classes, Mode, Unet, init_seeded, is_buffer, trainable_vars};
use rayon::prelude::*;

use crate::{AdamWConfig, Loss, TrainConfig};

/// Metrics of one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StepMetrics {
    /// The step just completed (1-based).
    pub step: u64,
    /// The loss, averaged over the micro-batches.
    pub loss: f64,
    /// The learning rate used.
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// The EMA decay used.
    pub ema_decay: f64,
}

/// Why a step failed in a way the caller may want to tell apart.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// The loss was NaN or infinite; nothing was updated.
    #[error("loss is {value} at step {step}: training stopped, the weights were not updated")]
    NonFiniteLoss {
        /// The step that would have been taken (1-based).
        step: u64,
        /// The loss value.
        value: f64,
    },
    /// Anything else.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A training error where candle's is expected: a tensor error as it was, a non-finite loss
/// kept whole as the source.
impl From<TrainError> for candle_core::Error {
    fn from(e: TrainError) -> Self {
        match e {
            TrainError::Candle(e) => e,
            other => candle_core::Error::wrap(other),
        }
    }
}

/// AdamW (PyTorch's single-tensor algorithm) with its moment estimates in the open, so they can
/// be checkpointed and restored (candle's own keeps them private).
///
/// On the CPU the moments are updated in place: a clone copies them, so it never sees the
/// original's later steps.
#[derive(Debug)]
pub struct AdamW {
    pub(crate) config: AdamWConfig,
    pub(crate) m: HashMap<String, Tensor>,
    pub(crate) v: HashMap<String, Tensor>,
    pub(crate) t: u64,
}

impl Clone for AdamW {
    fn clone(&self) -> Self {
        let copy = |m: &HashMap<String, Tensor>| -> HashMap<String, Tensor> {
            m.iter()
                .map(|(k, t)| (k.clone(), t.copy().expect("copying a tensor on its device")))
                .collect()
        };
        Self {
            config: self.config,
            m: copy(&self.m),
            v: copy(&self.v),
            t: self.t,
        }
    }
}

impl AdamW {
    /// Zero moments for `params`.
    pub fn new(config: AdamWConfig, params: &[(String, Var)]) -> candle_core::Result<Self> {
        let zeros = || -> candle_core::Result<HashMap<String, Tensor>> {
            params
                .iter()
                .map(|(k, v)| Ok((k.clone(), v.as_tensor().zeros_like()?)))
                .collect()
        };
        Ok(Self {
            config,
            m: zeros()?,
            v: zeros()?,
            t: 0,
        })
    }

    /// The first and second moment estimates, by parameter name.
    pub fn moments(&self) -> (&HashMap<String, Tensor>, &HashMap<String, Tensor>) {
        (&self.m, &self.v)
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// One update of every parameter with its gradient times `grad_scale`, at learning rate
    /// `lr`: decoupled decay `p *= 1 - lr wd`, then `p -= lr / (1 - b1^t) m / (sqrt(v) / sqrt(1 -
    /// b2^t) + eps)` with `m`, `v` the running moments.
    pub fn step(
        &mut self,
        params: &[(String, Var)],
        grads: &[Tensor],
        grad_scale: f64,
        lr: f64,
    ) -> candle_core::Result<()> {
        let o = self.config;
        self.t += 1;
        let t = self.t as i32;
        let bc1 = 1.0 - o.beta1.powi(t);
        let bc2_sqrt = (1.0 - o.beta2.powi(t)).sqrt();
        for ((name, var), g) in params.iter().zip(grads) {
            let missing = || candle_core::Error::Msg(format!("no AdamW state for {name}"));
            let (m, v) = (
                self.m.get(name).ok_or_else(missing)?,
                self.v.get(name).ok_or_else(missing)?,
            );
            if in_place_ok(&[var.as_tensor(), g, m, v]) {
                // In place: a large model's step otherwise allocates (and the allocator
                // clears) three parameter-sized buffers. The arithmetic is the op-by-op form's
                // below (candle's `tensor * f64` and `tensor / f64` multiply by the
                // f32-rounded factor), element by element, so the results are the same bits
                // and do not depend on the thread count.
                let f = |x: f64| x as f32;
                let scale = (grad_scale != 1.0).then(|| f(grad_scale));
                m.inplace_op2(
                    g,
                    &MomentUpdate {
                        decay: f(o.beta1),
                        weight: f(1.0 - o.beta1),
                        grad_scale: scale,
                        square: false,
                    },
                )?;
                v.inplace_op2(
                    g,
                    &MomentUpdate {
                        decay: f(o.beta2),
                        weight: f(1.0 - o.beta2),
                        grad_scale: scale,
                        square: true,
                    },
                )?;
                var.as_tensor().inplace_op3(
                    m,
                    v,
                    &ParamUpdate {
                        decay: f(1.0 - lr * o.weight_decay),
                        inv_bc2: f(1.0 / bc2_sqrt),
                        eps: f(o.eps),
                        step: f(lr / bc1),
                    },
                )?;
                continue;
            }
            // Detached: a gradient (and all derived from it) must not keep the step's graph
            // alive, or every step's graph stays in memory through the moments.
            let g = g.detach();
            let g = if grad_scale == 1.0 {
                g
            } else {
                (g * grad_scale)?
            };
            let m = ((m * o.beta1)? + (&g * (1.0 - o.beta1))?)?;
            let v = ((v * o.beta2)? + (g.sqr()? * (1.0 - o.beta2))?)?;
            let p = (var.as_tensor().detach() * (1.0 - lr * o.weight_decay))?;
            let denom = ((v.sqrt()? / bc2_sqrt)? + o.eps)?;
            let p = (p - ((&m / denom)? * (lr / bc1))?)?;
            var.set(&p)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }
}

/// `m = m * decay + g' * (1 - decay)` (or `g'^2` for the second moment), `g' = g * grad_scale`,
/// in place.
struct MomentUpdate {
    decay: f32,
    weight: f32,
    grad_scale: Option<f32>,
    square: bool,
}

/// `p = p * decay - m / (sqrt(v) * inv_bc2 + eps) * step`, in place.
struct ParamUpdate {
    decay: f32,
    inv_bc2: f32,
    eps: f32,
    step: f32,
}

/// The f32 data of a contiguous CPU storage.
fn cpu_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("AdamW: expected contiguous f32 CPU tensors"),
    }
}

fn cpu_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("AdamW: expected contiguous f32 CPU tensors"),
    }
}

/// Elements per parallel task of the element-wise updates.
const CHUNK: usize = 1 << 14;

impl InplaceOp2 for MomentUpdate {
    fn name(&self) -> &'static str {
        "ddpm-adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (m, g) = (cpu_slice_mut(s1, l1)?, cpu_slice(s2, l2)?);
        if m.len() != g.len() {
            candle_core::bail!("AdamW: a moment and its gradient differ in size");
        }
        m.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    let g = self.grad_scale.map_or(g, |s| g * s);
                    let g = if self.square { g * g } else { g };
                    *m = *m * self.decay + g * self.weight;
                }
            });
        Ok(())
    }
}

impl InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "ddpm-adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (p, m, v) = (
            cpu_slice_mut(s1, l1)?,
            cpu_slice(s2, l2)?,
            cpu_slice(s3, l3)?,
        );
        if m.len() != p.len() || v.len() != p.len() {
            candle_core::bail!("AdamW: a parameter and its moments differ in size");
        }
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK))
            .zip(v.par_chunks(CHUNK))
            .for_each(|((p, m), v)| {
                for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                    let denom = v.sqrt() * self.inv_bc2 + self.eps;
                    *p = *p * self.decay - m / denom * self.step;
                }
            });
        Ok(())
    }
}

/// Whether the in-place update applies: contiguous f32 tensors on the CPU.
fn in_place_ok(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
}

/// One EMA update, diffusers' `s -= (1 - decay) (s - p)`.
/// Both inputs are detached first, so the shadow never holds on to a computation graph.
pub fn ema_step(shadow: &Tensor, param: &Tensor, decay: f64) -> candle_core::Result<Tensor> {
    let (shadow, param) = (shadow.detach(), param.detach());
    &shadow - ((&shadow - param)? * (1.0 - decay))?
}

/// A training run's complete state: model, EMA, optimizer, RNG, data position, step.
pub struct Trainer {
    pub(crate) config: TrainConfig,
    pub(crate) device: Device,
    pub(crate) varmap: VarMap,
    pub(crate) unet: Unet,
    /// Trainable parameters by name, sorted (buffers excluded).
    pub(crate) params: Vec<(String, Var)>,
    pub(crate) ema: HashMap<String, Tensor>,
    pub(crate) ema_steps: u64,
    pub(crate) opt: AdamW,
    pub(crate) step: u64,
    pub(crate) rng: NoiseSource,
    pub(crate) data: Batches,
    pub(crate) forward: ForwardProcess,
    pub(crate) schedule: Schedule,
    pub(crate) dataset: String,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("step", &self.step)
            .field("dataset", &self.dataset)
            .finish_non_exhaustive()
    }
}

impl Trainer {
    /// A fresh run: weights initialised from `config.seed`, EMA equal to them, zero moments.
    /// `dataset` describes the data for the record (e.g. `embedded mnist`).
    pub fn new(
        config: TrainConfig,
        data: Arc<ImageSet>,
        dataset: &str,
        device: &Device,
    ) -> candle_core::Result<Self> {
        config.validate()?;
        let mut config = config;
        if config.model.sample_size().is_none() {
            config.model.set_sample_size(data.height());
        }
        let (c, h, w) = (data.channels(), data.height(), data.width());
        let f = config.model.downsampling_factor();
        if c != config.model.in_channels()
            || c != config.model.out_channels()
            || h % f != 0
            || w % f != 0
        {
            candle_core::bail!(
                "the data's images are {c}x{h}x{w}, the model takes {} channel(s) in, gives {} out, at sizes divisible by {f}",
                config.model.in_channels(),
                config.model.out_channels()
            );
        }
        if let Some(classes) = config.classes() {
            let Some(labels) = data.labels() else {
                candle_core::bail!(
                    "the model is class-conditional (num_class_embeds {}), but the data has no labels",
                    config.model.num_class_embeds().unwrap_or_default()
                );
            };
            if let Some(&bad) = labels.iter().find(|&&l| l as usize >= classes.count()) {
                let null = match classes.null_label() {
                    Some(_) => format!(
                        ", the last of the model's {} class embeddings being \"no class\" for class_dropout",
                        classes.num_class_embeds()
                    ),
                    None => String::new(),
                };
                candle_core::bail!(
                    "the data has class {bad}, the model takes classes 0..{}{null}",
                    classes.count()
                );
            }
        }
        let varmap = VarMap::new();
        let unet = Unet::new(
            &config.model,
            VarBuilder::from_varmap(&varmap, DType::F32, device),
        )?;
        init_seeded(&varmap, config.seed)?;
        let schedule = Schedule::new(config.schedule)?;
        let forward = ForwardProcess::new(&schedule, device)?;
        let params = trainable_vars(&varmap);
        let ema = ddpm_unet::varmap_tensors(&varmap)
            .into_iter()
            .map(|(k, t)| Ok((k, t.detach().copy()?)))
            .collect::<candle_core::Result<_>>()?;
        let opt = AdamW::new(config.optimizer, &params)?;
        Ok(Self {
            data: Batches::new(data, config.batch_size, config.seed, config.flip),
            rng: NoiseSource::with_stream(config.seed, 0),
            config,
            device: device.clone(),
            varmap,
            unet,
            params,
            ema,
            ema_steps: 0,
            opt,
            step: 0,
            forward,
            schedule,
            dataset: dataset.to_string(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The model being trained.
    pub fn unet(&self) -> &Unet {
        &self.unet
    }

    /// The training images.
    pub fn data(&self) -> &ImageSet {
        self.data.set()
    }

    /// The description of the data given at the start.
    pub fn dataset(&self) -> &str {
        &self.dataset
    }

    /// The schedule the model is trained with.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The raw weights (and BatchNorm statistics), by name.
    pub fn model_tensors(&self) -> HashMap<String, Tensor> {
        ddpm_unet::varmap_tensors(&self.varmap)
    }

    /// The EMA weights (BatchNorm statistics follow the raw model's), by name.
    pub fn ema_tensors(&self) -> &HashMap<String, Tensor> {
        &self.ema
    }

    /// The model with the EMA weights, for sampling and export.
    pub fn ema_unet(&self) -> candle_core::Result<Unet> {
        Unet::from_tensors(&self.config.model, self.ema.clone(), &self.device)
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// The RNG state (for the record; checkpoints carry it).
    pub fn noise_state(&self) -> NoiseState {
        self.rng.state()
    }

    /// Where the data stream stands.
    pub fn data_position(&self) -> DataPosition {
        self.data.position()
    }

    /// Min-SNR-gamma weights for the objective (Hang et al. 2023, eq. 9 and its eps/v forms).
    fn snr_weights(&self, t: &Tensor, gamma: f64) -> candle_core::Result<Tensor> {
        let snr = self.forward.tables().gather_rank(Table::Snr, t, 1)?;
        let clipped = snr.clamp(0f32, gamma as f32)?;
        match self.config.objective {
            Prediction::Epsilon => clipped / snr,
            Prediction::VPrediction => clipped / (snr + 1.0)?,
            Prediction::Sample => Ok(clipped),
        }
    }

    /// One optimizer step over `grad_accum` micro-batches. A non-finite loss returns
    /// [`TrainError::NonFiniteLoss`] and leaves every weight, moment and the step untouched.
    pub fn train_step(&mut self) -> Result<StepMetrics, TrainError> {
        // BatchNorm statistics move during the forward pass, the RNG and data stream as batches
        // are drawn: keep them to put back if the step fails.
        let buffers: Vec<(Var, Tensor)> = self
            .varmap
            .data()
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|(k, _)| is_buffer(k))
            .map(|(_, v)| Ok((v.clone(), v.as_tensor().copy()?)))
            .collect::<candle_core::Result<_>>()?;
        let (rng, data) = (self.rng.clone(), self.data.clone());
        let result = self.try_step();
        if result.is_err() {
            for (var, saved) in &buffers {
                var.set(saved)?;
            }
            self.rng = rng;
            self.data = data;
        }
        result
    }

    fn try_step(&mut self) -> Result<StepMetrics, TrainError> {
        let c = self.config.clone();
        let next = self.step + 1;
        let mut grads: Vec<Option<Tensor>> = vec![None; self.params.len()];
        let mut total_loss = 0.0;
        for micro in 0..c.grad_accum {
            let (x0, indices) = self.data.next_batch_with_indices(&self.device)?;
            let batch = self.forward.training_batch(&x0, &mut self.rng)?;
            let labels = match c.classes() {
                Some(classes) => Some(self.batch_labels(&indices, classes)?),
                None => None,
            };
            let dropout_seed = c.seed ^ (next << 8) ^ micro as u64;
            let pred = self.unet.forward_with_labels(
                &batch.x_t,
                &batch.t,
                labels.as_ref(),
                Mode::Train { seed: dropout_seed },
            )?;
            let target = self
                .forward
                .target(c.objective, &x0, &batch.noise, &batch.t)?;
            let mut per_sample = c.loss.per_sample(&pred, &target)?;
            if let Some(gamma) = c.min_snr_gamma {
                per_sample = (per_sample * self.snr_weights(&batch.t, gamma)?)?;
            }
            let loss = (per_sample.mean_all()? / c.grad_accum as f64)?;
            let value = loss.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                return Err(TrainError::NonFiniteLoss { step: next, value });
            }
            total_loss += value;
            let store = loss.backward()?;
            for (slot, (_, var)) in grads.iter_mut().zip(&self.params) {
                if let Some(g) = store.get(var.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(acc) => (acc + g.detach())?,
                        None => g.detach(),
                    });
                }
            }
        }
        let grads: Vec<Tensor> = grads
            .into_iter()
            .zip(&self.params)
            .map(|(g, (_, v))| g.map(Ok).unwrap_or_else(|| v.as_tensor().zeros_like()))
            .collect::<candle_core::Result<_>>()?;
        let mut sq = 0.0f64;
        for g in &grads {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFiniteLoss {
                step: next,
                value: grad_norm,
            });
        }
        let scale = match c.grad_clip {
            Some(max) if grad_norm > max => max / (grad_norm + 1e-6),
            _ => 1.0,
        };
        let lr = c.lr_at(self.step);
        self.opt.step(&self.params, &grads, scale, lr)?;
        self.step = next;
        let ema_decay = self.ema_update()?;
        Ok(StepMetrics {
            step: next,
            loss: total_loss,
            lr,
            grad_norm,
            ema_decay,
        })
    }

    /// The class labels of the images at `indices`, each replaced by the "no class" label
    /// with probability `class_dropout` (drawn from the run's RNG after the batch's timesteps
    /// and noise, so a resumed run draws the same).
    fn batch_labels(&mut self, indices: &[usize], classes: Classes) -> candle_core::Result<Tensor> {
        let all = self
            .data
            .set()
            .labels()
            .expect("checked at construction: a class-conditional run has labels");
        let p = self.config.class_dropout;
        let labels: Vec<u32> = indices
            .iter()
            .map(|&i| match classes.null_label() {
                Some(null) if self.rng.uniform() < p => null,
                _ => all[i] as u32,
            })
            .collect();
        Tensor::new(labels, &self.device)
    }

    /// diffusers' `EMAModel.step`: parameters follow with the scheduled decay, buffers copy.
    fn ema_update(&mut self) -> candle_core::Result<f64> {
        self.ema_steps += 1;
        let decay = self.config.ema.decay(self.ema_steps);
        let current = self.model_tensors();
        for (name, t) in current {
            let updated = if is_buffer(&name) {
                t.detach().copy()?
            } else {
                ema_step(&self.ema[&name], &t, decay)?
            };
            self.ema.insert(name, updated);
        }
        Ok(decay)
    }
}

impl Loss {
    /// The loss of each sample of a batch, `[B]`: the element-wise loss averaged over all but
    /// the first dimension (PyTorch's `reduction="mean"` per sample).
    pub fn per_sample(&self, pred: &Tensor, target: &Tensor) -> candle_core::Result<Tensor> {
        let diff = (pred - target)?;
        let elementwise = match *self {
            Loss::L1 => diff.abs()?,
            Loss::L2 => diff.sqr()?,
            // PyTorch's huber_loss: 0.5 x^2 within delta, delta (|x| - delta / 2) beyond.
            Loss::Huber { delta } => {
                let a = diff.abs()?;
                let quadratic = (diff.sqr()? * 0.5)?;
                let linear = ((&a - delta / 2.0)? * delta)?;
                a.le(delta)?.where_cond(&quadratic, &linear)?
            }
        };
        elementwise.flatten_from(1)?.mean(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Label dropout replaces a label by "no class" at the configured rate and keeps the rest.
    #[test]
    fn class_dropout_replaces_labels_at_its_rate() {
        let mut config = TrainConfig::preset("mnist").expect("preset");
        config.class_dropout = 0.25;
        let data = Arc::new(
            ImageSet::embedded_mnist()
                .expect("embedded")
                .take(3000)
                .resize_to(16),
        );
        let truth: Vec<u8> = data.labels().expect("labelled").to_vec();
        let mut trainer = Trainer::new(config, data, "d", &Device::Cpu).expect("trainer");
        let indices: Vec<usize> = (0..3000).collect();
        let labels: Vec<u32> = trainer
            .batch_labels(&indices, Classes::new(11, true).expect("classes"))
            .expect("labels")
            .to_vec1()
            .expect("u32");
        let dropped = labels.iter().filter(|&&l| l == 10).count() as f64 / 3000.0;
        // 3000 draws: the standard error of the rate is 0.008.
        assert!((dropped - 0.25).abs() < 0.035, "{dropped}");
        for (&l, &t) in labels.iter().zip(&truth) {
            assert!(l == 10 || l == t as u32, "label {l} for class {t}");
        }
    }
}
