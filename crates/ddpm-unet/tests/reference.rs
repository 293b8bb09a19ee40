//! Both U-Nets against PyTorch and diffusers 0.42.1 outputs.
//!
//! Fixtures under `assets/reference/unet/`:
//! - `seed_small`, `diffusers_tiny`: from the shared reference set (`ref_fixtures.py`, see
//!   `assets/reference/README.md`): the seed's SimpleUnet in eval mode and a 2-level UNet2DModel.
//! - `legacy_tiny`, `multihead_tiny`, `class_tiny`, `ddpm_cifar10`: written by
//!   `scripts/reference/unet_fixtures.py` (diffusers 0.42.1, PyTorch 2.15, float32); that script's
//!   docstring lists what each exercises.
//!
//! Tolerance: 1e-4 absolute (the reference README's "expect agreement to ~1e-4").

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ddpm_testutil::{assert_close, max_abs_diff, reference_path};
use ddpm_unet::{
    Classes, Denoiser, Guided, Mode, SimpleUnetConfig, Unet, Unet2dConfig, UnetConfig,
    count_parameters,
};

const ATOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    reference_path(&format!("unet/{name}"))
}

fn io(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("io.safetensors"), &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[track_caller]
fn check_output(name: &str, unet: &Unet) {
    let io = io(name);
    let out = unet
        .forward_t(&io["sample"], &io["timesteps"], Mode::Eval)
        .unwrap();
    assert_eq!(out.dims(), io["output"].dims(), "{name}");
    let (ours, theirs) = (flat(&out), flat(&io["output"]));
    assert_close(name, &ours, &theirs, ATOL, 0.0);
    eprintln!("{name}: max |diff| {:e}", max_abs_diff(&ours, &theirs));
}

#[test]
fn seed_small_matches_pytorch() {
    // The fixture's config.json describes the PyTorch model; ours is the same architecture.
    let config = UnetConfig::Simple(SimpleUnetConfig::with_channels(1, &[16, 32, 64]));
    let tensors = candle_core::safetensors::load(
        fixture("seed_small").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let unet = Unet::from_tensors(&config, tensors, &Device::Cpu).unwrap();
    check_output("seed_small", &unet);
}

#[test]
fn diffusers_folders_match_diffusers() {
    for name in ["diffusers_tiny", "legacy_tiny", "multihead_tiny"] {
        let (config, unet) = Unet::from_pretrained(&fixture(name), &Device::Cpu).unwrap();
        assert!(matches!(config, UnetConfig::Unet2d(_)), "{name}");
        check_output(name, &unet);
    }
}

#[test]
fn class_conditional_unet_matches_diffusers() {
    let (config, unet) = Unet::from_pretrained(&fixture("class_tiny"), &Device::Cpu).unwrap();
    assert_eq!(config.num_class_embeds(), Some(5));
    assert_eq!(unet.num_class_embeds(), Some(5));
    let io = io("class_tiny");
    let labels = &io["class_labels"]; // i64, as PyTorch writes them
    let out = unet
        .forward_with_labels(&io["sample"], &io["timesteps"], Some(labels), Mode::Eval)
        .unwrap();
    assert_close("class_tiny", &flat(&out), &flat(&io["output"]), ATOL, 0.0);
    eprintln!(
        "class_tiny: max |diff| {:e}",
        max_abs_diff(&flat(&out), &flat(&io["output"]))
    );

    // Classifier-free guidance, class 4 as "no class", scale 2.5. The difference is scaled
    // by 2.5, hence the wider tolerance.
    let host: Vec<u32> = labels.to_dtype(DType::U32).unwrap().to_vec1().unwrap();
    let guided = Guided::new(
        &unet,
        Classes::new(5, true).unwrap(),
        &host,
        2.5,
        &Device::Cpu,
    )
    .unwrap();
    let out = guided.predict(&io["sample"], &io["timesteps"]).unwrap();
    assert_close(
        "class_tiny guided",
        &flat(&out),
        &flat(&io["guided_output"]),
        4.0 * ATOL,
        0.0,
    );

    // Scale 1 is the conditional prediction alone.
    let plain = Guided::new(
        &unet,
        Classes::new(5, false).unwrap(),
        &host,
        1.0,
        &Device::Cpu,
    )
    .unwrap();
    let out = plain.predict(&io["sample"], &io["timesteps"]).unwrap();
    assert_close(
        "class_tiny scale 1",
        &flat(&out),
        &flat(&io["output"]),
        ATOL,
        0.0,
    );
}

#[test]
fn class_labels_are_checked() {
    let (_, unet) = Unet::from_pretrained(&fixture("class_tiny"), &Device::Cpu).unwrap();
    let io = io("class_tiny");
    let (x, t) = (&io["sample"], &io["timesteps"]);
    let err = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();
    // A conditional model needs labels; an unconditional one takes none.
    assert!(
        err(unet.forward_t(x, t, Mode::Eval)).contains("class-conditional (num_class_embeds 5)")
    );
    let (_, plain) = Unet::from_pretrained(&fixture("diffusers_tiny"), &Device::Cpu).unwrap();
    let labels = Tensor::new(&[0u32], &Device::Cpu).unwrap();
    let io_plain = self::io("diffusers_tiny");
    assert!(
        err(plain.forward_with_labels(
            &io_plain["sample"],
            &io_plain["timesteps"],
            Some(&labels),
            Mode::Eval
        ))
        .contains("unconditional")
    );
    // Float labels, a wrong count, an out-of-range class.
    let floats = Tensor::new(&[0f32, 1., 2., 3.], &Device::Cpu).unwrap();
    assert!(err(unet.forward_with_labels(x, t, Some(&floats), Mode::Eval)).contains("integers"));
    let three = Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap();
    assert!(err(unet.forward_with_labels(x, t, Some(&three), Mode::Eval)).contains("[4]"));
    let e = Guided::new(
        &unet,
        Classes::new(5, true).unwrap(),
        &[0, 4],
        2.0,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(e.to_string().contains("class 4 out of range 0..4"), "{e}");
    assert!(e.to_string().contains("\"no class\""), "{e}");
    let e = Guided::new(
        &unet,
        Classes::new(5, false).unwrap(),
        &[5],
        1.0,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(e.to_string().contains("class 5 out of range 0..5"), "{e}");
    assert!(
        Guided::new(
            &plain,
            Classes::new(5, false).unwrap(),
            &[0],
            1.0,
            &Device::Cpu
        )
        .is_err()
    );
    let e = Guided::new(
        &unet,
        Classes::new(5, false).unwrap(),
        &[0],
        2.0,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(e.to_string().contains("needs a \"no class\" label"), "{e}");
    let e = Guided::new(
        &unet,
        Classes::new(6, true).unwrap(),
        &[0],
        2.0,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("the model has 5 class embeddings"),
        "{e}"
    );
    let e = Guided::new(
        &unet,
        Classes::new(5, true).unwrap(),
        &[0],
        f64::NAN,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("guidance scale must be finite"),
        "{e}"
    );
    // A wrongly sized timestep tensor is named before the batch is doubled.
    let guided = Guided::new(
        &unet,
        Classes::new(5, true).unwrap(),
        &[0, 1, 2, 3],
        2.0,
        &Device::Cpu,
    )
    .unwrap();
    let two = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
    let e = guided.predict(x, &two).unwrap_err().to_string();
    assert!(e.contains("timesteps must be [4] or a single value"), "{e}");
    // One label for the whole batch broadcasts, as timesteps do.
    let one = Tensor::new(&[3u32], &Device::Cpu).unwrap();
    let all = Tensor::new(&[3u32, 3, 3, 3], &Device::Cpu).unwrap();
    let a = unet
        .forward_with_labels(x, t, Some(&one), Mode::Eval)
        .unwrap();
    let b = unet
        .forward_with_labels(x, t, Some(&all), Mode::Eval)
        .unwrap();
    assert_eq!(flat(&a), flat(&b));
}

/// The weights `unet_fixtures.py::formula_weights` gives every parameter.
fn formula_weights(varmap: &VarMap) {
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let phase = name.bytes().map(|b| b as f64).sum::<f64>() / 1000.0;
        let dims = var.dims().to_vec();
        let fan_in: usize = dims.iter().skip(1).product();
        let v: Vec<f32> = (0..var.elem_count())
            .map(|i| {
                let s = (0.37 * i as f64 + phase).sin();
                (if dims.len() >= 2 {
                    s / (fan_in as f64).sqrt()
                } else if name.ends_with("weight") {
                    1.0 + 0.1 * s
                } else {
                    0.1 * s
                }) as f32
            })
            .collect();
        var.set(&Tensor::from_vec(v, dims, &Device::Cpu).unwrap())
            .unwrap();
    }
}

#[test]
fn ddpm_cifar10_architecture_matches_diffusers() {
    let io = io("ddpm_cifar10");
    let config = UnetConfig::preset("ddpm-cifar10").unwrap();
    // The preset is exactly the config diffusers wrote for this architecture.
    let text = std::fs::read_to_string(fixture("ddpm_cifar10").join("config.json")).unwrap();
    assert_eq!(UnetConfig::from_json(&text).unwrap(), config);

    let varmap = VarMap::new();
    let unet = Unet::new(
        &config,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let expected_params = io["num_parameters"].to_vec1::<i64>().unwrap()[0] as usize;
    let tensors = ddpm_unet::varmap_tensors(&varmap);
    assert_eq!(count_parameters(&tensors), expected_params);
    assert_eq!(expected_params, 35_746_307);
    formula_weights(&varmap);
    check_output("ddpm_cifar10", &unet);
}

#[test]
fn seed_default_has_the_seeds_parameter_count() {
    let varmap = VarMap::new();
    Unet::new(
        &UnetConfig::preset("seed").unwrap(),
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let tensors = ddpm_unet::varmap_tensors(&varmap);
    assert_eq!(count_parameters(&tensors), 62_438_883);
    // Running statistics are state, not parameters, but they are there.
    assert!(tensors.contains_key("downs.0.bnorm1.running_mean"));
    assert!(tensors.contains_key("ups.3.transform.weight"));
    assert!(tensors.contains_key("time_mlp.1.weight"));
}

#[test]
fn mnist_presets_build_and_run() {
    // mnist-16's count is diffusers' `UNet2DModel(**config)` parameter count for the same
    // config (diffusers 0.42.1).
    for (name, size, params) in [
        ("mnist", 32, 1_000_000..3_000_000),
        ("mnist-16", 16, 1_045_729..1_045_730),
        // The same with an 11 x 128 class embedding (diffusers' count too).
        ("mnist-16-classes", 16, 1_047_137..1_047_138),
    ] {
        let config = UnetConfig::preset(name).unwrap();
        let varmap = VarMap::new();
        let unet = Unet::new(
            &config,
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        )
        .unwrap();
        ddpm_unet::init_seeded(&varmap, 1).unwrap();
        let x = Tensor::ones((2, 1, size, size), DType::F32, &Device::Cpu).unwrap();
        let t = Tensor::new(&[0u32, 299], &Device::Cpu).unwrap();
        let labels = config
            .num_class_embeds()
            .map(|_| Tensor::new(&[1u32, 10], &Device::Cpu).unwrap());
        let out = unet
            .forward_with_labels(&x, &t, labels.as_ref(), Mode::Eval)
            .unwrap();
        assert_eq!(out.dims(), &[2, 1, size, size]);
        assert!(flat(&out).iter().all(|v| v.is_finite()));
        let n = count_parameters(&ddpm_unet::varmap_tensors(&varmap));
        assert!(params.contains(&n), "{name} preset has {n} parameters");
    }
    let _ = Unet2dConfig::mnist();
}

fn bits(tensors: &HashMap<String, Tensor>) -> Vec<(String, Vec<u32>)> {
    let mut out: Vec<(String, Vec<u32>)> = tensors
        .iter()
        .map(|(k, t)| {
            let v: Vec<f32> = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (k.clone(), v.iter().map(|x| x.to_bits()).collect())
        })
        .collect();
    out.sort();
    out
}

/// Files PyTorch wrote (`scripts/reference/pytorch_fixtures.py`): `torch.save` of the seed
/// fixture's state_dict and of diffusers_tiny's weights read through candle's pickle reader
/// give the committed safetensors values exactly, and the models their outputs.
#[test]
fn pytorch_pickles_read_as_the_same_weights() {
    let seed_pt =
        ddpm_unet::read_pytorch(&fixture("seed_small").join("model.pt"), &Device::Cpu).unwrap();
    let seed_st = ddpm_unet::read_safetensors(
        &fixture("seed_small").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(bits(&seed_pt), bits(&seed_st));
    let config = UnetConfig::Simple(SimpleUnetConfig::with_channels(1, &[16, 32, 64]));
    check_output(
        "seed_small",
        &Unet::from_tensors(&config, seed_pt, &Device::Cpu).unwrap(),
    );

    let bin = ddpm_unet::read_pytorch(
        &fixture("diffusers_tiny_bin").join("diffusion_pytorch_model.bin"),
        &Device::Cpu,
    )
    .unwrap();
    let st = ddpm_unet::read_safetensors(
        &fixture("diffusers_tiny").join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(bits(&bin), bits(&st));

    // Not a PyTorch archive: a one-line error naming the file.
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pt");
    std::fs::write(&junk, vec![3u8; 200]).unwrap();
    let err = ddpm_unet::read_pytorch(&junk, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("junk.pt") && err.contains("not a PyTorch"),
        "{err}"
    );
}

/// diffusers' fp16 and bf16 variant files (written by safetensors from PyTorch's casts) hold
/// the f32 weights rounded as candle rounds them, and the model built from them stays within
/// half precision of diffusers' f32 output.
#[test]
fn half_precision_variants_load() {
    let dir = fixture("diffusers_tiny");
    let config =
        UnetConfig::from_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let f32s = ddpm_unet::read_safetensors(
        &dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for (variant, dtype, atol) in [("fp16", DType::F16, 2e-2f32), ("bf16", DType::BF16, 1e-1)] {
        let half = ddpm_unet::read_safetensors(
            &dir.join(format!("diffusion_pytorch_model.{variant}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        assert!(half.values().all(|t| t.dtype() == dtype), "{variant}");
        let ours: HashMap<String, Tensor> = f32s
            .iter()
            .map(|(k, t)| (k.clone(), t.to_dtype(dtype).unwrap()))
            .collect();
        assert_eq!(
            bits(&half),
            bits(&ours),
            "{variant}: rounding differs from PyTorch's"
        );
        let unet = Unet::from_tensors(&config, half, &Device::Cpu).unwrap();
        let io = io("diffusers_tiny");
        let out = unet
            .forward_t(&io["sample"], &io["timesteps"], Mode::Eval)
            .unwrap();
        assert_close(variant, &flat(&out), &flat(&io["output"]), atol, 0.0);
    }
}
