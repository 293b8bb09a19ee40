//! Data rearrangements around the matmuls: im2col, col2im and the `[B, C, L]` <-> `[C, B*L]`
//! permutation. Each runs in parallel over pieces of its output that no other piece writes,
//! and sums (col2im) in a fixed order, so results do not depend on the thread count.

use rayon::prelude::*;

/// The geometry of a convolution's *input* side: channels, height, width, kernel, stride,
/// padding (square kernels, equal padding on all sides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Geometry {
    /// Output height and width; an error when there is no output.
    pub fn out_hw(&self) -> candle_core::Result<(usize, usize)> {
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

    /// Output positions per image.
    pub fn l(&self) -> usize {
        let (ho, wo) = self.out_hw().expect("checked when the op was built");
        ho * wo
    }

    /// Rows of the column matrix: `C * k * k`.
    pub fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }

    /// For kernel column `kx`: the output columns `ox` whose input column `ox * s + kx - p`
    /// lies inside the image, and that input column for `ox = 0` (may be negative).
    fn x_range(&self, kx: usize, wo: usize) -> (usize, usize, isize) {
        let (s, first) = (self.stride, kx as isize - self.padding as isize);
        let lo = if first >= 0 {
            0
        } else {
            ((-first) as usize).div_ceil(s)
        };
        let hi = if (self.w as isize) > first {
            ((self.w as isize - first) as usize).div_ceil(s).min(wo)
        } else {
            0
        };
        (lo.min(wo), hi.max(lo.min(wo)), first)
    }

    /// The input row read by output row `oy` at kernel row `ky`, if inside the image.
    fn y_source(&self, oy: usize, ky: usize) -> Option<usize> {
        let iy = (oy * self.stride + ky) as isize - self.padding as isize;
        (0..self.h as isize).contains(&iy).then_some(iy as usize)
    }
}

/// `x` `[B, C, H, W]` into `cols` `[C*k*k, B*L]`: row `(ci, ky, kx)`, column `b * L + oy * Wo +
/// ox` holds `x[b, ci, oy*s + ky - p, ox*s + kx - p]` (0 in the padding). Every element of
/// `cols` is written.
pub(crate) fn im2col(x: &[f32], b: usize, g: &Geometry, cols: &mut [f32]) {
    let (ho, wo) = g.out_hw().expect("checked when the op was built");
    let (l, k, hw) = (ho * wo, g.k, g.h * g.w);
    debug_assert_eq!(x.len(), b * g.c * hw);
    debug_assert_eq!(cols.len(), g.ckk() * b * l);
    cols.par_chunks_mut(b * l)
        .enumerate()
        .for_each(|(row, dst)| {
            let (ci, ky, kx) = (row / (k * k), (row / k) % k, row % k);
            let (lo, hi, first) = g.x_range(kx, wo);
            for bi in 0..b {
                let plane = &x[(bi * g.c + ci) * hw..][..hw];
                for oy in 0..ho {
                    let d = &mut dst[bi * l + oy * wo..][..wo];
                    let Some(iy) = g.y_source(oy, ky) else {
                        d.fill(0.0);
                        continue;
                    };
                    let src = &plane[iy * g.w..][..g.w];
                    d[..lo].fill(0.0);
                    d[hi..].fill(0.0);
                    if lo < hi {
                        let start = (lo as isize * g.stride as isize + first) as usize;
                        if g.stride == 1 {
                            d[lo..hi].copy_from_slice(&src[start..start + hi - lo]);
                        } else {
                            for (o, ix) in d[lo..hi].iter_mut().zip((start..).step_by(g.stride)) {
                                *o = src[ix];
                            }
                        }
                    }
                }
            }
        });
}

/// The adjoint of [`im2col`]: `cols` `[C*k*k, B*L]` summed into `out` `[B, C, H, W]`, each
/// plane first set to `init[c]` (0 without `init`). Every element of `out` is written.
pub(crate) fn col2im(cols: &[f32], b: usize, g: &Geometry, init: Option<&[f32]>, out: &mut [f32]) {
    let (ho, wo) = g.out_hw().expect("checked when the op was built");
    let (l, k, hw) = (ho * wo, g.k, g.h * g.w);
    debug_assert_eq!(out.len(), b * g.c * hw);
    debug_assert_eq!(cols.len(), g.ckk() * b * l);
    out.par_chunks_mut(hw).enumerate().for_each(|(plane, o)| {
        let (bi, ci) = (plane / g.c, plane % g.c);
        o.fill(init.map_or(0.0, |v| v[ci]));
        for ky in 0..k {
            for kx in 0..k {
                let row = (ci * k + ky) * k + kx;
                let src = &cols[row * b * l + bi * l..][..l];
                let (lo, hi, first) = g.x_range(kx, wo);
                if lo >= hi {
                    continue;
                }
                for oy in 0..ho {
                    let Some(iy) = g.y_source(oy, ky) else {
                        continue;
                    };
                    let s = &src[oy * wo..][..wo];
                    let dst = &mut o[iy * g.w..][..g.w];
                    let start = (lo as isize * g.stride as isize + first) as usize;
                    if g.stride == 1 {
                        for (d, v) in dst[start..start + hi - lo].iter_mut().zip(&s[lo..hi]) {
                            *d += v;
                        }
                    } else {
                        for (ix, v) in (start..).step_by(g.stride).zip(&s[lo..hi]) {
                            dst[ix] += v;
                        }
                    }
                }
            }
        }
    });
}

/// `[B, C, L]` to `[C, B*L]`.
pub(crate) fn to_cbl(x: &[f32], b: usize, c: usize, l: usize, out: &mut [f32]) {
    debug_assert_eq!(x.len(), b * c * l);
    debug_assert_eq!(out.len(), b * c * l);
    out.par_chunks_mut(l).enumerate().for_each(|(i, o)| {
        let (ci, bi) = (i / b, i % b);
        o.copy_from_slice(&x[(bi * c + ci) * l..][..l]);
    });
}

/// `[C, B*L]` to `[B, C, L]`, adding `bias[c]` where given.
pub(crate) fn from_cbl(
    x: &[f32],
    b: usize,
    c: usize,
    l: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    debug_assert_eq!(x.len(), b * c * l);
    debug_assert_eq!(out.len(), b * c * l);
    out.par_chunks_mut(l).enumerate().for_each(|(i, o)| {
        let (bi, ci) = (i / c, i % c);
        let src = &x[(ci * b + bi) * l..][..l];
        match bias {
            Some(bias) => {
                for (d, v) in o.iter_mut().zip(src) {
                    *d = v + bias[ci];
                }
            }
            None => o.copy_from_slice(src),
        }
    });
}

/// Per-channel sums of `x` `[B, C, L]` over `B` and `L`, in f64, in a fixed order.
pub(crate) fn channel_sums(x: &[f32], b: usize, c: usize, l: usize) -> Vec<f32> {
    (0..c)
        .into_par_iter()
        .map(|ci| {
            (0..b)
                .map(|bi| {
                    x[(bi * c + ci) * l..][..l]
                        .iter()
                        .map(|&v| f64::from(v))
                        .sum::<f64>()
                })
                .sum::<f64>() as f32
        })
        .collect()
}

/// Row sums of `x` `[C, N]`, in f64, in a fixed order.
pub(crate) fn row_sums(x: &[f32], n: usize) -> Vec<f32> {
    x.par_chunks(n)
        .map(|r| r.iter().map(|&v| f64::from(v)).sum::<f64>() as f32)
        .collect()
}
