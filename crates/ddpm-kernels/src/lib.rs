//! Faster CPU convolutions for candle, with backward passes.
//!
//! candle 0.11's CPU `conv2d` backward computes the input gradient with a direct
//! `conv_transpose2d` loop (15-19 GFLOP/s on a 2-core x86 machine, where its matmul reaches
//! ~180), and `conv_transpose2d` forward uses the same loop. Here both convolutions are
//! rewritten as one large matmul plus a data rearrangement:
//!
//! - `conv2d(x, w)`: `w` `[C_out, C*k*k]` times `im2col(x)` `[B, C*k*k, L]`, which is NCHW;
//! - `conv_transpose2d(x, w)`: `w^T` `[C_out*k*k, C_in]` times `x` `[B, C_in, H*W]`, then
//!   `col2im`.
//!
//! `im2col` and `col2im` are each other's adjoint, so each is the other's backward pass; the
//! matmuls backpropagate through candle. The rearrangements run per batch item in parallel and
//! write disjoint memory, so results do not depend on the thread count.
//!
//! ```
//! use candle_core::{Device, Tensor};
//!
//! # fn main() -> candle_core::Result<()> {
//! let x = (Tensor::arange(0f32, 384., &Device::Cpu)?.reshape((2, 3, 8, 8))? / 100.)?.sin()?;
//! let w = (Tensor::arange(0f32, 108., &Device::Cpu)?.reshape((4, 3, 3, 3))? / 7.)?.cos()?;
//! let ours = ddpm_kernels::conv2d(&x, &w, 1, 1)?;
//! let candle = x.conv2d(&w, 1, 1, 1, 1)?;
//! let diff = (ours - candle)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(diff < 1e-4);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// The geometry of a convolution's *input* side: channels, height, width, kernel, stride,
/// padding (square kernels, equal padding on all sides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    padding: usize,
}

impl Geometry {
    fn out_hw(&self) -> candle_core::Result<(usize, usize)> {
        let (hp, wp) = (self.h + 2 * self.padding, self.w + 2 * self.padding);
        if self.k == 0 || self.stride == 0 || hp < self.k || wp < self.k {
            candle_core::bail!(
                "convolution of {}x{} with kernel {} stride {} padding {} has no output",
                self.h,
                self.w,
                self.k,
                self.stride,
                self.padding
            );
        }
        Ok((
            (hp - self.k) / self.stride + 1,
            (wp - self.k) / self.stride + 1,
        ))
    }

    /// Columns per position.
    fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }

    /// For every column `col = (ci, ky, kx)` and output row `oy`: the input row it reads (or
    /// `None` where it falls in the padding), and the output `ox` range that reads inside the
    /// input with the first input column read, so callers move whole runs of a row.
    fn for_each_row(
        &self,
        mut f: impl FnMut(usize, usize, usize, Option<usize>, std::ops::Range<usize>, isize),
    ) -> candle_core::Result<()> {
        let (ho, wo) = self.out_hw()?;
        let (k, s, p) = (self.k, self.stride, self.padding as isize);
        for ci in 0..self.c {
            for ky in 0..k {
                for kx in 0..k {
                    let col = (ci * k + ky) * k + kx;
                    // ox reads ix = ox * s + kx - p, inside [0, w) for ox in [lo, hi).
                    let first = kx as isize - p;
                    let lo = if first >= 0 {
                        0
                    } else {
                        ((-first) as usize).div_ceil(s)
                    };
                    let hi = if (self.w as isize) > first {
                        (((self.w as isize - first) as usize).div_ceil(s)).min(wo)
                    } else {
                        0
                    };
                    for oy in 0..ho {
                        let iy = (oy * s + ky) as isize - p;
                        let row = (0..self.h as isize)
                            .contains(&iy)
                            .then(|| (ci * self.h + iy as usize) * self.w);
                        f(col, oy, wo, row, lo..hi.max(lo), first);
                    }
                }
            }
        }
        Ok(())
    }
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("ddpm-kernels: the input must be contiguous"),
    }
}

/// `[B, C, H, W]` to `[B, C*k*k, L]`, `L` the output positions (Caffe's layout: each row of
/// columns is contiguous along the output, so a matmul with the kernel gives NCHW directly).
struct Im2Col(Geometry);

/// `[B, C*k*k, L]` to `[B, C, H, W]`, summing overlapping contributions.
struct Col2Im(Geometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "ddpm-im2col"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (b, c, h, w) = layout.shape().dims4()?;
        if (c, h, w) != (g.c, g.h, g.w) {
            candle_core::bail!(
                "im2col: input {:?} does not match the geometry {g:?}",
                layout.shape()
            );
        }
        let x = contiguous_f32(storage, layout)?;
        let (ho, wo) = g.out_hw()?;
        let (l, ckk) = (ho * wo, g.ckk());
        let s = g.stride;
        let mut out = vec![0f32; b * ckk * l];
        out.par_chunks_mut(ckk * l)
            .zip(x.par_chunks(c * h * w))
            .try_for_each(|(o, xi)| {
                g.for_each_row(|col, oy, wo, row, xs, first| {
                    let Some(row) = row else { return };
                    let dst = &mut o[col * l + oy * wo..col * l + (oy + 1) * wo];
                    for ox in xs {
                        dst[ox] = xi[row + (ox as isize * s as isize + first) as usize];
                    }
                })
            })?;
        Ok((CpuStorage::F32(out), Shape::from((b, ckk, l))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            grad_res.contiguous()?.apply_op1_no_bwd(&Col2Im(self.0))?,
        ))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "ddpm-col2im"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (b, ckk, l) = layout.shape().dims3()?;
        let (ho, wo) = g.out_hw()?;
        if (ckk, l) != (g.ckk(), ho * wo) {
            candle_core::bail!(
                "col2im: input {:?} does not match the geometry {g:?}",
                layout.shape()
            );
        }
        let cols = contiguous_f32(storage, layout)?;
        let n = g.c * g.h * g.w;
        let s = g.stride;
        let mut out = vec![0f32; b * n];
        out.par_chunks_mut(n)
            .zip(cols.par_chunks(ckk * l))
            .try_for_each(|(o, ci)| {
                g.for_each_row(|col, oy, wo, row, xs, first| {
                    let Some(row) = row else { return };
                    let src = &ci[col * l + oy * wo..col * l + (oy + 1) * wo];
                    for ox in xs {
                        o[row + (ox as isize * s as isize + first) as usize] += src[ox];
                    }
                })
            })?;
        Ok((CpuStorage::F32(out), Shape::from((b, g.c, g.h, g.w))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            grad_res.contiguous()?.apply_op1_no_bwd(&Im2Col(self.0))?,
        ))
    }
}

fn check_f32_cpu(x: &Tensor, w: &Tensor) -> candle_core::Result<()> {
    if !x.device().is_cpu()
        || x.dtype() != candle_core::DType::F32
        || w.dtype() != candle_core::DType::F32
    {
        candle_core::bail!("ddpm-kernels runs f32 on the CPU; use candle's convolutions elsewhere");
    }
    Ok(())
}

/// `conv2d` of `x` `[B, C_in, H, W]` with `w` `[C_out, C_in, k, k]` (no bias, no groups, no
/// dilation), the same as candle's `x.conv2d(w, padding, stride, 1, 1)`.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    check_f32_cpu(x, w)?;
    let (b, c, h, wd) = x.dims4()?;
    let (c_out, c_in, k, k2) = w.dims4()?;
    if c_in != c || k != k2 {
        candle_core::bail!(
            "conv2d: input {:?} and kernel {:?} do not fit",
            x.dims(),
            w.dims()
        );
    }
    let g = Geometry {
        c,
        h,
        w: wd,
        k,
        stride,
        padding,
    };
    let (ho, wo) = g.out_hw()?;
    let cols = x.contiguous()?.apply_op1(Im2Col(g))?; // [B, Ckk, L]
    let y = w.reshape((c_out, g.ckk()))?.broadcast_matmul(&cols)?; // [B, C_out, L]
    y.reshape((b, c_out, ho, wo))
}

/// `conv_transpose2d` of `x` `[B, C_in, H, W]` with `w` `[C_in, C_out, k, k]` (no output
/// padding, no dilation), the same as candle's `x.conv_transpose2d(w, padding, 0, stride, 1)`.
pub fn conv_transpose2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    check_f32_cpu(x, w)?;
    let (b, c_in, h, wd) = x.dims4()?;
    let (w_in, c_out, k, k2) = w.dims4()?;
    if w_in != c_in || k != k2 {
        candle_core::bail!(
            "conv_transpose2d: input {:?} and kernel {:?} do not fit",
            x.dims(),
            w.dims()
        );
    }
    let out = |n: usize| -> candle_core::Result<usize> {
        ((n - 1) * stride + k).checked_sub(2 * padding).filter(|&v| v > 0).ok_or_else(|| {
            candle_core::Error::Msg(format!("conv_transpose2d of size {n} with kernel {k} stride {stride} padding {padding} has no output"))
        })
    };
    let g = Geometry {
        c: c_out,
        h: out(h)?,
        w: out(wd)?,
        k,
        stride,
        padding,
    };
    // [C_out*k*k, C_in] x [B, C_in, H*W] -> [B, C_out*k*k, H*W], then scatter into the output.
    let cols = w
        .reshape((c_in, g.ckk()))?
        .t()?
        .broadcast_matmul(&x.reshape((b, c_in, h * wd))?)?;
    cols.contiguous()?.apply_op1(Col2Im(g))
}
