//! GroupNorm, optionally fused with the SiLU after it (diffusers' `ResnetBlock2D` runs
//! `silu(norm(x))` twice per block), forward and backward, on `[N, C, ...]` f32 tensors or
//! channels-last `[N, ..., C]` ones.
//!
//! candle-nn's GroupNorm is a chain of a dozen tensor ops (reshapes, two means, broadcasts, a
//! square root, the affine part), each a pass over memory with its own allocation, and the
//! SiLU after it two more; their backward passes twice as many. Here each `(sample, group)`
//! slab, which is contiguous in `[N, C, ...]`, is read three times forward (mean, spread,
//! output) and twice backward, one task per slab; channels last, one task per sample, whose
//! rows add into per-channel sums. Sums run in f64 in a fixed order, and the
//! weight and bias gradients add per-sample partial sums in sample order, so results do not
//! depend on the thread count.
//!
//! The SiLU's exponential is computed without libm (a call per element would keep the loops
//! scalar), and the channels-last per-sample bodies are compiled for the widest vectors the
//! CPU has through `pulp`'s run-time dispatch: the same operations in the same order at every
//! width, so the same bits.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::matmul::zeroed;
use crate::ops::{check_eps, contiguous_f32, is_cpu_f32, per_channel_dims, tensor, with_data};

/// The op: `groups` groups, `eps`, with or without the SiLU, and the per-slab mean and
/// `1 / sqrt(var + eps)` the forward pass found, for the backward pass.
struct GroupNorm {
    groups: usize,
    eps: f64,
    silu: bool,
    /// Channels last (`[N, ..., C]`), else `[N, C, ...]`.
    nhwc: bool,
    saved: Arc<OnceLock<Vec<(f32, f32)>>>,
}

/// The channels and the positions per sample of `[N, C, ...]`, or of `[N, ..., C]` with `nhwc`.
fn dims_of(dims: &[usize], nhwc: bool) -> (usize, usize) {
    if nhwc {
        (
            dims[dims.len() - 1],
            dims[1..dims.len() - 1].iter().product(),
        )
    } else {
        (dims[1], dims[2..].iter().product())
    }
}

/// `e^v` in f32 with no call into libm, so that loops over it vectorize (libm's `expf`
/// is one call per element): `v = n ln 2 + r` with `|r| <= ln 2 / 2`, `e^r` by Cephes'
/// `expf` polynomial, `2^n` written into the exponent bits. Within a few ulp of the exact
/// value; arguments are clamped to [-87, 88], where `2^n` stays a normal number (a sigmoid
/// needs no more). NaN stays NaN.
#[inline(always)]
fn exp(v: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer, which its low mantissa bits then hold.
    const ROUND: f32 = 12_582_912.0;
    let v = if v > 88.0 { 88.0 } else { v };
    let v = if v < -87.0 { -87.0 } else { v };
    let t = v * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    // ln 2 in two parts (Cody and Waite), so that `n * LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let r = v - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let two_n = (t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127)) << 23;
    er * f32::from_bits(two_n)
}

#[inline(always)]
fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + exp(-v))
}

/// `a <- silu(a)` over a row.
#[inline(always)]
fn silu_in_place(row: &mut [f32]) {
    for a in row {
        *a *= sigmoid(*a);
    }
}

/// The gradient at the norm's output, `a = xhat * w + b`, for the gradient `d` after the
/// SiLU: `d s (1 + a (1 - s))`, `s = sigmoid(a)`. (Without the SiLU it is `d` itself.)
#[inline(always)]
fn silu_grad(a: f32, d: f32) -> f32 {
    let s = sigmoid(a);
    d * s * (1.0 + a * (1.0 - s))
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        if self.silu {
            "group-norm-silu"
        } else {
            "group-norm"
        }
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
        let (channels, hw) = dims_of(l1.shape().dims(), self.nhwc);
        let (x, w, b) = (
            contiguous_f32(s1, l1)?,
            contiguous_f32(s2, l2)?,
            contiguous_f32(s3, l3)?,
        );
        let (y, stats) = if self.nhwc {
            self.forward_nhwc(x, w, b, channels, hw)
        } else {
            self.forward_nchw(x, w, b, channels, hw)
        };
        if self.saved.set(stats).is_err() {
            candle_core::bail!("group-norm: an op value runs forward once");
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(saved) = self.saved.get() else {
            candle_core::bail!("group-norm: backward before forward");
        };
        let dims = x.dims().to_vec();
        if grad_res.dims() != dims {
            candle_core::bail!(
                "group-norm: gradient of shape {:?} for {dims:?}",
                grad_res.dims()
            );
        }
        let (channels, hw) = dims_of(&dims, self.nhwc);
        let (dx, dw, db) = with_data(x, |x| {
            with_data(w, |w| {
                with_data(b, |b| {
                    with_data(grad_res, |dy| {
                        self.backward(x, w, b, dy, saved, channels, hw)
                    })
                })
            })
        })????;
        Ok((
            Some(tensor(dx, &dims, x)?),
            Some(tensor(dw, &[channels], x)?),
            Some(tensor(db, &[channels], x)?),
        ))
    }
}

impl GroupNorm {
    /// `(dx, dw, db)` for the output gradient `dy`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        x: &[f32],
        w: &[f32],
        b: &[f32],
        dy: &[f32],
        saved: &[(f32, f32)],
        channels: usize,
        hw: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut dx = zeroed(x.len());
        let sums = if self.nhwc {
            self.backward_nhwc(x, w, b, dy, saved, &mut dx)
        } else {
            self.backward_nchw(x, w, b, dy, saved, channels, hw, &mut dx)
        };
        // Weight and bias gradients: the per-sample sums added in sample order.
        let (mut dw, mut db) = (vec![0f64; channels], vec![0f64; channels]);
        for per_sample in sums.chunks_exact(channels) {
            for (c, s) in per_sample.iter().enumerate() {
                db[c] += s[0];
                dw[c] += s[1];
            }
        }
        (
            dx,
            dw.into_iter().map(|v| v as f32).collect(),
            db.into_iter().map(|v| v as f32).collect(),
        )
    }

    /// Leaves `dx` for `[N, C, ...]` data; returns `[sum(g), sum(g * xhat)]` per (sample,
    /// channel), `g` the gradient at the norm's output.
    #[allow(clippy::too_many_arguments)]
    fn backward_nchw(
        &self,
        x: &[f32],
        w: &[f32],
        b: &[f32],
        dy: &[f32],
        saved: &[(f32, f32)],
        channels: usize,
        hw: usize,
        dx: &mut [f32],
    ) -> Vec<[f64; 2]> {
        let per_group = channels / self.groups;
        let slab = per_group * hw;
        // Per (sample, channel): [sum(g), sum(g * xhat)], g the gradient at the norm's output
        // (through the SiLU), which the first pass leaves in `dx`.
        let mut sums = vec![[0f64; 2]; x.len() / hw];
        dx.par_chunks_mut(slab)
            .zip(x.par_chunks(slab).zip(dy.par_chunks(slab)))
            .zip(sums.par_chunks_mut(per_group))
            .enumerate()
            .for_each(|(i, ((gs, (xs, dys)), sums))| {
                let (mean, inv_std) = saved[i];
                let c0 = (i % self.groups) * per_group;
                for (j, sum) in sums.iter_mut().enumerate() {
                    let range = j * hw..(j + 1) * hw;
                    let (wc, bc) = (w[c0 + j], b[c0 + j]);
                    let (gc, xc) = (&mut gs[range.clone()], &xs[range.clone()]);
                    if self.silu {
                        for ((g, &v), &d) in gc.iter_mut().zip(xc).zip(&dys[range]) {
                            *g = silu_grad((v - mean) * inv_std * wc + bc, d);
                        }
                    } else {
                        gc.copy_from_slice(&dys[range]);
                    }
                    // The sums in their own loop, which stays sequential (f64, in order),
                    // so that the one above vectorizes.
                    let (mut s_g, mut s_gx) = (0f64, 0f64);
                    for (&g, &v) in gc.iter().zip(xc) {
                        let xhat = (v - mean) * inv_std;
                        s_g += f64::from(g);
                        s_gx += f64::from(g) * f64::from(xhat);
                    }
                    *sum = [s_g, s_gx];
                }
                // dx = inv_std (g w - mean(g w) - xhat mean(g w xhat)), means over the slab.
                let count = slab as f64;
                let (mut m1, mut m2) = (0f64, 0f64);
                for (j, s) in sums.iter().enumerate() {
                    m1 += f64::from(w[c0 + j]) * s[0];
                    m2 += f64::from(w[c0 + j]) * s[1];
                }
                let (m1, m2) = ((m1 / count) as f32, (m2 / count) as f32);
                for (j, (gc, xc)) in gs.chunks_exact_mut(hw).zip(xs.chunks_exact(hw)).enumerate() {
                    let wc = w[c0 + j];
                    for (g, &v) in gc.iter_mut().zip(xc) {
                        let xhat = (v - mean) * inv_std;
                        *g = inv_std * (*g * wc - m1 - xhat * m2);
                    }
                }
            });
        sums
    }

    /// The forward pass on `[N, C, ...]` data, one task per `(sample, group)` slab: the
    /// output and the per-slab mean and `1 / sqrt(var + eps)`.
    fn forward_nchw(
        &self,
        x: &[f32],
        w: &[f32],
        b: &[f32],
        channels: usize,
        hw: usize,
    ) -> (Vec<f32>, Vec<(f32, f32)>) {
        let per_group = channels / self.groups;
        let slab = per_group * hw;
        let mut y = zeroed(x.len());
        let stats: Vec<(f32, f32)> = y
            .par_chunks_mut(slab)
            .zip(x.par_chunks(slab))
            .enumerate()
            .map(|(i, (ys, xs))| {
                let count = xs.len() as f64;
                // Two passes in f64: the mean, then the spread around it.
                let mean = xs.iter().map(|&v| f64::from(v)).sum::<f64>() / count;
                let var = xs
                    .iter()
                    .map(|&v| (f64::from(v) - mean).powi(2))
                    .sum::<f64>()
                    / count;
                let inv_std = (1.0 / (var + self.eps).sqrt()) as f32;
                let mean = mean as f32;
                let c0 = (i % self.groups) * per_group;
                for (j, (yc, xc)) in ys.chunks_exact_mut(hw).zip(xs.chunks_exact(hw)).enumerate() {
                    let k = inv_std * w[c0 + j];
                    let shift = b[c0 + j] - mean * k;
                    for (o, &v) in yc.iter_mut().zip(xc) {
                        *o = v * k + shift;
                    }
                    if self.silu {
                        silu_in_place(yc);
                    }
                }
                (mean, inv_std)
            })
            .collect();
        (y, stats)
    }

    /// The forward pass on `[N, ..., C]` data, one task per sample: the output and the
    /// per-(sample, group) mean and `1 / sqrt(var + eps)`.
    fn forward_nhwc(
        &self,
        x: &[f32],
        w: &[f32],
        b: &[f32],
        channels: usize,
        positions: usize,
    ) -> (Vec<f32>, Vec<(f32, f32)>) {
        let per_group = channels / self.groups;
        let sample = positions * channels;
        let count = (positions * per_group) as f64;
        let simd = pulp::Arch::new();
        let mut y = zeroed(x.len());
        let stats: Vec<Vec<(f32, f32)>> = y
            .par_chunks_mut(sample)
            .zip(x.par_chunks(sample))
            .map(|(ys, xs)| {
                simd.dispatch(ForwardSample {
                    op: self,
                    ys,
                    xs,
                    w,
                    b,
                    count,
                })
            })
            .collect();
        (y, stats.concat())
    }

    /// [`Self::backward_nchw`] for `[N, ..., C]` data, one task per sample.
    #[allow(clippy::too_many_arguments)]
    fn backward_nhwc(
        &self,
        x: &[f32],
        w: &[f32],
        b: &[f32],
        dy: &[f32],
        saved: &[(f32, f32)],
        dx: &mut [f32],
    ) -> Vec<[f64; 2]> {
        let sample = x.len() / (saved.len() / self.groups);
        let count = (sample / self.groups) as f64;
        let simd = pulp::Arch::new();
        let per_sample: Vec<Vec<[f64; 2]>> = dx
            .par_chunks_mut(sample)
            .zip(x.par_chunks(sample).zip(dy.par_chunks(sample)))
            .enumerate()
            .map(|(n, (gs, (xs, dys)))| {
                let stats = &saved[n * self.groups..][..self.groups];
                simd.dispatch(BackwardSample {
                    op: self,
                    gs,
                    xs,
                    dys,
                    stats,
                    w,
                    b,
                    count,
                })
            })
            .collect();
        per_sample.concat()
    }

    /// One sample of [`Self::forward_nhwc`]: `xs` `[positions, C]` in, `ys` out; returns the
    /// sample's per-group mean and `1 / sqrt(var + eps)`.
    #[inline(always)]
    fn forward_sample(
        &self,
        ys: &mut [f32],
        xs: &[f32],
        w: &[f32],
        b: &[f32],
        count: f64,
    ) -> Vec<(f32, f32)> {
        let channels = w.len();
        let per_group = channels / self.groups;
        // Two passes in f64: per-channel sums give the group means, then the spread
        // around them.
        let mut sums = vec![0f64; channels];
        for row in xs.chunks_exact(channels) {
            for (s, &v) in sums.iter_mut().zip(row) {
                *s += f64::from(v);
            }
        }
        let means: Vec<f64> = sums
            .chunks_exact(per_group)
            .map(|g| g.iter().sum::<f64>() / count)
            .collect();
        let channel_mean: Vec<f64> = (0..channels).map(|c| means[c / per_group]).collect();
        let mut spread = vec![0f64; channels];
        for row in xs.chunks_exact(channels) {
            for ((s, &v), &m) in spread.iter_mut().zip(row).zip(&channel_mean) {
                *s += (f64::from(v) - m).powi(2);
            }
        }
        let stats: Vec<(f32, f32)> = spread
            .chunks_exact(per_group)
            .zip(&means)
            .map(|(g, &m)| {
                let var = g.iter().sum::<f64>() / count;
                (m as f32, (1.0 / (var + self.eps).sqrt()) as f32)
            })
            .collect();
        let scale: Vec<f32> = (0..channels)
            .map(|c| stats[c / per_group].1 * w[c])
            .collect();
        let shift: Vec<f32> = (0..channels)
            .map(|c| b[c] - stats[c / per_group].0 * scale[c])
            .collect();
        for (yr, xr) in ys.chunks_exact_mut(channels).zip(xs.chunks_exact(channels)) {
            for (((o, &v), &k), &sh) in yr.iter_mut().zip(xr).zip(&scale).zip(&shift) {
                *o = v * k + sh;
            }
            if self.silu {
                silu_in_place(yr);
            }
        }
        stats
    }

    /// One sample of [`Self::backward_nhwc`]: leaves `dx` in `gs` and returns the per-channel
    /// `[sum(g), sum(g * xhat)]`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn backward_sample(
        &self,
        gs: &mut [f32],
        xs: &[f32],
        dys: &[f32],
        stats: &[(f32, f32)],
        w: &[f32],
        b: &[f32],
        count: f64,
    ) -> Vec<[f64; 2]> {
        let channels = w.len();
        let per_group = channels / self.groups;
        let mean: Vec<f32> = (0..channels).map(|c| stats[c / per_group].0).collect();
        let inv: Vec<f32> = (0..channels).map(|c| stats[c / per_group].1).collect();
        // g through the activation, left in `gs`; per-channel sums of g and g xhat.
        let (mut s_g, mut s_gx) = (vec![0f64; channels], vec![0f64; channels]);
        for ((gr, xr), dr) in gs
            .chunks_exact_mut(channels)
            .zip(xs.chunks_exact(channels))
            .zip(dys.chunks_exact(channels))
        {
            if self.silu {
                let per_channel = mean.iter().zip(&inv).zip(w.iter().zip(b));
                for ((g, (&v, &d)), ((&m, &i), (&wc, &bc))) in
                    gr.iter_mut().zip(xr.iter().zip(dr)).zip(per_channel)
                {
                    *g = silu_grad((v - m) * i * wc + bc, d);
                }
            } else {
                gr.copy_from_slice(dr);
            }
            let per_channel = mean.iter().zip(&inv).zip(s_g.iter_mut().zip(&mut s_gx));
            for ((&g, &v), ((&m, &i), (sg, sgx))) in gr.iter().zip(xr).zip(per_channel) {
                let xhat = (v - m) * i;
                *sg += f64::from(g);
                *sgx += f64::from(g) * f64::from(xhat);
            }
        }
        let sums: Vec<[f64; 2]> = s_g.into_iter().zip(s_gx).map(|(a, b)| [a, b]).collect();
        // dx = inv_std (g w - mean(g w) - xhat mean(g w xhat)), means per group.
        let mut m = vec![[0f64; 2]; self.groups];
        for (c, s) in sums.iter().enumerate() {
            m[c / per_group][0] += f64::from(w[c]) * s[0];
            m[c / per_group][1] += f64::from(w[c]) * s[1];
        }
        let m1: Vec<f32> = (0..channels)
            .map(|c| (m[c / per_group][0] / count) as f32)
            .collect();
        let m2: Vec<f32> = (0..channels)
            .map(|c| (m[c / per_group][1] / count) as f32)
            .collect();
        for (gr, xr) in gs.chunks_exact_mut(channels).zip(xs.chunks_exact(channels)) {
            for (c, (g, &v)) in gr.iter_mut().zip(xr).enumerate() {
                let xhat = (v - mean[c]) * inv[c];
                *g = inv[c] * (*g * w[c] - m1[c] - xhat * m2[c]);
            }
        }
        sums
    }
}

/// One sample of the channels-last forward pass, as a [`pulp::WithSimd`] operation: `pulp`
/// compiles it for the widest vectors the CPU has (AVX2, AVX-512) and picks at run time.
/// Vectors change how many elements each instruction takes, not the operations or their
/// order, so every choice gives the same bits.
struct ForwardSample<'a> {
    op: &'a GroupNorm,
    ys: &'a mut [f32],
    xs: &'a [f32],
    w: &'a [f32],
    b: &'a [f32],
    count: f64,
}

impl pulp::WithSimd for ForwardSample<'_> {
    type Output = Vec<(f32, f32)>;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> Self::Output {
        let Self {
            op,
            ys,
            xs,
            w,
            b,
            count,
        } = self;
        op.forward_sample(ys, xs, w, b, count)
    }
}

/// One sample of the channels-last backward pass, as [`ForwardSample`].
struct BackwardSample<'a> {
    op: &'a GroupNorm,
    gs: &'a mut [f32],
    xs: &'a [f32],
    dys: &'a [f32],
    stats: &'a [(f32, f32)],
    w: &'a [f32],
    b: &'a [f32],
    count: f64,
}

impl pulp::WithSimd for BackwardSample<'_> {
    type Output = Vec<[f64; 2]>;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> Self::Output {
        let Self {
            op,
            gs,
            xs,
            dys,
            stats,
            w,
            b,
            count,
        } = self;
        op.backward_sample(gs, xs, dys, stats, w, b, count)
    }
}

/// Whether [`group_norm`] runs on `x`: f32 on the CPU.
pub fn group_norm_supports(x: &Tensor) -> bool {
    is_cpu_f32(x)
}

/// GroupNorm (Wu and He 2018) as PyTorch's `nn.GroupNorm`: the channels (dimension 1) of
/// `x` `[N, C, ...]` split into `groups` consecutive groups, each `(sample, group)` normalised
/// by its own mean and biased variance, then each channel scaled by `weight` and shifted by
/// `bias` (`[C]`). Gradients flow to all three. `x` is f32 on the CPU.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    group_norm_in(x, groups, weight, bias, eps, false, false)
}

/// `silu(group_norm(x))` in one op: [`group_norm`] followed by `v * sigmoid(v)`.
pub fn group_norm_silu(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    group_norm_in(x, groups, weight, bias, eps, true, false)
}

/// [`group_norm`] with the channels last: `x` is `[N, ..., C]` (NHWC images).
pub fn group_norm_nhwc(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    group_norm_in(x, groups, weight, bias, eps, false, true)
}

/// [`group_norm_silu`] with the channels last: `x` is `[N, ..., C]` (NHWC images).
pub fn group_norm_silu_nhwc(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    group_norm_in(x, groups, weight, bias, eps, true, true)
}

fn group_norm_in(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
    nhwc: bool,
) -> candle_core::Result<Tensor> {
    let what = match (silu, nhwc) {
        (false, false) => "group_norm",
        (true, false) => "group_norm_silu",
        (false, true) => "group_norm_nhwc",
        (true, true) => "group_norm_silu_nhwc",
    };
    let channels = per_channel_dims(what, x, ("weight and bias [C]", weight, bias), nhwc)?;
    check_eps(what, eps)?;
    if groups == 0 || channels % groups != 0 {
        candle_core::bail!("{what}: {channels} channels do not split into {groups} groups");
    }
    let op = GroupNorm {
        groups,
        eps,
        silu,
        nhwc,
        saved: Arc::new(OnceLock::new()),
    };
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::{BackwardSample, ForwardSample, GroupNorm, exp, sigmoid};

    /// The channels-last sample bodies compiled for the widest vectors this CPU has (AVX2 on
    /// most x86-64 machines) and for none give the same bits, forward and backward.
    #[test]
    fn every_vector_width_gives_the_same_bits() {
        let (positions, channels, groups) = (37, 24, 4);
        let wave = |i: usize, k: usize| ((i * k) % 1009) as f32 / 250.0 - 2.0;
        let x: Vec<f32> = (0..positions * channels).map(|i| wave(i, 7919)).collect();
        let dy: Vec<f32> = (0..positions * channels)
            .map(|i| wave(i, 104_729))
            .collect();
        let w: Vec<f32> = (0..channels).map(|c| 0.5 + c as f32 / 10.0).collect();
        let b: Vec<f32> = (0..channels).map(|c| c as f32 / 20.0 - 0.3).collect();
        let count = (positions * channels / groups) as f64;
        let run = |arch: pulp::Arch, silu: bool| {
            let op = GroupNorm {
                groups,
                eps: 1e-5,
                silu,
                nhwc: true,
                saved: Default::default(),
            };
            let mut y = vec![0f32; x.len()];
            let stats = arch.dispatch(ForwardSample {
                op: &op,
                ys: &mut y,
                xs: &x,
                w: &w,
                b: &b,
                count,
            });
            let mut g = vec![0f32; x.len()];
            let sums = arch.dispatch(BackwardSample {
                op: &op,
                gs: &mut g,
                xs: &x,
                dys: &dy,
                stats: &stats,
                w: &w,
                b: &b,
                count,
            });
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
            let stats: Vec<f32> = stats.iter().flat_map(|&(m, i)| [m, i]).collect();
            let sums: Vec<u64> = sums.iter().flatten().map(|f| f.to_bits()).collect();
            (bits(&y), bits(&stats), bits(&g), sums)
        };
        for silu in [false, true] {
            let (wide, plain) = (run(pulp::Arch::new(), silu), run(pulp::Arch::Scalar, silu));
            assert!(wide.0 == plain.0, "outputs differ (silu {silu})");
            assert!(wide.1 == plain.1, "statistics differ (silu {silu})");
            assert!(wide.2 == plain.2, "input gradients differ (silu {silu})");
            assert!(
                wide.3 == plain.3,
                "weight and bias sums differ (silu {silu})"
            );
        }
    }

    /// The branch-free `exp` against f64's over the range a sigmoid uses, and its clamping.
    #[test]
    fn exp_is_within_a_few_ulp() {
        let mut worst = 0f64;
        for i in 0..350_000 {
            let v = -87.0 + i as f32 * 5e-4;
            let exact = f64::from(v).exp();
            let rel = ((f64::from(exp(v)) - exact) / exact).abs();
            worst = worst.max(rel);
        }
        // 3 ulp of f32 is 3.6e-7 relative.
        assert!(worst < 3.6e-7, "worst relative error {worst:e}");
        assert!(exp(-200.0) > 0.0 && exp(-200.0) < 2e-38);
        assert!(exp(200.0).is_finite() && exp(200.0) > 1e38);
        assert!(exp(f32::NAN).is_nan());
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
        assert!(sigmoid(-100.0) < 1e-37 && sigmoid(100.0) == 1.0);
    }
}
