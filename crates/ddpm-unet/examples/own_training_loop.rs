//! Our U-Net in your own training loop: candle-nn's AdamW, your data, DDPM's noising from
//! `ddpm-forward`, and the model from a preset (or any `UnetConfig`). Swap in your loss, your
//! optimizer, your data loader; nothing here needs `ddpm-trainer`.
//!
//! ```sh
//! cargo run --release -p ddpm-unet --example own_training_loop
//! ```

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use ddpm_forward::{ForwardProcess, NoiseSource};
use ddpm_schedule::{Schedule, ScheduleConfig};
use ddpm_unet::{Mode, Unet, UnetConfig, init_seeded};

fn main() -> candle_core::Result<()> {
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let config = UnetConfig::preset("seed-tiny")?;
    let unet = Unet::new(
        &config,
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
    )?;
    init_seeded(&varmap, 0)?; // candle's own initialisation cannot be seeded
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: 1e-3,
            ..Default::default()
        },
    )?;
    let forward = ForwardProcess::new(&Schedule::new(ScheduleConfig::seed_linear())?, &device)?;
    let mut rng = NoiseSource::new(0);
    // Your data here: a fixed batch of smooth 16x16 "images" in [-1, 1].
    let x0 = (Tensor::arange(0f32, 8. * 256., &device)?.reshape((8, 1, 16, 16))? / 40.)?.sin()?;
    let mut losses = Vec::new();
    for step in 1..=20 {
        let batch = forward.training_batch(&x0, &mut rng)?; // t ~ U{0..T}, eps, x_t
        let dropout_seed = step; // dropout masks are seeded too
        let eps = unet.forward_t(&batch.x_t, &batch.t, Mode::Train { seed: dropout_seed })?;
        let loss = (eps - &batch.noise)?.sqr()?.mean_all()?; // the DDPM objective
        opt.backward_step(&loss)?;
        losses.push(loss.to_scalar::<f32>()?);
    }
    println!(
        "loss {:.4} at step 1, {:.4} at step 20",
        losses[0], losses[19]
    );
    if losses[19] >= losses[0] || losses[19].is_nan() {
        candle_core::bail!("the loss did not fall: {losses:?}");
    }
    Ok(())
}
