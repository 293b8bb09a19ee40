//! Training mode, gradients, checkpoint checks, config errors and save/load round trips.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ddpm_testutil::reference_path;
use ddpm_unet::{Mode, Unet, UnetConfig, init_seeded, is_buffer, save_pretrained, varmap_tensors};

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn build(config: &UnetConfig, seed: u64) -> (VarMap, Unet) {
    let varmap = VarMap::new();
    let unet = Unet::new(
        config,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    init_seeded(&varmap, seed).unwrap();
    (varmap, unet)
}

/// A small UNet2DModel with attention in a block and in the middle, several heads, dropout.
fn tiny_unet2d() -> UnetConfig {
    let text = std::fs::read_to_string(reference_path("unet/diffusers_tiny/config.json")).unwrap();
    let mut config = UnetConfig::from_json(&text).unwrap();
    if let UnetConfig::Unet2d(c) = &mut config {
        c.dropout = 0.1;
    }
    config
}

fn inputs(channels: usize, size: usize) -> (Tensor, Tensor) {
    let n = 2 * channels * size * size;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let x = Tensor::from_vec(x, (2, channels, size, size), &Device::Cpu).unwrap();
    (x, Tensor::new(&[3u32, 250], &Device::Cpu).unwrap())
}

#[test]
fn gradients_reach_every_parameter_in_training_mode() {
    let cases = [
        (
            UnetConfig::preset("seed-tiny").unwrap(),
            [
                "downs.0.bnorm1.weight",
                "ups.1.transform.weight",
                "time_mlp.1.bias",
            ],
        ),
        (
            tiny_unet2d(),
            [
                "mid_block.attentions.0.to_q.weight",
                "down_blocks.1.attentions.0.group_norm.bias",
                "up_blocks.0.attentions.1.to_out.0.weight",
            ],
        ),
    ];
    for (config, must_have) in cases {
        let (varmap, unet) = build(&config, 3);
        let (x, t) = inputs(config.in_channels(), 16);
        let out = unet.forward_t(&x, &t, Mode::Train { seed: 1 }).unwrap();
        let loss = out.sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        let data = varmap.data().lock().unwrap();
        let mut checked = Vec::new();
        for (name, var) in data.iter().filter(|(n, _)| !is_buffer(n)) {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{name}: gradient norm {norm}"
            );
            checked.push(name.as_str());
        }
        for name in must_have {
            assert!(
                checked.contains(&name),
                "{name} was not among the parameters checked"
            );
        }
    }
}

/// The model of `config` in f64 with `map32`'s weights.
fn f64_twin(config: &UnetConfig, map32: &VarMap) -> (VarMap, Unet) {
    let mut map64 = VarMap::new();
    let unet64 = Unet::new(
        config,
        VarBuilder::from_varmap(&map64, DType::F64, &Device::Cpu),
    )
    .unwrap();
    for (name, t) in varmap_tensors(map32) {
        map64
            .set_one(&name, t.to_dtype(DType::F64).unwrap())
            .unwrap();
    }
    (map64, unet64)
}

/// `a` (f32) within 1e-4 of `b` (any float dtype), relative to `b`'s largest value.
#[track_caller]
fn close_relative(what: &str, a: &Tensor, b: &Tensor) {
    let (a, b) = (flat(a), flat(&b.to_dtype(DType::F32).unwrap()));
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        diff <= 1e-4 * scale,
        "{what}: max |diff| {diff} at scale {scale}"
    );
}

/// Both U-Nets in f32 on the CPU run channels-last on `ddpm-kernels`; in f64 they run candle's
/// NCHW ops. The same weights give the same training-mode output (dropout included: both
/// layouts drop the same units), gradients for every parameter and running statistics both
/// ways, and the same evaluation output. Batch 8 at 16x16 takes both convolution paths
/// (im2row, and Winograd for 16 -> 16 channels); the UNet2DModel has attention, dropout 0.1 and
/// the padded downsampler (`downsample_padding` 0). Tolerance: 1e-4 relative to the largest
/// value (f32 against f64).
#[test]
fn channels_last_matches_candle_nchw() {
    let mut unet2d = tiny_unet2d();
    if let UnetConfig::Unet2d(c) = &mut unet2d {
        c.downsample_padding = 0;
    }
    for config in [UnetConfig::preset("seed-tiny").unwrap(), unet2d] {
        let (map32, unet32) = build(&config, 5);
        let (map64, unet64) = f64_twin(&config, &map32);
        let n = 8 * 16 * 16;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let x = Tensor::from_vec(x, (8, 1, 16, 16), &Device::Cpu).unwrap();
        let t = Tensor::new(&[3u32, 250, 999, 0, 17, 500, 42, 731], &Device::Cpu).unwrap();
        let probe = (x.affine(1.7, 0.3).unwrap().sin().unwrap() * 0.5).unwrap();
        let close = |what: &str, a: &Tensor, b: &Tensor| {
            close_relative(&format!("{config:?} {what}"), a, b)
        };
        let mode = Mode::Train { seed: 1 };
        let y32 = unet32.forward_t(&x, &t, mode).unwrap();
        let x64 = x.to_dtype(DType::F64).unwrap();
        let y64 = unet64.forward_t(&x64, &t, mode).unwrap();
        close("train output", &y32, &y64);
        let loss = |y: &Tensor| {
            let p = probe.to_dtype(y.dtype()).unwrap();
            (y * p).unwrap().sum_all().unwrap().backward().unwrap()
        };
        let (g32, g64) = (loss(&y32), loss(&y64));
        let (d32, d64) = (map32.data().lock().unwrap(), map64.data().lock().unwrap());
        let mut params = 0;
        for (name, v32) in d32.iter() {
            let v64 = &d64[name];
            if is_buffer(name) {
                // Running statistics, updated by the training step.
                close(name, v32.as_tensor(), v64.as_tensor());
                continue;
            }
            let (a, b) = (g32.get(v32.as_tensor()), g64.get(v64.as_tensor()));
            if name.ends_with("to_k.bias") {
                // Zero in exact arithmetic: the key bias adds `q . b` to every score of a
                // softmax row alike. Both sides leave only rounding.
                let worst = flat(a.unwrap()).iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(worst < 1e-6, "d {name}: {worst}");
            } else {
                close(&format!("d {name}"), a.unwrap(), b.unwrap());
            }
            params += 1;
        }
        assert!(params > 20, "{params} parameters compared");
        drop((d32, d64));
        close(
            "eval output",
            &unet32.forward_t(&x, &t, Mode::Eval).unwrap(),
            &unet64.forward_t(&x64, &t, Mode::Eval).unwrap(),
        );
    }
}

/// Both U-Nets run in f64 (the sinusoidal features are cast to the model's dtype) and agree
/// with f32 in evaluation, 1e-4 relative to the largest value.
#[test]
fn both_unets_run_in_f64() {
    for config in [UnetConfig::preset("seed-tiny").unwrap(), tiny_unet2d()] {
        let (map32, unet32) = build(&config, 6);
        let (_map64, unet64) = f64_twin(&config, &map32);
        let (x, t) = inputs(config.in_channels(), 16);
        let y32 = unet32.forward_t(&x, &t, Mode::Eval).unwrap();
        let x64 = x.to_dtype(DType::F64).unwrap();
        let y64 = unet64.forward_t(&x64, &t, Mode::Eval).unwrap();
        assert_eq!(y64.dtype(), DType::F64);
        close_relative(&format!("{config:?}"), &y32, &y64);
    }
}

#[test]
fn batchnorm_train_mode_uses_batch_statistics_and_updates_running_ones() {
    let config = UnetConfig::preset("seed-tiny").unwrap();
    let (varmap, unet) = build(&config, 4);
    let (x, t) = inputs(1, 16);
    let eval_before = flat(&unet.forward_t(&x, &t, Mode::Eval).unwrap());
    let mean_before = flat(&varmap_tensors(&varmap)["downs.0.bnorm1.running_mean"]);
    let train = flat(&unet.forward_t(&x, &t, Mode::Train { seed: 0 }).unwrap());
    let mean_after = flat(&varmap_tensors(&varmap)["downs.0.bnorm1.running_mean"]);
    assert_ne!(
        eval_before, train,
        "train mode must normalise with batch statistics"
    );
    assert!(mean_before.iter().all(|&m| m == 0.0));
    assert!(
        mean_after.iter().any(|&m| m != 0.0),
        "running mean not updated"
    );
    let eval_after = flat(&unet.forward_t(&x, &t, Mode::Eval).unwrap());
    assert_ne!(
        eval_before, eval_after,
        "eval must use the updated running statistics"
    );
}

/// A model loaded from plain tensors (as `ddpm sample` loads one) builds no autograd graph in
/// evaluation: a sampling loop feeds each output back in, so a graph would keep every step's
/// activations alive. candle-nn keeps BatchNorm running statistics as variables even then.
#[test]
fn eval_on_plain_weights_builds_no_graph() {
    for config in [UnetConfig::preset("seed-tiny").unwrap(), tiny_unet2d()] {
        let (varmap, _) = build(&config, 4);
        let plain = varmap_tensors(&varmap)
            .into_iter()
            .map(|(k, v)| (k, v.detach()))
            .collect();
        let unet = Unet::new(
            &config,
            VarBuilder::from_tensors(plain, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let (x, t) = inputs(config.in_channels(), 16);
        let out = unet.forward_t(&x, &t, Mode::Eval).unwrap();
        assert!(!out.track_op(), "{config:?}: evaluation built a graph");
        let (_, trained) = build(&config, 4);
        let out = trained.forward_t(&x, &t, Mode::Eval).unwrap();
        assert!(out.track_op(), "variables do make a graph");
    }
}

#[test]
fn dropout_is_seeded_and_off_in_eval() {
    let config = tiny_unet2d();
    let (_varmap, unet) = build(&config, 5);
    let (x, t) = inputs(1, 16);
    let run = |mode| flat(&unet.forward_t(&x, &t, mode).unwrap());
    assert_eq!(run(Mode::Train { seed: 9 }), run(Mode::Train { seed: 9 }));
    assert_ne!(run(Mode::Train { seed: 9 }), run(Mode::Train { seed: 10 }));
    assert_ne!(run(Mode::Train { seed: 9 }), run(Mode::Eval));
    assert_eq!(run(Mode::Eval), run(Mode::Eval));
}

#[test]
fn seeded_init_is_reproducible_and_pytorch_like() {
    let config = UnetConfig::preset("seed-tiny").unwrap();
    let (a, _) = build(&config, 42);
    let (b, _) = build(&config, 42);
    let (c, _) = build(&config, 43);
    let (a, b, c) = (varmap_tensors(&a), varmap_tensors(&b), varmap_tensors(&c));
    for (name, t) in &a {
        assert_eq!(flat(t), flat(&b[name]), "{name} differs for the same seed");
    }
    assert_ne!(flat(&a["conv0.weight"]), flat(&c["conv0.weight"]));
    // conv1 of the first down block: fan_in = 16 * 3 * 3, bound 1/12.
    let w = flat(&a["downs.0.conv1.weight"]);
    let bound = 1.0 / 12.0;
    assert!(w.iter().all(|v| v.abs() <= bound));
    assert!(w.iter().any(|v| v.abs() > 0.9 * bound));
    assert!(flat(&a["downs.0.bnorm1.weight"]).iter().all(|&v| v == 1.0));
    assert!(
        flat(&a["downs.0.bnorm1.running_var"])
            .iter()
            .all(|&v| v == 1.0)
    );
}

#[test]
fn save_pretrained_round_trips_exactly() {
    let dir = tempfile::tempdir().unwrap();
    for (i, config) in [UnetConfig::preset("seed-tiny").unwrap(), tiny_unet2d()]
        .into_iter()
        .enumerate()
    {
        let (varmap, unet) = build(&config, 6);
        // Train one forward pass so BatchNorm statistics are not their initial values.
        let (x, t) = inputs(config.in_channels(), 16);
        unet.forward_t(&x, &t, Mode::Train { seed: 0 }).unwrap();
        let path = dir.path().join(format!("m{i}"));
        save_pretrained(&config, &varmap_tensors(&varmap), &path).unwrap();
        let (loaded_config, loaded) = Unet::from_pretrained(&path, &Device::Cpu).unwrap();
        assert_eq!(loaded_config, config);
        let a = flat(&unet.forward_t(&x, &t, Mode::Eval).unwrap());
        let b = flat(&loaded.forward_t(&x, &t, Mode::Eval).unwrap());
        assert_eq!(a, b, "{config:?}");
        // No temporary file is left beside them.
        let mut names: Vec<String> = std::fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["config.json", "diffusion_pytorch_model.safetensors"]
        );
        // The weights take a new file's usual permissions, like the config beside them (not
        // the 0600 of a private temporary file), so others can read an exported model.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |name: &str| {
                let meta = std::fs::metadata(path.join(name)).unwrap();
                meta.permissions().mode() & 0o777
            };
            assert_eq!(
                mode("diffusion_pytorch_model.safetensors"),
                mode("config.json"),
                "weights and config modes"
            );
        }
    }
}

fn seed_tiny_tensors() -> (UnetConfig, HashMap<String, Tensor>) {
    let config = UnetConfig::preset("seed-tiny").unwrap();
    let (varmap, _) = build(&config, 7);
    (config, varmap_tensors(&varmap))
}

#[track_caller]
fn check_load_error(config: &UnetConfig, tensors: HashMap<String, Tensor>, needles: &[&str]) {
    let err = Unet::from_tensors(config, tensors, &Device::Cpu)
        .unwrap_err()
        .to_string();
    for needle in needles {
        assert!(
            err.contains(needle),
            "error {err:?} should contain {needle:?}"
        );
    }
}

#[test]
fn bad_checkpoints_name_the_tensor() {
    let (config, good) = seed_tiny_tensors();
    assert!(Unet::from_tensors(&config, good.clone(), &Device::Cpu).is_ok());

    let mut missing = good.clone();
    missing.remove("downs.1.conv2.weight");
    check_load_error(&config, missing, &["downs.1.conv2.weight", "missing"]);

    let mut misshaped = good.clone();
    misshaped.insert(
        "ups.0.conv1.bias".into(),
        Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
    );
    check_load_error(&config, misshaped, &["ups.0.conv1.bias", "[7]", "[32]"]);

    let mut wrong_dtype = good.clone();
    let w = wrong_dtype["conv0.weight"].to_dtype(DType::U8).unwrap();
    wrong_dtype.insert("conv0.weight".into(), w);
    check_load_error(&config, wrong_dtype, &["conv0.weight", "U8", "F32"]);

    let mut extra = good.clone();
    extra.insert(
        "downs.9.conv1.weight".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    );
    check_load_error(&config, extra, &["downs.9.conv1.weight", "does not use"]);

    // PyTorch's BatchNorm counters are bookkeeping, not weights: accepted.
    let mut counters = good;
    counters.insert(
        "downs.0.bnorm1.num_batches_tracked".into(),
        Tensor::new(&[3i64], &Device::Cpu).unwrap(),
    );
    assert!(Unet::from_tensors(&config, counters, &Device::Cpu).is_ok());
}

#[test]
fn a_corrupt_weights_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_unet2d();
    std::fs::write(dir.path().join("config.json"), config.to_json()).unwrap();
    std::fs::write(
        dir.path().join("diffusion_pytorch_model.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let err = Unet::from_pretrained(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    let err = Unet::from_pretrained(&dir.path().join("nowhere"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
}

#[track_caller]
fn check_config_error(
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
    needle: &str,
) {
    let text = std::fs::read_to_string(reference_path("unet/diffusers_tiny/config.json")).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(value.as_object_mut().unwrap());
    let result = UnetConfig::from_json(&value.to_string()).and_then(|c| match &c {
        UnetConfig::Unet2d(u) => u.validate().map(|_| c),
        UnetConfig::Simple(_) => Ok(c),
    });
    let err = result.unwrap_err().to_string();
    assert!(
        err.contains(needle),
        "error {err:?} should contain {needle:?}"
    );
}

#[test]
fn unsupported_config_is_an_error_naming_it() {
    use serde_json::json;
    check_config_error(
        |m| drop(m.insert("cross_attention_dim".into(), json!(64))),
        "cross_attention_dim",
    );
    check_config_error(
        |m| {
            drop(m.insert(
                "down_block_types".into(),
                json!(["DownBlock2D", "CrossAttnDownBlock2D"]),
            ))
        },
        "CrossAttnDownBlock2D",
    );
    check_config_error(
        |m| drop(m.insert("time_embedding_type".into(), json!("fourier"))),
        "time_embedding_type",
    );
    check_config_error(
        |m| drop(m.insert("resnet_time_scale_shift".into(), json!("scale_shift"))),
        "scale_shift",
    );
    check_config_error(
        |m| drop(m.insert("class_embed_type".into(), json!("timestep"))),
        "class_embed_type",
    );
    check_config_error(
        |m| drop(m.insert("downsample_type".into(), json!("resnet"))),
        "downsample_type",
    );
    check_config_error(|m| drop(m.insert("act_fn".into(), json!("gelu"))), "act_fn");
    check_config_error(
        |m| drop(m.insert("_class_name".into(), json!("UNet2DConditionModel"))),
        "UNet2DConditionModel",
    );
    check_config_error(
        |m| drop(m.insert("block_out_channels".into(), json!([16, 32, 64]))),
        "same length",
    );
    // Metadata keys are fine.
    let text = std::fs::read_to_string(reference_path("unet/diffusers_tiny/config.json")).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
    value["_name_or_path"] = serde_json::json!("somewhere");
    assert!(UnetConfig::from_json(&value.to_string()).is_ok());
    assert!(
        UnetConfig::preset("huge")
            .unwrap_err()
            .to_string()
            .contains("\"huge\"")
    );
}

#[test]
fn wrong_input_shapes_are_errors() {
    let config = UnetConfig::preset("seed-tiny").unwrap();
    let (_, unet) = build(&config, 8);
    let x = Tensor::zeros((1, 1, 10, 10), DType::F32, &Device::Cpu).unwrap();
    let t = Tensor::new(&[1u32], &Device::Cpu).unwrap();
    let err = unet.forward_t(&x, &t, Mode::Eval).unwrap_err().to_string();
    assert!(
        err.contains("divisible by 4") && err.contains("[1, 1, 10, 10]"),
        "{err}"
    );

    let (_, unet) = build(&tiny_unet2d(), 8);
    let x = Tensor::zeros((2, 1, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let t = Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap();
    let err = unet.forward_t(&x, &t, Mode::Eval).unwrap_err().to_string();
    assert!(err.contains("timesteps"), "{err}");
    // One timestep broadcasts over the batch, as in diffusers.
    let one = Tensor::new(&[5u32], &Device::Cpu).unwrap();
    let both = Tensor::new(&[5u32, 5], &Device::Cpu).unwrap();
    let a = flat(&unet.forward_t(&x, &one, Mode::Eval).unwrap());
    let b = flat(&unet.forward_t(&x, &both, Mode::Eval).unwrap());
    assert_eq!(a, b);
}

/// A config's parameter count is known before anything is built, and matches the built model;
/// an absurd config (10^8 channels) is refused at once, without allocating its weights.
#[test]
fn parameter_counts_come_before_allocation() {
    for name in ["seed-tiny", "mnist-16-classes", "ddpm-cifar10"] {
        let config = UnetConfig::preset(name).unwrap();
        let varmap = candle_nn::VarMap::new();
        Unet::new(
            &config,
            candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let built: usize = varmap_tensors(&varmap)
            .values()
            .map(|t| t.elem_count())
            .sum();
        assert_eq!(config.parameter_count().unwrap(), built as u128, "{name}");
    }
    let preset: serde_json::Value =
        serde_json::from_str(&UnetConfig::preset("mnist-16").unwrap().to_json()).unwrap();
    let start = std::time::Instant::now();
    for (channels, needle) in [
        (
            100_000_000,
            "block_out_channels = 100000000 is not supported",
        ),
        (16_384, "more than the 2147483648 this library builds"),
    ] {
        let mut json = preset.clone();
        json["block_out_channels"] = serde_json::json!([channels, channels, channels]);
        let absurd = UnetConfig::from_json(&json.to_string()).unwrap();
        let varmap = candle_nn::VarMap::new();
        let err = Unet::new(
            &absurd,
            candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(needle), "{err}");
        assert!(varmap_tensors(&varmap).is_empty());
    }
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
}

/// Half-precision weights (fp16 variants, bf16 checkpoints) load into the f32 model, widened
/// exactly: the model is the one built from the same values stored in f32.
#[test]
fn half_precision_weights_are_widened_exactly() {
    let (config, good) = seed_tiny_tensors();
    let (x, t) = inputs(config.in_channels(), 16);
    for half in [DType::F16, DType::BF16] {
        let stored: HashMap<String, Tensor> = good
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(half).unwrap()))
            .collect();
        let widened: HashMap<String, Tensor> = stored
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(DType::F32).unwrap()))
            .collect();
        let a = Unet::from_tensors(&config, stored, &Device::Cpu).unwrap();
        let b = Unet::from_tensors(&config, widened, &Device::Cpu).unwrap();
        let (ya, yb) = (
            flat(&a.forward_t(&x, &t, Mode::Eval).unwrap()),
            flat(&b.forward_t(&x, &t, Mode::Eval).unwrap()),
        );
        assert_eq!(
            ya.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            yb.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{half:?}"
        );
    }
}
