//! Sampler settings and diffusers' `scheduler_config.json`.

use ddpm_forward::Prediction;
use ddpm_schedule::{BetaSchedule, DIFFUSERS_BETA_SCHEDULES, ScheduleConfig};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The variance of each DDPM ancestral step (DDPM section 3.2: both give similar samples).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    /// The posterior variance `beta_t (1 - abar_{t-1}) / (1 - abar_t)` (the seed; diffusers'
    /// default).
    FixedSmall,
    /// `beta_t` itself (what `google/ddpm-cifar10-32` ships with).
    FixedLarge,
}

impl std::str::FromStr for VarianceType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            // diffusers' fixed_small_log takes exp(0.5 log v) = sqrt(v): the same numbers.
            "fixed_small" | "fixed_small_log" => Ok(Self::FixedSmall),
            "fixed_large" => Ok(Self::FixedLarge),
            other => Err(format!(
                "variance_type {other:?} is not supported (fixed_small, fixed_small_log or fixed_large)"
            )),
        }
    }
}

/// How `n` sampling timesteps are picked out of `T` (Lin et al. 2023, table 2; diffusers'
/// `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `0, k, 2k, ...` with `k = T / n` (integer division), plus `steps_offset`, reversed.
    Leading,
    /// `T, T - T/n, ...` rounded, minus one: always starts at `T - 1`.
    Trailing,
    /// `n` values evenly spaced over `[0, T - 1]`, rounded, reversed.
    Linspace,
}

impl std::str::FromStr for TimestepSpacing {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "leading" => Ok(Self::Leading),
            "trailing" => Ok(Self::Trailing),
            "linspace" => Ok(Self::Linspace),
            other => Err(format!(
                "timestep_spacing {other:?} is not supported (leading, trailing or linspace)"
            )),
        }
    }
}

/// Which reverse process to run: the name `ddpm sample --sampler` and a training
/// configuration's `sampler` give (`"ddpm"` or `"ddim"` in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    /// DDPM ancestral sampling ([`crate::DdpmSampler`]).
    Ddpm,
    /// DDIM ([`crate::DdimSampler`]).
    Ddim,
}

impl SamplerKind {
    /// The steps a sampler of this kind takes unless told: every training timestep for DDPM,
    /// 50 for DDIM.
    pub fn default_steps(self, num_train_timesteps: usize) -> usize {
        match self {
            Self::Ddpm => num_train_timesteps,
            Self::Ddim => 50,
        }
    }
}

/// Settings of DDPM ancestral sampling (DDPM algorithm 2, eq. 11).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DdpmConfig {
    /// Steps to take; `None` takes all `T` (the seed and the paper). Fewer steps are spaced by
    /// `timestep_spacing`, as diffusers' `DDPMScheduler.set_timesteps` does.
    pub num_inference_steps: Option<usize>,
    /// The step variance.
    pub variance_type: VarianceType,
    /// What the model predicts.
    pub prediction: Prediction,
    /// Clip the predicted `x_0` to `[-clip_sample_range, clip_sample_range]`.
    pub clip_sample: bool,
    /// The clipping bound (1 for images in [-1, 1]).
    pub clip_sample_range: f64,
    /// Spacing of the timesteps when `num_inference_steps` is set.
    pub timestep_spacing: TimestepSpacing,
    /// Added to every timestep with `leading` spacing.
    pub steps_offset: usize,
}

impl DdpmConfig {
    /// The seed tutorial's sampler: every step, posterior variance, epsilon, no clipping.
    pub fn seed() -> Self {
        Self {
            num_inference_steps: None,
            variance_type: VarianceType::FixedSmall,
            prediction: Prediction::Epsilon,
            clip_sample: false,
            clip_sample_range: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
        }
    }
}

/// Settings of DDIM sampling (Song et al. 2021, eq. 12).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DdimConfig {
    /// Steps to take, at most `T`.
    pub num_inference_steps: usize,
    /// 0 is deterministic DDIM; 1 has DDPM's posterior variance. Must be >= 0.
    pub eta: f64,
    /// How the steps are spaced.
    pub timestep_spacing: TimestepSpacing,
    /// Added to every timestep with `leading` spacing (Stable Diffusion uses 1).
    pub steps_offset: usize,
    /// Take `abar = 1` before the first training step (else `abar_0`).
    pub set_alpha_to_one: bool,
    /// What the model predicts.
    pub prediction: Prediction,
    /// Clip the predicted `x_0`.
    pub clip_sample: bool,
    /// The clipping bound.
    pub clip_sample_range: f64,
    /// Recompute the noise estimate from the clipped `x_0` (diffusers' `use_clipped_model_output`).
    pub use_clipped_model_output: bool,
}

impl DdimConfig {
    /// DDIM with diffusers' `DDIMScheduler` defaults: leading spacing, no offset,
    /// `set_alpha_to_one`, epsilon, clipping to [-1, 1].
    pub fn new(num_inference_steps: usize, eta: f64) -> Self {
        Self {
            num_inference_steps,
            eta,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
            set_alpha_to_one: true,
            prediction: Prediction::Epsilon,
            clip_sample: true,
            clip_sample_range: 1.0,
            use_clipped_model_output: false,
        }
    }
}

/// The timesteps diffusers' `set_timesteps` picks: `n` of `0..T`, descending.
pub fn spaced_timesteps(
    num_train_timesteps: usize,
    n: usize,
    spacing: TimestepSpacing,
    steps_offset: usize,
) -> candle_core::Result<Vec<usize>> {
    let t_max = num_train_timesteps;
    if n == 0 {
        candle_core::bail!("the number of sampling steps must be at least 1, got 0");
    }
    if n > t_max {
        candle_core::bail!(
            "{n} sampling steps is more than the {t_max} timesteps the model was trained with"
        );
    }
    let steps: Vec<i64> = match spacing {
        TimestepSpacing::Leading => {
            let ratio = (t_max / n) as i64;
            (0..n as i64)
                .rev()
                .map(|i| i * ratio + steps_offset as i64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = t_max as f64 / n as f64;
            // numpy's arange(T, 0, -ratio): ceil(T / ratio) values T - k * ratio.
            let len = (t_max as f64 / ratio).ceil() as usize;
            (0..len)
                .map(|k| (t_max as f64 - k as f64 * ratio).round_ties_even() as i64 - 1)
                .collect()
        }
        TimestepSpacing::Linspace => {
            let last = (t_max - 1) as f64;
            (0..n)
                .rev()
                .map(|i| {
                    let v = if n == 1 {
                        0.0
                    } else {
                        last * i as f64 / (n - 1) as f64
                    };
                    v.round_ties_even() as i64
                })
                .collect()
        }
    };
    steps
        .into_iter()
        .map(|t| {
            if t < 0 || t >= t_max as i64 {
                candle_core::bail!(
                    "timestep {t} (spacing {spacing:?}, steps_offset {steps_offset}) is outside 0..{t_max}"
                )
            }
            Ok(t as usize)
        })
        .collect()
}

/// A diffusers `scheduler_config.json` (`DDPMScheduler` or `DDIMScheduler`), resolved into the
/// training schedule and the settings both samplers take from it.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// `_class_name`: `DDPMScheduler` or `DDIMScheduler`.
    pub class_name: String,
    /// The training noise schedule.
    pub schedule: ScheduleConfig,
    /// `prediction_type`.
    pub prediction: Prediction,
    /// `clip_sample`.
    pub clip_sample: bool,
    /// `clip_sample_range`.
    pub clip_sample_range: f64,
    /// `variance_type` (DDPM only; DDIM configs default to `fixed_small`).
    pub variance_type: VarianceType,
    /// `set_alpha_to_one` (DDIM only).
    pub set_alpha_to_one: bool,
    /// `steps_offset`.
    pub steps_offset: usize,
    /// `timestep_spacing`.
    pub timestep_spacing: TimestepSpacing,
}

/// Keys either scheduler may carry that change nothing here once checked (`tensor_format` is
/// from diffusers 0.1; `skip_prk_steps` from PNDM configs that DDIM pipelines reuse).
const INERT_KEYS: [&str; 4] = [
    "tensor_format",
    "skip_prk_steps",
    "dynamic_thresholding_ratio",
    "sample_max_value",
];

impl SchedulerConfig {
    /// The seed's schedule and sampler settings: T = 300 linear, fixed_small, no clipping.
    pub fn seed() -> Self {
        Self {
            class_name: "DDPMScheduler".into(),
            schedule: ScheduleConfig::seed_linear(),
            prediction: Prediction::Epsilon,
            clip_sample: false,
            clip_sample_range: 1.0,
            variance_type: VarianceType::FixedSmall,
            set_alpha_to_one: true,
            steps_offset: 0,
            timestep_spacing: TimestepSpacing::Leading,
        }
    }

    /// The settings a model trained by `ddpm-trainer` with `schedule` and `prediction`
    /// samples with (and that `ddpm export` writes as its `scheduler_config.json`): diffusers'
    /// `DDPMScheduler` with the posterior variance, `x_0` clipped to [-1, 1], leading spacing.
    pub fn for_training(schedule: ScheduleConfig, prediction: Prediction) -> Self {
        Self {
            class_name: "DDPMScheduler".into(),
            schedule,
            prediction,
            clip_sample: true,
            clip_sample_range: 1.0,
            variance_type: VarianceType::FixedSmall,
            set_alpha_to_one: true,
            steps_offset: 0,
            timestep_spacing: TimestepSpacing::Leading,
        }
    }

    /// The sampler `kind` with this config's settings over its schedule: `steps` spaced steps
    /// (unless `None`: [`SamplerKind::default_steps`]), and DDIM's `eta` (which DDPM must leave
    /// at 0).
    pub fn sampler(
        &self,
        kind: SamplerKind,
        steps: Option<usize>,
        eta: f64,
    ) -> candle_core::Result<Box<dyn crate::Scheduler>> {
        let schedule = ddpm_schedule::Schedule::new(self.schedule)?;
        Ok(match kind {
            SamplerKind::Ddpm => {
                if eta != 0.0 {
                    candle_core::bail!("eta applies to DDIM only, got {eta} for DDPM");
                }
                Box::new(crate::DdpmSampler::new(&schedule, self.ddpm(steps))?)
            }
            SamplerKind::Ddim => {
                let steps = steps.unwrap_or(kind.default_steps(self.schedule.num_train_timesteps));
                Box::new(crate::DdimSampler::new(&schedule, self.ddim(steps, eta))?)
            }
        })
    }

    /// Parses a `scheduler_config.json`. Missing keys take diffusers' defaults; unknown keys and
    /// unsupported values (`thresholding`, `trained_betas`, learned variances, ...) are errors
    /// naming them.
    pub fn from_json(text: &str) -> candle_core::Result<Self> {
        Self::parse(text, false).map(|(c, _)| c)
    }

    /// [`SchedulerConfig::from_json`], but a key it does not know (one a newer diffusers
    /// added) is left out with a warning, as diffusers itself does; the warnings come back,
    /// one line each. Unsupported values of known keys are still errors.
    pub fn from_json_lenient(text: &str) -> candle_core::Result<(Self, Vec<String>)> {
        Self::parse(text, true)
    }

    fn parse(text: &str, lenient: bool) -> candle_core::Result<(Self, Vec<String>)> {
        let mut warnings = Vec::new();
        let value: Value =
            serde_json::from_str(text).map_err(|e| msg(format!("scheduler_config.json: {e}")))?;
        let Value::Object(map) = value else {
            return Err(msg("scheduler_config.json: expected a JSON object".into()));
        };
        let class_name = match map.get("_class_name") {
            None => "DDPMScheduler".to_string(),
            Some(Value::String(s)) if s == "DDPMScheduler" || s == "DDIMScheduler" => s.clone(),
            Some(other) => {
                return Err(msg(format!(
                    "scheduler_config.json: scheduler {other} is not supported (DDPMScheduler or DDIMScheduler)"
                )));
            }
        };
        let r = Reader { map: &map };
        for key in map.keys() {
            let known = key.starts_with('_')
                || INERT_KEYS.contains(&key.as_str())
                || [
                    "num_train_timesteps",
                    "beta_start",
                    "beta_end",
                    "beta_schedule",
                    "trained_betas",
                    "variance_type",
                    "clip_sample",
                    "clip_sample_range",
                    "prediction_type",
                    "thresholding",
                    "timestep_spacing",
                    "steps_offset",
                    "rescale_betas_zero_snr",
                    "set_alpha_to_one",
                ]
                .contains(&key.as_str());
            if !known {
                if !lenient {
                    return Err(msg(format!("scheduler_config.json: unknown key {key:?}")));
                }
                warnings.push(format!(
                    "scheduler_config.json: unknown key {key:?} ignored (this library reads diffusers {}'s keys)",
                    ddpm_forward::DIFFUSERS_VERSION
                ));
            }
        }
        if r.bool("thresholding", false)? {
            return Err(msg(
                "scheduler_config.json: thresholding = true is not supported".into(),
            ));
        }
        if !matches!(map.get("trained_betas"), None | Some(Value::Null)) {
            return Err(msg(
                "scheduler_config.json: trained_betas is not supported (use a named beta_schedule)"
                    .into(),
            ));
        }
        let num_train_timesteps = r.usize("num_train_timesteps", 1000)?;
        let beta_start = r.f64("beta_start", 1e-4)?;
        let beta_end = r.f64("beta_end", 0.02)?;
        let name = r.str("beta_schedule", "linear")?;
        let beta_schedule =
            BetaSchedule::from_diffusers(&name, beta_start, beta_end).ok_or_else(|| {
                msg(format!(
                    "scheduler_config.json: beta_schedule {name:?} is not supported ({})",
                    DIFFUSERS_BETA_SCHEDULES.join(", ")
                ))
            })?;
        let schedule = ScheduleConfig {
            num_train_timesteps,
            beta_schedule,
            rescale_betas_zero_snr: r.bool("rescale_betas_zero_snr", false)?,
        };
        schedule
            .validate()
            .map_err(|e| msg(format!("scheduler_config.json: {e}")))?;
        let parse =
            |key: &str, default: &str| -> candle_core::Result<String> { r.str(key, default) };
        Ok((
            Self {
                class_name,
                schedule,
                prediction: parse("prediction_type", "epsilon")?
                    .parse()
                    .map_err(|e: String| msg(format!("scheduler_config.json: {e}")))?,
                clip_sample: r.bool("clip_sample", true)?,
                clip_sample_range: r.f64("clip_sample_range", 1.0)?,
                variance_type: parse("variance_type", "fixed_small")?
                    .parse()
                    .map_err(|e: String| msg(format!("scheduler_config.json: {e}")))?,
                set_alpha_to_one: r.bool("set_alpha_to_one", true)?,
                steps_offset: r.usize("steps_offset", 0)?,
                timestep_spacing: parse("timestep_spacing", "leading")?
                    .parse()
                    .map_err(|e: String| msg(format!("scheduler_config.json: {e}")))?,
            },
            warnings,
        ))
    }

    /// The DDPM settings from this config, taking `num_inference_steps` (all `T` when `None`).
    pub fn ddpm(&self, num_inference_steps: Option<usize>) -> DdpmConfig {
        DdpmConfig {
            num_inference_steps,
            variance_type: self.variance_type,
            prediction: self.prediction,
            clip_sample: self.clip_sample,
            clip_sample_range: self.clip_sample_range,
            timestep_spacing: self.timestep_spacing,
            steps_offset: self.steps_offset,
        }
    }

    /// The DDIM settings from this config, for `num_inference_steps` steps and `eta`.
    pub fn ddim(&self, num_inference_steps: usize, eta: f64) -> DdimConfig {
        DdimConfig {
            num_inference_steps,
            eta,
            timestep_spacing: self.timestep_spacing,
            steps_offset: self.steps_offset,
            set_alpha_to_one: self.set_alpha_to_one,
            prediction: self.prediction,
            clip_sample: self.clip_sample,
            clip_sample_range: self.clip_sample_range,
            use_clipped_model_output: false,
        }
    }

    /// A `scheduler_config.json` that diffusers' `DDPMScheduler.from_config` (and
    /// `DDIMScheduler.from_config`) reads back into these settings.
    pub fn to_json(&self) -> candle_core::Result<String> {
        let mut m = Map::new();
        m.insert("_class_name".into(), self.class_name.clone().into());
        m.insert(
            "_diffusers_version".into(),
            ddpm_forward::DIFFUSERS_VERSION.into(),
        );
        m.insert(
            "num_train_timesteps".into(),
            self.schedule.num_train_timesteps.into(),
        );
        let (name, start, end) = self.schedule.beta_schedule.to_diffusers().ok_or_else(|| {
            msg(format!(
                "the schedule {:?} has no diffusers equivalent",
                self.schedule.beta_schedule
            ))
        })?;
        m.insert("beta_schedule".into(), name.into());
        m.insert("beta_start".into(), start.into());
        m.insert("beta_end".into(), end.into());
        m.insert("trained_betas".into(), Value::Null);
        m.insert(
            "rescale_betas_zero_snr".into(),
            self.schedule.rescale_betas_zero_snr.into(),
        );
        m.insert("prediction_type".into(), self.prediction.as_str().into());
        m.insert("clip_sample".into(), self.clip_sample.into());
        m.insert("clip_sample_range".into(), self.clip_sample_range.into());
        let variance = match self.variance_type {
            VarianceType::FixedSmall => "fixed_small",
            VarianceType::FixedLarge => "fixed_large",
        };
        m.insert("variance_type".into(), variance.into());
        m.insert("set_alpha_to_one".into(), self.set_alpha_to_one.into());
        m.insert("steps_offset".into(), self.steps_offset.into());
        let spacing = match self.timestep_spacing {
            TimestepSpacing::Leading => "leading",
            TimestepSpacing::Trailing => "trailing",
            TimestepSpacing::Linspace => "linspace",
        };
        m.insert("timestep_spacing".into(), spacing.into());
        m.insert("thresholding".into(), false.into());
        Ok(serde_json::to_string_pretty(&Value::Object(m)).expect("JSON values serialize"))
    }
}

fn msg(s: String) -> candle_core::Error {
    candle_core::Error::Msg(s)
}

/// Typed reads of a JSON object with defaults and errors that name the key.
struct Reader<'a> {
    map: &'a Map<String, Value>,
}

impl Reader<'_> {
    fn get<T>(
        &self,
        key: &str,
        default: T,
        what: &str,
        f: impl Fn(&Value) -> Option<T>,
    ) -> candle_core::Result<T> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => f(v).ok_or_else(|| {
                msg(format!(
                    "scheduler_config.json: {key} must be {what}, got {v}"
                ))
            }),
        }
    }

    fn bool(&self, key: &str, default: bool) -> candle_core::Result<bool> {
        self.get(key, default, "true or false", Value::as_bool)
    }

    fn f64(&self, key: &str, default: f64) -> candle_core::Result<f64> {
        self.get(key, default, "a number", Value::as_f64)
    }

    fn usize(&self, key: &str, default: usize) -> candle_core::Result<usize> {
        self.get(key, default, "a non-negative integer", |v| {
            v.as_u64().map(|u| u as usize)
        })
    }

    fn str(&self, key: &str, default: &str) -> candle_core::Result<String> {
        self.get(key, default.to_string(), "a string", |v| {
            v.as_str().map(str::to_string)
        })
    }
}
