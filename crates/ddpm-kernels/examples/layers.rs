//! Times each convolution of the seed `SimpleUnet` (channels 32..256, 1x32x32, batch 64),
//! forward and forward+backward, channels-last as the model runs them, and prints GFLOP/s
//! per layer shape.
//!
//! `cargo run --release -p ddpm-kernels --example layers [seed]`: with `seed`, the layers of
//! the seed's 62M-parameter model (channels 64..1024, 3x64x64, batch 8) instead. With
//! `LAYER=n` set, only the table's row `n` (from 0), for profiling one layer.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let seed = std::env::args().nth(1).as_deref() == Some("seed");
    let b = if seed { 8 } else { 64 };
    // (c_in, c_out, size, k, stride, transpose)
    let seed_shapes = [
        (3, 64, 64, 3, 1, false),
        (64, 128, 64, 3, 1, false),
        (128, 128, 64, 3, 1, false),
        (128, 128, 64, 4, 2, false),
        (128, 256, 32, 3, 1, false),
        (256, 256, 32, 3, 1, false),
        (256, 256, 32, 4, 2, false),
        (256, 512, 16, 3, 1, false),
        (512, 512, 16, 3, 1, false),
        (512, 512, 16, 4, 2, false),
        (512, 1024, 8, 3, 1, false),
        (1024, 1024, 8, 3, 1, false),
        (1024, 1024, 8, 4, 2, false),
        (2048, 512, 4, 3, 1, false),
        (512, 512, 4, 3, 1, false),
        (512, 512, 4, 4, 2, true),
        (1024, 256, 8, 3, 1, false),
        (256, 256, 8, 3, 1, false),
        (256, 256, 8, 4, 2, true),
        (512, 128, 16, 3, 1, false),
        (128, 128, 16, 3, 1, false),
        (128, 128, 16, 4, 2, true),
        (256, 64, 32, 3, 1, false),
        (64, 64, 32, 3, 1, false),
        (64, 64, 32, 4, 2, true),
        (64, 3, 64, 1, 1, false),
    ];
    let small_shapes = [
        (32, 64, 32, 3, 1, false),
        (64, 64, 32, 3, 1, false),
        (64, 64, 32, 4, 2, false),
        (64, 128, 16, 3, 1, false),
        (128, 128, 16, 3, 1, false),
        (128, 128, 16, 4, 2, false),
        (128, 256, 8, 3, 1, false),
        (256, 256, 8, 3, 1, false),
        (256, 256, 8, 4, 2, false),
        (512, 128, 4, 3, 1, false),
        (128, 128, 4, 4, 2, true),
        (256, 64, 8, 3, 1, false),
        (64, 64, 8, 4, 2, true),
        (128, 32, 16, 3, 1, false),
        (32, 32, 16, 4, 2, true),
    ];
    let shapes = if seed {
        &seed_shapes[..]
    } else {
        &small_shapes[..]
    };
    println!("| c_in | c_out | size | k | s | T | fwd ms | fwd GFLOP/s | fwd+bwd ms | GFLOP/s |");
    let only: Option<usize> = std::env::var("LAYER").ok().and_then(|v| v.parse().ok());
    for (li, &(ci, co, size, k, s, t)) in shapes.iter().enumerate() {
        if only.is_some_and(|o| o != li) {
            continue;
        }
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (b, size, size, ci), &dev)?)?;
        let (w, out) = if t {
            (Tensor::randn(0f32, 1., (ci, co, k, k), &dev)?, size * 2)
        } else {
            (
                Tensor::randn(0f32, 1., (co, ci, k, k), &dev)?,
                (size + 2 - k) / s + 1,
            )
        };
        let w = Var::from_tensor(&w)?;
        let macs = if t {
            b * size * size * ci * co * k * k
        } else {
            b * out * out * ci * co * k * k
        } as f64;
        let run = |bwd: bool| -> candle_core::Result<f64> {
            let mut ts = Vec::new();
            for _ in 0..5 {
                let start = Instant::now();
                let y = if t {
                    ddpm_kernels::conv_transpose2d_nhwc(&x, &w, None, 1, s)?
                } else {
                    ddpm_kernels::conv2d_nhwc(&x, &w, None, (k - 1) / 2, s)?
                };
                if bwd {
                    y.sum_all()?.backward()?;
                } else {
                    y.flatten_all()?.get(0)?.to_scalar::<f32>()?;
                }
                ts.push(start.elapsed().as_secs_f64());
            }
            ts.sort_by(f64::total_cmp);
            Ok(ts[2])
        };
        let f = run(false)?;
        let fb = run(true)?;
        println!(
            "| {ci} | {co} | {size} | {k} | {s} | {t} | {:.1} | {:.0} | {:.1} | {:.0} |",
            f * 1e3,
            2. * macs / f / 1e9,
            fb * 1e3,
            6. * macs / fb / 1e9
        );
    }
    Ok(())
}
