//! The schedules against diffusers 0.42.1's `DDPMScheduler`.
//!
//! Vectors: `assets/reference/schedule_linear_T300.json` and `schedules_sampled.json`, written by
//! `ref_fixtures.py` (diffusers 0.42.1, PyTorch 2.15, float32; see `assets/reference/README.md`).
//! Tolerance: the README's relative 1e-5 per value and for the float32 sums, plus, per value,
//! diffusers' own float32 rounding error (`ddpm_testutil::diffusers_f32_rtol`). Our tables are
//! exact to f64; diffusers' `1 - abar` cancels in float32, so at small t its posterior variance
//! is off by up to ~5e-4 relative (scaled_linear, T = 1000), which is diffusers' error, not ours.

use candle_core::{Device, Tensor};
use ddpm_schedule::{BetaSchedule, Schedule, ScheduleConfig, Table};
use ddpm_testutil::{diffusers_f32_rtol, f32s, i64s, reference_json};
use serde_json::Value;

const RTOL: f64 = 1e-5;

/// The schedule diffusers builds from `DDPMScheduler(**config)`.
fn from_diffusers(config: &Value) -> ScheduleConfig {
    let n = config["num_train_timesteps"].as_u64().unwrap() as usize;
    let beta_start = config["beta_start"].as_f64().unwrap();
    let beta_end = config["beta_end"].as_f64().unwrap();
    let name = config["beta_schedule"].as_str().unwrap();
    let beta_schedule = BetaSchedule::from_diffusers(name, beta_start, beta_end)
        .unwrap_or_else(|| panic!("no mapping for {name}"));
    ScheduleConfig {
        num_train_timesteps: n,
        beta_schedule,
        rescale_betas_zero_snr: false,
    }
}

#[track_caller]
fn check_table(what: &str, schedule: &Schedule, table: Table, t: usize, theirs: f32) {
    let ours = schedule.table(table);
    if table == Table::PosteriorVariance && t == 0 {
        // diffusers clamps to 1e-20 where the formula gives 0; both add no noise.
        assert_eq!(ours[0], 0.0, "{what}[0]");
        assert!(theirs <= 1e-20, "{what}[0]: diffusers {theirs}");
        return;
    }
    let (abar_rtol, pv_rtol) = diffusers_f32_rtol(schedule.betas())[t];
    let rtol = RTOL
        + match table {
            Table::AlphasCumprod => abar_rtol,
            Table::PosteriorVariance => pv_rtol,
            _ => 0.0,
        };
    // Compare at float32: our f64 value is what the f32 tensor will hold.
    let ours = ours[t] as f32 as f64;
    let theirs = theirs as f64;
    let rel = (ours - theirs).abs() / theirs.abs();
    assert!(
        rel <= rtol,
        "{what}[{t}]: ours {ours}, diffusers {theirs}, rel {rel:e} > {rtol:e}"
    );
}

#[test]
fn seed_linear_t300_full_tables() {
    let reference = reference_json("schedule_linear_T300.json");
    let schedule = Schedule::new(from_diffusers(&reference["config"])).unwrap();
    assert_eq!(schedule.config(), &ScheduleConfig::seed_linear());
    for (key, table) in [
        ("betas", Table::Betas),
        ("alphas_cumprod", Table::AlphasCumprod),
        ("posterior_variance", Table::PosteriorVariance),
    ] {
        let theirs = f32s(&reference[key]);
        assert_eq!(theirs.len(), 300);
        for (t, &v) in theirs.iter().enumerate() {
            check_table(key, &schedule, table, t, v);
        }
    }
}

#[test]
fn sampled_schedules_and_sums() {
    let reference = reference_json("schedules_sampled.json");
    let schedules = reference["schedules"].as_array().unwrap();
    assert_eq!(schedules.len(), 6);
    for entry in schedules {
        let name = entry["name"].as_str().unwrap();
        let schedule = Schedule::new(from_diffusers(&entry["config"])).unwrap();
        let indices = i64s(&entry["indices"]);
        for (key, table) in [
            ("betas", Table::Betas),
            ("alphas_cumprod", Table::AlphasCumprod),
            ("posterior_variance", Table::PosteriorVariance),
        ] {
            let theirs = f32s(&entry[key]);
            for (&t, &v) in indices.iter().zip(&theirs) {
                check_table(&format!("{name}.{key}"), &schedule, table, t as usize, v);
            }
            // The sums diffusers took in float32 over all t (its t = 0 clamp of 1e-20 is invisible).
            let sum: f64 = schedule.table(table).iter().map(|&x| x as f32 as f64).sum();
            let theirs_sum = entry[format!("sum_{key}")].as_f64().unwrap();
            let rel = (sum - theirs_sum).abs() / theirs_sum;
            assert!(
                rel <= RTOL,
                "{name}.sum_{key}: ours {sum}, diffusers {theirs_sum}, rel {rel:e}"
            );
        }
    }
}

#[test]
fn tensors_hold_the_f32_tables_and_gather_per_sample() {
    let schedule = Schedule::new(ScheduleConfig::seed_linear()).unwrap();
    let tensors = schedule.tensors(&Device::Cpu).unwrap();
    assert_eq!(tensors.num_train_timesteps(), 300);
    for table in Table::ALL {
        let v: Vec<f32> = tensors.get(table).to_vec1().unwrap();
        let expected: Vec<f32> = schedule.table(table).iter().map(|&x| x as f32).collect();
        assert_eq!(v.len(), 300, "{table:?}");
        assert!(
            v.iter()
                .zip(&expected)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{table:?}"
        );
    }
    for dtype_ts in [
        Tensor::new(&[299u32, 0, 7], &Device::Cpu).unwrap(),
        Tensor::new(&[299i64, 0, 7], &Device::Cpu).unwrap(),
    ] {
        let g = tensors
            .gather(Table::SqrtOneMinusAlphasCumprod, &dtype_ts)
            .unwrap();
        assert_eq!(g.dims(), &[3, 1, 1, 1]);
        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        let table = schedule.table(Table::SqrtOneMinusAlphasCumprod);
        assert_eq!(g, vec![table[299] as f32, table[0] as f32, table[7] as f32]);
    }
    let t = Tensor::new(&[3u32, 4], &Device::Cpu).unwrap();
    assert_eq!(
        tensors.gather_rank(Table::Betas, &t, 2).unwrap().dims(),
        &[2, 1]
    );
}

#[track_caller]
fn check_gather_err(t: Tensor, needle: &str) {
    let schedule = Schedule::new(ScheduleConfig::seed_linear()).unwrap();
    let tensors = schedule.tensors(&Device::Cpu).unwrap();
    let err = tensors.gather(Table::Betas, &t).unwrap_err().to_string();
    assert!(
        err.contains(needle),
        "error {err:?} should contain {needle:?}"
    );
}

#[test]
fn gather_rejects_bad_timesteps_with_the_value() {
    let cpu = Device::Cpu;
    check_gather_err(
        Tensor::new(&[0u32, 300], &cpu).unwrap(),
        "timestep 300 out of range 0..300",
    );
    check_gather_err(
        Tensor::new(&[-1i64], &cpu).unwrap(),
        "timestep -1 out of range",
    );
    check_gather_err(
        Tensor::new(&[1.5f32], &cpu).unwrap(),
        "integer tensor, got dtype F32",
    );
    check_gather_err(
        Tensor::new(&[[1u32]], &cpu).unwrap(),
        "must be a [B] tensor, got shape [1, 1]",
    );
}
