//! `ddpm golden`: golden-image regression checks (what `cargo xtask golden` runs).
//!
//! Renders, from a small model committed under `assets/golden/model` and fixed seeds, a DDPM
//! grid, a DDIM grid and the forward-process strip, and compares each with
//! `assets/golden/NAME.png`: every pixel channel within `--tolerance` levels of 255. On a
//! mismatch the actual image goes to `--actual` (git-ignored) and both paths are printed.
//! `--bless` rewrites the goldens instead.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use clap::Args;
use ddpm_data::ImageSet;
use ddpm_forward::{ForwardProcess, NoiseSource};
use ddpm_pipeline::{Pipeline, Weights};
use ddpm_sampler::{SamplerKind, Scheduler};
use ddpm_schedule::{Schedule, ScheduleConfig};
use image::DynamicImage;

#[derive(Args, Debug)]
pub struct GoldenArgs {
    /// The folder of golden PNGs, with the model in its `model/` subfolder.
    #[arg(long, default_value = "assets/golden")]
    pub dir: PathBuf,
    /// Where to write actual images that do not match.
    #[arg(long, default_value = "target/golden-actual")]
    pub actual: PathBuf,
    /// Largest allowed difference per pixel channel, in levels of 255.
    #[arg(long, default_value_t = 2)]
    pub tolerance: u8,
    /// Rewrite the goldens from this machine's rendering.
    #[arg(long)]
    pub bless: bool,
}

fn sample_grid(pipeline: &Pipeline, scheduler: &dyn Scheduler, seed: u64) -> Result<Tensor> {
    let mut rng = NoiseSource::new(seed);
    let size = pipeline.image_size(None)?;
    let init = rng.randn(
        (16, pipeline.config.in_channels(), size, size),
        &Device::Cpu,
    )?;
    Ok(pipeline
        .sample(scheduler, None, init, &mut rng, |_| {})?
        .clamp(-1f32, 1f32)?)
}

/// The three renderings, by file name.
fn render(dir: &Path) -> Result<Vec<(&'static str, DynamicImage)>> {
    let pipeline = Pipeline::open(&dir.join("model"), Weights::Ema, &Device::Cpu)?;
    let ddpm = pipeline.sampler(SamplerKind::Ddpm, Some(50), 0.0)?;
    let ddim = pipeline.sampler(SamplerKind::Ddim, Some(20), 0.0)?;
    let digits = ImageSet::embedded_mnist()?.take(1).pad_to(32)?;
    let image = digits.batch(&[0], &[false], &Device::Cpu)?;
    let strip = ForwardProcess::new(&Schedule::new(ScheduleConfig::seed_linear())?, &Device::Cpu)?
        .strip(&image, 10, 0)?;
    let tile =
        |x: &Tensor, cols: usize| -> Result<DynamicImage> { Ok(ddpm_data::grid_image(x, cols)?) };
    Ok(vec![
        (
            "ddpm-grid.png",
            tile(&sample_grid(&pipeline, ddpm.as_ref(), 1)?, 8)?,
        ),
        (
            "ddim-grid.png",
            tile(&sample_grid(&pipeline, ddim.as_ref(), 2)?, 8)?,
        ),
        ("forward-strip.png", tile(&strip, 10)?),
    ])
}

/// The largest channel difference and how many channels differ by more than `tolerance`.
fn compare(a: &DynamicImage, b: &DynamicImage, tolerance: u8) -> Option<(u8, usize)> {
    let (a, b) = (a.to_rgb8(), b.to_rgb8());
    if a.dimensions() != b.dimensions() {
        return None;
    }
    let mut worst = 0u8;
    let mut over = 0;
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        worst = worst.max(d);
        over += (d > tolerance) as usize;
    }
    Some((worst, over))
}

pub fn run(a: GoldenArgs) -> Result<()> {
    let rendered = render(&a.dir)?;
    if a.bless {
        for (name, img) in &rendered {
            let path = a.dir.join(name);
            ddpm_data::write_image(img, &path)?;
            println!("blessed {}", path.display());
        }
        return Ok(());
    }
    let mut failed = Vec::new();
    for (name, img) in &rendered {
        let golden_path = a.dir.join(name);
        let golden = image::open(&golden_path).with_context(|| {
            format!(
                "reading golden {} (run with --bless to create it)",
                golden_path.display()
            )
        })?;
        match compare(img, &golden, a.tolerance) {
            Some((worst, 0)) => println!("ok {name} (max channel difference {worst})"),
            outcome => {
                std::fs::create_dir_all(&a.actual)
                    .with_context(|| format!("creating {}", a.actual.display()))?;
                let actual = a.actual.join(name);
                ddpm_data::write_image(img, &actual)?;
                let why = match outcome {
                    Some((worst, over)) => format!(
                        "{over} channel values differ by more than {} (max {worst})",
                        a.tolerance
                    ),
                    None => "the sizes differ".to_string(),
                };
                println!(
                    "MISMATCH {name}: {why}\n  golden: {}\n  actual: {}",
                    golden_path.display(),
                    actual.display()
                );
                failed.push(name.to_string());
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "golden images differ: {} (rerun with --bless if the change is intended)",
            failed.join(", ")
        );
    }
    Ok(())
}
