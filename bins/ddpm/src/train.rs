//! `ddpm train`: a training run into a run folder.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use clap::{Args, ValueEnum};
use ddpm_forward::Prediction;
use ddpm_schedule::ScheduleConfig;
use ddpm_trainer::{LOCK_FILE, Loss, LrSchedule, RunLock, TrainConfig, Trainer};
use ddpm_unet::UnetConfig;

use crate::data::DataArgs;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LossArg {
    L1,
    L2,
    Huber,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ObjectiveArg {
    Eps,
    X0,
    V,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LrArg {
    Constant,
    Cosine,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// The run folder. An existing run is continued only with --resume, replaced only with --force.
    #[arg(long, default_value = "runs/mnist")]
    pub out: PathBuf,
    /// Continue the run in --out from its newest checkpoint (its configuration; --steps may
    /// raise the total).
    #[arg(long, conflicts_with = "force")]
    pub resume: bool,
    /// Delete an existing run in --out and start over.
    #[arg(long)]
    pub force: bool,
    /// The starting recipe: mnist (the default for the embedded digits), seed, tiny.
    #[arg(long, default_value = "mnist")]
    pub recipe: String,
    /// The model: a preset (seed, seed-small, seed-tiny, ddpm-cifar10, mnist, mnist-16,
    /// mnist-16-classes) or a config.json.
    #[arg(long)]
    pub model: Option<String>,
    /// The noise schedule preset (seed-linear, ddpm-linear, cosine, scaled-linear, sigmoid).
    #[arg(long)]
    pub schedule: Option<String>,
    /// Train at this image size (default: the model's sample_size, else 32).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Optimizer steps.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Images per micro-batch.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warmup steps.
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Learning-rate schedule after warmup.
    #[arg(long, value_enum)]
    pub lr_schedule: Option<LrArg>,
    /// AdamW weight decay (0 is Adam).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clip (0 turns it off).
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// The loss.
    #[arg(long, value_enum)]
    pub loss: Option<LossArg>,
    /// Huber's delta.
    #[arg(long, default_value_t = 0.1)]
    pub huber_delta: f64,
    /// What the model predicts.
    #[arg(long, value_enum)]
    pub objective: Option<ObjectiveArg>,
    /// Min-SNR loss weighting with this gamma (5 is usual; 0 turns it off).
    #[arg(long)]
    pub min_snr_gamma: Option<f64>,
    /// EMA's maximum decay.
    #[arg(long)]
    pub ema_max_decay: Option<f64>,
    /// EMA warmup power.
    #[arg(long)]
    pub ema_power: Option<f64>,
    /// The seed of everything random.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Random horizontal flips.
    #[arg(long)]
    pub flip: bool,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Checkpoints to keep.
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    /// Sample grid every N steps (0: only at the end).
    #[arg(long)]
    pub sample_every: Option<u64>,
    /// Images per sample grid.
    #[arg(long)]
    pub sample_count: Option<usize>,
    /// The sampler of the sample grids and the quality report (the mnist recipe: ddpm).
    #[arg(long, value_enum)]
    pub sampler: Option<crate::SamplerArg>,
    /// Sampling steps for the sample grids and the quality report (the mnist recipe: 100).
    #[arg(long)]
    pub sample_steps: Option<usize>,
    /// Condition a UNet2DModel on the data's N classes (labels 0..N): num_class_embeds N + 1,
    /// the last "no class" for label dropout, which is 0.1 unless --class-dropout says.
    #[arg(long)]
    pub classes: Option<usize>,
    /// Class-conditional models: the probability of training an image as "no class" (the
    /// model's last class embedding), for classifier-free guidance (0 turns it off).
    #[arg(long)]
    pub class_dropout: Option<f64>,
    /// Class-conditional models: the guidance scale of the sample grids and the quality report.
    #[arg(long)]
    pub guidance: Option<f64>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

/// The recipe with every option given on the command line applied.
pub fn resolve_config(a: &TrainArgs) -> Result<TrainConfig> {
    let mut c = TrainConfig::preset(&a.recipe)?;
    if let Some(m) = &a.model {
        c.model = crate::model_config(m)?;
    }
    if let Some(n) = a.classes {
        let UnetConfig::Unet2d(m) = &mut c.model else {
            bail!("--classes needs a UNet2DModel (SimpleUnet has no class conditioning)");
        };
        crate::positive("--classes", n)?;
        m.num_class_embeds = Some(n + 1);
        if c.class_dropout == 0.0 {
            c.class_dropout = 0.1;
        }
    }
    if c.model.num_class_embeds().is_none() {
        // An unconditional --model under a recipe that guides (mnist): no guidance.
        c.class_dropout = 0.0;
        c.guidance_scale = 1.0;
    }
    if let Some(s) = &a.schedule {
        c.schedule = ScheduleConfig::preset(s)?;
    }
    macro_rules! set {
        ($field:expr, $opt:expr) => {
            if let Some(v) = $opt {
                $field = v;
            }
        };
    }
    set!(c.steps, a.steps);
    set!(c.batch_size, a.batch_size);
    set!(c.grad_accum, a.grad_accum);
    set!(c.optimizer.lr, a.lr);
    set!(c.warmup_steps, a.warmup);
    set!(c.optimizer.weight_decay, a.weight_decay);
    set!(c.ema.max_decay, a.ema_max_decay);
    set!(c.ema.power, a.ema_power);
    set!(c.seed, a.seed);
    set!(c.checkpoint_every, a.checkpoint_every);
    set!(c.keep_checkpoints, a.keep_checkpoints);
    set!(c.sample_every, a.sample_every);
    set!(c.sample_count, a.sample_count);
    set!(c.sample_steps, a.sample_steps);
    set!(c.class_dropout, a.class_dropout);
    set!(c.guidance_scale, a.guidance);
    if let Some(s) = a.sampler {
        c.sampler = s.into();
    }
    if let Some(g) = a.grad_clip {
        c.grad_clip = (g != 0.0).then_some(g);
    }
    if let Some(g) = a.min_snr_gamma {
        c.min_snr_gamma = (g != 0.0).then_some(g);
    }
    if let Some(l) = a.lr_schedule {
        c.lr_schedule = match l {
            LrArg::Constant => LrSchedule::Constant,
            LrArg::Cosine => LrSchedule::Cosine,
        };
    }
    if let Some(l) = a.loss {
        c.loss = match l {
            LossArg::L1 => Loss::L1,
            LossArg::L2 => Loss::L2,
            LossArg::Huber => Loss::Huber {
                delta: a.huber_delta,
            },
        };
    }
    if let Some(o) = a.objective {
        c.objective = match o {
            ObjectiveArg::Eps => Prediction::Epsilon,
            ObjectiveArg::X0 => Prediction::Sample,
            ObjectiveArg::V => Prediction::VPrediction,
        };
    }
    c.flip |= a.flip;
    if let Some(size) = a.image_size {
        c.model.set_sample_size(size);
    }
    c.validate()?;
    Ok(c)
}

/// The options `--resume` takes besides the run folder: the total steps (to extend the run),
/// the progress bar, and the data options, which must name the data the run was trained on.
/// Any other option would change the run's configuration, so it is an error.
const SAFE_ON_RESUME: [&str; 6] = ["out", "resume", "steps", "no_progress", "data", "limit"];

/// Whether `out` holds anything but its lock file.
fn holds_a_run(out: &Path) -> Result<bool> {
    if !out.is_dir() {
        return Ok(false);
    }
    for entry in std::fs::read_dir(out)
        .with_context(|| format!("cannot read run folder {}", out.display()))?
    {
        if entry?.file_name() != LOCK_FILE {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Empties the run folder for --force, all but the lock this process holds.
fn clear_run(out: &Path) -> Result<()> {
    for entry in std::fs::read_dir(out).with_context(|| format!("reading {}", out.display()))? {
        let entry = entry?;
        if entry.file_name() == LOCK_FILE {
            continue;
        }
        let path = entry.path();
        let removed = if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

pub fn run(a: TrainArgs, given: &[String], device: &Device) -> Result<()> {
    let out = &a.out;
    if out.is_file() {
        bail!("--out {} is a file, not a run folder", out.display());
    }
    // An existing folder is locked before it is looked at, so two writers never share it; a
    // new one is created (and locked) only once every argument has been checked.
    let lock = if out.is_dir() {
        Some(RunLock::acquire(out)?)
    } else {
        None
    };
    let exists = holds_a_run(out)?;
    let mut trainer = if a.resume {
        if !exists {
            bail!("--resume: {} holds no run to continue", out.display());
        }
        if let Some(bad) = given.iter().find(|g| !SAFE_ON_RESUME.contains(&g.as_str())) {
            bail!(
                "--resume continues the run with its own configuration: --{} would change it (a resumed run takes --steps, --no-progress and the same data options)",
                bad.replace('_', "-")
            );
        }
        let (path, ck, warnings) = ddpm_pipeline::latest_checkpoint(out)?;
        warnings.iter().for_each(crate::warn);
        let size = ck.config.model.sample_size().unwrap_or(32);
        let (set, what) = a.data.load(size, ck.config.model.in_channels())?;
        if what != ck.dataset {
            bail!(
                "--resume: the run was trained on {}, this data is {what} (give the same --data)",
                ck.dataset
            );
        }
        let trainer = Trainer::resume_from(&ck, &path, Arc::new(set), device, a.steps)?;
        println!(
            "resuming {} at step {} of {}",
            path.display(),
            trainer.step(),
            trainer.config().steps
        );
        trainer
    } else {
        if exists && !a.force {
            bail!(
                "{} already holds a run: pass --resume to continue it or --force to start over",
                out.display()
            );
        }
        // Everything that can fail on bad arguments happens before --force deletes anything.
        let config = resolve_config(&a)?;
        let size = config.model.sample_size().unwrap_or(32);
        let (set, what) = a.data.load(size, config.model.in_channels())?;
        if exists {
            clear_run(out)?;
        }
        let classes = set
            .labels()
            .map(|l| {
                let n = l.iter().max().map_or(0, |&m| m as usize + 1);
                format!(", labelled 0..{n}")
            })
            .unwrap_or_default();
        println!(
            "training on {what}: {} images of {}x{}x{}{classes}",
            set.len(),
            set.channels(),
            set.height(),
            set.width()
        );
        Trainer::new(config, Arc::new(set), &what, device)?
    };
    let lock = match lock {
        Some(lock) => lock,
        None => {
            std::fs::create_dir_all(out)
                .with_context(|| format!("cannot create run folder {}", out.display()))?;
            RunLock::acquire(out)?
        }
    };
    lock.claim()?;
    let summary = ddpm_trainer::run_locked(&mut trainer, &lock, !a.no_progress)?;
    println!(
        "trained {} steps in {:.1} s ({:.1} images/s), final loss {:.4}",
        summary.steps, summary.seconds, summary.images_per_second, summary.final_loss
    );
    if trainer.config().model.in_channels() == 1 && trainer.data().len() >= 2 * QUALITY_MIN {
        write_quality(&trainer, out)?;
    }
    println!("checkpoint: {}", summary.checkpoint.display());
    println!("samples:    {}", summary.samples.display());
    println!("metrics:    {}", summary.metrics.display());
    println!("loss curve: {}", summary.loss_curve.display());
    Ok(())
}

/// Samples the quality measure draws at most, and at least (the rest of the training set, twice
/// as many, is its real reference).
const QUALITY_SAMPLES: usize = 500;
const QUALITY_MIN: usize = 50;

/// The digit-quality measure on up to 500 EMA samples (the run's sampler and steps), printed
/// and written to RUN/quality.json.
fn write_quality(trainer: &Trainer, out: &std::path::Path) -> Result<()> {
    let n = QUALITY_SAMPLES.min(trainer.data().len() / 2);
    let samples = ddpm_trainer::sample_ema(trainer, n)?;
    let labels = ddpm_trainer::sample_labels(trainer.config(), n);
    let report = ddpm_trainer::quality::score_digits(&samples, labels.as_deref(), trainer.data())?;
    println!("{report}");
    let path = out.join("quality.json");
    let json = serde_json::to_string_pretty(&report)?;
    ddpm_trainer::atomic_write(&path, |f| std::io::Write::write_all(f, json.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
