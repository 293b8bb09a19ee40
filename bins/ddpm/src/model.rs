//! Finding a model to sample from (a run, a checkpoint, a diffusers folder) and exporting one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use clap::{Args, ValueEnum};
use ddpm_forward::Prediction;
use ddpm_sampler::{SchedulerConfig, TimestepSpacing, VarianceType};
use ddpm_schedule::ScheduleConfig;
use ddpm_trainer::{Checkpoint, RunPaths, TrainConfig};
use ddpm_unet::{Unet, UnetConfig};

/// The training configuration `ddpm export` writes beside a diffusers folder's own files.
pub const TRAIN_CONFIG: &str = "train_config.json";

/// A model ready to sample, with the schedule it was trained with.
pub struct Loaded {
    pub config: UnetConfig,
    pub unet: Unet,
    pub scheduler: SchedulerConfig,
    /// What was loaded, for messages.
    pub source: String,
    /// For a class-conditional model: its real classes and the guidance scale it samples
    /// with by default (a run's own, also from an exported folder's train_config.json; else
    /// 1, all class embeddings being classes until --guidance asks for the last one as "no
    /// class").
    pub classes: Option<usize>,
    pub guidance: f64,
}

/// The DDPMScheduler settings a run of ours samples with: its schedule and objective,
/// posterior variance, x0 clipped to [-1, 1].
pub fn scheduler_for(schedule: ScheduleConfig, objective: Prediction) -> SchedulerConfig {
    SchedulerConfig {
        class_name: "DDPMScheduler".into(),
        schedule,
        prediction: objective,
        clip_sample: true,
        clip_sample_range: 1.0,
        variance_type: VarianceType::FixedSmall,
        set_alpha_to_one: true,
        steps_offset: 0,
        timestep_spacing: TimestepSpacing::Leading,
    }
}

/// The newest checkpoint of a run folder.
pub fn latest_checkpoint(run: &Path) -> Result<PathBuf> {
    RunPaths::new(run)
        .latest_checkpoint()
        .with_context(|| format!("reading {}", run.join("checkpoints").display()))?
        .with_context(|| format!("{} has no checkpoints", run.display()))
}

/// Loads what `path` names: a run folder (its newest checkpoint), a checkpoint file, or a
/// folder with `config.json` and `diffusion_pytorch_model.safetensors` (and optionally
/// `scheduler_config.json`, diffusers' DDPMScheduler defaults otherwise, and the
/// `train_config.json` of `ddpm export`). Checkpoints give their EMA weights unless `raw`.
pub fn load(path: &Path, raw: bool, device: &Device) -> Result<Loaded> {
    if !path.exists() {
        bail!("{} does not exist", path.display());
    }
    let checkpoint = if path.is_dir() && path.join("checkpoints").is_dir() {
        Some(latest_checkpoint(path)?)
    } else if path.is_file() {
        Some(path.to_path_buf())
    } else {
        None
    };
    if let Some(ck_path) = checkpoint {
        let ck = Checkpoint::read(&ck_path, device)?;
        let tensors = if raw { ck.model } else { ck.ema };
        let unet = Unet::from_tensors(&ck.config.model, tensors, device)
            .with_context(|| format!("loading {}", ck_path.display()))?;
        return Ok(Loaded {
            scheduler: scheduler_for(ck.config.schedule, ck.config.objective),
            classes: ck.config.classes(),
            guidance: ck.config.guidance_scale,
            config: ck.config.model,
            unet,
            source: format!(
                "{} (step {}, {} weights)",
                ck_path.display(),
                ck.step,
                if raw { "raw" } else { "EMA" }
            ),
        });
    }
    if !path.join("config.json").is_file() {
        bail!(
            "{} is neither a run folder (with checkpoints/), a checkpoint file, nor a model folder (with config.json)",
            path.display()
        );
    }
    let (config, unet) = Unet::from_pretrained(path, device)?;
    // A folder `ddpm export` wrote says how its classes were trained.
    let train_path = path.join(TRAIN_CONFIG);
    let (classes, guidance) = if train_path.is_file() {
        let text = std::fs::read_to_string(&train_path)
            .with_context(|| format!("reading {}", train_path.display()))?;
        let train: TrainConfig =
            serde_json::from_str(&text).with_context(|| format!("{}", train_path.display()))?;
        if train.model != config {
            bail!(
                "{} describes another model than {}",
                train_path.display(),
                path.join("config.json").display()
            );
        }
        (train.classes(), train.guidance_scale)
    } else {
        (config.num_class_embeds(), 1.0)
    };
    let scheduler_path = path.join("scheduler_config.json");
    let scheduler = if scheduler_path.is_file() {
        let text = std::fs::read_to_string(&scheduler_path)
            .with_context(|| format!("reading {}", scheduler_path.display()))?;
        SchedulerConfig::from_json(&text)
            .with_context(|| format!("{}", scheduler_path.display()))?
    } else {
        SchedulerConfig::from_json("{}").expect("defaults parse")
    };
    Ok(Loaded {
        classes,
        guidance,
        config,
        unet,
        scheduler,
        source: path.display().to_string(),
    })
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ExportFormat {
    /// A diffusers folder: config.json, diffusion_pytorch_model.safetensors, scheduler_config.json
    /// (and the run's train_config.json).
    Diffusers,
    /// One safetensors file of weights with PyTorch's names.
    Safetensors,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The run folder (its newest checkpoint is exported) or a checkpoint file.
    pub run: PathBuf,
    /// Where to write: a folder (diffusers) or a file (safetensors). Default: RUN/export
    /// (or RUN/export.safetensors).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// What to write.
    #[arg(long, value_enum, default_value_t = ExportFormat::Diffusers)]
    pub format: ExportFormat,
    /// Export the raw weights rather than the EMA.
    #[arg(long)]
    pub raw: bool,
    /// Replace an existing export.
    #[arg(long)]
    pub force: bool,
}

pub fn export(a: ExportArgs) -> Result<()> {
    let ck_path = if a.run.is_dir() {
        latest_checkpoint(&a.run)?
    } else {
        a.run.clone()
    };
    let ck = Checkpoint::read(&ck_path, &Device::Cpu)?;
    let base = if a.run.is_dir() {
        a.run.clone()
    } else {
        a.run.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let out = a.out.clone().unwrap_or_else(|| match a.format {
        ExportFormat::Diffusers => base.join("export"),
        ExportFormat::Safetensors => base.join("export.safetensors"),
    });
    let occupied = out.is_file()
        || (out.is_dir()
            && out
                .read_dir()
                .map(|mut d| d.next().is_some())
                .unwrap_or(true));
    if occupied && !a.force {
        bail!(
            "{} already exists: pass --force to replace it",
            out.display()
        );
    }
    let tensors = if a.raw { &ck.model } else { &ck.ema };
    export_tensors(&ck.config, tensors, a.format, &out)?;
    println!(
        "exported {} weights of {} (step {}) to {}",
        if a.raw { "raw" } else { "EMA" },
        ck_path.display(),
        ck.step,
        out.display()
    );
    Ok(())
}

pub fn export_tensors(
    config: &TrainConfig,
    tensors: &HashMap<String, Tensor>,
    format: ExportFormat,
    out: &Path,
) -> Result<()> {
    match format {
        ExportFormat::Diffusers => {
            ddpm_unet::save_pretrained(&config.model, tensors, out)?;
            let scheduler = scheduler_for(config.schedule, config.objective);
            let json = scheduler.to_json()?;
            let path = out.join("scheduler_config.json");
            ddpm_trainer::atomic_write(&path, |f| std::io::Write::write_all(f, json.as_bytes()))
                .with_context(|| format!("writing {}", path.display()))?;
            // The run's configuration, for the record and for what config.json cannot say:
            // whether the last class is "no class", and the guidance scale to sample with.
            let json = serde_json::to_string_pretty(config)?;
            let path = out.join(TRAIN_CONFIG);
            ddpm_trainer::atomic_write(&path, |f| std::io::Write::write_all(f, json.as_bytes()))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        ExportFormat::Safetensors => {
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
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
