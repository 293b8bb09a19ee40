//! Trains the digit classifier behind `ddpm_trainer::quality` and writes its weights to
//! `crates/ddpm-trainer/data/classifier/digits-32.safetensors`: 1500 Adam steps of 64 on digits 0..9000 of the
//! embedded set (padded to 32x32), seed 0; prints the accuracy on digits 9000..10000.
//!
//! ```sh
//! cargo run --release -p ddpm-trainer --example train_classifier
//! ```

use std::path::PathBuf;

use candle_core::Device;
use ddpm_data::ImageSet;
use ddpm_trainer::quality::{accuracy, train_classifier};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::Cpu;
    let digits = ImageSet::embedded_mnist()?.pad_to(32)?;
    let train = digits.clone().take(9000);
    let held_out = digits.skip(9000);
    let (varmap, model) = train_classifier(train, 1500, 0, &device)?;
    println!(
        "held-out accuracy: {:.4}",
        accuracy(&model, &held_out, &device)?
    );
    let out =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/classifier/digits-32.safetensors");
    ddpm_unet::write_safetensors(&ddpm_unet::varmap_tensors(&varmap), None, &out)?;
    println!("wrote {}", out.display());
    Ok(())
}
