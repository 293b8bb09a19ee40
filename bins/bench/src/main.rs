//! `ddpm-bench`: times the seed's `SimpleUnet` on the CPU, one configuration and one kind of
//! step per process (so the peak RSS is that step's own), and prints one JSON line.
//!
//! A training step is what the seed's loop does: draw `x_0`, timesteps and noise, noise
//! `x_0`, predict the noise in training mode, L1 loss, backward, an Adam update. A sampling
//! step is one forward pass in evaluation mode plus one DDPM ancestral update.
//! `bench/torch_reference.py` does the same in PyTorch and prints the same JSON, and
//! `cargo xtask bench --torch PYTHON` runs the two in alternation and prints the ratio.

use std::time::Instant;

#[path = "../../alloc.rs"]
mod alloc;
#[path = "../../stats.rs"]
mod stats;
use stats::median;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::{Parser, ValueEnum};
use ddpm_forward::{ForwardProcess, NoiseSource};
use ddpm_sampler::{DdpmConfig, DdpmSampler, Scheduler};
use ddpm_schedule::{Schedule, ScheduleConfig};
use ddpm_trainer::{AdamW, AdamWConfig};
use ddpm_unet::{Mode, SimpleUnet, SimpleUnetConfig, init_seeded, trainable_vars};

#[derive(Parser)]
#[command(about = "Time SimpleUnet training or sampling steps; prints one JSON line")]
struct Args {
    /// Which model and batch.
    #[arg(long, value_enum)]
    config: Config,
    /// Which step to time.
    #[arg(long, value_enum)]
    mode: StepKind,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum Config {
    /// SimpleUnet 32,64,128,256 on 1x32x32, batch 64.
    Small,
    /// The seed's SimpleUnet (62.4M parameters) on 3x64x64, batch 8.
    Seed,
}

#[derive(Clone, Copy, ValueEnum)]
enum StepKind {
    /// One training step.
    Train,
    /// One sampling step.
    Sample,
    /// The machine's f32 matmul peak: a 2048^3 product through candle (the `gemm` crate).
    Peak,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Self::Small => "small",
            Self::Seed => "seed",
        }
    }

    fn model(self) -> SimpleUnetConfig {
        match self {
            Self::Small => SimpleUnetConfig::seed_small(),
            Self::Seed => SimpleUnetConfig::seed(),
        }
    }

    fn batch(self) -> usize {
        match self {
            Self::Small => 64,
            Self::Seed => 8,
        }
    }

    fn size(self) -> usize {
        match self {
            Self::Small => 32,
            Self::Seed => 64,
        }
    }
}

/// Multiply-adds of one image's forward pass through `SimpleUnet` (convolutions and the time
/// MLP; norms and activations are left out, as FLOP counts usually do).
fn forward_macs(c: &SimpleUnetConfig, size: usize) -> u64 {
    let conv =
        |cin: usize, cout: usize, k: usize, out: usize| (out * out * cin * cout * k * k) as u64;
    let t = c.time_emb_dim;
    let mut macs = conv(c.image_channels, c.down_channels[0], 3, size) + (t * t) as u64;
    let mut r = size;
    for w in c.down_channels.windows(2) {
        let (i, o) = (w[0], w[1]);
        macs += conv(i, o, 3, r) + conv(o, o, 3, r) + (t * o) as u64;
        r /= 2;
        macs += conv(o, o, 4, r);
    }
    for w in c.up_channels.windows(2) {
        let (i, o) = (w[0], w[1]);
        macs += conv(2 * i, o, 3, r) + conv(o, o, 3, r) + (t * o) as u64;
        // The transposed convolution: every input position meets the whole kernel.
        macs += conv(o, o, 4, r);
        r *= 2;
    }
    macs + conv(c.up_channels[c.up_channels.len() - 1], c.out_dim, 1, r)
}

/// The process's peak resident set, from `/proc/self/status` (Linux); `None` elsewhere.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs `step` `warmup + steps` times and returns the timed steps' seconds.
fn time(
    warmup: usize,
    steps: usize,
    mut step: impl FnMut(usize) -> Result<()>,
) -> Result<Vec<f64>> {
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let start = Instant::now();
        step(i)?;
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}

/// The seed's training step: noise a batch, predict in training mode, L1, backward, Adam.
fn time_train(cfg: Config, args: &Args, dev: &Device) -> Result<Vec<f64>> {
    let model_cfg = cfg.model();
    let (b, s, ch) = (cfg.batch(), cfg.size(), model_cfg.image_channels);
    let varmap = VarMap::new();
    let model = SimpleUnet::new(
        &model_cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, dev),
    )?;
    init_seeded(&varmap, 0)?;
    let forward = ForwardProcess::new(&Schedule::new(ScheduleConfig::seed_linear())?, dev)?;
    let params = trainable_vars(&varmap);
    let adam = AdamWConfig {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut opt = AdamW::new(adam, &params)?;
    let mut rng = NoiseSource::new(0);
    time(args.warmup, args.steps, |i| {
        let x0 = rng.randn((b, ch, s, s), dev)?;
        let batch = forward.training_batch(&x0, &mut rng)?;
        let pred = model.forward_t(&batch.x_t, &batch.t, Mode::Train { seed: i as u64 })?;
        let loss = (pred - &batch.noise)?.abs()?.mean_all()?;
        let grads = loss.backward()?;
        let g = params
            .iter()
            .map(|(k, v)| {
                grads
                    .get(v.as_tensor())
                    .cloned()
                    .with_context(|| format!("no gradient for {k}"))
            })
            .collect::<Result<Vec<Tensor>>>()?;
        opt.step(&params, &g, 1.0, adam.lr)?;
        loss.to_scalar::<f32>()?;
        Ok(())
    })
}

/// One DDPM ancestral step: a forward pass in evaluation mode on plain tensors (no variables,
/// so no graph, as `ddpm sample` runs) and the update, with the weights frozen as in
/// `ddpm_sampler::sample`'s loop (the warm-up step makes the kept kernel transforms).
fn time_sample(cfg: Config, args: &Args, dev: &Device) -> Result<Vec<f64>> {
    let model_cfg = cfg.model();
    let (b, s, ch) = (cfg.batch(), cfg.size(), model_cfg.image_channels);
    let varmap = VarMap::new();
    SimpleUnet::new(
        &model_cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, dev),
    )?;
    init_seeded(&varmap, 0)?;
    let weights = varmap
        .data()
        .lock()
        .expect("not poisoned")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    drop(varmap);
    let model = SimpleUnet::new(
        &model_cfg,
        VarBuilder::from_tensors(weights, DType::F32, dev),
    )?;
    let schedule = Schedule::new(ScheduleConfig::seed_linear())?;
    let sampler = DdpmSampler::new(&schedule, DdpmConfig::seed())?;
    let mut rng = NoiseSource::new(0);
    let mut x = rng.randn((b, ch, s, s), dev)?;
    // As in `ddpm_sampler::sample`'s loop: the weights are fixed, so the convolutions' kernel
    // transforms are made in the (untimed) first step and reused.
    ddpm_unet::with_frozen_weights(|| {
        time(args.warmup, args.steps, |i| {
            let index = i % schedule.num_train_timesteps();
            let t = Tensor::full(sampler.timesteps()[index] as u32, b, dev)?;
            let eps = model.forward_t(&x, &t, Mode::Eval)?;
            let noise = rng.randn((b, ch, s, s), dev)?;
            x = sampler
                .step_with_noise(index, &eps, &x, Some(&noise))?
                .prev_sample;
            x.flatten_all()?.get(0)?.to_scalar::<f32>()?;
            Ok(())
        })
    })
}

/// Side of the square matmul that `--mode peak` times.
const PEAK_N: usize = 2048;

fn time_peak(args: &Args, dev: &Device) -> Result<Vec<f64>> {
    let mut rng = NoiseSource::new(0);
    let a = rng.randn((PEAK_N, PEAK_N), dev)?;
    let b = rng.randn((PEAK_N, PEAK_N), dev)?;
    time(args.warmup, args.steps, |_| {
        a.matmul(&b)?.get(0)?.get(0)?.to_scalar::<f32>()?;
        Ok(())
    })
}

fn main() -> Result<()> {
    alloc::keep_freed_memory();
    alloc::configure_threads();
    let args = Args::parse();
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let dev = Device::Cpu;
    let cfg = args.config;
    let b = cfg.batch();
    let flop_per_image = 2 * forward_macs(&cfg.model(), cfg.size());
    let (times, flop) = match args.mode {
        StepKind::Train => (time_train(cfg, &args, &dev)?, 3 * flop_per_image * b as u64),
        StepKind::Sample => (time_sample(cfg, &args, &dev)?, flop_per_image * b as u64),
        StepKind::Peak => (time_peak(&args, &dev)?, 2 * (PEAK_N as u64).pow(3)),
    };
    let step_s = median(times.clone());
    let report = serde_json::json!({
        "impl": "ddpm",
        "config": cfg.name(),
        "mode": match args.mode {
            StepKind::Train => "train",
            StepKind::Sample => "sample",
            StepKind::Peak => "peak",
        },
        "batch": b,
        "threads": candle_core::utils::get_num_threads(),
        "step_s": step_s,
        "steps_s": times,
        "images_per_s": b as f64 / step_s,
        "gflop": flop as f64 / 1e9,
        "gflop_per_s": flop as f64 / 1e9 / step_s,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    println!("{report}");
    Ok(())
}
