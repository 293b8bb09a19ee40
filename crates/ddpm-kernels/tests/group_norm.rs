//! `group_norm` and `group_norm_silu`, and their channels-last forms, against candle-nn's
//! `GroupNorm` (and candle's `silu`) computed in f64: output and all three gradients, on odd shapes, batch 1, one group, one
//! channel per group, and rank 2, 3 and 4 inputs. Tolerance: 1e-4 relative to the largest
//! value (f32 against f64).

use candle_core::{DType, Device, Module, Tensor, Var};
use ddpm_forward::NoiseSource;

mod common;
use common::close;

fn randn(rng: &mut NoiseSource, dims: &[usize]) -> Tensor {
    rng.randn(dims, &Device::Cpu).unwrap()
}

/// `(y, dx, dw, db)` of `sum(f(x, w, b) * probe)`.
fn run(
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    probe: &Tensor,
) -> [Tensor; 4] {
    let (x, w, b) = (
        Var::from_tensor(x).unwrap(),
        Var::from_tensor(w).unwrap(),
        Var::from_tensor(b).unwrap(),
    );
    let y = f(&x, &w, &b);
    let g = (&y * probe).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
    [y, grad(&x), grad(&w), grad(&b)]
}

#[test]
fn group_norm_matches_candle_nn() {
    let mut rng = NoiseSource::new(5);
    let cases: [(&[usize], usize); 7] = [
        (&[4, 6, 5, 7], 3),
        (&[1, 8, 3, 3], 8),
        (&[2, 4, 1, 1], 1),
        (&[3, 12, 16, 16], 4),
        (&[2, 6, 10], 2),
        (&[5, 12], 2),
        (&[2, 32, 9, 9], 8),
    ];
    for (dims, groups) in cases {
        let c = dims[1];
        // Off-centre and scaled, so the mean and variance matter.
        let x = randn(&mut rng, dims).affine(3.0, 2.0).unwrap();
        let w = (randn(&mut rng, &[c]) + 1.0).unwrap();
        let b = randn(&mut rng, &[c]);
        let probe = randn(&mut rng, dims);
        for silu in [false, true] {
            let what = format!("{dims:?} groups {groups} silu {silu}");
            let ours = run(
                |x, w, b| {
                    if silu {
                        ddpm_kernels::group_norm_silu(x, groups, w, b, 1e-5).unwrap()
                    } else {
                        ddpm_kernels::group_norm(x, groups, w, b, 1e-5).unwrap()
                    }
                },
                &x,
                &w,
                &b,
                &probe,
            );
            let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let reference = run(
                |x, w, b| {
                    let norm =
                        candle_nn::GroupNorm::new(w.clone(), b.clone(), c, groups, 1e-5).unwrap();
                    // candle-nn's takes rank 3 and up; PyTorch's also [N, C].
                    let y = if x.rank() == 2 {
                        norm.forward(&x.unsqueeze(2).unwrap())
                            .unwrap()
                            .squeeze(2)
                            .unwrap()
                    } else {
                        norm.forward(x).unwrap()
                    };
                    if silu { y.silu().unwrap() } else { y }
                },
                &f64_of(&x),
                &f64_of(&w),
                &f64_of(&b),
                &f64_of(&probe),
            );
            // Channels last: dimension 1 swapped with the last (any order of the positions is
            // a valid channels-last layout), and the output and dx swapped back.
            let last = |t: &Tensor| t.transpose(1, t.rank() - 1).unwrap().contiguous().unwrap();
            let mut ours_nhwc = run(
                |x, w, b| {
                    if silu {
                        ddpm_kernels::group_norm_silu_nhwc(x, groups, w, b, 1e-5).unwrap()
                    } else {
                        ddpm_kernels::group_norm_nhwc(x, groups, w, b, 1e-5).unwrap()
                    }
                },
                &last(&x),
                &w,
                &b,
                &last(&probe),
            );
            ours_nhwc[0] = last(&ours_nhwc[0]);
            ours_nhwc[1] = last(&ours_nhwc[1]);
            for (layout, ours) in [("NCHW", &ours), ("NHWC", &ours_nhwc)] {
                for (name, (a, r)) in ["output", "dx", "dweight", "dbias"]
                    .iter()
                    .zip(ours.iter().zip(&reference))
                {
                    close(
                        &format!("{what} {layout} {name}"),
                        a,
                        &r.to_dtype(DType::F32).unwrap(),
                    );
                }
            }
        }
    }
}

#[test]
fn group_norm_rejects_bad_inputs() {
    let x = Tensor::zeros((2, 6, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::ones(6, DType::F32, &Device::Cpu).unwrap();
    let err = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();
    let e = err(ddpm_kernels::group_norm(&x, 4, &w, &w, 1e-5));
    assert!(e.contains("6 channels do not split into 4 groups"), "{e}");
    let e = err(ddpm_kernels::group_norm_silu(&x, 0, &w, &w, 1e-5));
    assert!(e.contains("into 0 groups"), "{e}");
    let short = Tensor::ones(5, DType::F32, &Device::Cpu).unwrap();
    let e = err(ddpm_kernels::group_norm(&x, 3, &short, &w, 1e-5));
    assert!(e.contains("group_norm takes x [N, C, ...]"), "{e}");
    let e = err(ddpm_kernels::group_norm(&x, 3, &w, &w, -1.0));
    assert!(e.contains("eps must be >= 0"), "{e}");
    let e = err(ddpm_kernels::group_norm(
        &x.to_dtype(DType::F64).unwrap(),
        3,
        &w,
        &w,
        1e-5,
    ));
    assert!(e.contains("runs f32 on the CPU"), "{e}");
    let empty = Tensor::zeros((0, 6, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let e = err(ddpm_kernels::group_norm(&empty, 3, &w, &w, 1e-5));
    assert!(e.contains("holds no values"), "{e}");
    // Channels last: C is the last dimension (4 here).
    let e = err(ddpm_kernels::group_norm_silu_nhwc(&x, 3, &w, &w, 1e-5));
    assert!(e.contains("group_norm_silu_nhwc takes x [..., C]"), "{e}");
    let w4 = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
    let e = err(ddpm_kernels::group_norm_nhwc(&x, 3, &w4, &w4, 1e-5));
    assert!(e.contains("4 channels do not split into 3 groups"), "{e}");
}
