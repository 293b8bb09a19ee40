//! Data rearrangements around the matmuls: NCHW <-> NHWC, im2row and its adjoint row2im (on
//! NHWC images), and the kernel permutations `[O, C, k, k]` <-> `[O, k, k, C]` and
//! `[O, C, k, k]` -> `[k, k, C, O]`. Each runs in
//! parallel over pieces of its output that no other piece writes, and sums (row2im) in a
//! fixed order, so results do not depend on the thread count.

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

    /// The input row (or column, with `w`) read by output row `o` at kernel offset `kk`, if
    /// inside the image of extent `n`.
    fn source(&self, o: usize, kk: usize, n: usize) -> Option<usize> {
        let i = (o * self.stride + kk) as isize - self.padding as isize;
        (0..n as isize).contains(&i).then_some(i as usize)
    }
}

/// Block edge of the tiled transposes.
const TILE: usize = 32;

/// Transposes each of `b` matrices `[r, c]` of `x` into `out` (`[c, r]` each), adding
/// `bias[j]` to column `j` of the source where given.
fn transpose_batch(x: &[f32], b: usize, r: usize, c: usize, bias: Option<&[f32]>, out: &mut [f32]) {
    debug_assert_eq!(x.len(), b * r * c);
    debug_assert_eq!(out.len(), b * r * c);
    if r * c == 0 {
        return;
    }
    // Tasks: one band of TILE output rows (source columns) of one matrix.
    let bands = c.div_ceil(TILE);
    out.par_chunks_mut(r * c)
        .zip(x.par_chunks(r * c))
        .for_each(|(o, xm)| {
            o.par_chunks_mut(TILE * r)
                .enumerate()
                .for_each(|(band, ob)| {
                    let j0 = band * TILE;
                    let jn = (c - j0).min(TILE);
                    debug_assert!(band < bands);
                    for i0 in (0..r).step_by(TILE) {
                        let in_ = (r - i0).min(TILE);
                        for j in 0..jn {
                            let add = bias.map_or(0.0, |v| v[j0 + j]);
                            let dst = &mut ob[j * r + i0..][..in_];
                            for (i, d) in dst.iter_mut().enumerate() {
                                *d = xm[(i0 + i) * c + j0 + j] + add;
                            }
                        }
                    }
                });
        });
}

/// A matrix `[r, c]` to `[c, r]`.
pub(crate) fn transpose(x: &[f32], r: usize, c: usize, out: &mut [f32]) {
    transpose_batch(x, 1, r, c, None, out);
}

/// NCHW `[B, C, H*W]` to NHWC `[B, H*W, C]`.
pub(crate) fn nchw_to_nhwc(x: &[f32], b: usize, c: usize, hw: usize, out: &mut [f32]) {
    transpose_batch(x, b, c, hw, None, out);
}

/// NHWC `[B, H*W, C]` to NCHW `[B, C, H*W]`, adding `bias[c]` where given.
pub(crate) fn nhwc_to_nchw(
    x: &[f32],
    b: usize,
    c: usize,
    hw: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    transpose_batch(x, b, hw, c, bias, out);
}

/// A kernel `[O, C, k, k]` as `[O, k, k, C]` (the column order of [`im2row`]).
pub(crate) fn kernel_to_rows(w: &[f32], o: usize, c: usize, kk: usize, out: &mut [f32]) {
    transpose_batch(w, o, c, kk, None, out);
}

/// A kernel `[O, k, k, C]` back to `[O, C, k, k]`.
pub(crate) fn kernel_from_rows(w: &[f32], o: usize, c: usize, kk: usize, out: &mut [f32]) {
    transpose_batch(w, o, kk, c, None, out);
}

/// A kernel `[O, C, k, k]` as `[k, k, C, O]`: the kernel of [`kernel_to_rows`] transposed,
/// `[k*k*C, O]`. As the right-hand side of `rows x kernel`, its output channels are adjacent,
/// which lets `gemm` pack it in parallel; the transposed `[O, k*k*C]` it packs on the calling
/// thread first. In parallel over blocks of 16 input channels, each through tiles of 16 x 16
/// (input, output) channels, so that reads and writes are runs of adjacent values.
pub(crate) fn kernel_to_columns(w: &[f32], o: usize, c: usize, kk: usize, out: &mut [f32]) {
    const EDGE: usize = 16;
    debug_assert_eq!(w.len(), o * c * kk);
    debug_assert_eq!(out.len(), o * c * kk);
    if w.is_empty() {
        return;
    }
    // Task b writes rows (k, b*EDGE..) of every tap k: its pieces of the k*k planes [C, O].
    let mut tasks: Vec<Vec<&mut [f32]>> = (0..c.div_ceil(EDGE)).map(|_| Vec::new()).collect();
    for plane in out.chunks_mut(c * o) {
        for (task, piece) in tasks.iter_mut().zip(plane.chunks_mut(EDGE * o)) {
            task.push(piece);
        }
    }
    tasks
        .into_par_iter()
        .enumerate()
        .for_each(|(b, mut planes)| {
            let (c0, cn) = (b * EDGE, EDGE.min(c - b * EDGE));
            let mut tile = vec![0f32; kk * EDGE * EDGE];
            for o0 in (0..o).step_by(EDGE) {
                let on = EDGE.min(o - o0);
                // tile[k][ci][oi], from each output channel's run of cn * kk values.
                for oi in 0..on {
                    let src = &w[((o0 + oi) * c + c0) * kk..][..cn * kk];
                    for (ci, taps) in src.chunks_exact(kk).enumerate() {
                        for (k, &v) in taps.iter().enumerate() {
                            tile[(k * EDGE + ci) * EDGE + oi] = v;
                        }
                    }
                }
                for (k, piece) in planes.iter_mut().enumerate() {
                    for ci in 0..cn {
                        piece[ci * o + o0..][..on]
                            .copy_from_slice(&tile[(k * EDGE + ci) * EDGE..][..on]);
                    }
                }
            }
        });
}

/// NHWC `x` `[B, H, W, C]` into `rows` `[B*L, k*k*C]`: row `b * L + oy * Wo + ox` is the
/// receptive field of that output position, `(ky, kx, ci)` holding `x[b, oy*s + ky - p, ox*s +
/// kx - p, ci]` (0 in the padding). Every element of `rows` is written. In parallel over
/// output rows.
pub(crate) fn im2row(x: &[f32], b: usize, g: &Geometry, rows: &mut [f32]) {
    let (ho, wo) = g.out_hw().expect("checked when the op was built");
    let (image, width) = (g.h * g.w * g.c, g.ckk());
    debug_assert_eq!(x.len(), b * image);
    debug_assert_eq!(rows.len(), b * ho * wo * width);
    rows.par_chunks_mut(wo * width)
        .enumerate()
        .for_each(|(task, dst)| {
            let (bi, oy) = (task / ho, task % ho);
            im2row_line(&x[bi * image..][..image], g, oy, dst);
        });
}

/// [`im2row`] on the calling thread, for callers that run blocks of images in parallel.
pub(crate) fn im2row_serial(x: &[f32], b: usize, g: &Geometry, rows: &mut [f32]) {
    let (ho, wo) = g.out_hw().expect("checked when the op was built");
    let (image, width) = (g.h * g.w * g.c, g.ckk());
    debug_assert_eq!(x.len(), b * image);
    debug_assert_eq!(rows.len(), b * ho * wo * width);
    for (task, dst) in rows.chunks_mut(wo * width).enumerate() {
        let (bi, oy) = (task / ho, task % ho);
        im2row_line(&x[bi * image..][..image], g, oy, dst);
    }
}

/// The `Wo` rows of output row `oy` of one NHWC `image`, into `dst`.
fn im2row_line(image: &[f32], g: &Geometry, oy: usize, dst: &mut [f32]) {
    let (c, k) = (g.c, g.k);
    for (ox, row) in dst.chunks_mut(g.ckk()).enumerate() {
        for ky in 0..k {
            let iy = g.source(oy, ky, g.h);
            for kx in 0..k {
                let d = &mut row[(ky * k + kx) * c..][..c];
                match (iy, g.source(ox, kx, g.w)) {
                    (Some(iy), Some(ix)) => d.copy_from_slice(&image[(iy * g.w + ix) * c..][..c]),
                    _ => d.fill(0.0),
                }
            }
        }
    }
}

/// The adjoint of [`im2row`]: `rows` `[B*L, k*k*C]` summed into NHWC `out` `[B, H, W, C]`,
/// onto `bias` `[C]` at every position where given. Every element of `out` is written. In
/// parallel over images.
pub(crate) fn row2im(rows: &[f32], b: usize, g: &Geometry, bias: Option<&[f32]>, out: &mut [f32]) {
    let image = g.h * g.w * g.c;
    let per = rows.len() / b.max(1);
    debug_assert_eq!(out.len(), b * image);
    out.par_chunks_mut(image.max(1))
        .zip(rows.par_chunks(per.max(1)))
        .for_each(|(o, r)| row2im_image(r, g, bias, o));
}

/// [`row2im`] on the calling thread, for callers that run blocks of images in parallel.
pub(crate) fn row2im_serial(
    rows: &[f32],
    b: usize,
    g: &Geometry,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let image = g.h * g.w * g.c;
    let per = rows.len() / b.max(1);
    debug_assert_eq!(out.len(), b * image);
    for (bi, o) in out.chunks_mut(image).enumerate() {
        row2im_image(&rows[bi * per..][..per], g, bias, o);
    }
}

/// One image's rows `[L, k*k*C]` summed into its NHWC `o`, onto `bias` where given.
fn row2im_image(src: &[f32], g: &Geometry, bias: Option<&[f32]>, o: &mut [f32]) {
    let (_, wo) = g.out_hw().expect("checked when the op was built");
    let (c, k) = (g.c, g.k);
    match bias {
        Some(v) => o.chunks_exact_mut(c).for_each(|p| p.copy_from_slice(v)),
        None => o.fill(0.0),
    }
    for (pos, row) in src.chunks(g.ckk()).enumerate() {
        let (oy, ox) = (pos / wo, pos % wo);
        for ky in 0..k {
            let Some(iy) = g.source(oy, ky, g.h) else {
                continue;
            };
            for kx in 0..k {
                let Some(ix) = g.source(ox, kx, g.w) else {
                    continue;
                };
                let d = &mut o[(iy * g.w + ix) * c..][..c];
                for (d, v) in d.iter_mut().zip(&row[(ky * k + kx) * c..][..c]) {
                    *d += v;
                }
            }
        }
    }
}

/// Rows per task of [`channel_sums_nhwc`]: a split that depends on the shape alone.
const SUM_ROWS: usize = 1024;

/// Per-channel sums of NHWC `x` `[positions, c]` over the positions, in f64, in a fixed order
/// (see [`row_sums`]).
pub(crate) fn channel_sums_nhwc(x: &[f32], c: usize) -> Vec<f32> {
    if c == 0 {
        return Vec::new();
    }
    row_sums(x.len() / c, c, |r, acc| {
        for (a, &v) in acc.iter_mut().zip(&x[r * c..][..c]) {
            *a += f64::from(v);
        }
    })
    .into_iter()
    .map(|v| v as f32)
    .collect()
}

/// `width` sums over `rows` rows in f64: `add(r, acc)` adds row `r`'s terms to `acc`. Blocks of
/// [`SUM_ROWS`] rows are summed in parallel, then the blocks' sums are added in order: a split
/// that depends on the shape alone, so the result does not depend on the thread count.
pub(crate) fn row_sums(
    rows: usize,
    width: usize,
    add: impl Fn(usize, &mut [f64]) + Sync,
) -> Vec<f64> {
    let blocks: Vec<Vec<f64>> = (0..rows.div_ceil(SUM_ROWS))
        .into_par_iter()
        .map(|block| {
            let mut acc = vec![0f64; width];
            for r in block * SUM_ROWS..((block + 1) * SUM_ROWS).min(rows) {
                add(r, &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![0f64; width];
    for block in &blocks {
        for (t, v) in total.iter_mut().zip(block) {
            *t += v;
        }
    }
    total
}

/// The sum of the `size`-float partial sums laid end to end in `partial`, added in order (in
/// parallel over elements).
pub(crate) fn sum_lanes(partial: &[f32], size: usize) -> Vec<f32> {
    let mut total = vec![0f32; size];
    total.par_chunks_mut(4096).enumerate().for_each(|(i, out)| {
        for part in partial.chunks_exact(size.max(1)) {
            for (o, &v) in out.iter_mut().zip(&part[i * 4096..]) {
                *o += v;
            }
        }
    });
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[O, C, k, k]` -> `[k, k, C, O]` element by element, on channel counts below, at and
    /// past the tiles' edge of 16.
    #[test]
    fn kernel_to_columns_permutes() {
        for (o, c, kk) in [(1, 1, 1), (3, 5, 9), (16, 16, 9), (17, 33, 16), (40, 7, 4)] {
            let w: Vec<f32> = (0..o * c * kk).map(|i| i as f32).collect();
            let mut out = vec![f32::NAN; w.len()];
            kernel_to_columns(&w, o, c, kk, &mut out);
            for oo in 0..o {
                for ci in 0..c {
                    for k in 0..kk {
                        assert_eq!(
                            out[(k * c + ci) * o + oo].to_bits(),
                            w[(oo * c + ci) * kk + k].to_bits(),
                            "o {oo} c {ci} k {k} of {o}x{c}x{kk}"
                        );
                    }
                }
            }
        }
    }
}
