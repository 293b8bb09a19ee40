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

use crate::layout::row_sums;
use crate::matmul::zeroed;
use crate::ops::{
    ROWS_PER_TASK, check_eps, contiguous_f32, is_cpu_f32, per_channel_dims, tensor, with_data,
};

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
    /// Channels last (`[..., C]`), else dimension 1 (`[N, C, ...]`).
    nhwc: bool,
}

/// The channel count and, for `[N, C, ...]`, the positions per (sample, channel) plane; for
/// channels last the planes are single values.
fn channel_dims(dims: &[usize], nhwc: bool) -> (usize, usize) {
    if nhwc {
        (dims[dims.len() - 1], 1)
    } else {
        (dims[1], dims[2..].iter().product())
    }
}

/// `out[r, c] = f(c, x[r, c])` over channels-last `[rows, channels]` data, in parallel.
fn map_rows(out: &mut [f32], x: &[f32], channels: usize, f: impl Fn(usize, f32) -> f32 + Sync) {
    out.par_chunks_mut(ROWS_PER_TASK * channels)
        .zip(x.par_chunks(ROWS_PER_TASK * channels))
        .for_each(|(o, xs)| {
            for (or, xr) in o.chunks_exact_mut(channels).zip(xs.chunks_exact(channels)) {
                for (c, (d, &v)) in or.iter_mut().zip(xr).enumerate() {
                    *d = f(c, v);
                }
            }
        });
}

/// `out[r, c] = f(c, x[r, c], dy[r, c])` over channels-last data, in parallel.
fn map_rows2(
    out: &mut [f32],
    x: &[f32],
    dy: &[f32],
    channels: usize,
    f: impl Fn(usize, f32, f32) -> f32 + Sync,
) {
    let n = ROWS_PER_TASK * channels;
    out.par_chunks_mut(n)
        .zip(x.par_chunks(n).zip(dy.par_chunks(n)))
        .for_each(|(o, (xs, gs))| {
            let rows = o
                .chunks_exact_mut(channels)
                .zip(xs.chunks_exact(channels).zip(gs.chunks_exact(channels)));
            for (or, (xr, gr)) in rows {
                for (c, ((d, &v), &g)) in or.iter_mut().zip(xr).zip(gr).enumerate() {
                    *d = f(c, v, g);
                }
            }
        });
}

/// Per-channel mean and biased variance of `relu(x)` for channels-last `x`, in f64: the sum,
/// then the spread around the mean, each in blocks of rows added in a fixed order.
fn stats_nhwc(x: &[f32], channels: usize) -> (Vec<f64>, Vec<f64>) {
    let rows = x.len() / channels;
    let count = rows as f64;
    let mean: Vec<f64> = row_sums(rows, channels, |r, acc| {
        for (a, &v) in acc.iter_mut().zip(&x[r * channels..][..channels]) {
            *a += f64::from(v.max(0.0));
        }
    })
    .into_iter()
    .map(|s| s / count)
    .collect();
    let var = row_sums(rows, channels, |r, acc| {
        let row = &x[r * channels..][..channels];
        for ((a, &v), &m) in acc.iter_mut().zip(row).zip(&mean) {
            *a += (f64::from(v.max(0.0)) - m).powi(2);
        }
    })
    .into_iter()
    .map(|s| s / count)
    .collect();
    (mean, var)
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
        let (channels, hw) = channel_dims(dims, self.nhwc);
        let (x, w, b) = (
            contiguous_f32(s1, l1)?,
            contiguous_f32(s2, l2)?,
            contiguous_f32(s3, l3)?,
        );
        let count = (x.len() / channels.max(1)) as f64;
        let stats: Vec<(f32, f32, f32)> = if self.nhwc {
            let (mean, var) = stats_nhwc(x, channels);
            mean.iter()
                .zip(&var)
                .map(|(&m, &v)| (m as f32, (1.0 / (v + self.eps).sqrt()) as f32, v as f32))
                .collect()
        } else {
            // Two passes per channel in f64: the mean, then the spread around it.
            (0..channels)
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
                .collect()
        };
        let saved = Saved {
            mean: stats.iter().map(|s| s.0).collect(),
            inv_std: stats.iter().map(|s| s.1).collect(),
            var: stats.iter().map(|s| s.2).collect(),
        };
        let scale: Vec<f32> = (0..channels).map(|c| saved.inv_std[c] * w[c]).collect();
        let shift: Vec<f32> = (0..channels)
            .map(|c| b[c] - saved.mean[c] * scale[c])
            .collect();
        let mut y = zeroed(x.len());
        if self.nhwc {
            map_rows(&mut y, x, channels, |c, v| v.max(0.0) * scale[c] + shift[c]);
        } else {
            y.par_chunks_mut(channels * hw)
                .zip(x.par_chunks(channels * hw))
                .for_each(|(ys, xs)| {
                    for c in 0..channels {
                        let (k, sh) = (scale[c], shift[c]);
                        for (o, &v) in ys[c * hw..][..hw].iter_mut().zip(&xs[c * hw..][..hw]) {
                            *o = v.max(0.0) * k + sh;
                        }
                    }
                });
        }
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
        let (channels, hw) = channel_dims(&dims, self.nhwc);
        if grad_res.dims() != dims {
            candle_core::bail!(
                "relu-batch-norm: gradient of shape {:?} for {dims:?}",
                grad_res.dims()
            );
        }
        let (dx, dw, db) = with_data(x, |x| {
            with_data(w, |w| {
                with_data(grad_res, |dy| {
                    if self.nhwc {
                        backward_nhwc(x, w, dy, saved, channels)
                    } else {
                        backward(x, w, dy, saved, channels, hw)
                    }
                })
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
    let mut dx = zeroed(x.len());
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

fn backward_nhwc(x: &[f32], w: &[f32], dy: &[f32], saved: &Saved, channels: usize) -> Grads {
    let rows = x.len() / channels;
    let count = rows as f64;
    let mean: Vec<f64> = saved.mean.iter().map(|&v| f64::from(v)).collect();
    let inv_std: Vec<f64> = saved.inv_std.iter().map(|&v| f64::from(v)).collect();
    // [sum(dy) per channel, sum(dy * xhat) per channel], in f64.
    let sums = row_sums(rows, 2 * channels, |r, acc| {
        let (s_dy, s_dy_xhat) = acc.split_at_mut(channels);
        let (xr, gr) = (
            &x[r * channels..][..channels],
            &dy[r * channels..][..channels],
        );
        for c in 0..channels {
            let g = f64::from(gr[c]);
            s_dy[c] += g;
            s_dy_xhat[c] += g * (f64::from(xr[c].max(0.0)) - mean[c]) * inv_std[c];
        }
    });
    let db: Vec<f32> = sums[..channels].iter().map(|&v| v as f32).collect();
    let dw: Vec<f32> = sums[channels..].iter().map(|&v| v as f32).collect();
    let k: Vec<f32> = (0..channels).map(|c| w[c] * saved.inv_std[c]).collect();
    let mean_dy: Vec<f32> = db.iter().map(|&v| (f64::from(v) / count) as f32).collect();
    let mean_dy_xhat: Vec<f32> = dw.iter().map(|&v| (f64::from(v) / count) as f32).collect();
    let mut dx = zeroed(x.len());
    map_rows2(&mut dx, x, dy, channels, |c, v, g| {
        if v > 0.0 {
            let xhat = (v - saved.mean[c]) * saved.inv_std[c];
            k[c] * (g - mean_dy[c] - xhat * mean_dy_xhat[c])
        } else {
            0.0
        }
    });
    (dx, dw, db)
}

/// Whether [`relu_batch_norm`] runs on `x`: f32 on the CPU.
pub fn relu_batch_norm_supports(x: &Tensor) -> bool {
    is_cpu_f32(x)
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
    relu_batch_norm_in(x, weight, bias, eps, false)
}

/// [`relu_batch_norm`] with the channels last: `x` is `[..., C]` (NHWC images).
pub fn relu_batch_norm_nhwc(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, BatchStats)> {
    relu_batch_norm_in(x, weight, bias, eps, true)
}

fn relu_batch_norm_in(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    nhwc: bool,
) -> candle_core::Result<(Tensor, BatchStats)> {
    let what = if nhwc {
        "relu_batch_norm_nhwc"
    } else {
        "relu_batch_norm"
    };
    let channels = per_channel_dims(what, x, ("weight and bias [C]", weight, bias), nhwc)?;
    check_eps(what, eps)?;
    let saved = Arc::new(OnceLock::new());
    let op = ReluBatchNorm {
        eps,
        saved: saved.clone(),
        nhwc,
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
struct ReluChannelAffine {
    /// Channels last (`[..., C]`), else dimension 1.
    nhwc: bool,
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
        let (channels, hw) = channel_dims(dims, self.nhwc);
        let (x, scale, shift) = (
            contiguous_f32(s1, l1)?,
            contiguous_f32(s2, l2)?,
            contiguous_f32(s3, l3)?,
        );
        let mut y = zeroed(x.len());
        if self.nhwc {
            map_rows(&mut y, x, channels, |c, v| v.max(0.0) * scale[c] + shift[c]);
            return Ok((CpuStorage::F32(y), l1.shape().clone()));
        }
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
        let (channels, hw) = channel_dims(&dims, self.nhwc);
        if grad_res.dims() != dims {
            candle_core::bail!(
                "relu-channel-affine: gradient of shape {:?} for {dims:?}",
                grad_res.dims()
            );
        }
        let (dx, dscale, dshift) = with_data(x, |x| {
            with_data(scale, |k| {
                with_data(grad_res, |dy| {
                    if self.nhwc {
                        return affine_backward_nhwc(x, k, dy, channels);
                    }
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
                    let mut dx = zeroed(x.len());
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

fn affine_backward_nhwc(x: &[f32], k: &[f32], dy: &[f32], channels: usize) -> Grads {
    // [sum(dy relu(x)) per channel, sum(dy) per channel], in f64.
    let sums = row_sums(x.len() / channels, 2 * channels, |r, acc| {
        let (s_k, s_b) = acc.split_at_mut(channels);
        let (xr, gr) = (
            &x[r * channels..][..channels],
            &dy[r * channels..][..channels],
        );
        for c in 0..channels {
            let g = f64::from(gr[c]);
            s_k[c] += g * f64::from(xr[c].max(0.0));
            s_b[c] += g;
        }
    });
    let mut dx = zeroed(x.len());
    map_rows2(&mut dx, x, dy, channels, |c, v, g| {
        if v > 0.0 { g * k[c] } else { 0.0 }
    });
    let (s_k, s_b) = sums.split_at(channels);
    (
        dx,
        s_k.iter().map(|&v| v as f32).collect(),
        s_b.iter().map(|&v| v as f32).collect(),
    )
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
    relu_channel_affine_in(x, scale, shift, false)
}

/// [`relu_channel_affine`] with the channels last: `x` is `[..., C]` (NHWC images).
pub fn relu_channel_affine_nhwc(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
) -> candle_core::Result<Tensor> {
    relu_channel_affine_in(x, scale, shift, true)
}

fn relu_channel_affine_in(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    nhwc: bool,
) -> candle_core::Result<Tensor> {
    let what = if nhwc {
        "relu_channel_affine_nhwc"
    } else {
        "relu_channel_affine"
    };
    per_channel_dims(what, x, ("two [C] vectors", scale, shift), nhwc)?;
    x.contiguous()?.apply_op3(
        &scale.contiguous()?,
        &shift.contiguous()?,
        ReluChannelAffine { nhwc },
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
    relu_batch_norm_eval_in(x, [weight, bias, running_mean, running_var], eps, false)
}

/// [`relu_batch_norm_eval`] with the channels last: `x` is `[..., C]` (NHWC images).
pub fn relu_batch_norm_eval_nhwc(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    relu_batch_norm_eval_in(x, [weight, bias, running_mean, running_var], eps, true)
}

fn relu_batch_norm_eval_in(
    x: &Tensor,
    [weight, bias, running_mean, running_var]: [&Tensor; 4],
    eps: f64,
    nhwc: bool,
) -> candle_core::Result<Tensor> {
    let what = if nhwc {
        "relu_batch_norm_eval_nhwc"
    } else {
        "relu_batch_norm_eval"
    };
    per_channel_dims(what, x, ("two [C] vectors", weight, bias), nhwc)?;
    per_channel_dims(
        what,
        x,
        ("two [C] vectors", running_mean, running_var),
        nhwc,
    )?;
    check_eps(what, eps)?;
    let scale = weight.mul(&(running_var + eps)?.sqrt()?.recip()?)?;
    let shift = bias.sub(&running_mean.mul(&scale)?)?;
    relu_channel_affine_in(x, &scale, &shift, nhwc)
}
