//! Writes a seeded UNet2DModel preset in diffusers' layout, with an input and our output beside
//! it, so `scripts/reference/check_diffusers_load.py` can load it with diffusers and compare.
//! A class-conditional preset (`mnist-16-classes`) also writes the `class_labels` it used.
//!
//! ```sh
//! cargo run --release -p ddpm-unet --example save_pretrained -- /tmp/unet ddpm-cifar10
//! venv/bin/python scripts/reference/check_diffusers_load.py /tmp/unet
//! ```

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ddpm_unet::{Mode, Unet, UnetConfig, init_seeded, save_pretrained, varmap_tensors};

fn main() -> candle_core::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: save_pretrained DIR [PRESET]"));
    let preset = args.next().unwrap_or_else(|| "mnist".into());
    let config = UnetConfig::preset(&preset)?;
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let unet = Unet::new(
        &config,
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
    )?;
    init_seeded(&varmap, 2024)?;
    let c = config.in_channels();
    let n = 2 * c * 32 * 32;
    let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.731).sin()).collect();
    let x = Tensor::from_vec(x, (2, c, 32, 32), &device)?;
    let t = Tensor::new(&[7i64, 640], &device)?;
    let labels = match config.num_class_embeds() {
        Some(n) => Some(Tensor::new(&[3i64, n as i64 - 1], &device)?),
        None => None,
    };
    let out = unet.forward_with_labels(&x, &t, labels.as_ref(), Mode::Eval)?;
    save_pretrained(&config, &varmap_tensors(&varmap), &dir)?;
    let mut io = HashMap::from([("sample", x), ("timesteps", t), ("output", out)]);
    if let Some(labels) = labels {
        io.insert("class_labels", labels);
    }
    candle_core::safetensors::save(&io, dir.join("io.safetensors"))?;
    println!("wrote {}", dir.display());
    Ok(())
}
