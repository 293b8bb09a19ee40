//! Timestep embeddings against diffusers 0.42.1's `get_timestep_embedding(t, 32, flip, shift)`.
//!
//! Vectors: `assets/reference/timestep_embedding.json`, written by `ref_fixtures.py`
//! (diffusers 0.42.1, PyTorch 2.15, float32). Tolerance from its README: ~4e-6 absolute at
//! t = 299 from operation order; we allow 1e-5. The other settings differ by O(1).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use ddpm_embeddings::{
    SeedTimeMlp, SinusoidalConfig, SinusoidalEmbedding, TimestepEmbedding, timestep_embedding,
};
use ddpm_testutil::{assert_close, f32s, i64s, max_abs_diff, reference_json};

const ATOL: f32 = 1e-5;

fn embed(timesteps: &[i64], cfg: &SinusoidalConfig) -> Vec<f32> {
    let t = Tensor::new(timesteps, &Device::Cpu).unwrap();
    timestep_embedding(&t, cfg)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn four_variants_match_and_wrong_variants_fail() {
    let reference = reference_json("timestep_embedding.json");
    let dim = reference["dim"].as_u64().unwrap() as usize;
    let timesteps = i64s(&reference["timesteps"]);
    let combos = reference["combos"].as_array().unwrap();
    assert_eq!(combos.len(), 4);
    let settings: Vec<(bool, f64)> = combos
        .iter()
        .map(|c| {
            (
                c["flip_sin_to_cos"].as_bool().unwrap(),
                c["downscale_freq_shift"].as_f64().unwrap(),
            )
        })
        .collect();
    for (combo, &(flip, shift)) in combos.iter().zip(&settings) {
        let theirs = f32s(&combo["embedding"]);
        for &(other_flip, other_shift) in &settings {
            let ours = embed(
                &timesteps,
                &SinusoidalConfig::diffusers(dim, other_flip, other_shift),
            );
            if (other_flip, other_shift) == (flip, shift) {
                assert_close(
                    &format!("flip={flip} shift={shift}"),
                    &ours,
                    &theirs,
                    ATOL,
                    0.0,
                );
            } else {
                // A wrong setting cannot pass.
                let diff = max_abs_diff(&ours, &theirs);
                assert!(
                    diff > 0.1,
                    "flip={other_flip} shift={other_shift} matches flip={flip} shift={shift} ({diff})"
                );
            }
        }
        if combo["matches_seed"].as_bool().unwrap() {
            let ours = embed(&timesteps, &SinusoidalConfig::seed(dim));
            assert_close("seed", &ours, &theirs, ATOL, 0.0);
        }
    }
}

#[test]
fn odd_width_pads_one_zero_column() {
    let cfg = SinusoidalConfig::diffusers(7, false, 0.0);
    let emb = embed(&[5, 9], &cfg);
    assert_eq!(emb.len(), 14);
    assert_eq!(emb[6], 0.0);
    assert_eq!(emb[13], 0.0);
    // sin(5 * f0) with f0 = 1.
    assert!((emb[0] - 5f32.sin()).abs() < 1e-6);
}

#[test]
fn bad_inputs_are_errors() {
    let t = Tensor::new(&[[1u32]], &Device::Cpu).unwrap();
    let err = timestep_embedding(&t, &SinusoidalConfig::seed(32))
        .unwrap_err()
        .to_string();
    assert!(err.contains("[B] tensor"), "{err}");
    let t = Tensor::new(&[1u32], &Device::Cpu).unwrap();
    // dim 2 with the seed's shift of 1 divides by half - 1 = 0.
    let err = timestep_embedding(&t, &SinusoidalConfig::seed(2))
        .unwrap_err()
        .to_string();
    assert!(err.contains("dim 2"), "{err}");
}

/// Weights with distinct, known values, so a swapped or missing one shows.
fn known_weights(entries: &[(&str, Vec<usize>)]) -> VarBuilder<'static> {
    let mut map = std::collections::HashMap::new();
    for (k, (name, shape)) in entries.iter().enumerate() {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7 + k * 13) % 11) as f32 / 11.0 - 0.45)
            .collect();
        map.insert(
            name.to_string(),
            Tensor::from_vec(v, shape.clone(), &Device::Cpu).unwrap(),
        );
    }
    VarBuilder::from_tensors(map, DType::F32, &Device::Cpu)
}

/// `x W^T + b` on the host.
fn linear_ref(x: &[f32], w: &[f32], b: &[f32], n_in: usize, n_out: usize) -> Vec<f32> {
    (0..n_out)
        .map(|o| b[o] + (0..n_in).map(|i| x[i] * w[o * n_in + i]).sum::<f32>())
        .collect()
}

fn get(vb: &VarBuilder<'_>, name: &str, shape: &[usize]) -> Vec<f32> {
    vb.get(shape, name)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn seed_time_mlp_is_linear_then_relu_on_the_seed_embedding() {
    let dim = 8;
    let vb = known_weights(&[
        ("time_mlp.1.weight", vec![dim, dim]),
        ("time_mlp.1.bias", vec![dim]),
    ]);
    let mlp = SeedTimeMlp::new(dim, vb.pp("time_mlp")).unwrap();
    let t = Tensor::new(&[3u32], &Device::Cpu).unwrap();
    let ours: Vec<f32> = mlp
        .forward(&t)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let emb = embed(&[3], &SinusoidalConfig::seed(dim));
    let w = get(&vb, "time_mlp.1.weight", &[dim, dim]);
    let b = get(&vb, "time_mlp.1.bias", &[dim]);
    let expected: Vec<f32> = linear_ref(&emb, &w, &b, dim, dim)
        .into_iter()
        .map(|v| v.max(0.0))
        .collect();
    assert!(expected.contains(&0.0) && expected.iter().any(|&v| v > 0.0));
    assert_close("time_mlp", &ours, &expected, 1e-6, 1e-6);
    // The module form of the embedding is the function.
    let module: Vec<f32> = SinusoidalEmbedding::new(SinusoidalConfig::seed(dim))
        .forward(&t)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(module, emb);
}

#[test]
fn diffusers_timestep_embedding_is_linear_silu_linear() {
    let (n_in, hidden, n_out) = (4, 6, 5);
    let vb = known_weights(&[
        ("linear_1.weight", vec![hidden, n_in]),
        ("linear_1.bias", vec![hidden]),
        ("linear_2.weight", vec![n_out, hidden]),
        ("linear_2.bias", vec![n_out]),
    ]);
    let module = TimestepEmbedding::new(n_in, hidden, n_out, vb.clone()).unwrap();
    let x = [0.3f32, -1.2, 2.0, 0.5];
    let ours: Vec<f32> = module
        .forward(&Tensor::new(&[x], &Device::Cpu).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let h = linear_ref(
        &x,
        &get(&vb, "linear_1.weight", &[hidden, n_in]),
        &get(&vb, "linear_1.bias", &[hidden]),
        n_in,
        hidden,
    );
    let h: Vec<f32> = h.into_iter().map(|v| v / (1.0 + (-v).exp())).collect();
    let expected = linear_ref(
        &h,
        &get(&vb, "linear_2.weight", &[n_out, hidden]),
        &get(&vb, "linear_2.bias", &[n_out]),
        hidden,
        n_out,
    );
    assert_close("TimestepEmbedding", &ours, &expected, 1e-5, 1e-5);
}
