//! Identities between the targets, and determinism of noising across runs and thread counts.

use candle_core::{Device, Tensor};
use ddpm_forward::{ForwardProcess, NoiseSource, Prediction};
use ddpm_schedule::{Schedule, ScheduleConfig};
use ddpm_testutil::assert_close;

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn setup(cfg: ScheduleConfig) -> (ForwardProcess, Tensor, Tensor, Tensor, Tensor) {
    let forward = ForwardProcess::new(&Schedule::new(cfg).unwrap(), &Device::Cpu).unwrap();
    let mut rng = NoiseSource::new(11);
    let x0 = rng
        .randn((5, 3, 4, 4), &Device::Cpu)
        .unwrap()
        .tanh()
        .unwrap();
    let noise = rng.randn((5, 3, 4, 4), &Device::Cpu).unwrap();
    let n = forward.num_train_timesteps() as u32;
    let t = Tensor::new(&[0, 1, n / 2, n - 2, n - 1], &Device::Cpu).unwrap();
    let x_t = forward.q_sample(&x0, &t, &noise).unwrap();
    (forward, x0, noise, t, x_t)
}

#[test]
fn every_prediction_recovers_x0_and_eps() {
    // The cosine schedule ends at abar ~ 1e-9, where x0 from eps is ill-conditioned; stop short.
    for cfg in [
        ScheduleConfig::seed_linear(),
        ScheduleConfig::ddpm_linear(),
        ScheduleConfig::cosine(1000),
    ] {
        let (forward, x0, noise, t, x_t) = setup(cfg);
        for prediction in [
            Prediction::Epsilon,
            Prediction::Sample,
            Prediction::VPrediction,
        ] {
            let target = forward.target(prediction, &x0, &noise, &t).unwrap();
            let x0_hat = forward.pred_x0(prediction, &x_t, &t, &target).unwrap();
            let eps_hat = forward.pred_eps(prediction, &x_t, &t, &target).unwrap();
            let name = prediction.as_str();
            let (x0_tol, eps_tol) = match prediction {
                // Dividing by sqrt(abar_T) (as small as 0.006 here) amplifies rounding.
                Prediction::Epsilon => (2e-3, 1e-6),
                Prediction::Sample => (1e-6, 2e-3),
                Prediction::VPrediction => (2e-6, 2e-6),
            };
            let skip_last = matches!(
                cfg.beta_schedule,
                ddpm_schedule::BetaSchedule::Cosine { .. }
            ) && prediction != Prediction::VPrediction;
            let keep = if skip_last { 4 * 48 } else { 5 * 48 };
            assert_close(
                &format!("{name} x0"),
                &flat(&x0_hat)[..keep],
                &flat(&x0)[..keep],
                x0_tol,
                0.0,
            );
            assert_close(
                &format!("{name} eps"),
                &flat(&eps_hat)[..keep],
                &flat(&noise)[..keep],
                eps_tol,
                0.0,
            );
        }
    }
}

#[test]
fn velocity_is_the_rotation_of_x0_and_eps() {
    // With a = sqrt(abar), s = sqrt(1 - abar): x_t = a x0 + s eps, v = a eps - s x0, so
    // |x_t|^2 + |v|^2 = |x0|^2 + |eps|^2 per sample (a^2 + s^2 = 1).
    let (forward, x0, noise, t, x_t) = setup(ScheduleConfig::seed_linear());
    let v = forward.velocity(&x0, &noise, &t).unwrap();
    let lhs = flat(
        &(x_t.sqr().unwrap() + v.sqr().unwrap())
            .unwrap()
            .sum((1, 2, 3))
            .unwrap(),
    );
    let rhs = flat(
        &(x0.sqr().unwrap() + noise.sqr().unwrap())
            .unwrap()
            .sum((1, 2, 3))
            .unwrap(),
    );
    assert_close("norm", &lhs, &rhs, 0.0, 1e-5);
}

#[test]
fn posterior_of_the_true_x0_is_between_x0_and_xt() {
    // At t = 0 the posterior mean is x0 itself and the variance is 0.
    let (forward, x0, _noise, t, x_t) = setup(ScheduleConfig::seed_linear());
    let post = forward.posterior(&x0, &x_t, &t).unwrap();
    assert_close(
        "mean at t=0",
        &flat(&post.mean)[..48],
        &flat(&x0)[..48],
        1e-6,
        0.0,
    );
    let var = flat(&post.variance);
    assert_eq!(var[0], 0.0);
    assert!(var[1..].iter().all(|&v| v > 0.0));
    let logv = flat(&post.log_variance_clipped);
    assert!(logv.iter().all(|v| v.is_finite()));
    assert_eq!(logv[0], logv[1]);
}

#[test]
fn shape_mismatch_is_an_error() {
    let (forward, x0, _noise, t, _x_t) = setup(ScheduleConfig::seed_linear());
    let wrong = Tensor::zeros((5, 3, 4, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = forward.q_sample(&x0, &t, &wrong).unwrap_err().to_string();
    assert!(
        err.contains("[5, 3, 4, 4]") && err.contains("[5, 3, 4, 5]"),
        "{err}"
    );
    let t_bad = Tensor::new(&[0u32, 1, 2, 3, 300], &Device::Cpu).unwrap();
    let err = forward.q_sample(&x0, &t_bad, &x0).unwrap_err().to_string();
    assert!(err.contains("timestep 300"), "{err}");
}

/// A hash of the bits of a seeded training batch.
fn batch_fingerprint() -> u64 {
    let forward = ForwardProcess::new(
        &Schedule::new(ScheduleConfig::seed_linear()).unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let mut rng = NoiseSource::new(2024);
    let x0 = rng.randn((16, 3, 32, 32), &Device::Cpu).unwrap();
    let batch = forward.training_batch(&x0, &mut rng).unwrap();
    let t: Vec<u32> = batch.t.to_vec1().unwrap();
    ddpm_testutil::fnv1a(flat(&batch.x_t).iter().map(|x| x.to_bits()).chain(t))
}

#[test]
fn q_sample_is_bitwise_identical_across_runs_and_thread_counts() {
    ddpm_testutil::assert_same_across_thread_counts(
        "q_sample_is_bitwise_identical_across_runs_and_thread_counts",
        "DDPM_FORWARD_FINGERPRINT_CHILD",
        &["1", "2", "5"],
        batch_fingerprint,
    );
}

/// The forward strip noises one image with one draw of noise at evenly spaced timesteps: its
/// frame at `t` is `q_sample` at `t`, clamped; bad frame counts and shapes are errors.
#[test]
fn the_forward_strip_is_q_sample_at_evenly_spaced_timesteps() {
    let forward = ForwardProcess::new(
        &Schedule::new(ScheduleConfig::seed_linear()).unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let image = (NoiseSource::new(1)
        .randn((1, 1, 8, 8), &Device::Cpu)
        .unwrap()
        * 0.3)
        .unwrap();
    let strip = forward.strip(&image, 4, 9).unwrap();
    assert_eq!(strip.dims(), &[4, 1, 8, 8]);
    let noise = NoiseSource::new(9)
        .randn((1, 8, 8), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    for (i, t) in [0u32, 99, 199, 299].into_iter().enumerate() {
        let t = Tensor::new(&[t], &Device::Cpu).unwrap();
        let expected = forward
            .q_sample(&image, &t, &noise)
            .unwrap()
            .clamp(-1f32, 1f32)
            .unwrap();
        let frame = strip.narrow(0, i, 1).unwrap();
        assert_close("strip frame", &flat(&frame), &flat(&expected), 1e-6, 0.0);
    }
    assert!(forward.strip(&image, 0, 0).is_err());
    let two = image.repeat((2, 1, 1, 1)).unwrap();
    let err = forward.strip(&two, 3, 0).unwrap_err().to_string();
    assert!(err.contains("one image"), "{err}");
}
