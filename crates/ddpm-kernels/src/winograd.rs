//! 3x3, stride-1, padding-1 convolutions by Winograd's minimal filtering F(2x2, 3x3) (Lavin and
//! Gray, "Fast Algorithms for Convolutional Neural Networks", 2015).
//!
//! Each 2x2 block of outputs (a tile) comes from the 4x4 input patch around it: the patch and
//! the kernel are transformed (`V = Bᵀ d B`, `U = G g Gᵀ`), multiplied elementwise and summed
//! over input channels, and transformed back (`Y = Aᵀ M A`). Summing over channels for one of
//! the 16 transform positions is a matrix product `[tiles, C] x [C, C_out]`, so the work is 16
//! `gemm` calls with 16 multiplies per tile where im2row needs 36: 2.25x fewer. The transforms
//! add and subtract only (G's halves are exact), so results differ from im2row's by float
//! rounding alone.
//!
//! Layouts: per block of tiles, `V` is `[tiles, 16, C]` (the product for position `ξ` reads
//! its rows with stride `16 C`), `U` is `[16, C, C_out]` for the whole call, and `M` is
//! `[tiles, 16, C_out]`. A block is transformed, multiplied and transformed back by one task
//! while it is in cache; the blocks run in parallel and write disjoint rows of the output, and
//! each block's arithmetic is the same whatever the thread count, so results are bitwise the
//! same for every thread count.

use rayon::prelude::*;

use crate::LANES;
use crate::layout::sum_lanes;
use crate::matmul::{Mat, Scratch, matmul_serial, with_local_scratch};

/// Whether the Winograd path is the faster one for `s`, as measured per layer on a 2-core x86
/// machine (`cargo run --release -p ddpm-kernels --example layers`): forward 1.2-2.2x faster
/// than im2row on every 3x3 layer of the small seed model, from 32 -> 64 channels over 32x32
/// maps to 512 -> 128 over 4x4 maps at batch 64 (256 tiles). Thinner products (the 1-channel
/// first conv of a digit model) and fewer tiles stay on im2row.
pub(crate) fn pays_off(s: &Shape3x3) -> bool {
    s.c.min(s.c_out) >= 16 && s.tiles() >= BLOCK_TILES
}

/// The shape of a 3x3 same-size convolution: batch, input and output channels, map size.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape3x3 {
    pub b: usize,
    pub c: usize,
    pub c_out: usize,
    pub h: usize,
    pub w: usize,
}

impl Shape3x3 {
    fn tiles_h(&self) -> usize {
        self.h.div_ceil(2)
    }

    fn tiles_w(&self) -> usize {
        self.w.div_ceil(2)
    }

    fn tiles(&self) -> usize {
        self.b * self.tiles_h() * self.tiles_w()
    }

    /// Tile `t` as (image, tile row, tile column).
    fn tile(&self, t: usize) -> (usize, usize, usize) {
        let (th, tw) = (self.tiles_h(), self.tiles_w());
        (t / (th * tw), t / tw % th, t % tw)
    }

    /// The `c` channel values of pixel (`y`, `x`) of image `bi` in NHWC `map`, or `zeros`
    /// outside the map (the padding, or outputs past its edge).
    fn pixel<'a>(
        &self,
        map: &'a [f32],
        c: usize,
        bi: usize,
        y: isize,
        x: isize,
        zeros: &'a [f32],
    ) -> &'a [f32] {
        if y < 0 || x < 0 || y as usize >= self.h || x as usize >= self.w {
            zeros
        } else {
            &map[((bi * self.h + y as usize) * self.w + x as usize) * c..][..c]
        }
    }
}

/// `U = G g Gᵀ` for every (output, input) channel pair of `w` `[C_out, C, 3, 3]`, as
/// `[16, C, C_out]`.
fn kernel_transform(w: &[f32], c: usize, c_out: usize) -> Scratch {
    let mut u = Scratch::new(16 * c * c_out);
    // Parallel over transform positions: each writes its own [C, C_out] block.
    u.par_chunks_mut(c * c_out)
        .enumerate()
        .for_each(|(xi, block)| {
            let (r, q) = (xi / 4, xi % 4);
            for (ci, row) in block.chunks_exact_mut(c_out).enumerate() {
                for (o, v) in row.iter_mut().enumerate() {
                    let g = &w[(o * c + ci) * 9..][..9];
                    // Row r of G g, then its product with column q of Gᵀ.
                    let gg = |s: usize| g_row(r, [g[s], g[3 + s], g[6 + s]]);
                    *v = g_row(q, [gg(0), gg(1), gg(2)]);
                }
            }
        });
    u
}

/// Row `r` of `G` = `[[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]` times `v`.
fn g_row(r: usize, v: [f32; 3]) -> f32 {
    match r {
        0 => v[0],
        1 => 0.5 * (v[0] + v[1] + v[2]),
        2 => 0.5 * (v[0] - v[1] + v[2]),
        _ => v[2],
    }
}

/// Tiles per block: rows enough for `gemm`, few enough that a block's transforms (`16 x 256 x
/// C` values) stay in cache between the three steps.
const BLOCK_TILES: usize = 256;

/// `V = Bᵀ d B` for tile `t` and every input channel of NHWC `xh` `[B, H, W, C]`, into `out`
/// `[16, C]` (zero outside the map: the padding); `bt` is scratch of the same size. Every step
/// adds or subtracts whole channel vectors, which the compiler vectorises.
fn input_transform(
    xh: &[f32],
    s: &Shape3x3,
    t: usize,
    zeros: &[f32],
    bt: &mut [f32],
    out: &mut [f32],
) {
    let c = s.c;
    let (bi, ti, tj) = s.tile(t);
    // The 16 channel vectors of the patch, rows 2ti-1.., columns 2tj-1...
    let d: [&[f32]; 16] = std::array::from_fn(|k| {
        let (y, x) = ((2 * ti + k / 4) as isize - 1, (2 * tj + k % 4) as isize - 1);
        s.pixel(xh, c, bi, y, x, zeros)
    });
    // Bᵀ d, row by row of the result: d0 - d2, d1 + d2, d2 - d1, d1 - d3.
    for (k, dst) in bt.chunks_exact_mut(c).enumerate() {
        let (r, q) = (k / 4, k % 4);
        let (a, b, sign) = match r {
            0 => (d[q], d[8 + q], -1.0),
            1 => (d[4 + q], d[8 + q], 1.0),
            2 => (d[8 + q], d[4 + q], -1.0),
            _ => (d[4 + q], d[12 + q], -1.0),
        };
        combine(dst, a, b, sign);
    }
    // (Bᵀ d) B: the same combination along each row.
    let x = |k: usize| &bt[k * c..][..c];
    for (k, dst) in out.chunks_exact_mut(c).enumerate() {
        let (r, q) = (4 * (k / 4), k % 4);
        let (a, b, sign) = match q {
            0 => (x(r), x(r + 2), -1.0),
            1 => (x(r + 1), x(r + 2), 1.0),
            2 => (x(r + 2), x(r + 1), -1.0),
            _ => (x(r + 1), x(r + 3), -1.0),
        };
        combine(dst, a, b, sign);
    }
}

/// `dst = a + sign * b`, elementwise (`sign` is 1 or -1: exact).
fn combine(dst: &mut [f32], a: &[f32], b: &[f32], sign: f32) {
    for ((o, &x), &y) in dst.iter_mut().zip(a).zip(b) {
        *o = x + sign * y;
    }
}

/// `Y = Aᵀ M A` plus `bias` `[C_out]` for tile `t` from `mt` `[16, C_out]` into `out`, the
/// NHWC `[.., W, C_out]` rows from output row `row0` on; `z` is scratch of `8 C_out`.
fn output_transform(
    mt: &[f32],
    s: &Shape3x3,
    t: usize,
    row0: usize,
    bias: &[f32],
    z: &mut [f32],
    out: &mut [f32],
) {
    let c = s.c_out;
    let (bi, ti, tj) = s.tile(t);
    let e = |k: usize| &mt[k * c..][..c];
    // Aᵀ M: rows m0 + m1 + m2 and m1 - m2 - m3, per column.
    for q in 0..4 {
        let (z0, z1) = z.split_at_mut(4 * c);
        let (m0, m1, m2, m3) = (e(q), e(4 + q), e(8 + q), e(12 + q));
        for o in 0..c {
            z0[q * c + o] = m0[o] + m1[o] + m2[o];
            z1[q * c + o] = m1[o] - m2[o] - m3[o];
        }
    }
    // (Aᵀ M) A: columns z0 + z1 + z2 and z1 - z2 - z3, for each output row.
    for r in 0..2 {
        if 2 * ti + r >= s.h {
            continue;
        }
        let zr = &z[r * 4 * c..][..4 * c];
        let (z0, z1, z2, z3) = (&zr[..c], &zr[c..2 * c], &zr[2 * c..3 * c], &zr[3 * c..]);
        let row = &mut out[((bi * s.h + 2 * ti + r) * s.w - row0 * s.w) * c..][..s.w * c];
        let left = &mut row[2 * tj * c..][..c];
        for o in 0..c {
            left[o] = z0[o] + z1[o] + z2[o] + bias[o];
        }
        if 2 * tj + 1 < s.w {
            let right = &mut row[(2 * tj + 1) * c..][..c];
            for o in 0..c {
                right[o] = z1[o] - z2[o] - z3[o] + bias[o];
            }
        }
    }
}

/// The 3x3, stride-1, padding-1 convolution of NHWC `x` `[B, H, W, C]` with `w`
/// `[C_out, C, 3, 3]`, plus `bias` where given, as NHWC `[B, H, W, C_out]`.
///
/// The tiles go in blocks of whole rows of tiles (whole images where an image has fewer than
/// a block takes); each block is transformed, multiplied (16 single-threaded products) and
/// transformed back by one task, into its own rows of the NHWC output, while its values are
/// still in cache. Blocks run in parallel.
pub(crate) fn conv3x3(x: &[f32], w: &[f32], bias: Option<&[f32]>, s: Shape3x3) -> Vec<f32> {
    let (c, c_out) = (s.c, s.c_out);
    let u = kernel_transform(w, c, c_out);
    let zeros = vec![0f32; c.max(c_out)];
    let bias = bias.unwrap_or(&zeros[..c_out]);
    let mut y = vec![0f32; s.b * s.h * s.w * c_out];
    // (first tile, tiles, first output row over the batch, the block's output rows): each
    // block's tiles cover whole output rows, contiguous in NHWC.
    let mut rest: &mut [f32] = &mut y;
    let mut blocks: Vec<(usize, usize, usize, &mut [f32])> = Vec::new();
    for (t0, n) in tile_blocks(&s) {
        let (bi, ti, _) = s.tile(t0);
        let row0 = bi * s.h + 2 * ti;
        let (bl, tl, _) = s.tile(t0 + n - 1);
        let rows = (bl * s.h + (2 * tl + 2).min(s.h)) - row0;
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(rows * s.w * c_out);
        rest = tail;
        blocks.push((t0, n, row0, mine));
    }
    let most = blocks.iter().map(|b| b.1).max().unwrap_or(0);
    let (v_len, m_len) = (most * 16 * c, most * 16 * c_out);
    blocks.into_par_iter().for_each(|(t0, n, row0, out)| {
        with_local_scratch(v_len + m_len + 16 * c.max(c_out), |buf| {
            let (v, rest) = buf.split_at_mut(v_len);
            let (m, tmp) = rest.split_at_mut(m_len);
            for (i, vt) in v.chunks_exact_mut(16 * c).take(n).enumerate() {
                input_transform(x, &s, t0 + i, &zeros[..c], &mut tmp[..16 * c], vt);
            }
            for xi in 0..16 {
                let lhs = Mat {
                    data: &v[xi * c..],
                    rows: n,
                    cols: c,
                    rs: 16 * c,
                    cs: 1,
                };
                let rhs = Mat::rows(&u[xi * c * c_out..][..c * c_out], c, c_out);
                matmul_serial(&mut m[xi * c_out..], 16 * c_out, lhs, rhs, false);
            }
            for (i, mt) in m.chunks_exact(16 * c_out).take(n).enumerate() {
                output_transform(mt, &s, t0 + i, row0, bias, &mut tmp[..8 * c_out], out);
            }
        })
    });
    y
}

/// The blocks of [`conv3x3`] as (first tile, tiles): whole rows of tiles, or whole images
/// where an image has fewer tiles than a block takes.
fn tile_blocks(s: &Shape3x3) -> Vec<(usize, usize)> {
    let (th, tw) = (s.tiles_h(), s.tiles_w());
    // At least 8 blocks where there are tiles enough, so that every core has work. The split
    // depends on the shape alone: the kernel gradient sums the blocks in this order.
    let target = s.tiles().div_ceil(8).clamp(32, BLOCK_TILES);
    if th * tw >= target {
        let bands = target.div_ceil(tw);
        (0..s.b)
            .flat_map(|bi| {
                (0..th)
                    .step_by(bands)
                    .map(move |ti| ((bi * th + ti) * tw, bands.min(th - ti) * tw))
            })
            .collect()
    } else {
        let images = target.div_ceil(th * tw);
        (0..s.b)
            .step_by(images)
            .map(|b0| (b0 * th * tw, images.min(s.b - b0) * th * tw))
            .collect()
    }
}

/// `A dY Aᵀ` (4x4) for tile `t` of NHWC `dyh` `[B, H, W, C_out]`, into `out` `[16, C_out]`;
/// outputs past the map's edge count as 0. `p` is scratch of `8 C_out`.
fn grad_transform(
    dyh: &[f32],
    s: &Shape3x3,
    t: usize,
    zeros: &[f32],
    p: &mut [f32],
    out: &mut [f32],
) {
    let c = s.c_out;
    let (bi, ti, tj) = s.tile(t);
    let e: [&[f32]; 4] = std::array::from_fn(|k| {
        let (y, x) = (2 * ti + k / 2, 2 * tj + k % 2);
        s.pixel(dyh, c, bi, y as isize, x as isize, zeros)
    });
    // A dY with A = [[1, 0], [1, 1], [1, -1], [0, -1]]: rows y0, y0 + y1, y0 - y1, -y1, per
    // column of dY.
    for (k, dst) in p.chunks_exact_mut(c).enumerate() {
        let (r, q) = (k / 2, k % 2);
        let (a, b) = (e[q], e[2 + q]);
        for o in 0..c {
            dst[o] = match r {
                0 => a[o],
                1 => a[o] + b[o],
                2 => a[o] - b[o],
                _ => -b[o],
            };
        }
    }
    // (A dY) Aᵀ: the same along each row.
    for (k, dst) in out.chunks_exact_mut(c).enumerate() {
        let (r, q) = (k / 4, k % 4);
        let (a, b) = (&p[2 * r * c..][..c], &p[(2 * r + 1) * c..][..c]);
        for o in 0..c {
            dst[o] = match q {
                0 => a[o],
                1 => a[o] + b[o],
                2 => a[o] - b[o],
                _ => -b[o],
            };
        }
    }
}

/// Row `i` of `Gᵀ` times `v`: the adjoint of [`g_row`].
fn gt_row(i: usize, v: [f32; 4]) -> f32 {
    match i {
        0 => v[0] + 0.5 * (v[1] + v[2]),
        1 => 0.5 * (v[1] - v[2]),
        _ => 0.5 * (v[1] + v[2]) + v[3],
    }
}

/// The kernel gradient `[C_out, C, 3, 3]` of [`conv3x3`] from its input `x` and output
/// gradient `dy` (both NHWC). The forward pass is `Y = Aᵀ (U ⊙ V) A` per tile with `U = G g Gᵀ`,
/// so `dU = Σ_tiles V ⊙ (A dY Aᵀ)` and `dg = Gᵀ dU G`. Each block's sum over its tiles is 16
/// products `Vᵀ [C, tiles] x [tiles, C_out]`, added into one of [`LANES`] partial sums by a
/// fixed rule; the lanes' sums are then added in order, so the result does not depend on the
/// thread count.
pub(crate) fn kernel_grad3x3(x: &[f32], dy: &[f32], s: Shape3x3) -> Vec<f32> {
    let (c, c_out) = (s.c, s.c_out);
    let blocks = tile_blocks(&s);
    let most = blocks.iter().map(|b| b.1).max().unwrap_or(0);
    let zeros = vec![0f32; c.max(c_out)];
    let size = 16 * c * c_out;
    // Block i adds into lane i % LANES; the lanes run in parallel, each over its blocks in
    // order, so every sum has the same order whatever the thread count.
    let lanes = blocks.len().min(LANES);
    let mut partial = vec![0f32; lanes * size];
    let (v_len, g_len) = (most * 16 * c, most * 16 * c_out);
    partial
        .par_chunks_mut(size)
        .enumerate()
        .for_each(|(lane, du)| {
            with_local_scratch(v_len + g_len + 16 * c.max(c_out), |buf| {
                let (v, rest) = buf.split_at_mut(v_len);
                let (g, tmp) = rest.split_at_mut(g_len);
                for (k, &(t0, n)) in blocks.iter().enumerate().skip(lane).step_by(lanes) {
                    for (i, vt) in v.chunks_exact_mut(16 * c).take(n).enumerate() {
                        input_transform(x, &s, t0 + i, &zeros[..c], &mut tmp[..16 * c], vt);
                    }
                    for (i, gt) in g.chunks_exact_mut(16 * c_out).take(n).enumerate() {
                        let p = &mut tmp[..8 * c_out];
                        grad_transform(dy, &s, t0 + i, &zeros[..c_out], p, gt);
                    }
                    for xi in 0..16 {
                        let lhs = Mat {
                            data: &v[xi * c..],
                            rows: c,
                            cols: n,
                            rs: 1,
                            cs: 16 * c,
                        };
                        let rhs = Mat {
                            data: &g[xi * c_out..],
                            rows: n,
                            cols: c_out,
                            rs: 16 * c_out,
                            cs: 1,
                        };
                        let dst = &mut du[xi * c * c_out..];
                        matmul_serial(dst, c_out, lhs, rhs, k >= lanes);
                    }
                }
            })
        });
    // dU: the lanes' sums added in order, in parallel over elements.
    let du = sum_lanes(&partial, size);
    drop(partial);
    // dg = Gᵀ dU G for every (output, input) channel pair, into [C_out, C, 3, 3].
    let mut dw = vec![0f32; c_out * c * 9];
    dw.par_chunks_mut(c * 9).enumerate().for_each(|(o, block)| {
        for (ci, k) in block.chunks_exact_mut(9).enumerate() {
            let e = |xi: usize| du[(xi * c + ci) * c_out + o];
            for i in 0..3 {
                // Row i of Gᵀ dU, then its product with column j of G.
                let row: [f32; 4] =
                    std::array::from_fn(|q| gt_row(i, [e(q), e(4 + q), e(8 + q), e(12 + q)]));
                for j in 0..3 {
                    k[i * 3 + j] = gt_row(j, row);
                }
            }
        }
    });
    dw
}

/// The kernel of the input gradient of a 3x3 padding-1 convolution: `w` `[C_out, C, 3, 3]`
/// with its channels swapped and each 3x3 turned by 180 degrees, `[C, C_out, 3, 3]`.
pub(crate) fn flipped_kernel(w: &[f32], c: usize, c_out: usize) -> Vec<f32> {
    let mut f = vec![0f32; w.len()];
    f.par_chunks_mut(c_out * 9)
        .enumerate()
        .for_each(|(ci, block)| {
            for (o, k) in block.chunks_exact_mut(9).enumerate() {
                let g = &w[(o * c + ci) * 9..][..9];
                for (i, v) in k.iter_mut().enumerate() {
                    *v = g[8 - i];
                }
            }
        });
    f
}
