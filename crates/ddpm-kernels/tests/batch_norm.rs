//! `relu_batch_norm` (and its eval form) against the same computation in candle ops, forward,
//! statistics and all three gradients, on odd shapes, batch 1, and rank 2 and 4 inputs; the
//! channels-last forms and `add_per_image_nhwc` the same way. Tolerance: 1e-4 relative to the
//! largest value (means over up to a few thousand values in another order and precision).

use candle_core::{D, Device, Tensor, Var};
use ddpm_forward::NoiseSource;

mod common;
use common::close;

/// BatchNorm(relu(x)) with batch statistics, in candle ops: channels to the front, flattened.
fn reference(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> (Tensor, Tensor, Tensor) {
    let dims = x.dims().to_vec();
    let c = dims[1];
    let r = x.relu().unwrap().transpose(0, 1).unwrap();
    let r = r.flatten_from(1).unwrap();
    let mean = r.mean_keepdim(D::Minus1).unwrap();
    let centred = r.broadcast_sub(&mean).unwrap();
    let var = centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let y = centred
        .broadcast_div(&(&var + eps).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(&w.reshape((c, 1)).unwrap())
        .unwrap()
        .broadcast_add(&b.reshape((c, 1)).unwrap())
        .unwrap();
    let mut moved = dims.clone();
    moved.swap(0, 1);
    let y = y.reshape(moved).unwrap().transpose(0, 1).unwrap();
    (y, mean.flatten_all().unwrap(), var.flatten_all().unwrap())
}

/// `x` with dimension 1 and the last swapped: channels last for `[N, C, ...]` (any order of
/// the positions is a valid channels-last layout), and back.
fn swap_last(x: &Tensor) -> Tensor {
    x.transpose(1, x.rank() - 1).unwrap()
}

/// The gradients of `sum(y * probe)` for `vars`, with `x`'s (channels last, a `Var` of its
/// own) swapped back.
fn channels_last_grads(y: &Tensor, probe: &Tensor, x: &Var, vars: &[&Var]) -> Vec<Tensor> {
    let g = (y * probe).unwrap().sum_all().unwrap().backward().unwrap();
    let mut out = vec![swap_last(g.get(x.as_tensor()).unwrap())];
    out.extend(vars.iter().map(|v| g.get(v.as_tensor()).unwrap().clone()));
    out
}

fn randn(rng: &mut NoiseSource, dims: &[usize]) -> Tensor {
    rng.randn(dims, &Device::Cpu).unwrap()
}

#[test]
fn relu_batch_norm_matches_candle_ops() {
    let mut rng = NoiseSource::new(11);
    let cases: [&[usize]; 6] = [
        &[4, 3, 5, 7],
        &[1, 2, 3, 3],
        &[2, 5, 1, 1],
        &[8, 6],
        &[3, 4, 16, 16],
        &[64, 2, 4, 4],
    ];
    for dims in cases {
        let c = dims[1];
        // Shifted so that some channels are mostly cut by the ReLU and others mostly pass.
        let shift = Tensor::arange(0f32, c as f32, &Device::Cpu)
            .unwrap()
            .affine(0.6, -0.8)
            .unwrap();
        let mut bshape = vec![1; dims.len()];
        bshape[1] = c;
        let x0 = randn(&mut rng, dims)
            .broadcast_add(&shift.reshape(bshape).unwrap())
            .unwrap();
        let x = Var::from_tensor(&x0).unwrap();
        let w = Var::from_tensor(&(randn(&mut rng, &[c]) + 1.0).unwrap()).unwrap();
        let b = Var::from_tensor(&randn(&mut rng, &[c])).unwrap();
        let probe = randn(&mut rng, dims);
        let what = format!("{dims:?}");

        let (ours, stats) =
            ddpm_kernels::relu_batch_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)
                .unwrap();
        let (theirs, mean, var) = reference(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5);
        close(&format!("{what} forward"), &ours, &theirs);
        assert_eq!(stats.count, dims.iter().product::<usize>() / c);
        close(
            &format!("{what} mean"),
            &Tensor::new(stats.mean.as_slice(), &Device::Cpu).unwrap(),
            &mean,
        );
        close(
            &format!("{what} var"),
            &Tensor::new(stats.var.as_slice(), &Device::Cpu).unwrap(),
            &var,
        );

        let g_ours = (&ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_theirs = (&theirs * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [("dx", &x), ("dw", &w), ("db", &b)] {
            close(
                &format!("{what} {name}"),
                g_ours.get(v.as_tensor()).unwrap(),
                g_theirs.get(v.as_tensor()).unwrap(),
            );
        }

        // Channels last: the same output, statistics and gradients.
        let xh = Var::from_tensor(&swap_last(&x0).contiguous().unwrap()).unwrap();
        let (yh, stats_h) =
            ddpm_kernels::relu_batch_norm_nhwc(xh.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)
                .unwrap();
        let y = swap_last(&yh);
        close(&format!("{what} NHWC forward"), &y, &theirs);
        assert_eq!(stats_h.count, stats.count);
        for (name, a, e) in [("mean", &stats_h.mean, &mean), ("var", &stats_h.var, &var)] {
            let a = Tensor::new(a.as_slice(), &Device::Cpu).unwrap();
            close(&format!("{what} NHWC {name}"), &a, e);
        }
        let gh = channels_last_grads(&y, &probe, &xh, &[&w, &b]);
        for (name, v, g) in [("dx", &x, &gh[0]), ("dw", &w, &gh[1]), ("db", &b, &gh[2])] {
            close(
                &format!("{what} NHWC {name}"),
                g,
                g_theirs.get(v.as_tensor()).unwrap(),
            );
        }
    }
}

/// Inference-mode BatchNorm(relu(x)) in candle ops, unfolded, as candle-nn computes it.
fn reference_eval(x: &Tensor, w: &Tensor, b: &Tensor, mean: &Tensor, var: &Tensor) -> Tensor {
    let mut shape = vec![1; x.rank()];
    shape[1] = x.dim(1).unwrap();
    let per = |t: &Tensor| t.reshape(shape.as_slice()).unwrap();
    x.relu()
        .unwrap()
        .broadcast_sub(&per(mean))
        .unwrap()
        .broadcast_div(&per(&(var + 1e-5).unwrap().sqrt().unwrap()))
        .unwrap()
        .broadcast_mul(&per(w))
        .unwrap()
        .broadcast_add(&per(b))
        .unwrap()
}

#[test]
fn relu_batch_norm_eval_matches_candle_ops() {
    let mut rng = NoiseSource::new(12);
    let cases: [&[usize]; 5] = [
        &[4, 3, 5, 7],
        &[1, 2, 3, 3],
        &[2, 5, 1, 1],
        &[8, 6],
        &[3, 4, 16, 16],
    ];
    for dims in cases {
        let c = dims[1];
        let x = Var::from_tensor(&randn(&mut rng, dims)).unwrap();
        let w = Var::from_tensor(&(randn(&mut rng, &[c]) + 1.0).unwrap()).unwrap();
        let b = Var::from_tensor(&randn(&mut rng, &[c])).unwrap();
        let mean = randn(&mut rng, &[c]).abs().unwrap();
        // Variances from 0.05 up: a small one makes the folded scale large.
        let var = (randn(&mut rng, &[c]).abs().unwrap() + 0.05).unwrap();
        let probe = randn(&mut rng, dims);
        let what = format!("eval {dims:?}");
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let ours = ddpm_kernels::relu_batch_norm_eval(xt, wt, bt, &mean, &var, 1e-5).unwrap();
        let theirs = reference_eval(xt, wt, bt, &mean, &var);
        close(&format!("{what} forward"), &ours, &theirs);
        let grads = |y: &Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let (g_ours, g_theirs) = (grads(&ours), grads(&theirs));
        for (name, v) in [("dx", &x), ("dw", &w), ("db", &b)] {
            close(
                &format!("{what} {name}"),
                g_ours.get(v.as_tensor()).unwrap(),
                g_theirs.get(v.as_tensor()).unwrap(),
            );
        }
        // Channels last.
        let xh = Var::from_tensor(&swap_last(xt).contiguous().unwrap()).unwrap();
        let yh = ddpm_kernels::relu_batch_norm_eval_nhwc(xh.as_tensor(), wt, bt, &mean, &var, 1e-5)
            .unwrap();
        let y = swap_last(&yh);
        close(&format!("{what} NHWC forward"), &y, &theirs);
        let gh = channels_last_grads(&y, &probe, &xh, &[&w, &b]);
        for (name, v, g) in [("dx", &x, &gh[0]), ("dw", &w, &gh[1]), ("db", &b, &gh[2])] {
            close(
                &format!("{what} NHWC {name}"),
                g,
                g_theirs.get(v.as_tensor()).unwrap(),
            );
        }
    }
}

#[test]
fn add_per_image_nhwc_matches_broadcast_add() {
    let mut rng = NoiseSource::new(13);
    let cases: [&[usize]; 4] = [&[3, 5, 7, 4], &[1, 2, 2, 3], &[2, 300, 6], &[5, 1, 1, 2]];
    for dims in cases {
        let (b, c) = (dims[0], dims[dims.len() - 1]);
        let x = Var::from_tensor(&randn(&mut rng, dims)).unwrap();
        let v = Var::from_tensor(&randn(&mut rng, &[b, c])).unwrap();
        let probe = randn(&mut rng, dims);
        let what = format!("add_per_image_nhwc {dims:?}");
        let ours = ddpm_kernels::add_per_image_nhwc(x.as_tensor(), v.as_tensor()).unwrap();
        let mut vshape = vec![1; dims.len()];
        (vshape[0], vshape[dims.len() - 1]) = (b, c);
        let theirs = x
            .as_tensor()
            .broadcast_add(&v.as_tensor().reshape(vshape).unwrap())
            .unwrap();
        close(&format!("{what} forward"), &ours, &theirs);
        let grads = |y: &Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let (g_ours, g_theirs) = (grads(&ours), grads(&theirs));
        for (name, t) in [("dx", &x), ("dv", &v)] {
            close(
                &format!("{what} {name}"),
                g_ours.get(t.as_tensor()).unwrap(),
                g_theirs.get(t.as_tensor()).unwrap(),
            );
        }
    }
    let f32 = candle_core::DType::F32;
    let x = Tensor::zeros((2, 4, 4, 3), f32, &Device::Cpu).unwrap();
    for v in [(2, 4), (3, 3)] {
        let v = Tensor::zeros(v, f32, &Device::Cpu).unwrap();
        let err = ddpm_kernels::add_per_image_nhwc(&x, &v)
            .unwrap_err()
            .to_string();
        assert!(err.contains("v [B, C]"), "{err}");
    }
    let v = Tensor::zeros((2, 3), candle_core::DType::F64, &Device::Cpu).unwrap();
    let err = ddpm_kernels::add_per_image_nhwc(&x, &v)
        .unwrap_err()
        .to_string();
    assert!(err.contains("f32 on the CPU"), "{err}");
}

#[test]
fn relu_batch_norm_eval_rejects_what_it_cannot_run() {
    let f32 = candle_core::DType::F32;
    let x = Tensor::zeros((2, 3, 4, 4), f32, &Device::Cpu).unwrap();
    let ok = Tensor::ones(3, f32, &Device::Cpu).unwrap();
    let bad = Tensor::ones(4, f32, &Device::Cpu).unwrap();
    let eval = |x: &Tensor, w: &Tensor, m: &Tensor, eps: f64| {
        ddpm_kernels::relu_batch_norm_eval(x, w, &ok, m, &ok, eps)
            .unwrap_err()
            .to_string()
    };
    let err = eval(&x, &bad, &ok, 1e-5);
    assert!(err.contains("two [C] vectors"), "{err}");
    let err = eval(&x, &ok, &bad, 1e-5);
    assert!(err.contains("two [C] vectors"), "{err}");
    let err = eval(&x, &ok, &ok, f64::NAN);
    assert!(err.contains("eps"), "{err}");
    let err = eval(
        &x.to_dtype(candle_core::DType::F64).unwrap(),
        &ok,
        &ok,
        1e-5,
    );
    assert!(err.contains("f32 on the CPU"), "{err}");
    let empty = Tensor::zeros((0, 3), f32, &Device::Cpu).unwrap();
    let err = eval(&empty, &ok, &ok, 1e-5);
    assert!(err.contains("holds no values"), "{err}");
}

#[test]
fn relu_batch_norm_rejects_what_it_cannot_run() {
    let x = Tensor::zeros((2, 3, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::ones(3, candle_core::DType::F32, &Device::Cpu).unwrap();
    let bad = Tensor::ones(4, candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = ddpm_kernels::relu_batch_norm(&x, &bad, &w, 1e-5)
        .unwrap_err()
        .to_string();
    assert!(err.contains("weight and bias [C]"), "{err}");
    let err =
        ddpm_kernels::relu_batch_norm(&x.to_dtype(candle_core::DType::F64).unwrap(), &w, &w, 1e-5)
            .unwrap_err()
            .to_string();
    assert!(err.contains("f32 on the CPU"), "{err}");
    let empty = Tensor::zeros((0, 3, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = ddpm_kernels::relu_batch_norm(&empty, &w, &w, 1e-5)
        .unwrap_err()
        .to_string();
    assert!(err.contains("holds no values"), "{err}");
    let err = ddpm_kernels::relu_batch_norm(&x, &w, &w, -1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("eps"), "{err}");
    // Channels last: the channel count is the last dimension.
    let err = ddpm_kernels::relu_batch_norm_nhwc(&x, &w, &w, 1e-5)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[..., C]"), "{err}");
    let xh = Tensor::zeros((2, 4, 4, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(ddpm_kernels::relu_batch_norm_nhwc(&xh, &w, &w, 1e-5).is_ok());
}
