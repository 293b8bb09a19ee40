//! Each op against candle's own, forward and backward, on random shapes: odd sizes, strides 1
//! and 2, padding 0..2, batch 1, blocks of several images, and both of conv2d's paths
//! (im2row, Winograd). Tolerance: 1e-4 relative to the largest value (sums of up to
//! a few hundred products in another order).

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use ddpm_forward::NoiseSource;

mod common;
use common::close;

/// Compares the gradients of `vars` (named) in two gradient stores.
fn close_grads(what: &str, ours: &GradStore, theirs: &GradStore, vars: &[(&str, &Var)]) {
    for (name, var) in vars {
        close(
            &format!("{what} {name}"),
            ours.get(var.as_tensor()).unwrap(),
            theirs.get(var.as_tensor()).unwrap(),
        );
    }
}

/// `sum(a * b)`.
fn dot(a: &Tensor, b: &Tensor) -> f32 {
    (a * b)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// (batch, c_in, c_out, h, w, k, stride, padding)
type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

const CASES: [Case; 18] = [
    (1, 1, 1, 5, 5, 3, 1, 1),
    (2, 3, 4, 7, 9, 3, 1, 1),
    (1, 4, 2, 8, 8, 4, 2, 1),
    (3, 2, 5, 9, 7, 3, 2, 0),
    (2, 5, 3, 6, 6, 1, 1, 0),
    (1, 3, 3, 11, 6, 5, 2, 2),
    (2, 6, 4, 16, 16, 3, 1, 1),
    (1, 2, 2, 3, 3, 3, 1, 0),
    // Larger maps, odd sizes.
    (3, 3, 5, 17, 16, 3, 1, 1),
    (2, 4, 3, 34, 33, 4, 2, 1),
    // 3x3 stride 1 padding 1, 16+ channels: conv2d's Winograd path (forward and both
    // gradients), F(4x4, 3x3) for the first and third (256+ 4x4 tiles), F(2x2, 3x3) for the
    // second and, as one block of 144 tiles, the fourth. Odd sizes leave part-filled tiles at
    // the edges; blocks of whole rows of tiles (the last one shorter) and of whole images (the
    // last one shorter).
    (1, 64, 128, 63, 65, 3, 1, 1),
    (1, 16, 16, 45, 70, 3, 1, 1),
    (5, 128, 64, 31, 30, 3, 1, 1),
    (2, 32, 48, 17, 15, 3, 1, 1),
    // A batch of 20 small maps: the im2row passes run blocks of 3 images, the last of 2, and
    // the kernel gradients sum them in lanes.
    (20, 3, 4, 8, 8, 4, 2, 1),
    // Blocks whose rows would be small next to the kernel: whole-batch passes (conv2d; then
    // conv_transpose2d too).
    (2, 3, 40, 6, 6, 3, 2, 1),
    (2, 40, 3, 3, 3, 4, 2, 1),
    // 2 x 128 x 128 = 32768 output positions over 3 channels: large blocks, thin kernels.
    (2, 2, 3, 128, 128, 3, 1, 1),
];

/// A convolution of `x` (NCHW, or NHWC for the `_nhwc` forms) with a kernel and a bias.
type ConvFn = fn(&Tensor, &Tensor, Option<&Tensor>, usize, usize) -> candle_core::Result<Tensor>;

/// The channels-last form `conv_nhwc` of a convolution against its NCHW form, whose output
/// `ours` and gradients `grads` (of `sum(ours * r)`) are already checked against candle: the
/// same output and the same gradients, dx transposed back.
#[allow(clippy::too_many_arguments)]
fn check_nhwc(
    what: &str,
    conv_nhwc: ConvFn,
    (x, wt, bias): (&Var, &Var, &Var),
    (p, s): (usize, usize),
    ours: &Tensor,
    r: &Tensor,
    grads: &GradStore,
) {
    let xh = Var::from_tensor(&x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap()).unwrap();
    let yh = conv_nhwc(xh.as_tensor(), wt.as_tensor(), Some(bias.as_tensor()), p, s).unwrap();
    let y = yh.permute((0, 3, 1, 2)).unwrap();
    close(&format!("{what} NHWC forward"), &y, ours);
    let gh = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = gh
        .get(xh.as_tensor())
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap();
    close(
        &format!("{what} NHWC dx"),
        &dx,
        grads.get(x.as_tensor()).unwrap(),
    );
    close_grads(
        &format!("{what} NHWC"),
        &gh,
        grads,
        &[("dw", wt), ("db", bias)],
    );
}

fn randn(rng: &mut NoiseSource, shape: &[usize]) -> Tensor {
    rng.randn(shape.to_vec(), &Device::Cpu).unwrap()
}

#[test]
fn conv2d_matches_candle_forward_and_backward() {
    let mut rng = NoiseSource::new(1);
    for (b, ci, co, h, w, k, s, p) in CASES {
        let what = format!("conv2d b{b} {ci}->{co} {h}x{w} k{k} s{s} p{p}");
        let x = Var::from_tensor(&randn(&mut rng, &[b, ci, h, w])).unwrap();
        let wt = Var::from_tensor(&randn(&mut rng, &[co, ci, k, k])).unwrap();
        let bias = Var::from_tensor(&randn(&mut rng, &[co])).unwrap();
        let ours =
            ddpm_kernels::conv2d(x.as_tensor(), wt.as_tensor(), Some(bias.as_tensor()), p, s)
                .unwrap();
        let theirs = x
            .as_tensor()
            .conv2d(wt.as_tensor(), p, s, 1, 1)
            .unwrap()
            .broadcast_add(&bias.as_tensor().reshape((1, co, 1, 1)).unwrap())
            .unwrap();
        close(&format!("{what} forward"), &ours, &theirs);
        let r = randn(&mut rng, ours.dims());
        let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = g1.get(x.as_tensor()).unwrap();
        let operands = (&x, &wt, &bias);
        check_nhwc(
            &what,
            ddpm_kernels::conv2d_nhwc,
            operands,
            (p, s),
            &ours,
            &r,
            &g1,
        );
        match (&theirs * &r).unwrap().sum_all().unwrap().backward() {
            Ok(g2) => close_grads(&what, &g1, &g2, &[("dx", &x), ("dw", &wt), ("db", &bias)]),
            // candle's own backward fails when (size + 2 padding - kernel) is not a multiple
            // of the stride ("shape mismatch in add"): check ours by the adjoint identity
            // <conv(x'), r> = <x', dx> on fresh random inputs (conv is linear in x).
            Err(e) => {
                assert!(e.to_string().contains("shape mismatch"), "{what}: {e}");
                for _ in 0..5 {
                    let probe = randn(&mut rng, x.dims());
                    let lhs = dot(
                        &ddpm_kernels::conv2d(&probe, wt.as_tensor(), None, p, s).unwrap(),
                        &r,
                    );
                    let rhs = dot(&probe, dx);
                    assert!(
                        (lhs - rhs).abs() <= 1e-4 * lhs.abs().max(1.0),
                        "{what}: <Ax, r> {lhs} vs <x, A^T r> {rhs}"
                    );
                }
            }
        }
    }
}

#[test]
fn conv_transpose2d_matches_candle_forward_and_backward() {
    let mut rng = NoiseSource::new(2);
    for (b, ci, co, h, w, k, s, p) in CASES {
        if (h - 1) * s + k <= 2 * p {
            continue;
        }
        let what = format!("conv_transpose2d b{b} {ci}->{co} {h}x{w} k{k} s{s} p{p}");
        let x = Var::from_tensor(&randn(&mut rng, &[b, ci, h, w])).unwrap();
        let wt = Var::from_tensor(&randn(&mut rng, &[ci, co, k, k])).unwrap();
        let bias = Var::from_tensor(&randn(&mut rng, &[co])).unwrap();
        let ours = ddpm_kernels::conv_transpose2d(
            x.as_tensor(),
            wt.as_tensor(),
            Some(bias.as_tensor()),
            p,
            s,
        )
        .unwrap();
        let theirs = x
            .as_tensor()
            .conv_transpose2d(wt.as_tensor(), p, 0, s, 1)
            .unwrap()
            .broadcast_add(&bias.as_tensor().reshape((1, co, 1, 1)).unwrap())
            .unwrap();
        close(&format!("{what} forward"), &ours, &theirs);
        let r = randn(&mut rng, ours.dims());
        let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let operands = (&x, &wt, &bias);
        let nhwc = ddpm_kernels::conv_transpose2d_nhwc;
        check_nhwc(&what, nhwc, operands, (p, s), &ours, &r, &g1);
        let g2 = (&theirs * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        close_grads(&what, &g1, &g2, &[("dx", &x), ("dw", &wt), ("db", &bias)]);
    }
}

#[test]
fn mismatched_shapes_are_errors() {
    let x = Tensor::zeros((1, 3, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((4, 2, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(
        ddpm_kernels::conv2d(&x, &w, None, 1, 1)
            .unwrap_err()
            .to_string()
            .contains("do not fit")
    );
    // Channels last, the channels are the last dimension: 8 here.
    let err = ddpm_kernels::conv2d_nhwc(&x, &w, None, 1, 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("(NHWC)") && err.contains("do not fit"),
        "{err}"
    );
    let w = Tensor::zeros((4, 3, 9, 9), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(
        ddpm_kernels::conv2d(&x, &w, None, 0, 1)
            .unwrap_err()
            .to_string()
            .contains("no output")
    );
    let w = Tensor::zeros((4, 3, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    let bias = Tensor::zeros(5, candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(
        ddpm_kernels::conv2d(&x, &w, Some(&bias), 1, 1)
            .unwrap_err()
            .to_string()
            .contains("bias [5] must be [4]")
    );
    let w = Tensor::zeros((3, 4, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    let x = Tensor::zeros((1, 3, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(
        ddpm_kernels::conv_transpose2d(&x, &w, None, 2, 1)
            .unwrap_err()
            .to_string()
            .contains("has no output")
    );
    let f64s = x.to_dtype(candle_core::DType::F64).unwrap();
    assert!(
        ddpm_kernels::conv_transpose2d(&f64s, &w, None, 0, 1)
            .unwrap_err()
            .to_string()
            .contains("runs f32 on the CPU")
    );
}

/// Forward and backward of both convolutions (NCHW and NHWC), the fused BatchNorms, the
/// GroupNorms and the per-image add at shapes that take every path (both orientations of the
/// kernel gradient, strides 1 and 2, Winograd) are bitwise the same with 1, 2 and 5 threads.
#[test]
fn results_do_not_depend_on_the_thread_count() {
    ddpm_testutil::assert_same_across_thread_counts(
        "results_do_not_depend_on_the_thread_count",
        "DDPM_KERNELS_CHILD",
        &["1", "2", "5"],
        || {
            let mut rng = NoiseSource::new(3);
            let mut words: Vec<u32> = Vec::new();
            for (b, ci, co, h, k, s, p) in [
                (4, 6, 8, 20, 3, 1, 1),
                (3, 8, 5, 9, 4, 2, 1),
                (2, 3, 4, 128, 3, 1, 1),
                // Blocks of several images; whole-batch passes.
                (20, 3, 5, 8, 4, 2, 1),
                (2, 3, 64, 6, 3, 2, 1),
                (2, 40, 3, 3, 4, 2, 1),
                // Winograd: F(4x4, 3x3), then F(2x2, 3x3).
                (2, 64, 128, 45, 3, 1, 1),
                (4, 16, 24, 16, 3, 1, 1),
            ] {
                let x = Var::from_tensor(&randn(&mut rng, &[b, ci, h, h])).unwrap();
                let w = Var::from_tensor(&randn(&mut rng, &[co, ci, k, k])).unwrap();
                let wt = Var::from_tensor(&randn(&mut rng, &[ci, co, k, k])).unwrap();
                let bias = Var::from_tensor(&randn(&mut rng, &[co])).unwrap();
                let y = ddpm_kernels::conv2d(&x, &w, Some(&bias), p, s).unwrap();
                let z = ddpm_kernels::conv_transpose2d(&x, &wt, Some(&bias), p, s).unwrap();
                let loss = ((&y * &y).unwrap().sum_all().unwrap()
                    + (&z * &z).unwrap().sum_all().unwrap())
                .unwrap();
                let (n, _) = ddpm_kernels::relu_batch_norm(&y, &bias, &bias, 1e-5).unwrap();
                let loss = (loss + (&n * &y).unwrap().sum_all().unwrap()).unwrap();
                let e = ddpm_kernels::relu_channel_affine(&y, &bias, &bias).unwrap();
                let loss = (loss + (&e * &y).unwrap().sum_all().unwrap()).unwrap();
                // GroupNorms: one group, and one channel per group.
                let g1 = ddpm_kernels::group_norm_silu(&y, 1, &bias, &bias, 1e-5).unwrap();
                let gc = ddpm_kernels::group_norm(&g1, co, &bias, &bias, 1e-5).unwrap();
                let loss = (loss + (&gc * &y).unwrap().sum_all().unwrap()).unwrap();
                // The channels-last forms, with the per-image add.
                let xh = x.permute((0, 2, 3, 1)).unwrap();
                let yh = ddpm_kernels::conv2d_nhwc(&xh, &w, Some(&bias), p, s).unwrap();
                let zh = ddpm_kernels::conv_transpose2d_nhwc(&xh, &wt, None, p, s).unwrap();
                let v = bias.broadcast_as((b, co)).unwrap();
                let (nh, _) = ddpm_kernels::relu_batch_norm_nhwc(&yh, &bias, &bias, 1e-5).unwrap();
                let eh = ddpm_kernels::relu_channel_affine_nhwc(&nh, &bias, &bias).unwrap();
                let ah = ddpm_kernels::add_per_image_nhwc(&eh, &v).unwrap();
                let gh = ddpm_kernels::group_norm_silu_nhwc(&ah, 1, &bias, &bias, 1e-5).unwrap();
                let gh = ddpm_kernels::group_norm_nhwc(&gh, co, &bias, &bias, 1e-5).unwrap();
                let loss = (loss
                    + (&gh * &yh).unwrap().sum_all().unwrap()
                    + (&zh * &zh).unwrap().sum_all().unwrap())
                .unwrap();
                let grads = loss.backward().unwrap();
                for t in [
                    &y,
                    &z,
                    &n,
                    &e,
                    &g1,
                    &gc,
                    &ah,
                    &gh,
                    &zh,
                    x.as_tensor(),
                    w.as_tensor(),
                    wt.as_tensor(),
                    bias.as_tensor(),
                ] {
                    let t = grads.get(t).unwrap_or(t);
                    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                    words.extend(v.iter().map(|f| f.to_bits()));
                }
            }
            ddpm_testutil::fnv1a(words)
        },
    );
}

/// Inside `with_frozen_weights` the Winograd convolutions reuse their transformed kernels, and
/// the results stay bit for bit those without the scope, also when a kernel is changed in
/// place between calls (`Var::set` keeps its address) or replaced by a new one.
#[test]
fn frozen_weights_change_no_result() {
    let dev = Device::Cpu;
    let mut rng = NoiseSource::new(11);
    // F(4x4, 3x3) (16 maps of 16x16: 256 tiles of 4x4) and F(2x2, 3x3) (2 maps: 128 of 2x2).
    for (b, c, c_out, size) in [(16, 16, 24, 16), (2, 32, 16, 16)] {
        let x = rng.randn((b, size, size, c), &dev).unwrap();
        let w = Var::from_tensor(&rng.randn((c_out, c, 3, 3), &dev).unwrap()).unwrap();
        let other = rng.randn((c_out, c, 3, 3), &dev).unwrap();
        let conv = |w: &Tensor| ddpm_kernels::conv2d_nhwc(&x, w, None, 1, 1).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.into_iter().map(f32::to_bits).collect()
        };
        let plain = bits(&conv(w.as_tensor()));
        let plain_other = bits(&conv(&other));
        ddpm_kernels::with_frozen_weights(|| {
            assert_eq!(
                bits(&conv(w.as_tensor())),
                plain,
                "first call, b{b} {c}->{c_out}"
            );
            assert_eq!(
                bits(&conv(w.as_tensor())),
                plain,
                "kept kernel, b{b} {c}->{c_out}"
            );
            assert_eq!(
                bits(&conv(&other)),
                plain_other,
                "another kernel, b{b} {c}->{c_out}"
            );
            w.set(&other).unwrap();
            assert_eq!(
                bits(&conv(w.as_tensor())),
                plain_other,
                "kernel changed in place, b{b} {c}->{c_out}"
            );
        });
    }
}
