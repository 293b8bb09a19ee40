//! The optimizer, EMA, learning-rate schedule and losses against PyTorch and diffusers.
//!
//! Vectors: `assets/reference/trainer.json`, written by `scripts/reference/trainer_fixtures.py`
//! (torch.optim.AdamW, diffusers' EMAModel and get_scheduler, torch's losses).
//! Tolerances: AdamW 1e-6 absolute after four steps (PyTorch uses `lerp` for the first moment,
//! we use `b1 m + (1 - b1) g`: a few ulp apart); decays and learning rates 1e-12 (both f64);
//! losses 1e-6 relative (f32).

use candle_core::{Device, Tensor, Var};
use ddpm_testutil::{assert_close, f32s, reference_json};
use ddpm_trainer::{AdamW, AdamWConfig, EmaConfig, Loss, LrSchedule, TrainConfig, ema_step};
use serde_json::Value;

fn vec_f32(v: &Value) -> Vec<f32> {
    f32s(v)
}

#[test]
fn adamw_matches_pytorch() {
    let r = reference_json("trainer.json");
    for case in r["adamw"].as_array().unwrap() {
        let config = AdamWConfig {
            lr: case["lr"].as_f64().unwrap(),
            beta1: case["beta1"].as_f64().unwrap(),
            beta2: case["beta2"].as_f64().unwrap(),
            eps: case["eps"].as_f64().unwrap(),
            weight_decay: case["weight_decay"].as_f64().unwrap(),
        };
        let var = Var::from_vec(vec_f32(&case["param"]), 7, &Device::Cpu).unwrap();
        let params = vec![("p".to_string(), var.clone())];
        let mut opt = AdamW::new(config, &params).unwrap();
        for (k, (g, after)) in case["grads"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["after"].as_array().unwrap())
            .enumerate()
        {
            let g = Tensor::from_vec(vec_f32(g), 7, &Device::Cpu).unwrap();
            opt.step(&params, &[g], 1.0, config.lr).unwrap();
            let ours: Vec<f32> = var.as_tensor().to_vec1().unwrap();
            assert_close(
                &format!("wd={} step {}", config.weight_decay, k + 1),
                &ours,
                &vec_f32(after),
                1e-6,
                0.0,
            );
        }
        assert_eq!(opt.steps(), 4);
    }
}

/// The moments update in place on the CPU: a clone must not see the original's later steps, and
/// a parameter shared with no one else changes only through its own optimizer.
#[test]
fn an_adamw_clone_is_independent() {
    let config = AdamWConfig {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let var = Var::from_vec(vec![1f32, -2., 3.], 3, &Device::Cpu).unwrap();
    let params = vec![("p".to_string(), var.clone())];
    let g = Tensor::from_vec(vec![0.5f32, 0.25, -1.], 3, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(config, &params).unwrap();
    opt.step(&params, std::slice::from_ref(&g), 1.0, config.lr)
        .unwrap();
    let snapshot = opt.clone();
    let moments = |o: &AdamW| -> Vec<f32> {
        let (m, v) = o.moments();
        let mut all: Vec<f32> = m["p"].to_vec1().unwrap();
        all.extend(v["p"].to_vec1::<f32>().unwrap());
        all
    };
    let before = moments(&snapshot);
    opt.step(&params, &[g], 1.0, config.lr).unwrap();
    assert_eq!(
        moments(&snapshot)
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>(),
        before.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        "the clone changed with the original's step"
    );
    assert_ne!(moments(&opt), before, "the original did not step");
}

#[test]
fn ema_decay_matches_diffusers() {
    let r = reference_json("trainer.json");
    for case in r["ema_decay"].as_array().unwrap() {
        let s = &case["settings"];
        let config = EmaConfig {
            max_decay: s["decay"].as_f64().unwrap(),
            min_decay: s.get("min_decay").and_then(Value::as_f64).unwrap_or(0.0),
            inv_gamma: s.get("inv_gamma").and_then(Value::as_f64).unwrap_or(1.0),
            power: s.get("power").and_then(Value::as_f64).unwrap_or(2.0 / 3.0),
            update_after_step: s
                .get("update_after_step")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            use_warmup: s["use_ema_warmup"].as_bool().unwrap(),
        };
        for (step, want) in case["steps"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["decay"].as_array().unwrap())
        {
            let (step, want) = (step.as_u64().unwrap(), want.as_f64().unwrap());
            let got = config.decay(step);
            assert!(
                (got - want).abs() < 1e-12,
                "{s} step {step}: {got} vs diffusers {want}"
            );
        }
    }
}

#[test]
fn ema_updates_match_diffusers() {
    let r = reference_json("trainer.json");
    let case = &r["ema_steps"];
    let config = EmaConfig {
        max_decay: 0.9999,
        power: 0.75,
        ..EmaConfig::diffusers()
    };
    let mut param = Tensor::from_vec(vec_f32(&case["param"]), 7, &Device::Cpu).unwrap();
    let mut shadow = param.clone();
    for (k, (inc, want)) in case["increments"]
        .as_array()
        .unwrap()
        .iter()
        .zip(case["shadow"].as_array().unwrap())
        .enumerate()
    {
        param = (param + Tensor::from_vec(vec_f32(inc), 7, &Device::Cpu).unwrap()).unwrap();
        shadow = ema_step(&shadow, &param, config.decay(k as u64 + 1)).unwrap();
        assert_close(
            &format!("shadow after {}", k + 1),
            &shadow.to_vec1::<f32>().unwrap(),
            &vec_f32(want),
            1e-6,
            0.0,
        );
    }
}

#[test]
fn learning_rates_match_diffusers_schedulers() {
    let r = reference_json("trainer.json");
    for case in r["lr"].as_array().unwrap() {
        let mut config = TrainConfig::preset("tiny").unwrap();
        config.optimizer.lr = 1.0;
        config.warmup_steps = case["warmup"].as_u64().unwrap();
        config.steps = case["total"].as_u64().unwrap();
        config.lr_schedule = match case["name"].as_str().unwrap() {
            "cosine" => LrSchedule::Cosine,
            _ => LrSchedule::Constant,
        };
        for (step, want) in case["multipliers"].as_array().unwrap().iter().enumerate() {
            let (got, want) = (config.lr_at(step as u64), want.as_f64().unwrap());
            assert!(
                (got - want).abs() < 1e-12,
                "{} step {step}: {got} vs {want}",
                case["name"]
            );
        }
    }
}

#[test]
fn losses_match_pytorch() {
    let r = reference_json("trainer.json");
    let l = &r["losses"];
    let pred = Tensor::from_vec(vec_f32(&l["pred"]), (1, 12), &Device::Cpu).unwrap();
    let target = Tensor::from_vec(vec_f32(&l["target"]), (1, 12), &Device::Cpu).unwrap();
    let delta = l["huber_delta"].as_f64().unwrap();
    for (loss, key) in [
        (Loss::L1, "l1"),
        (Loss::L2, "l2"),
        (Loss::Huber { delta }, "huber"),
    ] {
        let got = loss
            .per_sample(&pred, &target)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0] as f64;
        let want = l[key].as_f64().unwrap();
        assert!(
            (got - want).abs() <= 1e-6 * want.abs(),
            "{key}: {got} vs {want}"
        );
    }
}
