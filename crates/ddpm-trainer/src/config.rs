//! The training configuration: everything a run needs besides its data, serialized beside every
//! checkpoint.

use ddpm_forward::Prediction;
use ddpm_sampler::{SamplerKind, SchedulerConfig};
use ddpm_schedule::ScheduleConfig;
use ddpm_unet::{Classes, UnetConfig};
use serde::{Deserialize, Serialize};

/// The regression loss between the network's output and its target.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Loss {
    /// Mean absolute error (the seed's `F.l1_loss`).
    L1,
    /// Mean squared error (the DDPM paper's simplified objective, eq. 14).
    L2,
    /// PyTorch's `huber_loss`: quadratic within `delta`, linear beyond.
    Huber {
        /// Where the quadratic part ends.
        delta: f64,
    },
}

/// How the learning rate evolves after warmup (diffusers' `get_scheduler` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// Linear warmup, then constant (`constant_with_warmup`).
    Constant,
    /// Linear warmup, then half a cosine down to 0 at the last step (`cosine`).
    Cosine,
}

/// AdamW (Loshchilov and Hutter 2019) hyper-parameters, PyTorch's names and meaning. Adam is
/// `weight_decay = 0`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// EMA of the weights with diffusers' warmup schedule (`EMAModel`): the decay after `n`
/// optimizer steps is `1 - (1 + k / inv_gamma)^-power` with `k = n - update_after_step - 1`,
/// clamped to `[min_decay, max_decay]` (0 before the first update).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmaConfig {
    /// The decay the schedule approaches.
    pub max_decay: f64,
    /// A floor on the decay.
    pub min_decay: f64,
    /// Warmup time scale.
    pub inv_gamma: f64,
    /// Warmup exponent (2/3 for long runs, 3/4 for short ones).
    pub power: f64,
    /// Steps before the EMA starts following.
    pub update_after_step: u64,
    /// Use the warmup schedule; without it the decay is `(1 + k) / (10 + k)`.
    pub use_warmup: bool,
}

impl EmaConfig {
    /// diffusers' `train_unconditional.py` defaults: max 0.9999, inv_gamma 1, power 3/4.
    pub fn diffusers() -> Self {
        Self {
            max_decay: 0.9999,
            min_decay: 0.0,
            inv_gamma: 1.0,
            power: 0.75,
            update_after_step: 0,
            use_warmup: true,
        }
    }

    /// The decay used for the `optimization_step`-th update (1-based), diffusers' `get_decay`.
    pub fn decay(&self, optimization_step: u64) -> f64 {
        let step = optimization_step.saturating_sub(self.update_after_step + 1);
        if step == 0 {
            return 0.0;
        }
        let s = step as f64;
        let d = if self.use_warmup {
            1.0 - (1.0 + s / self.inv_gamma).powf(-self.power)
        } else {
            (1.0 + s) / (10.0 + s)
        };
        d.min(self.max_decay).max(self.min_decay)
    }
}

/// Everything about a training run except its data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The network.
    pub model: UnetConfig,
    /// The noise schedule.
    pub schedule: ScheduleConfig,
    /// What the network learns to predict.
    pub objective: Prediction,
    /// The loss.
    pub loss: Loss,
    /// Min-SNR loss weighting (Hang et al. 2023) with this gamma (5 in the paper); `None` is off.
    pub min_snr_gamma: Option<f64>,
    /// The optimizer.
    pub optimizer: AdamWConfig,
    /// Learning-rate schedule after warmup.
    pub lr_schedule: LrSchedule,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// Clip the global gradient norm to this; `None` is off.
    pub grad_clip: Option<f64>,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Images per micro-batch.
    pub batch_size: usize,
    /// Optimizer steps in all.
    pub steps: u64,
    /// The weight EMA.
    pub ema: EmaConfig,
    /// The seed of everything random: initialisation, data order, timesteps, noise, dropout.
    pub seed: u64,
    /// Random horizontal flips of the training images.
    pub flip: bool,
    /// Save a checkpoint every this many steps (and at the end); 0 only at the end.
    pub checkpoint_every: u64,
    /// Keep this many most recent checkpoints.
    pub keep_checkpoints: usize,
    /// Write a sample grid every this many steps (and at the end); 0 only at the end.
    pub sample_every: u64,
    /// Images in each sample grid.
    pub sample_count: usize,
    /// The sampler of the sample grids and the quality report. DDPM's fresh noise at each step
    /// corrects the errors of a small model that deterministic DDIM carries to the end: on the
    /// earlier `mnist` recipe's SimpleUnet, 250 DDPM steps gave a Fréchet distance of 40 where
    /// DDIM's 25 and 50 steps gave 62 and 82. Configurations written before this choice
    /// existed sampled with DDIM.
    #[serde(default = "ddim")]
    pub sampler: SamplerKind,
    /// Sampling steps for the sample grids and the quality report.
    pub sample_steps: usize,
    /// For a class-conditional model: the probability of training an image with the "no
    /// class" label (the model's last class embedding) instead of its own, so that one model
    /// learns both predictions classifier-free guidance combines (Ho and Salimans 2022 use
    /// 0.1-0.2). 0 trains plain conditioning, with every class embedding a real class.
    #[serde(default)]
    pub class_dropout: f64,
    /// The classifier-free guidance scale of the sample grids and the quality report of a
    /// class-conditional model (1 is plain conditional sampling).
    #[serde(default = "one")]
    pub guidance_scale: f64,
}

fn ddim() -> SamplerKind {
    SamplerKind::Ddim
}

fn one() -> f64 {
    1.0
}

/// The recipe names [`TrainConfig::preset`] accepts.
pub const RECIPES: [&str; 3] = ["mnist", "seed", "tiny"];

impl TrainConfig {
    /// The number of real classes a class-conditional model is trained on: its
    /// The classes of a class-conditional model: its `num_class_embeds`, the last one the
    /// "no class" label when `class_dropout` is on (see [`Classes`]). `None` for an
    /// unconditional model, or one whose `num_class_embeds` cannot hold a "no class" label
    /// ([`TrainConfig::validate`] names that).
    pub fn classes(&self) -> Option<Classes> {
        Classes::new(self.model.num_class_embeds()?, self.class_dropout > 0.0).ok()
    }

    /// The sampler settings a model trained with this configuration samples with (see
    /// [`SchedulerConfig::for_training`]).
    pub fn scheduler(&self) -> SchedulerConfig {
        SchedulerConfig::for_training(self.schedule, self.objective)
    }

    /// A named recipe:
    /// - `mnist`: the default for the embedded digits (see the README for what it achieves);
    /// - `seed`: the seed tutorial's setup: SimpleUnet, T = 300 linear, L1 on eps, Adam 1e-3;
    /// - `tiny`: a few-second run for tests and smoke checks.
    pub fn preset(name: &str) -> candle_core::Result<Self> {
        let base = Self {
            model: UnetConfig::preset("seed-small")?,
            schedule: ScheduleConfig::seed_linear(),
            objective: Prediction::Epsilon,
            loss: Loss::L1,
            min_snr_gamma: None,
            optimizer: AdamWConfig {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            lr_schedule: LrSchedule::Constant,
            warmup_steps: 0,
            grad_clip: None,
            grad_accum: 1,
            batch_size: 128,
            steps: 3000,
            ema: EmaConfig::diffusers(),
            seed: 0,
            flip: false,
            checkpoint_every: 500,
            keep_checkpoints: 3,
            sample_every: 500,
            sample_count: 40,
            sampler: SamplerKind::Ddim,
            sample_steps: 50,
            class_dropout: 0.0,
            guidance_scale: 1.0,
        };
        Ok(match name {
            "seed" => base,
            // Sized to finish within 10 minutes on a 2-core CPU (see the README for what it
            // reaches there).
            "mnist" => Self {
                // A small UNet2DModel (residual blocks, GroupNorm) rather than the seed's
                // SimpleUnet: in the same budget, 1000 steps of it reached a Frechet distance
                // of 34 where 3000 steps of SimpleUnet 16/32/64 reached 60-67 (see the README).
                model: UnetConfig::preset("mnist-16-classes")?,
                loss: Loss::L2,
                optimizer: AdamWConfig {
                    lr: 2e-3,
                    ..base.optimizer
                },
                // The improved-DDPM cosine schedule over T = 1000. At 16x16 the linear one
                // leaves SNR < 0.01 from t = 674 on (the cosine one from 936), so a third of
                // the training draws see almost pure noise; with the cosine schedule the same
                // 1200 steps scored 21.5 instead of 29.9 (and 24.2 against 32.3 on other
                // noise). (The seed's T = 300 linear schedule ends at abar_T = 0.05, 22% of the
                // signal left, while sampling starts from pure noise.)
                schedule: ScheduleConfig::cosine(1000),
                lr_schedule: LrSchedule::Cosine,
                warmup_steps: 100,
                grad_clip: Some(1.0),
                batch_size: 64,
                // 1200 steps fit in the 10 minutes with a margin for a slower hour (the
                // quality report included); 1000 steps scored 33.8, 1300 steps 26.5 but took
                // about 8.7 minutes here at 183 images/s.
                steps: 1200,
                ema: EmaConfig {
                    max_decay: 0.995,
                    power: 2.0 / 3.0,
                    ..EmaConfig::diffusers()
                },
                checkpoint_every: 250,
                sample_every: 500,
                sampler: SamplerKind::Ddpm,
                sample_steps: 100,
                // Conditioned on the digit, with label dropout for classifier-free guidance.
                // Unconditional, about one sample in eight was malformed (Frechet distance
                // 21.5). On this recipe's weights, 500 samples on the same noise: guidance 1
                // (plain conditioning) gave 15.8 with 93.0% of samples the digit asked for,
                // 1.25 gave 20.0 / 97.0%, 1.5 31.7 / 99.2%, 2 67.2 / 99.8%, 3 143.6 / 100%. 1.5
                // draws the class asked for more often than the classifier reads real digits
                // right (97.6%), at a moderate cost in diversity (see the README).
                class_dropout: 0.1,
                guidance_scale: 1.5,
                ..base
            },
            "tiny" => Self {
                model: UnetConfig::preset("seed-tiny")?,
                batch_size: 8,
                steps: 10,
                checkpoint_every: 5,
                sample_every: 0,
                sample_count: 4,
                sample_steps: 5,
                ..base
            },
            other => candle_core::bail!("unknown recipe {other:?} (known: {})", RECIPES.join(", ")),
        })
    }

    /// Checks the values that would otherwise fail deep inside a run.
    pub fn validate(&self) -> candle_core::Result<()> {
        fn positive(what: &str, v: f64) -> candle_core::Result<()> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                candle_core::bail!("{what} must be positive, got {v}")
            }
        }
        positive("steps", self.steps as f64)?;
        positive("batch_size", self.batch_size as f64)?;
        let size = self.model.sample_size().unwrap_or(32);
        self.model
            .check_input(self.batch_size, size, size)
            .map_err(|e| candle_core::Error::Msg(format!("the model's sample_size: {e}")))?;
        positive("grad_accum", self.grad_accum as f64)?;
        positive("keep_checkpoints", self.keep_checkpoints as f64)?;
        positive("sample_count", self.sample_count as f64)?;
        positive("sample_steps", self.sample_steps as f64)?;
        positive("lr", self.optimizer.lr)?;
        positive("eps", self.optimizer.eps)?;
        if let Some(c) = self.grad_clip {
            positive("grad_clip", c)?;
        }
        if let Some(g) = self.min_snr_gamma {
            positive("min_snr_gamma", g)?;
        }
        if let Loss::Huber { delta } = self.loss {
            positive("huber delta", delta)?;
        }
        let o = self.optimizer;
        if !(0.0..1.0).contains(&o.beta1) || !(0.0..1.0).contains(&o.beta2) {
            candle_core::bail!(
                "AdamW betas must be in [0, 1), got {} and {}",
                o.beta1,
                o.beta2
            );
        }
        if !(0.0..1.0).contains(&self.ema.max_decay) {
            candle_core::bail!(
                "EMA max_decay must be in [0, 1), got {}",
                self.ema.max_decay
            );
        }
        if !(0.0..1.0).contains(&self.class_dropout) {
            candle_core::bail!(
                "class_dropout must be in [0, 1), got {}",
                self.class_dropout
            );
        }
        if !self.guidance_scale.is_finite() {
            candle_core::bail!("guidance_scale must be finite, got {}", self.guidance_scale);
        }
        match self.model.num_class_embeds() {
            None if self.class_dropout > 0.0 => candle_core::bail!(
                "class_dropout {} needs a class-conditional model (num_class_embeds), this one is unconditional",
                self.class_dropout
            ),
            None if self.guidance_scale != 1.0 => candle_core::bail!(
                "guidance_scale {} needs a class-conditional model (num_class_embeds), this one is unconditional",
                self.guidance_scale
            ),
            Some(n) if self.class_dropout > 0.0 => {
                Classes::new(n, true).map_err(|e| {
                    candle_core::Error::Msg(format!(
                        "class_dropout needs a \"no class\" label: {e}"
                    ))
                })?;
            }
            Some(_) if self.guidance_scale != 1.0 && self.class_dropout == 0.0 => {
                candle_core::bail!(
                    "guidance_scale {} needs a model trained with class_dropout (the \"no class\" prediction)",
                    self.guidance_scale
                )
            }
            _ => {}
        }
        self.schedule.validate()?;
        Ok(())
    }

    /// The learning rate for optimizer step `step` (0-based), as diffusers' schedulers give it.
    pub fn lr_at(&self, step: u64) -> f64 {
        let w = self.warmup_steps;
        let m = if step < w {
            step as f64 / w.max(1) as f64
        } else {
            match self.lr_schedule {
                LrSchedule::Constant => 1.0,
                LrSchedule::Cosine => {
                    let progress = (step - w) as f64 / (self.steps.saturating_sub(w)).max(1) as f64;
                    (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
                }
            }
        };
        self.optimizer.lr * m
    }
}
