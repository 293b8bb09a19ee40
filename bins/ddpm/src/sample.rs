//! `ddpm sample`: images from a trained model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use ddpm_forward::NoiseSource;
use ddpm_pipeline::{Conditioning, Pipeline, Weights};
use ddpm_sampler::{Progress, SamplerKind, Scheduler};
use indicatif::ProgressBar;

use crate::SamplerArg;

/// Options shared by `sample` and `show-reverse`.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// A run folder, a checkpoint file, or a model folder (config.json +
    /// diffusion_pytorch_model.safetensors, optional scheduler_config.json).
    #[arg(long)]
    pub model: PathBuf,
    /// The sampler. Default: the model's own (a run's, or its export's: the sampler its
    /// sample grids and quality report used; a diffusers folder: DDPM for a DDPMScheduler,
    /// DDIM for a DDIMScheduler).
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerArg>,
    /// Sampling steps. Default: the model's own (a run's grid steps; DDPM: every training
    /// step; DDIM: 50).
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
    /// For a PyTorch weights file (.bin, .pt, .pth, a `torch.save` of a state_dict) given as
    /// --model: its model, a preset (e.g. seed) or a config.json.
    #[arg(long)]
    pub config: Option<String>,
    /// A weights variant of a model folder: `fp16` reads
    /// diffusion_pytorch_model.fp16.safetensors.
    #[arg(long)]
    pub variant: Option<String>,
    /// The folder inside --model that holds the model (as diffusers' `subfolder`, e.g. unet).
    #[arg(long)]
    pub subfolder: Option<String>,
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
    /// Write a grid picture here (PNG or JPEG, by the extension).
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

/// Checks that `path` names a picture format ([`ddpm_data::image_format`]) and can be
/// written ([`check_output`]), before any work.
pub fn prepare_picture(path: &Path) -> Result<()> {
    ddpm_data::image_format(path)?;
    check_output(path)
}

/// Checks, before any work and without changing anything, that a file can be written at
/// `path`: it is not a folder, and the nearest folder above it that exists is a folder this
/// process can write in (a file is created there and removed at once). Folders it needs are
/// created only when it is written ([`create_parent`]).
pub fn check_output(path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!("{} is a folder, not a file", path.display());
    }
    check_folder(path.parent().unwrap_or(Path::new("")))
}

/// [`check_output`] for a folder that files will be written into.
pub fn check_folder(dir: &Path) -> Result<()> {
    let mut existing = dir;
    while !existing.as_os_str().is_empty() && !existing.exists() {
        existing = existing.parent().unwrap_or(Path::new(""));
    }
    let probe_dir = if existing.as_os_str().is_empty() {
        Path::new(".")
    } else {
        existing
    };
    if !probe_dir.is_dir() {
        bail!(
            "cannot write into {}: {} is not a folder",
            dir.display(),
            probe_dir.display()
        );
    }
    let probe = probe_dir.join(format!(".ddpm-write-test-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .with_context(|| format!("cannot write into {}", probe_dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Creates the folder a file will go into, naming it on failure.
pub fn create_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create output folder {}", dir.display()))?;
    }
    Ok(())
}

impl SamplingArgs {
    /// The model the options name.
    pub fn open(&self, device: &Device) -> Result<Pipeline> {
        let weights = if self.raw { Weights::Raw } else { Weights::Ema };
        let pipeline = match &self.config {
            Some(c) if ddpm_pipeline::is_pytorch_file(&self.model) => {
                Pipeline::from_pytorch(&self.model, crate::model_config(c)?, device)?
            }
            Some(_) => bail!(
                "--config is for PyTorch weights files (.bin, .pt, .pth); {} carries its own",
                self.model.display()
            ),
            None if ddpm_pipeline::is_pytorch_file(&self.model) && self.model.is_file() => bail!(
                "{} is PyTorch weights: give its model with --config (a preset such as seed, or a config.json)",
                self.model.display()
            ),
            None => {
                let open = ddpm_pipeline::Open {
                    weights,
                    variant: self.variant.clone(),
                    subfolder: self.subfolder.clone(),
                };
                Pipeline::open_with(&self.model, &open, device)?
            }
        };
        pipeline.warnings.iter().for_each(crate::warn);
        Ok(pipeline)
    }

    /// The sampler the options ask for, over the schedule the model was trained with.
    pub fn sampler(&self, pipeline: &Pipeline) -> Result<Box<dyn Scheduler>> {
        if let Some(s) = self.steps {
            crate::positive("--steps", s)?;
        }
        let (kind, steps) = match self.sampler {
            Some(asked) => (asked.into(), self.steps),
            None => {
                let (kind, own) = pipeline.default_sampler;
                (kind, self.steps.or(own))
            }
        };
        if kind == SamplerKind::Ddpm && self.eta != 0.0 {
            bail!("--eta applies to DDIM only");
        }
        pipeline
            .sampler(kind, steps, self.eta)
            .context("the model's schedule")
    }

    /// The classes of `count` images and the guidance scale, for a class-conditional model.
    pub fn conditioning(&self, pipeline: &Pipeline, count: usize) -> Result<Option<Conditioning>> {
        if pipeline.unet.num_class_embeds().is_none()
            && (!self.class.is_empty() || self.guidance.is_some())
        {
            bail!(
                "--class and --guidance need a class-conditional model (num_class_embeds); {} is unconditional",
                pipeline.source
            );
        }
        let scale = self.guidance.unwrap_or(pipeline.guidance);
        if let Some(classes) = pipeline.classes(scale)?
            && let Some(bad) = self.class.iter().find(|&&c| c as usize >= classes.count())
        {
            bail!(
                "--class {bad} out of range: the model draws classes 0..{}",
                classes.count()
            );
        }
        Ok(pipeline.conditioning(&self.class, self.guidance, count)?)
    }

    /// The image size to sample at.
    pub fn image_size(&self, pipeline: &Pipeline) -> Result<usize> {
        pipeline.image_size(self.size).context("--size")
    }

    /// Runs the sampler with a progress bar, calling `on_step` as well.
    pub fn run(
        &self,
        pipeline: &Pipeline,
        scheduler: &dyn Scheduler,
        init: Tensor,
        rng: &mut NoiseSource,
        mut on_step: impl FnMut(&Progress<'_>),
    ) -> Result<Tensor> {
        let bar = if self.no_progress {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(scheduler.timesteps().len() as u64)
        };
        let conditioning = self.conditioning(pipeline, init.dim(0)?)?;
        let out = pipeline.sample(scheduler, conditioning.as_ref(), init, rng, |p| {
            bar.set_position(p.index as u64 + 1);
            on_step(p);
        })?;
        bar.finish_and_clear();
        Ok(out)
    }
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
    if let Some(p) = &a.out {
        prepare_picture(p)?;
    }
    if let Some(p) = &a.out_tensor {
        check_output(p)?;
    }
    if let Some(d) = &a.out_dir {
        if d.is_file() {
            bail!("--out-dir {} is a file, not a folder", d.display());
        }
        check_folder(d)?;
    }
    let pipeline = a.sampling.open(device)?;
    tracing::info!("sampling from {}", pipeline.source);
    let channels = pipeline.config.in_channels();
    if a.quality && channels != 1 {
        bail!(
            "--quality scores digits: the model makes {channels}-channel images, the digit classifier takes 1"
        );
    }
    let scheduler = a.sampling.sampler(&pipeline)?;
    let mut rng = NoiseSource::new(a.sampling.seed);
    let init = match &a.init_noise {
        Some(path) => {
            let tensors = candle_core::safetensors::load(path, device)
                .with_context(|| format!("reading {}", path.display()))?;
            let noise = tensors
                .get("noise")
                .with_context(|| format!("{} has no tensor named noise", path.display()))?;
            let dims = noise.dims();
            let f = pipeline.config.downsampling_factor();
            if dims.len() != 4 || dims[1] != channels {
                bail!(
                    "{}: noise has shape {dims:?}, the model needs [N, {channels}, H, W] with H, W multiples of {f}",
                    path.display()
                );
            }
            pipeline
                .config
                .check_input(dims[0], dims[2], dims[3])
                .with_context(|| format!("{}: noise of shape {dims:?}", path.display()))?;
            if !noise.dtype().is_float() {
                bail!(
                    "{}: noise has dtype {:?}, not a float",
                    path.display(),
                    noise.dtype()
                );
            }
            if ddpm_unet::non_finite_count(noise)? > 0 {
                bail!("{}: noise holds NaN or infinite values", path.display());
            }
            noise.to_dtype(DType::F32)?
        }
        None => {
            let size = a.sampling.image_size(&pipeline)?;
            pipeline
                .config
                .check_input(a.num, size, size)
                .context("--num and --size")?;
            rng.randn((a.num, channels, size, size), device)?
        }
    };
    let samples = a
        .sampling
        .run(&pipeline, scheduler.as_ref(), init, &mut rng, |_| {})?
        .clamp(-1f32, 1f32)?;
    if let Some(p) = &a.out {
        create_parent(p)?;
        ddpm_data::write_grid(&samples, a.cols, p)?;
        println!("grid: {}", p.display());
    }
    if let Some(d) = &a.out_dir {
        std::fs::create_dir_all(d)
            .with_context(|| format!("cannot create output folder {}", d.display()))?;
        for (i, img) in ddpm_data::tensor_to_images(&samples)?.iter().enumerate() {
            ddpm_data::write_image(img, &d.join(format!("{i:05}.png")))?;
        }
        println!("images: {}", d.display());
    }
    if let Some(p) = &a.out_tensor {
        let map = HashMap::from([("samples".to_string(), samples.to_device(&Device::Cpu)?)]);
        create_parent(p)?;
        ddpm_unet::write_safetensors(&map, None, p)?;
        println!("tensor: {}", p.display());
    }
    if a.quality {
        let size = samples.dim(2)?;
        let (real, _) = crate::data::DataArgs::default().load(size, 1)?;
        let labels = a.sampling.conditioning(&pipeline, samples.dim(0)?)?;
        let report = ddpm_trainer::quality::score_digits(
            &samples,
            labels.as_ref().map(|c| &c.labels[..]),
            &real,
        )?;
        println!("{report}");
        let json = serde_json::to_string(&report)?;
        println!("quality json: {json}");
    }
    Ok(())
}
