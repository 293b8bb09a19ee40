//! The training loop with its outputs: checkpoints, metrics, a loss curve, sample grids.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use ddpm_forward::NoiseSource;
use ddpm_sampler::sample;
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;

use crate::checkpoint::{atomic_write, checkpoint_name, list_checkpoints};
use crate::{Checkpoint, RunLock};
use crate::{StepMetrics, TrainConfig, Trainer};
use ddpm_unet::Guided;

/// What a finished run wrote, and where.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Steps taken in all (including any before a resume).
    pub steps: u64,
    /// The loss of the last step.
    pub final_loss: f64,
    /// Wall-clock seconds of this invocation.
    pub seconds: f64,
    /// Images per second over this invocation.
    pub images_per_second: f64,
    /// The last checkpoint written.
    pub checkpoint: PathBuf,
    /// The last sample grid written.
    pub samples: PathBuf,
    /// The metrics file (JSON lines).
    pub metrics: PathBuf,
    /// The loss curve (SVG).
    pub loss_curve: PathBuf,
}

/// The layout of a run folder.
#[derive(Debug, Clone)]
pub struct RunPaths {
    /// The run folder.
    pub root: PathBuf,
}

impl RunPaths {
    /// The paths inside `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }
    /// `config.json`: the resolved training configuration.
    pub fn config(&self) -> PathBuf {
        self.root.join("config.json")
    }
    /// `checkpoints/`.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }
    /// `samples/`.
    pub fn samples(&self) -> PathBuf {
        self.root.join("samples")
    }
    /// `metrics.jsonl`.
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    /// `loss.svg`.
    pub fn loss_curve(&self) -> PathBuf {
        self.root.join("loss.svg")
    }
    /// The newest checkpoint, if any.
    pub fn latest_checkpoint(&self) -> std::io::Result<Option<PathBuf>> {
        Ok(list_checkpoints(&self.checkpoints())?.pop().map(|(_, p)| p))
    }

    /// The newest checkpoint that reads and verifies ([`Checkpoint::read`]), read onto
    /// `device`, with the newer ones passed over and why (a checkpoint damaged by a crash or a
    /// bad disk). An error when the run has no checkpoint, or none that verifies.
    pub fn newest_good_checkpoint(
        &self,
        device: &candle_core::Device,
    ) -> candle_core::Result<GoodCheckpoint> {
        let dir = self.checkpoints();
        let mut all = list_checkpoints(&dir).map_err(io(&dir))?;
        if all.is_empty() {
            candle_core::bail!("{} has no checkpoints", self.root.display());
        }
        let mut skipped = Vec::new();
        while let Some((_, path)) = all.pop() {
            match Checkpoint::read(&path, device) {
                Ok(checkpoint) => {
                    return Ok(GoodCheckpoint {
                        path,
                        checkpoint,
                        skipped,
                    });
                }
                Err(error) => skipped.push((path, error)),
            }
        }
        let (newest, why) = &skipped[0];
        candle_core::bail!(
            "no checkpoint of {} can be read; the newest, {}, because: {why}",
            self.root.display(),
            newest.display()
        )
    }
}

/// Removes the temporary files (`.NAME.XXXXXX`, see [`atomic_write`]) that a writer killed
/// mid-write left in `dir`. Only a holder of the run's lock calls this, so no write of ours is
/// in progress there.
fn remove_stale_temporaries(dir: &Path) -> candle_core::Result<()> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let stale = name.starts_with('.')
            && name != crate::LOCK_FILE
            && name.rsplit_once('.').is_some_and(|(base, suffix)| {
                base.len() > 1
                    && suffix.len() == 6
                    && suffix.chars().all(|c| c.is_ascii_alphanumeric())
            });
        if stale && entry.file_type().map_err(io(dir))?.is_file() {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    Ok(())
}

/// What [`RunPaths::newest_good_checkpoint`] found.
#[derive(Debug)]
pub struct GoodCheckpoint {
    /// Its file.
    pub path: PathBuf,
    /// Its contents.
    pub checkpoint: Checkpoint,
    /// Newer checkpoints that could not be read, newest first, with the reason.
    pub skipped: Vec<(PathBuf, candle_core::Error)>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> candle_core::Error + '_ {
    move |e| candle_core::Error::Msg(format!("{}: {e}", path.display()))
}

#[derive(serde::Serialize)]
struct MetricsLine {
    #[serde(flatten)]
    step: StepMetrics,
    images_per_second: f64,
    elapsed_seconds: f64,
}

/// The classes [`sample_ema`] draws `count` images of for a class-conditional run: the
/// classes in turn ([`ddpm_unet::Classes::cycle`]), so a grid 10 wide shows each digit in a column. `None`
/// for an unconditional run.
pub fn sample_labels(config: &TrainConfig, count: usize) -> Option<Vec<u32>> {
    Some(config.classes()?.cycle(count))
}

/// Samples `count` images with the EMA weights, with the run's sampler and `sample_steps`
/// (at most `T`), from noise that depends on the run seed alone, so grids from different steps
/// are comparable. A class-conditional run samples the classes of [`sample_labels`] with its
/// `guidance_scale`.
pub fn sample_ema(trainer: &Trainer, count: usize) -> candle_core::Result<Tensor> {
    let c = trainer.config();
    let steps = c.sample_steps.min(trainer.schedule().num_train_timesteps());
    let sampler = c.scheduler().sampler(c.sampler, Some(steps), 0.0)?;
    let unet = trainer.ema_unet()?;
    let set_shape = trainer.data.set();
    let shape = (
        count,
        set_shape.channels(),
        set_shape.height(),
        set_shape.width(),
    );
    let mut rng = NoiseSource::with_stream(c.seed, u64::MAX);
    let init = rng.randn(shape, trainer.device())?;
    let _frozen = unet.freeze_weights();
    match (c.classes(), sample_labels(c, count)) {
        (Some(classes), Some(labels)) => {
            let guided = Guided::new(&unet, classes, &labels, c.guidance_scale, trainer.device())?;
            sample(&guided, sampler.as_ref(), init, &mut rng, |_| {})
        }
        _ => sample(&unet, sampler.as_ref(), init, &mut rng, |_| {}),
    }
}

/// Trains until `config.steps`, writing into `out`: `config.json`, `metrics.jsonl`, `loss.svg`,
/// `samples/step-N.png` and `checkpoints/step-N.safetensors` (the last
/// `keep_checkpoints` kept). A trainer restored with [`Trainer::resume`] continues its metrics.
/// A non-finite loss stops the run with an error naming the step; the checkpoints already
/// written stay as they were. The folder is locked for the run ([`RunLock`]): a second writer
/// fails at once.
pub fn run(
    trainer: &mut Trainer,
    out: &Path,
    show_progress: bool,
) -> candle_core::Result<RunSummary> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let lock = RunLock::acquire(out)?;
    lock.claim()?;
    run_locked(trainer, &lock, show_progress)
}

/// [`run`] into the folder of a lock the caller holds (taken before it checked or cleared
/// the folder).
pub fn run_locked(
    trainer: &mut Trainer,
    lock: &RunLock,
    show_progress: bool,
) -> candle_core::Result<RunSummary> {
    let paths = RunPaths::new(lock.root());
    for dir in [paths.root.clone(), paths.checkpoints(), paths.samples()] {
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        remove_stale_temporaries(&dir)?;
    }
    let c = trainer.config().clone();
    let config_json = serde_json::json!({ "train": &c, "dataset": trainer.dataset() });
    let config_path = paths.config();
    atomic_write(&config_path, |f| {
        f.write_all(
            serde_json::to_string_pretty(&config_json)
                .expect("serializes")
                .as_bytes(),
        )
    })
    .map_err(io(&config_path))?;

    // Keep the metrics up to the resumed step: later lines belong to a run that did not finish.
    let metrics_path = paths.metrics();
    let mut curve: Vec<(u64, f64)> = Vec::new();
    let mut kept = String::new();
    if let Ok(text) = std::fs::read_to_string(&metrics_path) {
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let (Some(step), Some(loss)) = (v["step"].as_u64(), v["loss"].as_f64()) else {
                continue;
            };
            if step <= trainer.step() {
                curve.push((step, loss));
                kept.push_str(line);
                kept.push('\n');
            }
        }
    }
    atomic_write(&metrics_path, |f| f.write_all(kept.as_bytes())).map_err(io(&metrics_path))?;
    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .map_err(io(&metrics_path))?;

    let bar = if show_progress {
        ProgressBar::new(c.steps)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
        )
        .expect("valid template"),
    );
    bar.set_position(trainer.step());
    let start = Instant::now();
    let start_step = trainer.step();
    let images_per_step = (c.batch_size * c.grad_accum) as f64;
    let mut last = None;
    let mut checkpoint = paths
        .latest_checkpoint()
        .map_err(io(&paths.checkpoints()))?
        .unwrap_or_default();
    let mut samples = PathBuf::new();
    while trainer.step() < c.steps {
        let m = match trainer.train_step() {
            Ok(m) => m,
            Err(e) => {
                bar.abandon();
                return Err(e.into());
            }
        };
        let elapsed = start.elapsed().as_secs_f64();
        let ips = (m.step - start_step) as f64 * images_per_step / elapsed.max(1e-9);
        let line = serde_json::to_string(&MetricsLine {
            step: m,
            images_per_second: ips,
            elapsed_seconds: elapsed,
        })
        .expect("serializes");
        writeln!(metrics, "{line}").map_err(io(&metrics_path))?;
        curve.push((m.step, m.loss));
        bar.set_position(m.step);
        bar.set_message(format!(
            "loss {:.4}  lr {:.2e}  {:.1} img/s",
            m.loss, m.lr, ips
        ));
        let done = m.step == c.steps;
        if done || (c.checkpoint_every > 0 && m.step % c.checkpoint_every == 0) {
            checkpoint = paths.checkpoints().join(checkpoint_name(m.step));
            trainer.save_checkpoint(&checkpoint)?;
            prune(&paths.checkpoints(), c.keep_checkpoints)?;
            draw_loss_curve(&curve, &paths.loss_curve())?;
        }
        if done || (c.sample_every > 0 && m.step % c.sample_every == 0) {
            samples = paths.samples().join(format!("step-{:08}.png", m.step));
            let x = sample_ema(trainer, c.sample_count)?;
            ddpm_data::write_grid(&x, c.sample_count.min(10), &samples)?;
        }
        last = Some(m);
    }
    bar.finish();
    let seconds = start.elapsed().as_secs_f64();
    Ok(RunSummary {
        steps: trainer.step(),
        final_loss: last.map(|m| m.loss).unwrap_or(f64::NAN),
        seconds,
        images_per_second: (trainer.step() - start_step) as f64 * images_per_step
            / seconds.max(1e-9),
        checkpoint,
        samples,
        metrics: metrics_path,
        loss_curve: paths.loss_curve(),
    })
}

/// Deletes all but the newest `keep` checkpoints.
fn prune(dir: &Path, keep: usize) -> candle_core::Result<()> {
    let all = list_checkpoints(dir).map_err(io(dir))?;
    for (_, path) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_file(path).map_err(io(path))?;
    }
    Ok(())
}

/// Draws the loss per step (and a 50-step moving average) as an SVG, atomically.
pub fn draw_loss_curve(points: &[(u64, f64)], path: &Path) -> candle_core::Result<()> {
    let err = |e: String| candle_core::Error::Msg(format!("drawing {}: {e}", path.display()));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let finite: Vec<(u64, f64)> = points.iter().copied().filter(|p| p.1.is_finite()).collect();
        let max_step = finite.last().map(|p| p.0).unwrap_or(1).max(1);
        let (lo, hi) = finite
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
                (lo.min(p.1), hi.max(p.1))
            });
        let (lo, hi) = if lo.is_finite() && hi > lo {
            (lo, hi)
        } else {
            (0.0, 1.0)
        };
        let mut chart = ChartBuilder::on(&root)
            .caption("training loss", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0u64..max_step, lo..hi)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .draw()
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(LineSeries::new(
                finite.iter().copied(),
                RGBColor(170, 190, 220),
            ))
            .map_err(|e| err(e.to_string()))?;
        let window = 50usize;
        let smooth: Vec<(u64, f64)> = finite
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let from = i.saturating_sub(window - 1);
                let slice = &finite[from..=i];
                (
                    p.0,
                    slice.iter().map(|q| q.1).sum::<f64>() / slice.len() as f64,
                )
            })
            .collect();
        chart
            .draw_series(LineSeries::new(
                smooth,
                RGBColor(20, 60, 160).stroke_width(2),
            ))
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    atomic_write(path, |f| f.write_all(svg.as_bytes())).map_err(io(path))
}
