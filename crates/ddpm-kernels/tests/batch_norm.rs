//! `relu_batch_norm` against the same computation in candle ops, forward, statistics and all
//! three gradients, on odd shapes, batch 1, and rank 2 and 4 inputs. Tolerance: 1e-4 relative
//! to the largest value (means over up to a few thousand values in another order and
//! precision).

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
    }
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
}
