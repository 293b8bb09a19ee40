//! `show-forward` and `show-reverse`: the seed tutorial's two pictures.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use clap::Args;
use ddpm_forward::{ForwardProcess, NoiseSource};
use ddpm_schedule::{Schedule, ScheduleConfig};

use crate::data::DataArgs;
use crate::sample::{SamplingArgs, create_parent, prepare_picture};

#[derive(Args, Debug)]
pub struct ForwardArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Which image of the data.
    #[arg(long, default_value_t = 0)]
    pub index: usize,
    /// How many timesteps to show, evenly spaced from 0 to T - 1.
    #[arg(long, default_value_t = 10)]
    pub frames: usize,
    /// The noise schedule (seed-linear, ddpm-linear, cosine, scaled-linear, sigmoid).
    #[arg(long, default_value = "seed-linear")]
    pub schedule: String,
    /// Image size.
    #[arg(long, default_value_t = 32)]
    pub size: usize,
    /// Image channels (1 or 3).
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// The seed of the noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The picture to write (PNG or JPEG, by the extension).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn forward(a: ForwardArgs) -> Result<()> {
    prepare_picture(&a.out)?;
    let (set, _) = a.data.load(a.size, a.channels)?;
    if a.index >= set.len() {
        bail!(
            "--index {} is past the {} images of the data",
            a.index,
            set.len()
        );
    }
    let schedule = Schedule::new(ScheduleConfig::preset(&a.schedule)?)?;
    let image = set.batch(&[a.index], &[false], &Device::Cpu)?;
    crate::positive("--frames", a.frames)?;
    let strip = ForwardProcess::new(&schedule, &Device::Cpu)?.strip(&image, a.frames, a.seed)?;
    create_parent(&a.out)?;
    ddpm_data::write_strip(&strip, &a.out)?;
    println!("forward process: {}", a.out.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct ReverseArgs {
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// How many moments of the sampling to show, evenly spaced, the last one the result.
    #[arg(long, default_value_t = 10)]
    pub frames: usize,
    /// How many samples (one row each).
    #[arg(long, default_value_t = 1)]
    pub num: usize,
    /// The picture to write (PNG or JPEG, by the extension).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn reverse(a: ReverseArgs, device: &Device) -> Result<()> {
    crate::positive("--frames", a.frames)?;
    crate::positive("--num", a.num)?;
    prepare_picture(&a.out)?;
    let pipeline = a.sampling.open(device)?;
    let scheduler = a.sampling.sampler(&pipeline)?;
    let size = a.sampling.image_size(&pipeline)?;
    let n = scheduler.timesteps().len();
    if a.frames > n {
        bail!("--frames {} is more than the {n} sampling steps", a.frames);
    }
    let keep: Vec<usize> = (1..=a.frames).map(|i| i * n / a.frames - 1).collect();
    let mut rng = NoiseSource::new(a.sampling.seed);
    pipeline
        .config
        .check_input(a.num, size, size)
        .context("--num and --size")?;
    let init = rng.randn((a.num, pipeline.config.in_channels(), size, size), device)?;
    let mut frames = Vec::new();
    a.sampling
        .run(&pipeline, scheduler.as_ref(), init, &mut rng, |p| {
            if keep.contains(&p.index) {
                frames.push(p.sample.clone());
            }
        })?;
    // Rows are samples, columns moments: [num, frames, C, H, W] flattened row-major.
    let grid = Tensor::stack(&frames, 1)?
        .flatten_to(1)?
        .clamp(-1f32, 1f32)?;
    create_parent(&a.out)?;
    ddpm_data::write_grid(&grid, a.frames, &a.out)?;
    println!("reverse process: {}", a.out.display());
    Ok(())
}
