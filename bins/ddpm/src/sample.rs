//! `ddpm sample`: images from a trained model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use ddpm_forward::NoiseSource;
use ddpm_sampler::{DdimSampler, DdpmSampler, Progress, Scheduler};
use ddpm_schedule::Schedule;
use indicatif::ProgressBar;

use crate::model;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum SamplerArg {
    /// DDPM ancestral sampling (every training step unless --steps).
    Ddpm,
    /// DDIM (50 steps unless --steps).
    Ddim,
}

/// Options shared by `sample` and `show-reverse`.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// A run folder, a checkpoint file, or a model folder (config.json +
    /// diffusion_pytorch_model.safetensors, optional scheduler_config.json).
    #[arg(long)]
    pub model: PathBuf,
    /// The sampler.
    #[arg(long, value_enum, default_value_t = SamplerArg::Ddim)]
    pub sampler: SamplerArg,
    /// Sampling steps (default: 50 for DDIM, every training step for DDPM).
    #[arg(long)]
    pub steps: Option<usize>,
    /// DDIM's eta: 0 is deterministic, 1 adds DDPM's variance.
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// The seed of the initial and step noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image height and width (default: the model's sample_size, else 32).
    #[arg(long)]
    pub size: Option<usize>,
    /// Use a checkpoint's raw weights instead of its EMA.
    #[arg(long)]
    pub raw: bool,
    /// Class-conditional models: the classes to draw, in turn over the images (e.g. `3` or
    /// `0,1,2`). Default: every class in turn.
    #[arg(long, value_delimiter = ',')]
    pub class: Vec<u32>,
    /// Class-conditional models: the classifier-free guidance scale (1 is plain conditional
    /// sampling; 0 ignores the class). Default: the run's own setting (also from the
    /// train_config.json of a folder `ddpm export` wrote), else 1. Any scale but 1 takes the
    /// model's last class embedding as "no class".
    #[arg(long)]
    pub guidance: Option<f64>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Args, Debug)]
pub struct SampleArgs {
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// How many images.
    #[arg(long, default_value_t = 16)]
    pub num: usize,
    /// Start from this noise instead: a safetensors file with a tensor `noise`, NCHW f32.
    #[arg(long)]
    pub init_noise: Option<PathBuf>,
    /// Write a grid PNG here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write one PNG per image into this folder.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Write the samples (NCHW f32, clamped to [-1, 1]) as a safetensors tensor `samples`.
    #[arg(long)]
    pub out_tensor: Option<PathBuf>,
    /// Columns of the grid.
    #[arg(long, default_value_t = 8)]
    pub cols: usize,
    /// Score the samples as digits (1-channel models): the digit classifier's Fréchet distance
    /// against the embedded MNIST digits, the classes present and their counts. Needs --num of
    /// at least 50 and at most 5,000.
    #[arg(long)]
    pub quality: bool,
}

/// Creates the folder a file will go into, naming it on failure.
pub fn prepare_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create output folder {}", dir.display()))?;
    }
    if path.is_dir() {
        bail!("{} is a folder, not a file", path.display());
    }
    Ok(())
}

/// The sampler the options ask for, over the schedule the model was trained with.
pub fn build_sampler(
    a: &SamplingArgs,
    loaded: &model::Loaded,
) -> Result<(Box<dyn Scheduler>, Schedule)> {
    let schedule = Schedule::new(loaded.scheduler.schedule)
        .map_err(|e| anyhow::anyhow!("the model's schedule: {e}"))?;
    if let Some(s) = a.steps {
        crate::positive("--steps", s)?;
    }
    let s: Box<dyn Scheduler> = match a.sampler {
        SamplerArg::Ddpm => Box::new(DdpmSampler::new(&schedule, loaded.scheduler.ddpm(a.steps))?),
        SamplerArg::Ddim => Box::new(DdimSampler::new(
            &schedule,
            loaded.scheduler.ddim(a.steps.unwrap_or(50), a.eta),
        )?),
    };
    if a.sampler == SamplerArg::Ddpm && a.eta != 0.0 {
        bail!("--eta applies to DDIM only");
    }
    Ok((s, schedule))
}

/// The class of each of `count` images for a class-conditional model, with the guidance
/// scale; `None` for an unconditional one (where --class and --guidance are errors).
pub fn class_labels(
    a: &SamplingArgs,
    loaded: &model::Loaded,
    count: usize,
) -> Result<Option<(Vec<u32>, f64)>> {
    let Some(embeds) = loaded.unet.num_class_embeds() else {
        if !a.class.is_empty() || a.guidance.is_some() {
            bail!(
                "--class and --guidance need a class-conditional model (num_class_embeds); {} is unconditional",
                loaded.source
            );
        }
        return Ok(None);
    };
    let guidance = a.guidance.unwrap_or(loaded.guidance);
    let classes = match loaded.classes {
        // A model folder asked to guide: its last class embedding is "no class".
        Some(n) if n == embeds && guidance != 1.0 => n - 1,
        Some(n) => n,
        None => embeds,
    };
    if let Some(bad) = a.class.iter().find(|&&c| c as usize >= classes) {
        bail!("--class {bad} out of range: the model draws classes 0..{classes}");
    }
    let cycle: Vec<u32> = if a.class.is_empty() {
        (0..classes as u32).collect()
    } else {
        a.class.clone()
    };
    let labels = (0..count).map(|i| cycle[i % cycle.len()]).collect();
    Ok(Some((labels, guidance)))
}

/// Runs the sampler with a progress bar, calling `on_step` as well. A class-conditional model
/// draws the classes of [`class_labels`].
pub fn run_sampler(
    a: &SamplingArgs,
    loaded: &model::Loaded,
    scheduler: &dyn Scheduler,
    init: Tensor,
    rng: &mut NoiseSource,
    mut on_step: impl FnMut(&Progress<'_>),
) -> Result<Tensor> {
    let bar = if a.no_progress {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(scheduler.timesteps().len() as u64)
    };
    let device = init.device().clone();
    let progress = |p: &Progress<'_>| {
        bar.set_position(p.index as u64 + 1);
        on_step(p);
    };
    let out = match class_labels(a, loaded, init.dim(0)?)? {
        Some((labels, scale)) => {
            let guided = ddpm_unet::Guided::new(&loaded.unet, &labels, scale, &device)?;
            ddpm_sampler::sample(&guided, scheduler, init, rng, progress)?
        }
        None => ddpm_sampler::sample(&loaded.unet, scheduler, init, rng, progress)?,
    };
    bar.finish_and_clear();
    Ok(out)
}

/// The image size to sample at.
pub fn image_size(a: &SamplingArgs, loaded: &model::Loaded) -> Result<usize> {
    let size = a.size.or(loaded.config.sample_size()).unwrap_or(32);
    let f = loaded.config.downsampling_factor();
    if size == 0 || size % f != 0 {
        bail!("--size {size} must be a positive multiple of {f} for this model");
    }
    Ok(size)
}

pub fn run(a: SampleArgs, device: &Device) -> Result<()> {
    if a.out.is_none() && a.out_dir.is_none() && a.out_tensor.is_none() && !a.quality {
        bail!(
            "nothing to write: give --out FILE.png, --out-dir DIR, --out-tensor FILE or --quality"
        );
    }
    crate::positive("--num", a.num)?;
    if a.quality && !(50..=5000).contains(&a.num) {
        bail!(
            "--quality needs --num between 50 and 5000 (the embedded set holds 10,000 real digits), got {}",
            a.num
        );
    }
    crate::positive("--cols", a.cols)?;
    for p in [&a.out, &a.out_tensor].into_iter().flatten() {
        prepare_parent(p)?;
    }
    if let Some(d) = &a.out_dir {
        std::fs::create_dir_all(d)
            .with_context(|| format!("cannot create output folder {}", d.display()))?;
    }
    let loaded = model::load(&a.sampling.model, a.sampling.raw, device)?;
    tracing::info!("sampling from {}", loaded.source);
    if a.quality && loaded.config.in_channels() != 1 {
        bail!(
            "--quality scores digits: the model makes {}-channel images, the digit classifier takes 1",
            loaded.config.in_channels()
        );
    }
    let (scheduler, _) = build_sampler(&a.sampling, &loaded)?;
    let channels = loaded.config.in_channels();
    let mut rng = NoiseSource::new(a.sampling.seed);
    let init = match &a.init_noise {
        Some(path) => {
            let tensors = candle_core::safetensors::load(path, device)
                .with_context(|| format!("reading {}", path.display()))?;
            let noise = tensors
                .get("noise")
                .with_context(|| format!("{} has no tensor named noise", path.display()))?;
            let dims = noise.dims();
            let f = loaded.config.downsampling_factor();
            if dims.len() != 4 || dims[1] != channels || dims[2] % f != 0 || dims[3] % f != 0 {
                bail!(
                    "{}: noise has shape {dims:?}, the model needs [N, {channels}, H, W] with H, W multiples of {f}",
                    path.display()
                );
            }
            noise.to_dtype(DType::F32)?
        }
        None => {
            let size = image_size(&a.sampling, &loaded)?;
            rng.randn((a.num, channels, size, size), device)?
        }
    };
    let samples = run_sampler(
        &a.sampling,
        &loaded,
        scheduler.as_ref(),
        init,
        &mut rng,
        |_| {},
    )?
    .clamp(-1f32, 1f32)?;
    if let Some(p) = &a.out {
        ddpm_data::write_grid_png(&samples, a.cols, p)?;
        println!("grid: {}", p.display());
    }
    if let Some(d) = &a.out_dir {
        for (i, img) in ddpm_data::tensor_to_images(&samples)?.iter().enumerate() {
            ddpm_data::write_png(img, &d.join(format!("{i:05}.png")))?;
        }
        println!("images: {}", d.display());
    }
    if let Some(p) = &a.out_tensor {
        let map = HashMap::from([("samples".to_string(), samples.to_device(&Device::Cpu)?)]);
        ddpm_unet::write_safetensors(&map, None, p)?;
        println!("tensor: {}", p.display());
    }
    if a.quality {
        let size = samples.dim(2)?;
        let (real, _) = crate::data::DataArgs::default().load(size, 1)?;
        let labels = class_labels(&a.sampling, &loaded, samples.dim(0)?)?;
        let report =
            crate::train::report_quality(&samples, labels.as_ref().map(|l| &l.0[..]), &real)?;
        let json = serde_json::to_string(&report)?;
        println!("quality json: {json}");
    }
    Ok(())
}
