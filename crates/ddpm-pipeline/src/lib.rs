//! A diffusion model with everything needed to sample from it, opened from wherever it lives.
//!
//! - [`Pipeline::open`] takes a training run folder (its newest checkpoint), a checkpoint
//!   file, or a diffusers model folder (`config.json`, `diffusion_pytorch_model.safetensors`,
//!   optionally `scheduler_config.json` and the `train_config.json` that [`export`] writes),
//!   and gives the U-Net with the scheduler settings, classes and guidance scale it was
//!   trained with.
//! - [`Pipeline::sampler`] builds the sampler you ask for over the model's own schedule;
//!   [`Pipeline::conditioning`] resolves the classes to draw and the guidance scale (the one
//!   "no class" rule, [`Classes`]); [`Pipeline::sample`] runs the loop with the weights frozen.
//! - [`export`] writes a run's weights as a diffusers folder or one safetensors file.
//!
//! ```
//! use candle_core::{DType, Device};
//! use candle_nn::{VarBuilder, VarMap};
//! use ddpm_forward::NoiseSource;
//! use ddpm_pipeline::{ExportFormat, Pipeline, Weights, export};
//! use ddpm_sampler::SamplerKind;
//! use ddpm_trainer::TrainConfig;
//! use ddpm_unet::{Unet, init_seeded, varmap_tensors};
//!
//! # fn main() -> candle_core::Result<()> {
//! // A freshly initialised model of the `tiny` recipe, exported as a diffusers folder.
//! let config = TrainConfig::preset("tiny")?;
//! let varmap = VarMap::new();
//! Unet::new(&config.model, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
//! init_seeded(&varmap, 0)?;
//! let dir = tempfile::tempdir()?;
//! export(&config, &varmap_tensors(&varmap), ExportFormat::Diffusers, dir.path())?;
//!
//! // Opened again: the model, its schedule and objective, ready to sample.
//! let pipeline = Pipeline::open(dir.path(), Weights::Ema, &Device::Cpu)?;
//! let sampler = pipeline.sampler(SamplerKind::Ddim, Some(5), 0.0)?;
//! let mut rng = NoiseSource::new(0);
//! let init = rng.randn((2, 1, 16, 16), &Device::Cpu)?;
//! let images = pipeline.sample(sampler.as_ref(), None, init, &mut rng, |_| {})?;
//! assert_eq!(images.dims(), &[2, 1, 16, 16]);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ddpm_forward::NoiseSource;
use ddpm_sampler::{Progress, SamplerKind, Scheduler, SchedulerConfig};
use ddpm_trainer::{Checkpoint, RunPaths, TrainConfig, atomic_write};
use ddpm_unet::{Classes, Denoiser, Guided, Unet, UnetConfig};

/// The training configuration [`export`] writes beside a diffusers folder's own files: what
/// `config.json` cannot say (whether the last class embedding is "no class", the guidance
/// scale to sample with) and how the model was trained.
pub const TRAIN_CONFIG: &str = "train_config.json";

/// The file name of diffusers' PyTorch weights, read where the safetensors file is absent.
pub const PYTORCH_WEIGHTS: &str = "diffusion_pytorch_model.bin";

/// Whether `path` names a PyTorch weights file by its extension (`.bin`, `.pt`, `.pth`).
pub fn is_pytorch_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("bin" | "pt" | "pth")
    )
}

/// A diffusers pipeline folder's index file.
pub const MODEL_INDEX: &str = "model_index.json";

/// How [`Pipeline::open_with`] opens a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// A checkpoint's EMA or raw weights.
    pub weights: Weights,
    /// A weights variant of a model folder: `fp16` reads
    /// `diffusion_pytorch_model.fp16.safetensors` (or `.bin`).
    pub variant: Option<String>,
    /// The folder inside the given one that holds the model (diffusers' `subfolder`, such as
    /// `unet`); its scheduler is taken from `scheduler/` beside it where there is one.
    pub subfolder: Option<String>,
}

impl Open {
    /// `weights`, no variant, no subfolder.
    pub fn new(weights: Weights) -> Self {
        Self {
            weights,
            variant: None,
            subfolder: None,
        }
    }
}

/// Which weights of a checkpoint to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// The exponential moving average (what a run samples with).
    Ema,
    /// The raw weights of the last optimizer step.
    Raw,
}

impl Weights {
    fn name(self) -> &'static str {
        match self {
            Weights::Ema => "EMA",
            Weights::Raw => "raw",
        }
    }
}

/// A model ready to sample, with the schedule, classes and guidance scale it was trained with.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The model's configuration.
    pub config: UnetConfig,
    /// The model.
    pub unet: Unet,
    /// The sampler settings it was trained for (its schedule and prediction type).
    pub scheduler: SchedulerConfig,
    /// What was loaded, for messages: the path, and for a checkpoint its step and weights.
    pub source: String,
    /// The classes as its training configuration says, where one came with it.
    trained_classes: Option<Classes>,
    /// The guidance scale it samples with unless told (the run's own; 1 for a plain
    /// diffusers folder).
    pub guidance: f64,
    /// The sampler and steps it samples with unless told: a run's own (the ones its grids and
    /// quality report used, also from an exported folder's train_config.json), else what the
    /// pipeline or the folder's `scheduler_config.json` names (`DDPMScheduler`: DDPM over every
    /// training step, as diffusers' `DDPMPipeline`; `DDIMScheduler`: DDIM over 50, as
    /// `DDIMPipeline`). `None` steps are the kind's [`SamplerKind::default_steps`].
    pub default_sampler: (SamplerKind, Option<usize>),
    /// What the caller should tell the user: newer checkpoints of a run that could not be
    /// read and were passed over, one line each.
    pub warnings: Vec<String>,
}

/// The classes a class-conditional model draws, one per image, and the guidance scale: what
/// [`Pipeline::conditioning`] resolves.
#[derive(Debug, Clone, PartialEq)]
pub struct Conditioning {
    /// The model's classes.
    pub classes: Classes,
    /// The class of each image, in order.
    pub labels: Vec<u32>,
    /// The classifier-free guidance scale.
    pub guidance: f64,
}

/// The newest checkpoint of a run folder that reads and verifies, read onto the CPU, with a
/// warning line for each newer one passed over; an error naming the folder when there is none.
pub fn latest_checkpoint(run: &Path) -> candle_core::Result<(PathBuf, Checkpoint, Vec<String>)> {
    let found = RunPaths::new(run).newest_good_checkpoint(&Device::Cpu)?;
    let warnings = skipped_warnings(&found.skipped);
    Ok((found.path, found.checkpoint, warnings))
}

fn skipped_warnings(skipped: &[(PathBuf, candle_core::Error)]) -> Vec<String> {
    skipped
        .iter()
        .map(|(path, why)| {
            let why = why.to_string();
            let why = why.lines().next().unwrap_or_default().to_string();
            format!("skipping checkpoint {}: {why}", path.display())
        })
        .collect()
}

impl Pipeline {
    /// Opens what `path` names: a run folder (with `checkpoints/`: its newest checkpoint), a
    /// checkpoint file, or a diffusers model folder (`config.json` and
    /// `diffusion_pytorch_model.safetensors`; `scheduler_config.json` if present, else
    /// diffusers' `DDPMScheduler` defaults; and [`TRAIN_CONFIG`] if present). Checkpoints give
    /// the `weights` asked for; a model folder has only one set.
    pub fn open(path: &Path, weights: Weights, device: &Device) -> candle_core::Result<Self> {
        Self::open_with(path, &Open::new(weights), device)
    }

    /// [`Pipeline::open`] with diffusers' loading options: a weights `variant`
    /// (`diffusion_pytorch_model.fp16.safetensors`) and a `subfolder` holding the model.
    /// A diffusers pipeline folder (`model_index.json` naming a `DDPMPipeline` or
    /// `DDIMPipeline`, the model in `unet/`, the scheduler in `scheduler/`) opens as its model
    /// with its scheduler, sampling by default as that pipeline does.
    pub fn open_with(path: &Path, open: &Open, device: &Device) -> candle_core::Result<Self> {
        let weights = open.weights;
        if !path.exists() {
            candle_core::bail!("{} does not exist", path.display());
        }
        if path.is_dir() && path.join("checkpoints").is_dir() {
            let found = RunPaths::new(path).newest_good_checkpoint(device)?;
            let mut pipeline =
                Self::from_checkpoint(&found.path, found.checkpoint, weights, device)?;
            pipeline.warnings = skipped_warnings(&found.skipped);
            Ok(pipeline)
        } else if is_pytorch_file(path) {
            candle_core::bail!(
                "{} is PyTorch weights without a config: open it with Pipeline::from_pytorch (ddpm: --config PRESET or config.json)",
                path.display()
            )
        } else if path.is_file() {
            let ck = Checkpoint::read(path, device)?;
            Self::from_checkpoint(path, ck, weights, device)
        } else if let Some(sub) = &open.subfolder {
            let scheduler = path.join("scheduler").join("scheduler_config.json");
            let scheduler = scheduler.is_file().then_some(scheduler);
            Self::from_folder(&path.join(sub), scheduler, None, open, device)
        } else if path.join(MODEL_INDEX).is_file() {
            Self::from_pipeline_folder(path, open, device)
        } else {
            Self::from_folder(path, None, None, open, device)
        }
    }

    /// A diffusers pipeline folder: `model_index.json`, `unet/`, `scheduler/`.
    fn from_pipeline_folder(
        path: &Path,
        open: &Open,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let index_path = path.join(MODEL_INDEX);
        let index: serde_json::Value = serde_json::from_str(&read(&index_path)?)
            .map_err(|e| msg(format!("{}: {e}", index_path.display())))?;
        let class = index["_class_name"].as_str().unwrap_or_default();
        let kind = match class {
            "DDPMPipeline" => (SamplerKind::Ddpm, None),
            "DDIMPipeline" => (SamplerKind::Ddim, None),
            other => candle_core::bail!(
                "{}: pipeline {other:?} is not supported (DDPMPipeline or DDIMPipeline)",
                index_path.display()
            ),
        };
        for (part, want) in [("unet", "UNet2DModel"), ("scheduler", "")] {
            let entry = &index[part];
            let named = entry.get(1).and_then(|v| v.as_str());
            if named.is_none() || (!want.is_empty() && named != Some(want)) {
                candle_core::bail!(
                    "{}: {part} is {entry}, expected [\"diffusers\", \"{}\"]",
                    index_path.display(),
                    if want.is_empty() {
                        "DDPMScheduler"
                    } else {
                        want
                    }
                );
            }
        }
        let scheduler = path.join("scheduler").join("scheduler_config.json");
        Self::from_folder(
            &path.join("unet"),
            Some(scheduler),
            Some(kind),
            open,
            device,
        )
    }

    fn from_checkpoint(
        path: &Path,
        ck: Checkpoint,
        weights: Weights,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let tensors = match weights {
            Weights::Ema => ck.ema,
            Weights::Raw => ck.model,
        };
        let unet = Unet::from_tensors(&ck.config.model, tensors, device)
            .map_err(|e| msg(format!("loading {}: {e}", path.display())))?;
        Ok(Self {
            default_sampler: run_sampler(&ck.config),
            scheduler: ck.config.scheduler(),
            trained_classes: ck.config.classes(),
            guidance: ck.config.guidance_scale,
            config: ck.config.model,
            unet,
            source: format!(
                "{} (step {}, {} weights)",
                path.display(),
                ck.step,
                weights.name()
            ),
            warnings: Vec::new(),
        })
    }

    /// A model folder, its scheduler config at `scheduler_path` (default: beside it), sampling
    /// by default with `pipeline_sampler` where a pipeline says.
    fn from_folder(
        path: &Path,
        scheduler_path: Option<PathBuf>,
        pipeline_sampler: Option<(SamplerKind, Option<usize>)>,
        open: &Open,
        device: &Device,
    ) -> candle_core::Result<Self> {
        if !path.join("config.json").is_file() {
            candle_core::bail!(
                "{} is neither a run folder (with checkpoints/), a checkpoint file, nor a model folder (with config.json)",
                path.display()
            );
        }
        // As diffusers: keys of a newer version are ignored with a warning.
        let config_path = path.join("config.json");
        let (config, mut warnings) = UnetConfig::from_json_lenient(&read(&config_path)?)
            .map_err(|e| msg(format!("{}: {e}", config_path.display())))?;
        // diffusers' safetensors weights, else the PyTorch pickle many hub repos carry alone.
        let (safetensors, pickle) = match &open.variant {
            None => (
                path.join(ddpm_unet::DIFFUSERS_WEIGHTS),
                path.join(PYTORCH_WEIGHTS),
            ),
            Some(v) => (
                path.join(format!("diffusion_pytorch_model.{v}.safetensors")),
                path.join(format!("diffusion_pytorch_model.{v}.bin")),
            ),
        };
        if open.variant.is_some() && !safetensors.is_file() && !pickle.is_file() {
            candle_core::bail!(
                "{} has no {} weights: neither {} nor {}",
                path.display(),
                open.variant.as_deref().unwrap_or_default(),
                safetensors.display(),
                pickle.display()
            );
        }
        let (weights, tensors) = if safetensors.is_file() || !pickle.is_file() {
            let tensors = ddpm_unet::read_safetensors(&safetensors, device)?;
            (safetensors, tensors)
        } else {
            let tensors = ddpm_unet::read_pytorch(&pickle, device)?;
            (pickle, tensors)
        };
        let unet = Unet::from_tensors(&config, tensors, device)
            .map_err(|e| msg(format!("{}: {e}", weights.display())))?;
        let train_path = path.join(TRAIN_CONFIG);
        let (trained_classes, guidance, trained_sampler) = if train_path.is_file() {
            let train: TrainConfig = serde_json::from_str(&read(&train_path)?)
                .map_err(|e| msg(format!("{}: {e}", train_path.display())))?;
            if train.model != config {
                candle_core::bail!(
                    "{} describes another model than {}",
                    train_path.display(),
                    path.join("config.json").display()
                );
            }
            (
                train.classes(),
                train.guidance_scale,
                Some(run_sampler(&train)),
            )
        } else {
            (None, 1.0, None)
        };
        let scheduler_path = scheduler_path.unwrap_or_else(|| path.join("scheduler_config.json"));
        let scheduler = if scheduler_path.is_file() {
            let (scheduler, more) = SchedulerConfig::from_json_lenient(&read(&scheduler_path)?)
                .map_err(|e| msg(format!("{}: {e}", scheduler_path.display())))?;
            warnings.extend(more);
            scheduler
        } else {
            SchedulerConfig::from_json("{}")?
        };
        let default_sampler =
            trained_sampler
                .or(pipeline_sampler)
                .unwrap_or(match scheduler.class_name.as_str() {
                    "DDIMScheduler" => (SamplerKind::Ddim, None),
                    _ => (SamplerKind::Ddpm, None),
                });
        Ok(Self {
            config,
            unet,
            default_sampler,
            scheduler,
            source: path.display().to_string(),
            trained_classes,
            guidance,
            warnings,
        })
    }

    /// A PyTorch weights file (a `torch.save` of a `state_dict`, such as the seed tutorial's
    /// `torch.save(model.state_dict(), ...)`) with the model `config` it belongs to. It samples
    /// with the seed's schedule (T = 300 linear, DDPM over every step) for a `SimpleUnet`, and
    /// diffusers' `DDPMScheduler` defaults for a `UNet2DModel`.
    pub fn from_pytorch(
        path: &Path,
        config: UnetConfig,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let tensors = ddpm_unet::read_pytorch(path, device)?;
        let unet = Unet::from_tensors(&config, tensors, device)
            .map_err(|e| msg(format!("{}: {e}", path.display())))?;
        let scheduler = match config {
            UnetConfig::Simple(_) => SchedulerConfig::seed(),
            UnetConfig::Unet2d(_) => SchedulerConfig::from_json("{}")?,
        };
        Ok(Self {
            trained_classes: None,
            guidance: 1.0,
            default_sampler: (SamplerKind::Ddpm, None),
            scheduler,
            source: path.display().to_string(),
            warnings: Vec::new(),
            config,
            unet,
        })
    }

    /// The sampler `kind` over the model's schedule with its settings: `steps` spaced steps
    /// (`None`: every training step for DDPM, 50 for DDIM) and DDIM's `eta`.
    pub fn sampler(
        &self,
        kind: SamplerKind,
        steps: Option<usize>,
        eta: f64,
    ) -> candle_core::Result<Box<dyn Scheduler>> {
        self.scheduler.sampler(kind, steps, eta)
    }

    /// The classes of a class-conditional model sampled with guidance scale `guidance`: as
    /// its training configuration says, else (a plain diffusers folder)
    /// [`Classes::assumed`]. `None` for an unconditional model.
    pub fn classes(&self, guidance: f64) -> candle_core::Result<Option<Classes>> {
        let Some(n) = self.unet.num_class_embeds() else {
            return Ok(None);
        };
        match self.trained_classes {
            Some(c) => Ok(Some(c)),
            None => Classes::assumed(n, guidance).map(Some),
        }
    }

    /// The conditioning of `count` images: the classes `wanted` in turn (every class in turn
    /// when empty), with `guidance` (the model's own scale when `None`). `None` for an
    /// unconditional model, where asking for classes or guidance is an error.
    pub fn conditioning(
        &self,
        wanted: &[u32],
        guidance: Option<f64>,
        count: usize,
    ) -> candle_core::Result<Option<Conditioning>> {
        let scale = guidance.unwrap_or(self.guidance);
        let Some(classes) = self.classes(scale)? else {
            if !wanted.is_empty() || guidance.is_some() {
                candle_core::bail!(
                    "classes and guidance need a class-conditional model (num_class_embeds); {} is unconditional",
                    self.source
                );
            }
            return Ok(None);
        };
        for &c in wanted {
            classes.check(c)?;
        }
        let labels = if wanted.is_empty() {
            classes.cycle(count)
        } else {
            (0..count).map(|i| wanted[i % wanted.len()]).collect()
        };
        Ok(Some(Conditioning {
            classes,
            labels,
            guidance: scale,
        }))
    }

    /// Runs `scheduler` from `init` with the weights frozen (see `Unet::freeze_weights`),
    /// conditioned as given (a class-conditional model needs it), calling `on_step` after each
    /// step. Returns the final sample, not clamped. A model prediction with NaN or infinite
    /// values stops the loop with an error naming the step (one reduction per step, read on
    /// the host).
    pub fn sample(
        &self,
        scheduler: &dyn Scheduler,
        conditioning: Option<&Conditioning>,
        init: Tensor,
        rng: &mut NoiseSource,
        on_step: impl FnMut(&Progress<'_>),
    ) -> candle_core::Result<Tensor> {
        let _frozen = self.unet.freeze_weights();
        let timesteps = scheduler.timesteps();
        match conditioning {
            Some(c) => {
                let device = init.device().clone();
                let guided = Guided::new(&self.unet, c.classes, &c.labels, c.guidance, &device)?;
                let checked = Finite::new(&guided, timesteps);
                ddpm_sampler::sample(&checked, scheduler, init, rng, on_step)
            }
            None => {
                let checked = Finite::new(&self.unet, timesteps);
                ddpm_sampler::sample(&checked, scheduler, init, rng, on_step)
            }
        }
    }

    /// The image size to sample at: `asked`, else the model's `sample_size`, else 32; an error
    /// unless a positive multiple of the model's downsampling factor.
    pub fn image_size(&self, asked: Option<usize>) -> candle_core::Result<usize> {
        let size = asked.or(self.config.sample_size()).unwrap_or(32);
        self.config.check_input(1, size, size)?;
        Ok(size)
    }
}

/// A model whose every prediction is checked for NaN and infinite values, counting its calls
/// so that an error names the sampling step.
struct Finite<'a, D> {
    model: &'a D,
    timesteps: &'a [usize],
    calls: std::cell::Cell<usize>,
}

impl<'a, D: Denoiser> Finite<'a, D> {
    fn new(model: &'a D, timesteps: &'a [usize]) -> Self {
        Self {
            model,
            timesteps,
            calls: std::cell::Cell::new(0),
        }
    }
}

impl<D: Denoiser> Denoiser for Finite<'_, D> {
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        let index = self.calls.get();
        self.calls.set(index + 1);
        let out = self.model.predict(x_t, t)?;
        let bad = ddpm_unet::non_finite_count(&out)?;
        if bad > 0 {
            let timestep = self
                .timesteps
                .get(index)
                .map(|t| format!(" (timestep {t})"))
                .unwrap_or_default();
            candle_core::bail!(
                "sampling step {} of {}{timestep}: the model predicted {bad} NaN or infinite value(s)",
                index + 1,
                self.timesteps.len()
            );
        }
        Ok(out)
    }
}

/// What [`export`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// A diffusers folder: `config.json`, `diffusion_pytorch_model.safetensors`,
    /// `scheduler_config.json` and [`TRAIN_CONFIG`].
    Diffusers,
    /// One safetensors file of weights with PyTorch's names, the model's `config.json` in its
    /// metadata.
    Safetensors,
}

/// Writes the weights `tensors` of a model trained with `config` to `out` in `format`.
/// Every file goes through a temporary file renamed into place.
pub fn export(
    config: &TrainConfig,
    tensors: &HashMap<String, Tensor>,
    format: ExportFormat,
    out: &Path,
) -> candle_core::Result<()> {
    match format {
        ExportFormat::Diffusers => {
            ddpm_unet::save_pretrained(&config.model, tensors, out)?;
            write_text(
                &out.join("scheduler_config.json"),
                &config.scheduler().to_json()?,
            )?;
            let json = serde_json::to_string_pretty(config).expect("configs serialize");
            write_text(&out.join(TRAIN_CONFIG), &json)?;
        }
        ExportFormat::Safetensors => {
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| msg(format!("creating {}: {e}", dir.display())))?;
            }
            let metadata = HashMap::from([
                ("format".to_string(), "pt".to_string()),
                ("config".to_string(), config.model.to_json()),
            ]);
            ddpm_unet::write_safetensors(tensors, Some(metadata), out)?;
        }
    }
    Ok(())
}

/// A run's own sampler: its grids' kind and steps (at most its `T`).
fn run_sampler(config: &TrainConfig) -> (SamplerKind, Option<usize>) {
    let t = config.schedule.num_train_timesteps;
    (config.sampler, Some(config.sample_steps.min(t)))
}

fn write_text(path: &Path, text: &str) -> candle_core::Result<()> {
    atomic_write(path, |f| f.write_all(text.as_bytes()))
        .map_err(|e| msg(format!("writing {}: {e}", path.display())))
}

fn read(path: &Path) -> candle_core::Result<String> {
    std::fs::read_to_string(path).map_err(|e| msg(format!("reading {}: {e}", path.display())))
}

fn msg(s: String) -> candle_core::Error {
    candle_core::Error::Msg(s)
}
