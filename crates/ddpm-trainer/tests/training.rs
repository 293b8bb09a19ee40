//! Training end to end on tiny models: learning, exact resume, safe checkpoints, NaN stops.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use ddpm_data::ImageSet;
use ddpm_trainer::{Loss, TrainConfig, TrainError, Trainer, atomic_write, list_checkpoints, run};
use ddpm_unet::UnetConfig;

/// Digits at 16x16, so the tests stay fast (the model and code paths are those of 32x32).
fn digits(n: usize) -> Arc<ImageSet> {
    Arc::new(ImageSet::embedded_mnist().unwrap().take(n).resize_to(16))
}

/// The `tiny` recipe with an even smaller SimpleUnet (8, 16, 32 channels).
fn tiny() -> TrainConfig {
    let mut config = TrainConfig::preset("tiny").unwrap();
    config.model = UnetConfig::Simple(ddpm_unet::SimpleUnetConfig::with_channels(1, &[8, 16, 32]));
    config
}

/// A small UNet2DModel with dropout and attention, for configurations BatchNorm does not cover.
fn tiny_unet2d() -> UnetConfig {
    let text = std::fs::read_to_string(ddpm_testutil::reference_path(
        "unet/diffusers_tiny/config.json",
    ))
    .unwrap();
    let mut config = UnetConfig::from_json(&text).unwrap();
    if let UnetConfig::Unet2d(c) = &mut config {
        c.dropout = 0.1;
    }
    config
}

fn bits(t: &HashMap<String, Tensor>) -> Vec<(String, Vec<u32>)> {
    let mut v: Vec<(String, Vec<u32>)> = t
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_tiny_model_learns_on_the_embedded_digits() {
    let mut config = tiny();
    config.steps = 40;
    config.batch_size = 16;
    config.optimizer.lr = 3e-3;
    let mut trainer = Trainer::new(config, digits(512), "embedded mnist", &Device::Cpu).unwrap();
    let losses: Vec<f64> = (0..40)
        .map(|_| trainer.train_step().unwrap().loss)
        .collect();
    let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = losses[35..].iter().sum::<f64>() / 5.0;
    assert!(
        last < 0.75 * first,
        "loss did not fall: first {first:.4}, last {last:.4} ({losses:?})"
    );
}

fn check_resume_is_exact(config: TrainConfig) {
    let dir = tempfile::tempdir().unwrap();
    let data = digits(64);
    let device = Device::Cpu;
    let mut straight = Trainer::new(config.clone(), data.clone(), "d", &device).unwrap();
    for _ in 0..6 {
        straight.train_step().unwrap();
    }
    let mut first = Trainer::new(config, data.clone(), "d", &device).unwrap();
    for _ in 0..3 {
        first.train_step().unwrap();
    }
    let path = dir.path().join("ck.safetensors");
    first.save_checkpoint(&path).unwrap();
    drop(first);
    let mut resumed = Trainer::resume(&path, data, &device, None).unwrap();
    assert_eq!(resumed.step(), 3);
    for _ in 0..3 {
        resumed.train_step().unwrap();
    }
    assert_eq!(resumed.step(), 6);
    assert!(
        bits(&straight.model_tensors()) == bits(&resumed.model_tensors()),
        "weights differ after resume"
    );
    assert!(
        bits(straight.ema_tensors()) == bits(resumed.ema_tensors()),
        "EMA differs after resume"
    );
    assert_eq!(straight.noise_state(), resumed.noise_state());
    assert_eq!(straight.data_position(), resumed.data_position());
    // And the optimizer moments, through a second checkpoint of each.
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    straight.save_checkpoint(&a).unwrap();
    resumed.save_checkpoint(&b).unwrap();
    let load = |p: &std::path::Path| candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    assert!(bits(&load(&a)) == bits(&load(&b)), "checkpoints differ");
}

#[test]
fn no_state_holds_on_to_a_computation_graph() {
    // A shadow or a moment derived from a tracked tensor keeps every earlier step's graph alive:
    // memory then grows with every step (a run of 450 steps reached 24 GB before this test).
    let mut config = tiny();
    config.grad_accum = 2;
    config.grad_clip = Some(0.1);
    let mut trainer = Trainer::new(config, digits(32), "d", &Device::Cpu).unwrap();
    for _ in 0..3 {
        trainer.train_step().unwrap();
    }
    for (name, t) in trainer.ema_tensors() {
        assert!(!t.track_op(), "EMA {name} tracks a graph");
    }
    let (m, v) = trainer.optimizer().moments();
    for (name, t) in m.iter().chain(v) {
        assert!(!t.track_op(), "AdamW moment {name} tracks a graph");
    }
}

#[test]
fn resume_is_bitwise_exact_with_batchnorm() {
    let mut config = tiny();
    config.steps = 6;
    config.warmup_steps = 2;
    config.lr_schedule = ddpm_trainer::LrSchedule::Cosine;
    config.flip = true;
    check_resume_is_exact(config);
}

#[test]
fn resume_is_bitwise_exact_with_dropout_accumulation_clipping_and_min_snr() {
    let mut config = tiny();
    config.model = tiny_unet2d();
    config.steps = 6;
    config.batch_size = 4;
    config.grad_accum = 2;
    config.grad_clip = Some(0.5);
    config.min_snr_gamma = Some(5.0);
    config.loss = Loss::Huber { delta: 0.1 };
    config.objective = ddpm_forward::Prediction::VPrediction;
    config.optimizer.weight_decay = 0.01;
    check_resume_is_exact(config);
}

#[test]
fn an_interrupted_checkpoint_write_never_replaces_the_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut trainer = Trainer::new(tiny(), digits(32), "d", &Device::Cpu).unwrap();
    trainer.train_step().unwrap();
    let path = dir.path().join("step-00000001.safetensors");
    trainer.save_checkpoint(&path).unwrap();
    let good = std::fs::read(&path).unwrap();

    // A write that dies half-way (disk full, killed process): the old file stays, whole.
    let err = atomic_write(&path, |f| {
        use std::io::Write;
        f.write_all(&good[..good.len() / 2])?;
        Err(std::io::Error::other("simulated crash mid-write"))
    })
    .unwrap_err();
    assert!(err.to_string().contains("simulated"));
    assert_eq!(std::fs::read(&path).unwrap(), good);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    assert_eq!(
        names,
        vec!["step-00000001.safetensors".to_string()],
        "temporary file left behind"
    );

    // A crash that leaves the temporary file behind: it is not a checkpoint, the good one loads.
    std::fs::write(
        dir.path().join(".step-00000002.safetensors.tmp"),
        &good[..100],
    )
    .unwrap();
    let found = list_checkpoints(dir.path()).unwrap();
    assert_eq!(found, vec![(1, path.clone())]);
    let resumed = Trainer::resume(&path, digits(32), &Device::Cpu, None).unwrap();
    assert_eq!(resumed.step(), 1);
}

#[test]
fn corrupt_or_foreign_checkpoints_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"garbage").unwrap();
    let err = Trainer::resume(&bad, digits(8), &Device::Cpu, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad.safetensors"), "{err}");
    // A diffusers weights file is a safetensors file but not a checkpoint.
    let weights =
        ddpm_testutil::reference_path("unet/diffusers_tiny/diffusion_pytorch_model.safetensors");
    let err = Trainer::resume(&weights, digits(8), &Device::Cpu, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("diffusion_pytorch_model.safetensors") && err.contains("format"),
        "{err}"
    );
}

#[test]
fn a_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny();
    config.steps = 50;
    config.checkpoint_every = 1;
    config.optimizer.lr = 1e30;
    let mut trainer = Trainer::new(config, digits(32), "d", &Device::Cpu).unwrap();
    let err = run(&mut trainer, dir.path(), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("at step"), "{err}");
    let step: u64 = err
        .split("at step ")
        .nth(1)
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let checkpoints = list_checkpoints(&dir.path().join("checkpoints")).unwrap();
    let (last, path) = checkpoints
        .last()
        .cloned()
        .expect("a checkpoint before the failure");
    assert_eq!(
        last,
        step - 1,
        "the last checkpoint is the step before the NaN"
    );
    let resumed = Trainer::resume(&path, digits(32), &Device::Cpu, None).unwrap();
    assert_eq!(resumed.step(), step - 1);

    // The same through train_step directly: the error names the step and nothing moves.
    let mut t = Trainer::resume(&path, digits(32), &Device::Cpu, None).unwrap();
    let before = bits(&t.model_tensors());
    match t.train_step() {
        Err(TrainError::NonFiniteLoss { step: s, .. }) => assert_eq!(s, step),
        other => panic!("expected a non-finite loss, got {other:?}"),
    }
    assert!(before == bits(&t.model_tensors()));
    assert_eq!(t.step(), step - 1);
}

#[test]
fn a_run_writes_its_outputs_and_continues_after_resume() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny();
    config.steps = 6;
    config.checkpoint_every = 2;
    config.keep_checkpoints = 2;
    config.sample_every = 3;
    let mut trainer = Trainer::new(config, digits(32), "embedded mnist", &Device::Cpu).unwrap();
    let summary = run(&mut trainer, dir.path(), false).unwrap();
    assert_eq!(summary.steps, 6);
    let steps: Vec<u64> = list_checkpoints(&dir.path().join("checkpoints"))
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(steps, vec![4, 6], "keeps the last two");
    assert!(summary.checkpoint.ends_with("step-00000006.safetensors"));
    let metrics = std::fs::read_to_string(&summary.metrics).unwrap();
    assert_eq!(metrics.lines().count(), 6);
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    for key in [
        "step",
        "loss",
        "lr",
        "grad_norm",
        "ema_decay",
        "images_per_second",
    ] {
        assert!(
            first.get(key).is_some(),
            "metrics line lacks {key}: {first}"
        );
    }
    let svg = std::fs::read_to_string(&summary.loss_curve).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline"),
        "{}",
        &svg[..svg.len().min(200)]
    );
    for step in [3, 6] {
        let png = image::open(dir.path().join(format!("samples/step-{step:08}.png"))).unwrap();
        assert_eq!(
            (png.width(), png.height()),
            (4 * 18 + 2, 18 + 2),
            "four 16x16 samples in a row"
        );
    }
    let config_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config_json["dataset"], "embedded mnist");
    assert_eq!(config_json["train"]["steps"], 6);

    // Resume to 8 steps: metrics continue, a stale line past the checkpoint is dropped.
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&summary.metrics)
        .unwrap();
    writeln!(f, "{{\"step\": 7, \"loss\": 0.5}}").unwrap();
    let mut resumed =
        Trainer::resume(&summary.checkpoint, digits(32), &Device::Cpu, Some(8)).unwrap();
    let again = run(&mut resumed, dir.path(), false).unwrap();
    assert_eq!(again.steps, 8);
    let steps: Vec<u64> = std::fs::read_to_string(&again.metrics)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=8).collect::<Vec<u64>>());
}

/// Grids and the quality report sample the EMA weights with the configured sampler, from the
/// run seed's own noise stream; configurations written before the choice existed read as DDIM.
#[test]
fn sample_grids_use_the_configured_sampler() {
    use ddpm_forward::NoiseSource;
    use ddpm_sampler::SamplerKind;
    use ddpm_sampler::{DdimConfig, DdimSampler, DdpmConfig, DdpmSampler, Scheduler, sample};
    use ddpm_trainer::sample_ema;

    let mut config = tiny();
    config.steps = 3;
    config.sample_steps = 4;
    config.sampler = SamplerKind::Ddpm;
    let mut trainer = Trainer::new(config.clone(), digits(16), "d", &Device::Cpu).unwrap();
    for _ in 0..3 {
        trainer.train_step().unwrap();
    }
    let expected = |sampler: &dyn Scheduler| {
        let mut rng = NoiseSource::with_stream(config.seed, u64::MAX);
        let init = rng.randn((3, 1, 16, 16), &Device::Cpu).unwrap();
        let unet = trainer.ema_unet().unwrap();
        sample(&unet, sampler, init, &mut rng, |_| {}).unwrap()
    };
    let ddpm = DdpmSampler::new(
        trainer.schedule(),
        DdpmConfig {
            num_inference_steps: Some(4),
            clip_sample: true,
            ..DdpmConfig::seed()
        },
    )
    .unwrap();
    let ddim = DdimSampler::new(trainer.schedule(), DdimConfig::new(4, 0.0)).unwrap();
    let got = sample_ema(&trainer, 3).unwrap();
    let bits = |t: &Tensor| bits(&HashMap::from([(String::new(), t.clone())]));
    assert_eq!(bits(&got), bits(&expected(&ddpm)), "DDPM, 4 steps, clipped");
    assert_ne!(bits(&got), bits(&expected(&ddim)), "DDPM and DDIM differ");

    let mut json = serde_json::to_value(&config).unwrap();
    assert_eq!(json["sampler"], "ddpm");
    let back: TrainConfig = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(back, config);
    json.as_object_mut().unwrap().remove("sampler");
    let old: TrainConfig = serde_json::from_value(json).unwrap();
    assert_eq!(old.sampler, SamplerKind::Ddim);
}

#[test]
fn bad_configs_and_mismatched_data_are_errors() {
    let mut config = tiny();
    config.steps = 0;
    let err = Trainer::new(config, digits(8), "d", &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("steps must be positive, got 0"), "{err}");
    let mut config = tiny();
    config.optimizer.beta1 = 1.5;
    assert!(
        Trainer::new(config, digits(8), "d", &Device::Cpu)
            .unwrap_err()
            .to_string()
            .contains("betas")
    );
    // RGB data into a 1-channel model.
    let rgb = Arc::new(ImageSet::from_pixels(vec![0; 3 * 32 * 32], 1, 3, 32, 32, None).unwrap());
    let err = Trainer::new(tiny(), rgb, "d", &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("3x32x32") && err.contains("1 channel"),
        "{err}"
    );
    assert!(
        TrainConfig::preset("huge")
            .unwrap_err()
            .to_string()
            .contains("\"huge\"")
    );
}

/// Three training steps of both U-Nets (convolutions, norms, attention, AdamW, EMA) give the same
/// bits with 1, 2 and 5 threads.
#[test]
fn training_does_not_depend_on_the_thread_count() {
    ddpm_testutil::assert_same_across_thread_counts(
        "training_does_not_depend_on_the_thread_count",
        "DDPM_TRAINER_CHILD",
        &["1", "2", "5"],
        || {
            let mut words = Vec::new();
            for model in [tiny().model, tiny_unet2d()] {
                let mut config = tiny();
                config.model = model;
                config.steps = 3;
                config.batch_size = 4;
                let mut trainer = Trainer::new(config, digits(16), "d", &Device::Cpu).unwrap();
                for _ in 0..3 {
                    trainer.train_step().unwrap();
                }
                for (_, v) in bits(&trainer.model_tensors())
                    .into_iter()
                    .chain(bits(trainer.ema_tensors()))
                {
                    words.extend(v);
                }
            }
            ddpm_testutil::fnv1a(words)
        },
    );
}

/// `tiny_unet2d` conditioned on the digit: 10 classes and "no class".
fn tiny_class_config() -> TrainConfig {
    let mut config = tiny();
    let mut model = tiny_unet2d();
    if let UnetConfig::Unet2d(c) = &mut model {
        c.num_class_embeds = Some(11);
    }
    config.model = model;
    config.batch_size = 8;
    config.class_dropout = 0.3;
    config.guidance_scale = 2.0;
    config
}

#[test]
fn resume_is_bitwise_exact_with_class_dropout() {
    let mut config = tiny_class_config();
    config.steps = 6;
    check_resume_is_exact(config);
}

/// The labels reach the model: training moves the class embedding, and the grids draw the
/// classes in turn with the run's guidance scale.
#[test]
fn class_conditional_training_and_grids() {
    use ddpm_forward::NoiseSource;
    use ddpm_sampler::{DdimConfig, DdimSampler, sample};
    use ddpm_trainer::{sample_ema, sample_labels};

    let mut config = tiny_class_config();
    config.steps = 2;
    config.sample_steps = 3;
    let mut trainer = Trainer::new(config.clone(), digits(32), "d", &Device::Cpu).unwrap();
    // A copy: the optimizer updates the weights in place.
    let before = trainer.model_tensors()["class_embedding.weight"]
        .copy()
        .unwrap();
    for _ in 0..2 {
        trainer.train_step().unwrap();
    }
    let after = &trainer.model_tensors()["class_embedding.weight"];
    let moved: Vec<f32> = (after - &before)
        .unwrap()
        .abs()
        .unwrap()
        .max(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    // Each of the 32 images' digits and "no class" appear within two batches of 8 here
    // (seeded), so each of their rows moves.
    assert!(moved.iter().filter(|&&m| m > 0.0).count() >= 5, "{moved:?}");

    assert_eq!(
        sample_labels(&config, 12),
        Some(vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
    );
    let got = sample_ema(&trainer, 3).unwrap();
    let unet = trainer.ema_unet().unwrap();
    let sampler = DdimSampler::new(trainer.schedule(), DdimConfig::new(3, 0.0)).unwrap();
    let expected = |scale: f64| {
        let mut rng = NoiseSource::with_stream(config.seed, u64::MAX);
        let init = rng.randn((3, 1, 16, 16), &Device::Cpu).unwrap();
        let classes = config.classes().unwrap();
        let guided =
            ddpm_unet::Guided::new(&unet, classes, &[0, 1, 2], scale, &Device::Cpu).unwrap();
        sample(&guided, &sampler, init, &mut rng, |_| {}).unwrap()
    };
    let bits = |t: &Tensor| bits(&HashMap::from([(String::new(), t.clone())]));
    assert_eq!(bits(&got), bits(&expected(2.0)));
    assert_ne!(bits(&got), bits(&expected(1.0)));
}

#[test]
fn class_conditioning_needs_matching_labels() {
    let err = |config: TrainConfig, data: Arc<ImageSet>| {
        Trainer::new(config, data, "d", &Device::Cpu)
            .unwrap_err()
            .to_string()
    };
    // No labels.
    let unlabelled =
        Arc::new(ImageSet::from_pixels(vec![0; 4 * 16 * 16], 4, 1, 16, 16, None).unwrap());
    let e = err(tiny_class_config(), unlabelled);
    assert!(
        e.contains("class-conditional") && e.contains("no labels"),
        "{e}"
    );
    // Digits 0..9 into 5 class embeddings, the last one "no class".
    let mut config = tiny_class_config();
    if let UnetConfig::Unet2d(c) = &mut config.model {
        c.num_class_embeds = Some(5);
    }
    let e = err(config, digits(64));
    assert!(e.contains("the model takes classes 0..4"), "{e}");
    assert!(e.contains("\"no class\""), "{e}");
    // Label dropout or guidance without class conditioning.
    let mut config = tiny();
    config.class_dropout = 0.1;
    let e = err(config, digits(8));
    assert!(
        e.contains("class_dropout 0.1 needs a class-conditional model"),
        "{e}"
    );
    let mut config = tiny();
    config.guidance_scale = 3.0;
    let e = err(config, digits(8));
    assert!(
        e.contains("guidance_scale 3 needs a class-conditional model"),
        "{e}"
    );
    // Guidance without a "no class" label to guide with.
    let mut config = tiny_class_config();
    config.class_dropout = 0.0;
    let e = err(config, digits(8));
    assert!(
        e.contains("needs a model trained with class_dropout"),
        "{e}"
    );
    let mut config = tiny_class_config();
    config.class_dropout = 1.0;
    let e = err(config, digits(8));
    assert!(e.contains("class_dropout must be in [0, 1)"), "{e}");
    let mut config = tiny_class_config();
    config.guidance_scale = f64::INFINITY;
    let e = err(config, digits(8));
    assert!(e.contains("guidance_scale must be finite, got inf"), "{e}");
}
