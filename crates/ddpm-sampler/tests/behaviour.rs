//! Seeds, progress, errors, scheduler configs, and the seed tutorial's formula.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ddpm_forward::NoiseSource;
use ddpm_sampler::{
    DdimConfig, DdimSampler, DdpmConfig, DdpmSampler, Scheduler, SchedulerConfig, TimestepSpacing,
    VarianceType, sample,
};
use ddpm_schedule::{Schedule, ScheduleConfig, Table};
use ddpm_testutil::{assert_close, reference_path};
use ddpm_unet::{Unet, UnetConfig, init_seeded};

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn tiny_unet() -> Unet {
    let config = UnetConfig::preset("seed-tiny").unwrap();
    let varmap = VarMap::new();
    let unet = Unet::new(
        &config,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    init_seeded(&varmap, 17).unwrap();
    unet
}

fn seed_schedule() -> Schedule {
    Schedule::new(ScheduleConfig::seed_linear()).unwrap()
}

/// A hash of the bits of a 20-step DDPM and a 5-step eta = 1 DDIM run from seed 7.
fn sampling_fingerprint() -> u64 {
    let unet = tiny_unet();
    let schedule = seed_schedule();
    let ddpm = DdpmSampler::new(
        &schedule,
        DdpmConfig {
            num_inference_steps: Some(20),
            ..DdpmConfig::seed()
        },
    )
    .unwrap();
    let ddim = DdimSampler::new(&schedule, DdimConfig::new(5, 1.0)).unwrap();
    let mut rng = NoiseSource::new(7);
    let mut bits = Vec::new();
    for s in [&ddpm as &dyn Scheduler, &ddim] {
        let init = rng.randn((3, 1, 16, 16), &Device::Cpu).unwrap();
        let out = sample(&unet, s, init, &mut rng, |_| {}).unwrap();
        bits.extend(flat(&out).iter().map(|v| v.to_bits()));
    }
    ddpm_testutil::fnv1a(bits)
}

#[test]
fn same_seed_same_image_across_runs_and_thread_counts() {
    ddpm_testutil::assert_same_across_thread_counts(
        "same_seed_same_image_across_runs_and_thread_counts",
        "DDPM_SAMPLER_FINGERPRINT_CHILD",
        &["1", "3"],
        sampling_fingerprint,
    );
}

#[test]
fn other_seeds_give_other_images_and_progress_reports_every_step() {
    let unet = tiny_unet();
    let schedule = seed_schedule();
    let ddim = DdimSampler::new(&schedule, DdimConfig::new(6, 1.0)).unwrap();
    let run = |seed| {
        let mut rng = NoiseSource::new(seed);
        let init = rng.randn((1, 1, 16, 16), &Device::Cpu).unwrap();
        let mut steps = Vec::new();
        let mut kept = Vec::new();
        let out = sample(&unet, &ddim, init, &mut rng, |p| {
            steps.push((p.index, p.num_steps, p.timestep));
            kept.push(p.sample.clone());
        })
        .unwrap();
        (flat(&out), steps, kept)
    };
    let (a, steps, kept) = run(1);
    let (b, _, _) = run(2);
    assert_ne!(a, b);
    let expected: Vec<(usize, usize, usize)> = [250, 200, 150, 100, 50, 0]
        .iter()
        .enumerate()
        .map(|(i, &t)| (i, 6, t))
        .collect();
    assert_eq!(steps, expected);
    assert_eq!(
        flat(kept.last().unwrap()),
        a,
        "the last kept sample is the result"
    );
    assert_ne!(flat(&kept[0]), a);
}

#[test]
fn ddpm_is_the_seeds_sample_timestep() {
    // The seed: mean = sqrt(1/alpha_t) (x - beta_t eps / sqrt(1 - abar_t)), plus
    // sqrt(posterior_variance_t) noise except at t = 0. Same algebra as diffusers' step.
    let schedule = seed_schedule();
    let ddpm = DdpmSampler::new(&schedule, DdpmConfig::seed()).unwrap();
    let mut rng = NoiseSource::new(3);
    let x = rng.randn((2, 1, 4, 4), &Device::Cpu).unwrap();
    let eps = rng.randn((2, 1, 4, 4), &Device::Cpu).unwrap();
    let noise = rng.randn((2, 1, 4, 4), &Device::Cpu).unwrap();
    for t in [299usize, 200, 100, 50, 0] {
        let index = 299 - t;
        let out = flat(
            &ddpm
                .step_with_noise(index, &eps, &x, Some(&noise))
                .unwrap()
                .prev_sample,
        );
        let g = |table| schedule.table(table)[t];
        let (xs, es, ns) = (flat(&x), flat(&eps), flat(&noise));
        let seed: Vec<f32> = (0..xs.len())
            .map(|i| {
                let mean = g(Table::SqrtRecipAlphas)
                    * (xs[i] as f64
                        - g(Table::Betas) * es[i] as f64 / g(Table::SqrtOneMinusAlphasCumprod));
                let noise = if t == 0 {
                    0.0
                } else {
                    g(Table::PosteriorVariance).sqrt() * ns[i] as f64
                };
                (mean + noise) as f32
            })
            .collect();
        assert_close(&format!("t={t}"), &out, &seed, 1e-5, 1e-5);
    }
}

#[test]
fn ddpm_adds_no_noise_at_t0_and_draws_none() {
    let schedule = seed_schedule();
    let ddpm = DdpmSampler::new(&schedule, DdpmConfig::seed()).unwrap();
    let x = Tensor::ones((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let eps = x.zeros_like().unwrap();
    let mut rng = NoiseSource::new(5);
    let before = rng.state();
    let last = ddpm.timesteps().len() - 1;
    let a = flat(&ddpm.step(last, &eps, &x, &mut rng).unwrap().prev_sample);
    assert_eq!(rng.state(), before, "the t = 0 step drew noise");
    let b = flat(
        &ddpm
            .step_with_noise(last, &eps, &x, None)
            .unwrap()
            .prev_sample,
    );
    assert_eq!(a, b);
    // Eta = 0 DDIM draws none either.
    let ddim = DdimSampler::new(&schedule, DdimConfig::new(3, 0.0)).unwrap();
    ddim.step(0, &eps, &x, &mut rng).unwrap();
    assert_eq!(rng.state(), before);
}

#[test]
fn fixed_large_is_noisier_than_fixed_small() {
    let schedule = seed_schedule();
    let x = Tensor::zeros((1, 1, 64, 64), DType::F32, &Device::Cpu).unwrap();
    let noise = NoiseSource::new(1)
        .randn((1, 1, 64, 64), &Device::Cpu)
        .unwrap();
    let spread = |variance_type| {
        let s = DdpmSampler::new(
            &schedule,
            DdpmConfig {
                variance_type,
                ..DdpmConfig::seed()
            },
        )
        .unwrap();
        // t = 2: posterior variance is well below beta_t there.
        let out = s
            .step_with_noise(297, &x, &x, Some(&noise))
            .unwrap()
            .prev_sample;
        out.sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (small, large) = (
        spread(VarianceType::FixedSmall),
        spread(VarianceType::FixedLarge),
    );
    let b = schedule.betas();
    let pv = schedule.posterior_variance()[2];
    assert!(
        (large / small - (b[2] / pv) as f32).abs() < 1e-3,
        "{large} / {small}"
    );
}

#[track_caller]
fn check_err<T: std::fmt::Debug>(r: candle_core::Result<T>, needle: &str) {
    let err = r.unwrap_err().to_string();
    assert!(
        err.contains(needle),
        "error {err:?} should contain {needle:?}"
    );
}

#[test]
fn bad_settings_are_clear_errors() {
    let schedule = seed_schedule();
    check_err(
        DdimSampler::new(&schedule, DdimConfig::new(301, 0.0)),
        "301 sampling steps is more than the 300",
    );
    check_err(
        DdimSampler::new(&schedule, DdimConfig::new(0, 0.0)),
        "at least 1, got 0",
    );
    check_err(
        DdimSampler::new(&schedule, DdimConfig::new(10, -0.5)),
        "eta must be >= 0, got -0.5",
    );
    check_err(
        DdimSampler::new(&schedule, DdimConfig::new(10, f64::NAN)),
        "eta",
    );
    check_err(
        DdimSampler::new(
            &schedule,
            DdimConfig {
                steps_offset: 40,
                ..DdimConfig::new(10, 0.0)
            },
        ),
        "timestep 310",
    );
    check_err(
        DdpmSampler::new(
            &schedule,
            DdpmConfig {
                num_inference_steps: Some(1000),
                ..DdpmConfig::seed()
            },
        ),
        "1000 sampling steps",
    );
    assert!(
        "karras"
            .parse::<TimestepSpacing>()
            .unwrap_err()
            .contains("\"karras\"")
    );
    let ddim = DdimSampler::new(&schedule, DdimConfig::new(10, 0.0)).unwrap();
    let x = Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let wrong = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    check_err(
        ddim.step_with_noise(0, &wrong, &x, None),
        "model returned shape [1, 3, 4, 4]",
    );
}

#[test]
fn scheduler_configs_parse_round_trip_and_reject_the_unsupported() {
    let text = std::fs::read_to_string(reference_path("unet/ddim_pipeline/scheduler_config.json"))
        .unwrap();
    let parsed = SchedulerConfig::from_json(&text).unwrap();
    assert_eq!(parsed.class_name, "DDIMScheduler");
    assert_eq!(parsed.schedule, ScheduleConfig::ddpm_linear());
    assert!(parsed.clip_sample && parsed.set_alpha_to_one);
    assert_eq!(
        SchedulerConfig::from_json(&parsed.to_json().unwrap()).unwrap(),
        parsed
    );

    // google/ddpm-cifar10-32's scheduler_config.json (diffusers 0.1 era, with tensor_format).
    let cifar = r#"{"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02,
        "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": true, "num_train_timesteps": 1000,
        "tensor_format": "pt", "trained_betas": null, "variance_type": "fixed_large"}"#;
    let cifar = SchedulerConfig::from_json(cifar).unwrap();
    assert_eq!(cifar.variance_type, VarianceType::FixedLarge);
    assert_eq!(cifar.ddpm(None).variance_type, VarianceType::FixedLarge);
    assert_eq!(cifar.ddim(50, 0.0).num_inference_steps, 50);

    let edit = |key: &str, value: &str| {
        text.replacen(
            "\"beta_end\": 0.02",
            &format!("\"beta_end\": 0.02, \"{key}\": {value}"),
            1,
        )
    };
    check_err(
        SchedulerConfig::from_json(&edit("use_karras_sigmas", "true")),
        "unknown key \"use_karras_sigmas\"",
    );
    check_err(
        SchedulerConfig::from_json(
            &text.replace("\"thresholding\": false", "\"thresholding\": true"),
        ),
        "thresholding",
    );
    check_err(
        SchedulerConfig::from_json(&text.replace("\"leading\"", "\"karras\"")),
        "timestep_spacing \"karras\"",
    );
    check_err(
        SchedulerConfig::from_json(&text.replace("\"epsilon\"", "\"flow\"")),
        "prediction type \"flow\"",
    );
    check_err(
        SchedulerConfig::from_json(
            &text.replace("\"trained_betas\": null", "\"trained_betas\": [0.1]"),
        ),
        "trained_betas",
    );
    check_err(
        SchedulerConfig::from_json(&text.replace(
            "\"num_train_timesteps\": 1000",
            "\"num_train_timesteps\": 0",
        )),
        "num_train_timesteps",
    );
    check_err(
        SchedulerConfig::from_json(
            &text.replace("\"clip_sample\": true", "\"clip_sample\": \"yes\""),
        ),
        "clip_sample must be true or false",
    );
    check_err(
        SchedulerConfig::from_json(&text.replace("DDIMScheduler", "EulerDiscreteScheduler")),
        "EulerDiscreteScheduler",
    );
    check_err(
        SchedulerConfig::from_json(&edit("variance_type", "\"learned_range\"")),
        "learned_range",
    );
}

#[test]
fn ddim_with_eta_one_and_all_steps_is_ddpm() {
    // DDIM section 4.1: eta = 1 over every timestep is DDPM with fixed_small variance.
    let schedule = seed_schedule();
    let ddim = DdimSampler::new(
        &schedule,
        DdimConfig {
            clip_sample: false,
            ..DdimConfig::new(300, 1.0)
        },
    )
    .unwrap();
    let ddpm = DdpmSampler::new(&schedule, DdpmConfig::seed()).unwrap();
    let mut rng = NoiseSource::new(8);
    let x = rng.randn((1, 1, 4, 4), &Device::Cpu).unwrap();
    let eps = rng.randn((1, 1, 4, 4), &Device::Cpu).unwrap();
    let noise = rng.randn((1, 1, 4, 4), &Device::Cpu).unwrap();
    for index in [0, 150, 290, 298] {
        let a = flat(
            &ddim
                .step_with_noise(index, &eps, &x, Some(&noise))
                .unwrap()
                .prev_sample,
        );
        let b = flat(
            &ddpm
                .step_with_noise(index, &eps, &x, Some(&noise))
                .unwrap()
                .prev_sample,
        );
        assert_close(&format!("index {index}"), &a, &b, 1e-5, 1e-5);
    }
}
