//! The forward process and posterior against diffusers 0.42.1's `DDPMScheduler`.
//!
//! Vectors: `assets/reference/ddpm_step.json`, written by `ref_fixtures.py` (diffusers 0.42.1,
//! PyTorch 2.15, float32): `add_noise` at t in {0, 1, 150, 299} on the seed schedule, and
//! `DDPMScheduler.step` (epsilon prediction, fixed_small variance, step noise pinned) whose
//! `pred_original_sample`, `variance` and `prev_sample` are our `x0_from_eps` and `posterior`.
//!
//! Tolerances. `add_noise`: 2e-6 absolute; diffusers forms `1 - abar_t` in float32, and at t = 0
//! that cancellation alone moves its x_t by 1.2e-6 from the exact value our f64 tables give.
//! The step: the README's ~1e-4 absolute at t <= 10, where the same cancellation dominates
//! diffusers' result, 2e-6 (+1e-5 relative) beyond; the variance to 1e-5 relative plus
//! diffusers' own float32 error (`ddpm_testutil::diffusers_f32_rtol`).

use candle_core::{Device, Tensor};
use ddpm_forward::ForwardProcess;
use ddpm_schedule::{Schedule, ScheduleConfig};
use ddpm_testutil::{assert_close, diffusers_f32_rtol, f32s, reference_json};
use serde_json::Value;

fn tensor(values: &Value, shape: &[usize]) -> Tensor {
    Tensor::from_vec(f32s(values), shape, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn shape_of(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn add_noise_matches_diffusers() {
    let reference = reference_json("ddpm_step.json");
    let shape = shape_of(&reference["shape"]);
    let forward = ForwardProcess::new(
        &Schedule::new(ScheduleConfig::seed_linear()).unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let x0 = tensor(&reference["x0"], &shape);
    let noise = tensor(&reference["noise"], &shape);
    let cases = reference["add_noise"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let t = case["t"].as_u64().unwrap() as u32;
        let ts = Tensor::new(&[t], &Device::Cpu).unwrap();
        let ours = forward.q_sample(&x0, &ts, &noise).unwrap();
        assert_close(
            &format!("add_noise t={t}"),
            &flat(&ours),
            &f32s(&case["x_t"]),
            2e-6,
            0.0,
        );
    }
}

#[test]
fn per_sample_timesteps_gather_per_sample() {
    // A batch of four copies noised at four different t equals four batches of one.
    let reference = reference_json("ddpm_step.json");
    let forward = ForwardProcess::new(
        &Schedule::new(ScheduleConfig::seed_linear()).unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let x0 = tensor(&reference["x0"], &[1, 1, 4, 4])
        .repeat((4, 1, 1, 1))
        .unwrap();
    let noise = tensor(&reference["noise"], &[1, 1, 4, 4])
        .repeat((4, 1, 1, 1))
        .unwrap();
    let ts = Tensor::new(&[0u32, 1, 150, 299], &Device::Cpu).unwrap();
    let ours = flat(&forward.q_sample(&x0, &ts, &noise).unwrap());
    let cases = reference["add_noise"].as_array().unwrap();
    let expected: Vec<f32> = cases.iter().flat_map(|c| f32s(&c["x_t"])).collect();
    assert_close("batched add_noise", &ours, &expected, 2e-6, 0.0);
}

#[test]
fn posterior_matches_the_diffusers_step() {
    let reference = reference_json("ddpm_step.json");
    let shape = shape_of(&reference["shape"]);
    let sample = tensor(&reference["sample"], &shape);
    let model_output = tensor(&reference["model_output"], &shape);
    let noise = tensor(&reference["noise"], &shape);
    let mut checked = 0;
    for section in reference["sections"].as_array().unwrap() {
        let cfg = &section["config"];
        assert_eq!(cfg["prediction_type"], "epsilon");
        assert_eq!(cfg["variance_type"], "fixed_small");
        let n = cfg["num_train_timesteps"].as_u64().unwrap() as usize;
        let clip = cfg["clip_sample"].as_bool().unwrap();
        let schedule = Schedule::new(ScheduleConfig::linear(n, 1e-4, 0.02)).unwrap();
        let forward = ForwardProcess::new(&schedule, &Device::Cpu).unwrap();
        let id = section["id"].as_str().unwrap();
        for step in section["steps"].as_array().unwrap() {
            let t = step["t"].as_u64().unwrap() as u32;
            let atol = if t <= 10 { 1e-4 } else { 2e-6 };
            let ts = Tensor::new(&[t], &Device::Cpu).unwrap();
            let what = format!("{id} t={t}");

            let mut x0 = forward.x0_from_eps(&sample, &ts, &model_output).unwrap();
            if clip {
                x0 = x0.clamp(-1f32, 1f32).unwrap();
            }
            // pred_original_sample is divided by sqrt(abar_t) ~ 1: relative error is what counts.
            assert_close(
                &format!("{what} x0"),
                &flat(&x0),
                &f32s(&step["pred_original_sample"]),
                atol,
                1e-5,
            );

            let post = forward.posterior(&x0, &sample, &ts).unwrap();
            let variance = flat(&post.variance)[0];
            let theirs_var = step["variance"].as_f64().unwrap() as f32;
            if t == 0 {
                assert_eq!(variance, 0.0);
                assert!(!step["noise_added"].as_bool().unwrap());
            } else {
                let rtol = 1e-5 + diffusers_f32_rtol(schedule.betas())[t as usize].1 as f32;
                let rel = (variance - theirs_var).abs() / theirs_var;
                assert!(
                    rel <= rtol,
                    "{what}: variance {variance} vs {theirs_var} (rel {rel:e} > {rtol:e})"
                );
            }
            let prev = post
                .mean
                .add(&noise.broadcast_mul(&post.variance.sqrt().unwrap()).unwrap())
                .unwrap();
            assert_close(
                &format!("{what} prev_sample"),
                &flat(&prev),
                &f32s(&step["prev_sample"]),
                atol,
                1e-5,
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 16);
}
