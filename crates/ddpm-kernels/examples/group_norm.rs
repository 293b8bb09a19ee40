//! Times the fused GroupNorm + SiLU, channels last, forward and forward+backward, on the
//! shapes of the default recipe's `mnist-16` U-Net (batch 64, 8 groups), and prints the best
//! of 20 runs in milliseconds per shape.
//!
//! `cargo run --release -p ddpm-kernels --example group_norm`

use std::time::Instant;

use candle_core::{Device, Tensor, Var};

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    // (size, channels) as NHWC [64, size, size, channels].
    let shapes = [
        (16, 32),
        (16, 64),
        (16, 96),
        (8, 64),
        (8, 128),
        (4, 64),
        (4, 128),
    ];
    let reps = 20;
    println!("shape               forward ms  fwd+bwd ms");
    for (size, c) in shapes {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (64, size, size, c), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.1, c, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.1, c, &dev)?)?;
        let mut best = [f64::INFINITY; 2];
        for _ in 0..reps {
            let start = Instant::now();
            std::hint::black_box(ddpm_kernels::group_norm_silu_nhwc(&x, 8, &w, &b, 1e-5)?);
            best[0] = best[0].min(start.elapsed().as_secs_f64());
            let start = Instant::now();
            let y = ddpm_kernels::group_norm_silu_nhwc(&x, 8, &w, &b, 1e-5)?;
            let grads = y.sum_all()?.backward()?;
            std::hint::black_box(grads.get(&x));
            best[1] = best[1].min(start.elapsed().as_secs_f64());
            drop(y);
        }
        println!(
            "[64,{size:2},{size:2},{c:3}]  {:10.3}  {:10.3}",
            best[0] * 1e3,
            best[1] * 1e3
        );
    }
    Ok(())
}
