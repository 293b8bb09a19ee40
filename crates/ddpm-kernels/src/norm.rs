//! Training-mode BatchNorm fused with the ReLU in front of it (the seed U-Net's
//! `bnorm(relu(conv(x)))`), forward and backward.
//!
//! candle-nn's train-mode BatchNorm is a chain of ten tensor ops (a transposed copy, two means,
//! broadcasts, a square root, the affine part, a transpose back), each allocating its output,
//! and its backward pass twice as many. Here the forward pass reads the input three times
//! (mean, variance, output) and the backward pass twice, with one allocation each.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::{contiguous_f32, tensor, with_data};

/// The statistics of one batch that a training-mode BatchNorm normalised with.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStats {
    /// Per-channel mean of `relu(x)` over batch and positions.
    pub mean: Vec<f32>,
    /// Per-channel biased variance (divided by `count`).
    pub var: Vec<f32>,
    /// Values per channel (batch times positions).
    pub count: usize,
}

/// Per-channel mean and `1 / sqrt(var + eps)`, shared by the forward and backward passes.
struct Saved {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    var: Vec<f32>,
}

struct ReluBatchNorm {
    eps: f64,
    saved: Arc<OnceLock<Saved>>,
}

/// The values of channel `c` of an `[n, c, hw]` array, sample by sample.
fn channel(x: &[f32], c: usize, channels: usize, hw: usize) -> impl Iterator<Item = &[f32]> {
    x.chunks_exact(channels * hw)
        .map(move |s| &s[c * hw..][..hw])
}

impl CustomOp3 for ReluBatchNorm {
    fn name(&self) -> &'static str {
        "relu-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims();
        let (channels, hw) = (dims[1], dims[2..].iter().product::<usize>());
        let (x, w, b) = (
            contiguous_f32(s1, l1)?,
            contiguous_f32(s2, l2)?,
            contiguous_f32(s3, l3)?,
        );
        let count = (x.len() / channels.max(1)) as f64;
        // Two passes per channel in f64: the mean, then the spread around it.
        let stats: Vec<(f32, f32, f32)> = (0..channels)
            .into_par_iter()
            .map(|c| {
                let sum: f64 = channel(x, c, channels, hw)
                    .flat_map(|s| s.iter())
                    .map(|&v| f64::from(v.max(0.0)))
                    .sum();
                let mean = sum / count;
                let sq: f64 = channel(x, c, channels, hw)
                    .flat_map(|s| s.iter())
                    .map(|&v| (f64::from(v.max(0.0)) - mean).powi(2))
                    .sum();
                let var = sq / count;
                (
                    mean as f32,
                    (1.0 / (var + self.eps).sqrt()) as f32,
                    var as f32,
                )
            })
            .collect();
        let saved = Saved {
            mean: stats.iter().map(|s| s.0).collect(),
            inv_std: stats.iter().map(|s| s.1).collect(),
            var: stats.iter().map(|s| s.2).collect(),
        };
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(channels * hw)
            .zip(x.par_chunks(channels * hw))
            .for_each(|(ys, xs)| {
                for c in 0..channels {
                    let scale = saved.inv_std[c] * w[c];
                    let shift = b[c] - saved.mean[c] * scale;
                    for (o, &v) in ys[c * hw..][..hw].iter_mut().zip(&xs[c * hw..][..hw]) {
                        *o = v.max(0.0) * scale + shift;
                    }
                }
            });
        if self.saved.set(saved).is_err() {
            candle_core::bail!("relu-batch-norm: an op value runs forward once");
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(saved) = self.saved.get() else {
            candle_core::bail!("relu-batch-norm: backward before forward");
        };
        let dims = x.dims().to_vec();
        let (channels, hw) = (dims[1], dims[2..].iter().product::<usize>());
        if grad_res.dims() != dims {
            candle_core::bail!(
                "relu-batch-norm: gradient of shape {:?} for {dims:?}",
                grad_res.dims()
            );
        }
        let (dx, dw, db) = with_data(x, |x| {
            with_data(w, |w| {
                with_data(grad_res, |dy| backward(x, w, dy, saved, channels, hw))
            })
        })???;
        Ok((
            Some(tensor(dx, &dims, x)?),
            Some(tensor(dw, &[channels], x)?),
            Some(tensor(db, &[channels], x)?),
        ))
    }
}

type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);

fn backward(x: &[f32], w: &[f32], dy: &[f32], saved: &Saved, channels: usize, hw: usize) -> Grads {
    let count = (x.len() / channels.max(1)) as f64;
    // db = sum(dy), dw = sum(dy * xhat), per channel, in f64.
    let sums: Vec<(f32, f32)> = (0..channels)
        .into_par_iter()
        .map(|c| {
            let (mean, inv_std) = (f64::from(saved.mean[c]), f64::from(saved.inv_std[c]));
            let (mut sum_dy, mut sum_dy_xhat) = (0f64, 0f64);
            for (xs, gs) in channel(x, c, channels, hw).zip(channel(dy, c, channels, hw)) {
                for (&v, &g) in xs.iter().zip(gs) {
                    let xhat = (f64::from(v.max(0.0)) - mean) * inv_std;
                    sum_dy += f64::from(g);
                    sum_dy_xhat += f64::from(g) * xhat;
                }
            }
            (sum_dy_xhat as f32, sum_dy as f32)
        })
        .collect();
    let dw: Vec<f32> = sums.iter().map(|s| s.0).collect();
    let db: Vec<f32> = sums.iter().map(|s| s.1).collect();
    // d relu(x) = w inv_std (dy - db / M - xhat dw / M); dx = that where x > 0.
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(channels * hw)
        .zip(
            x.par_chunks(channels * hw)
                .zip(dy.par_chunks(channels * hw)),
        )
        .for_each(|(out, (xs, gs))| {
            for c in 0..channels {
                let (mean, inv_std) = (saved.mean[c], saved.inv_std[c]);
                let k = w[c] * inv_std;
                let mean_dy = (f64::from(db[c]) / count) as f32;
                let mean_dy_xhat = (f64::from(dw[c]) / count) as f32;
                let range = c * hw..(c + 1) * hw;
                for ((o, &v), &g) in out[range.clone()]
                    .iter_mut()
                    .zip(&xs[range.clone()])
                    .zip(&gs[range])
                {
                    *o = if v > 0.0 {
                        let xhat = (v - mean) * inv_std;
                        k * (g - mean_dy - xhat * mean_dy_xhat)
                    } else {
                        0.0
                    };
                }
            }
        });
    (dx, dw, db)
}

/// Whether [`relu_batch_norm`] runs on `x`: f32 on the CPU.
pub fn relu_batch_norm_supports(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// `BatchNorm(relu(x))` in training mode: `relu(x)` normalised per channel (dimension 1) with
/// its batch mean and biased variance, then scaled by `weight` and shifted by `bias`; gradients
/// flow to all three. Returns the batch statistics too, for the caller's running averages.
/// `x` is `[N, C, ...]` f32 on the CPU; `weight` and `bias` are `[C]`.
pub fn relu_batch_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, BatchStats)> {
    let what = "relu_batch_norm";
    let (channels, _) = per_channel_dims(what, x, ("weight and bias [C]", weight, bias))?;
    check_eps(what, eps)?;
    let saved = Arc::new(OnceLock::new());
    let op = ReluBatchNorm {
        eps,
        saved: saved.clone(),
    };
    let y = x
        .contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
    let Some(saved) = saved.get() else {
        candle_core::bail!("relu-batch-norm: the forward pass did not run");
    };
    Ok((
        y,
        BatchStats {
            mean: saved.mean.clone(),
            var: saved.var.clone(),
            count: x.elem_count() / channels,
        },
    ))
}

/// `relu(x) * scale[c] + shift[c]`: an inference-mode BatchNorm folded into one pass.
struct ReluChannelAffine;

/// Checks that `x` is f32 on the CPU, `[N, C, ...]` and not empty, and that the two vectors,
/// described for errors as `names`, are `[C]`; returns `(C, positions)`.
fn per_channel_dims(
    what: &str,
    x: &Tensor,
    (names, a, b): (&str, &Tensor, &Tensor),
) -> candle_core::Result<(usize, usize)> {
    if !relu_batch_norm_supports(x) {
        candle_core::bail!(
            "ddpm-kernels runs f32 on the CPU (got {:?} on {:?})",
            x.dtype(),
            x.device().location()
        );
    }
    let dims = x.dims();
    if dims.len() < 2 || a.dims() != [dims[1]] || b.dims() != [dims[1]] {
        candle_core::bail!(
            "{what} takes x [N, C, ...] with {names}, got {:?}, {:?}, {:?}",
            dims,
            a.dims(),
            b.dims()
        );
    }
    if x.elem_count() == 0 {
        candle_core::bail!("{what}: x {dims:?} holds no values");
    }
    Ok((dims[1], dims[2..].iter().product()))
}

/// Checks a BatchNorm's `eps`.
fn check_eps(what: &str, eps: f64) -> candle_core::Result<()> {
    if !(eps.is_finite() && eps >= 0.0) {
        candle_core::bail!("{what}: eps must be >= 0, got {eps}");
    }
    Ok(())
}

impl CustomOp3 for ReluChannelAffine {
    fn name(&self) -> &'static str {
        "relu-channel-affine"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims();
        let (channels, hw) = (dims[1], dims[2..].iter().product::<usize>());
        let (x, scale, shift) = (
            contiguous_f32(s1, l1)?,
            contiguous_f32(s2, l2)?,
            contiguous_f32(s3, l3)?,
        );
        let mut y = vec![0f32; x.len()];
        // Each task owns whole (sample, channel) planes: disjoint writes, no sums.
        y.par_chunks_mut(hw)
            .zip(x.par_chunks(hw))
            .enumerate()
            .for_each(|(i, (ys, xs))| {
                let (k, s) = (scale[i % channels], shift[i % channels]);
                for (o, &v) in ys.iter_mut().zip(xs) {
                    *o = v.max(0.0) * k + s;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _shift: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = x.dims().to_vec();
        let (channels, hw) = (dims[1], dims[2..].iter().product::<usize>());
        if grad_res.dims() != dims {
            candle_core::bail!(
                "relu-channel-affine: gradient of shape {:?} for {dims:?}",
                grad_res.dims()
            );
        }
        let (dx, dscale, dshift) = with_data(x, |x| {
            with_data(scale, |k| {
                with_data(grad_res, |dy| {
                    // dscale = sum(dy relu(x)), dshift = sum(dy), per channel in f64.
                    let sums: Vec<(f32, f32)> = (0..channels)
                        .into_par_iter()
                        .map(|c| {
                            let (mut s_k, mut s_b) = (0f64, 0f64);
                            for (xs, gs) in
                                channel(x, c, channels, hw).zip(channel(dy, c, channels, hw))
                            {
                                for (&v, &g) in xs.iter().zip(gs) {
                                    s_k += f64::from(g) * f64::from(v.max(0.0));
                                    s_b += f64::from(g);
                                }
                            }
                            (s_k as f32, s_b as f32)
                        })
                        .collect();
                    let mut dx = vec![0f32; x.len()];
                    dx.par_chunks_mut(hw)
                        .zip(x.par_chunks(hw).zip(dy.par_chunks(hw)))
                        .enumerate()
                        .for_each(|(i, (out, (xs, gs)))| {
                            let kc = k[i % channels];
                            for ((o, &v), &g) in out.iter_mut().zip(xs).zip(gs) {
                                *o = if v > 0.0 { g * kc } else { 0.0 };
                            }
                        });
                    (
                        dx,
                        sums.iter().map(|s| s.0).collect::<Vec<_>>(),
                        sums.iter().map(|s| s.1).collect::<Vec<_>>(),
                    )
                })
            })
        })???;
        Ok((
            Some(tensor(dx, &dims, x)?),
            Some(tensor(dscale, &[channels], x)?),
            Some(tensor(dshift, &[channels], x)?),
        ))
    }
}

/// `relu(x) * scale + shift` per channel (dimension 1), in one pass: an inference-mode
/// BatchNorm after a ReLU, with `scale = weight / sqrt(running_var + eps)` and
/// `shift = bias - running_mean * scale` (see [`relu_batch_norm_eval`]). Gradients flow to all
/// three. `x` is `[N, C, ...]` f32 on the CPU; `scale` and `shift` are `[C]`.
pub fn relu_channel_affine(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
) -> candle_core::Result<Tensor> {
    per_channel_dims("relu_channel_affine", x, ("two [C] vectors", scale, shift))?;
    x.contiguous()?.apply_op3(
        &scale.contiguous()?,
        &shift.contiguous()?,
        ReluChannelAffine,
    )
}

/// `BatchNorm(relu(x))` in inference mode: normalised with the running statistics, then
/// scaled by `weight` and shifted by `bias`, as one [`relu_channel_affine`] pass. The folding
/// into a per-channel scale and shift runs as candle ops on `[C]` vectors, so gradients reach
/// `weight` and `bias` too. Differs from the unfolded computation by float rounding only.
pub fn relu_batch_norm_eval(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let what = "relu_batch_norm_eval";
    per_channel_dims(what, x, ("two [C] vectors", weight, bias))?;
    per_channel_dims(what, x, ("two [C] vectors", running_mean, running_var))?;
    check_eps(what, eps)?;
    let scale = weight.mul(&(running_var + eps)?.sqrt()?.recip()?)?;
    let shift = bias.sub(&running_mean.mul(&scale)?)?;
    relu_channel_affine(x, &scale, &shift)
}
