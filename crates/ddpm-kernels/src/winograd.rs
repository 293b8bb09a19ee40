//! 3x3, stride-1, padding-1 convolutions by Winograd's minimal filtering F(m x m, 3x3) (Lavin
//! and Gray, "Fast Algorithms for Convolutional Neural Networks", 2015), for m = 2 ([`F2`])
//! and m = 4 ([`F4`]).
//!
//! Each m x m block of outputs (a tile) comes from the a x a input patch around it (a = m + 2):
//! the patch and the kernel are transformed (`V = Bᵀ d B`, `U = G g Gᵀ`), multiplied
//! elementwise and summed over input channels, and transformed back (`Y = Aᵀ M A`). Summing
//! over channels for one of the a² transform positions is a matrix product
//! `[tiles, C] x [C, C_out]`, so the work is a² `gemm` calls with a² multiplies per tile of m²
//! outputs where im2row needs 9 m²: 2.25x fewer for F(2x2, 3x3) (16 per 4 outputs), 4x fewer
//! for F(4x4, 3x3) (36 per 16). F(2x2, 3x3)'s transforms add and subtract only (G's halves
//! are exact), so its results differ from im2row's by float rounding alone; F(4x4, 3x3)'s
//! interpolation points 0, ±1, ±2 bring factors up to 8 into `Bᵀ` and `Aᵀ` and sixths into
//! `G`, which costs a few more bits of rounding (the tests hold both to 1e-4 of the largest
//! value, against candle's convolutions and against a direct sum here).
//!
//! Layouts: per block of tiles, `V` is `[tiles, a², C]` (the product for position `ξ` reads
//! its rows with stride `a² C`), `U` is `[C, a², C_out]` for the whole call (likewise), and `M` is
//! `[tiles, a², C_out]`. A block is transformed, multiplied and transformed back by one task
//! while it is in cache; the blocks run in parallel and write disjoint rows of the output, and
//! each block's arithmetic is the same whatever the thread count, so results are bitwise the
//! same for every thread count.

use rayon::prelude::*;

use crate::LANES;
use crate::frozen;
use crate::layout::sum_lanes;
use crate::matmul::{Mat, Scratch, matmul_serial, with_local_scratch, zeroed};

/// One Winograd algorithm F(M x M, 3x3): tiles of `M x M` outputs from `A x A` input patches
/// (`A = M + 2`), with its three transform matrices as constants, so that the transforms
/// compile to straight-line code with the zeros and ones folded away.
pub(crate) trait Tiling<const M: usize, const A: usize>: Sync {
    /// `Bᵀ` (`A x A`): `V = Bᵀ d B`.
    const BT: [[f32; A]; A];
    /// `G` (`A x 3`): `U = G g Gᵀ`.
    const G: [[f32; 3]; A];
    /// `Aᵀ` (`M x A`): `Y = Aᵀ M A`.
    const AT: [[f32; A]; M];
    /// Tiles per block: rows enough for `gemm`, few enough that a block's transforms
    /// (`A² x tiles x C` values) stay in cache between the three steps of the forward pass;
    /// the kernel gradient's blocks take at least this many.
    const BLOCK: usize;
}

/// F(2x2, 3x3), interpolation points 0, 1, -1 and infinity.
pub(crate) struct F2;

impl Tiling<2, 4> for F2 {
    const BT: [[f32; 4]; 4] = [
        [1., 0., -1., 0.],
        [0., 1., 1., 0.],
        [0., -1., 1., 0.],
        [0., 1., 0., -1.],
    ];
    const G: [[f32; 3]; 4] = [
        [1., 0., 0.],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0., 0., 1.],
    ];
    const AT: [[f32; 4]; 2] = [[1., 1., 1., 0.], [0., 1., -1., -1.]];
    const BLOCK: usize = 256;
}

/// F(4x4, 3x3), interpolation points 0, 1, -1, 2, -2 and infinity.
pub(crate) struct F4;

impl Tiling<4, 6> for F4 {
    const BT: [[f32; 6]; 6] = [
        [4., 0., -5., 0., 1., 0.],
        [0., -4., -4., 1., 1., 0.],
        [0., 4., -4., -1., 1., 0.],
        [0., -2., -1., 2., 1., 0.],
        [0., 2., -1., -2., 1., 0.],
        [0., 4., 0., -5., 0., 1.],
    ];
    const G: [[f32; 3]; 6] = [
        [1. / 4., 0., 0.],
        [-1. / 6., -1. / 6., -1. / 6.],
        [-1. / 6., 1. / 6., -1. / 6.],
        [1. / 24., 1. / 12., 1. / 6.],
        [1. / 24., -1. / 12., 1. / 6.],
        [0., 0., 1.],
    ];
    const AT: [[f32; 6]; 4] = [
        [1., 1., 1., 1., 1., 0.],
        [0., 1., -1., 2., -2., 0.],
        [0., 1., 1., 4., 4., 0.],
        [0., 1., -1., 8., -8., 1.],
    ];
    const BLOCK: usize = 64;
}

/// The transpose of a constant matrix.
const fn transpose<const R: usize, const C: usize>(m: [[f32; C]; R]) -> [[f32; R]; C] {
    let mut t = [[0f32; R]; C];
    let mut i = 0;
    while i < R {
        let mut j = 0;
        while j < C {
            t[j][i] = m[i][j];
            j += 1;
        }
        i += 1;
    }
    t
}

/// `Σ_j k[j] v[j]`, the terms in order from -0 (so that a sum of one term is that term),
/// zero coefficients skipped. With `k` a constant, the zeros and ones fold away.
#[inline(always)]
fn dot<const N: usize>(k: &[f32; N], v: [f32; N]) -> f32 {
    let mut acc = -0f32;
    for j in 0..N {
        if k[j] != 0.0 {
            acc += k[j] * v[j];
        }
    }
    acc
}

/// For every channel `o < c` and output `r < rows`:
/// `dst[at[r] + o] = Σ_j mat[r][j] src[j][o]` (plus `add[o]`), each output's terms in `j`
/// order. Runs in chunks of 8 channels so that the compiler vectorises it; with `mat` a
/// constant, its zeros and ones fold away.
#[inline(always)]
fn apply<const I: usize, const O: usize>(
    mat: &[[f32; I]; O],
    src: &[&[f32]; I],
    dst: &mut [f32],
    at: &[usize; O],
    rows: usize,
    add: Option<&[f32]>,
    c: usize,
) {
    let mut o = 0;
    while o + 8 <= c {
        let x: [&[f32; 8]; I] = std::array::from_fn(|j| src[j][o..o + 8].try_into().unwrap());
        // Every row is computed (so that `r` is a constant in each unrolled copy) and the
        // first `rows` are stored.
        for r in 0..O {
            let mut acc = [-0f32; 8];
            for j in 0..I {
                if mat[r][j] != 0.0 {
                    for l in 0..8 {
                        acc[l] += mat[r][j] * x[j][l];
                    }
                }
            }
            if let Some(add) = add {
                for l in 0..8 {
                    acc[l] += add[o + l];
                }
            }
            if r < rows {
                dst[at[r] + o..][..8].copy_from_slice(&acc);
            }
        }
        o += 8;
    }
    for o in o..c {
        let x: [f32; I] = std::array::from_fn(|j| src[j][o]);
        for r in 0..O.min(rows) {
            let v = dot(&mat[r], x);
            dst[at[r] + o] = add.map_or(v, |a| v + a[o]);
        }
    }
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
    /// Tiles of `m x m` outputs down and across one map.
    fn tiles_hw(&self, m: usize) -> (usize, usize) {
        (self.h.div_ceil(m), self.w.div_ceil(m))
    }

    /// Tiles of `m x m` outputs over the batch.
    fn tiles(&self, m: usize) -> usize {
        let (th, tw) = self.tiles_hw(m);
        self.b * th * tw
    }

    /// Tile `t` of `m x m` outputs as (image, tile row, tile column).
    fn tile(&self, m: usize, t: usize) -> (usize, usize, usize) {
        let (th, tw) = self.tiles_hw(m);
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

    /// Blocks of `m x m` tiles as (first tile, tiles), about `target` tiles each: whole rows
    /// of tiles, or whole images where an image has fewer tiles than that. Depends on the
    /// shape alone.
    fn tile_blocks(&self, m: usize, target: usize) -> Vec<(usize, usize)> {
        let (th, tw) = self.tiles_hw(m);
        if th * tw >= target {
            let bands = target.div_ceil(tw);
            (0..self.b)
                .flat_map(|bi| {
                    (0..th)
                        .step_by(bands)
                        .map(move |ti| ((bi * th + ti) * tw, bands.min(th - ti) * tw))
                })
                .collect()
        } else {
            let images = target.div_ceil(th * tw);
            (0..self.b)
                .step_by(images)
                .map(|b0| (b0 * th * tw, images.min(self.b - b0) * th * tw))
                .collect()
        }
    }
}

/// Which kernel a convolution's `U = G g Gᵀ` comes from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kernel<'a> {
    /// `[C_out, C, 3, 3]`, the forward pass's.
    Forward(&'a [f32]),
    /// The input gradient's: the forward kernel `[C, C_out, 3, 3]` of the convolution whose
    /// input gradient this is, read with its channels swapped and each 3x3 turned by 180
    /// degrees (so no flipped copy is written).
    Flipped(&'a [f32]),
}

impl Kernel<'_> {
    /// The 3x3 from input channel `ci` to output channel `o`, row-major.
    #[inline(always)]
    fn taps(&self, ci: usize, o: usize, c: usize, c_out: usize) -> [f32; 9] {
        match *self {
            Kernel::Forward(w) => w[(o * c + ci) * 9..][..9].try_into().unwrap(),
            Kernel::Flipped(w) => {
                let g = &w[(ci * c_out + o) * 9..][..9];
                std::array::from_fn(|k| g[8 - k])
            }
        }
    }
}

/// `U = G g Gᵀ` for every (input, output) channel pair, into `u` `[C, A², C_out]`: position
/// `ξ`'s `[C, C_out]` matrix has row stride `A² C_out`. In parallel over blocks of 8 input
/// channels; each block walks the output channels 16 at a time, so that `u`'s writes are
/// whole cache lines and the arithmetic runs on 16 lanes.
fn kernel_transform<T: Tiling<M, A>, const M: usize, const A: usize>(
    kernel: Kernel<'_>,
    c: usize,
    c_out: usize,
    u: &mut [f32],
) {
    const OUTS: usize = 16;
    const INS: usize = 8;
    let pp = A * A;
    assert!(pp <= MOST_POSITIONS, "A is at most 6");
    u.par_chunks_mut(INS * pp * c_out)
        .enumerate()
        .for_each(|(blk, block)| {
            let ins = block.len() / (pp * c_out);
            // U for the block's input channels and 16 output channels, `[INS, A², OUTS]`.
            let mut vals = [[[0f32; OUTS]; MOST_POSITIONS]; INS];
            for o0 in (0..c_out).step_by(OUTS) {
                let outs = OUTS.min(c_out - o0);
                // The kernels' taps by tap, `[INS, 9, OUTS]`, read along the kernel's adjacent
                // values (a forward kernel's are adjacent along the input channels, a flipped
                // one's along the output channels).
                let mut taps = [[[0f32; OUTS]; 9]; INS];
                let mut gather = |il: usize, j: usize| {
                    let g = kernel.taps(blk * INS + il, o0 + j, c, c_out);
                    for (k, t) in g.into_iter().enumerate() {
                        taps[il][k][j] = t;
                    }
                };
                match kernel {
                    Kernel::Forward(_) => {
                        (0..outs).for_each(|j| (0..ins).for_each(|il| gather(il, j)))
                    }
                    Kernel::Flipped(_) => {
                        (0..ins).for_each(|il| (0..outs).for_each(|j| gather(il, j)))
                    }
                }
                // U for 16 output channels at once.
                for (vals, g) in vals.iter_mut().zip(&taps).take(ins) {
                    for (r, gr) in T::G.iter().enumerate() {
                        // Row r of G g, then its products with the rows of G.
                        let gg: [[f32; OUTS]; 3] = std::array::from_fn(|s| {
                            std::array::from_fn(|j| {
                                gr[0] * g[s][j] + gr[1] * g[3 + s][j] + gr[2] * g[6 + s][j]
                            })
                        });
                        for (q, gq) in T::G.iter().enumerate() {
                            vals[r * A + q] = std::array::from_fn(|j| {
                                gq[0] * gg[0][j] + gq[1] * gg[1][j] + gq[2] * gg[2][j]
                            });
                        }
                    }
                }
                for (rows, v) in block.chunks_exact_mut(pp * c_out).zip(&vals) {
                    for (xi, v) in v.iter().take(pp).enumerate() {
                        rows[xi * c_out + o0..][..outs].copy_from_slice(&v[..outs]);
                    }
                }
            }
        });
}

/// `mat D matᵀ` (`O x O`) for the `I x I` channel vectors `D`, given by column
/// (`columns[q][i]` is `D[i][q]`), into `out` `[O², c]`: `mat D` a column at a time into `tmp`
/// (`[O, I, c]`), then `(mat D) matᵀ` a row at a time.
#[inline(always)]
fn sandwich<const I: usize, const O: usize>(
    mat: &[[f32; I]; O],
    columns: &[[&[f32]; I]; I],
    tmp: &mut [f32],
    out: &mut [f32],
    c: usize,
) {
    for (q, column) in columns.iter().enumerate() {
        let at = std::array::from_fn(|r| (r * I + q) * c);
        apply(mat, column, tmp, &at, O, None, c);
    }
    for r in 0..O {
        let src = std::array::from_fn(|j| &tmp[(r * I + j) * c..][..c]);
        let at = std::array::from_fn(|q| (r * O + q) * c);
        apply(mat, &src, out, &at, O, None, c);
    }
}

/// Position `xi`'s values of an `[n, A², ch]` array (a block's transforms over `n` tiles, or
/// `U` over `n` input channels), as a strided `[n, ch]` matrix.
fn at_position<const A: usize>(data: &[f32], xi: usize, n: usize, ch: usize) -> Mat<'_> {
    Mat {
        data: &data[xi * ch..],
        rows: n,
        cols: ch,
        rs: A * A * ch,
        cs: 1,
    }
}

/// `V = Bᵀ d B` for tile `t` and every input channel of NHWC `xh` `[B, H, W, C]`, into `out`
/// `[A², C]` (zero outside the map: the padding); `tmp` is scratch of the same size.
fn input_transform<T: Tiling<M, A>, const M: usize, const A: usize>(
    xh: &[f32],
    s: &Shape3x3,
    t: usize,
    zeros: &[f32],
    tmp: &mut [f32],
    out: &mut [f32],
) {
    let c = s.c;
    let (bi, ti, tj) = s.tile(M, t);
    // The A² channel vectors of the patch, rows M ti - 1.., columns M tj - 1..., by column.
    let columns: [[&[f32]; A]; A] = std::array::from_fn(|j| {
        std::array::from_fn(|i| {
            let (y, x) = ((M * ti + i) as isize - 1, (M * tj + j) as isize - 1);
            s.pixel(xh, c, bi, y, x, zeros)
        })
    });
    sandwich(&T::BT, &columns, tmp, out, c);
}

/// `Y = Aᵀ M A` plus `bias` `[C_out]` for tile `t` from `mt` `[A², C_out]` into `out`, the
/// NHWC `[.., W, C_out]` rows from output row `row0` on; `z` is scratch of `M A C_out`.
#[allow(clippy::too_many_arguments)]
fn output_transform<T: Tiling<M, A>, const M: usize, const A: usize>(
    mt: &[f32],
    s: &Shape3x3,
    t: usize,
    row0: usize,
    bias: &[f32],
    z: &mut [f32],
    out: &mut [f32],
) {
    let c = s.c_out;
    let (bi, ti, tj) = s.tile(M, t);
    // Aᵀ M, a column at a time.
    for q in 0..A {
        let src = std::array::from_fn(|i| &mt[(i * A + q) * c..][..c]);
        let at = std::array::from_fn(|r| (r * A + q) * c);
        apply(&T::AT, &src, z, &at, M, None, c);
    }
    // (Aᵀ M) A, a row at a time, into the map's pixels (those past its edge dropped).
    let cols = M.min(s.w - M * tj);
    for r in 0..M.min(s.h - M * ti) {
        let src = std::array::from_fn(|q| &z[(r * A + q) * c..][..c]);
        let row = &mut out[((bi * s.h + M * ti + r) * s.w - row0 * s.w) * c..][..s.w * c];
        let at = std::array::from_fn(|p| (M * tj + p) * c);
        apply(&T::AT, &src, row, &at, cols, Some(bias), c);
    }
}

/// `A dY Aᵀ` (`A x A`) for tile `t` of NHWC `dyh` `[B, H, W, C_out]`, into `out`
/// `[A², C_out]`; outputs past the map's edge count as 0. `p` is scratch of `A M C_out`.
fn grad_transform<T: Tiling<M, A>, const M: usize, const A: usize>(
    dyh: &[f32],
    s: &Shape3x3,
    t: usize,
    zeros: &[f32],
    p: &mut [f32],
    out: &mut [f32],
) {
    let c = s.c_out;
    let (bi, ti, tj) = s.tile(M, t);
    let a: [[f32; M]; A] = const { transpose(T::AT) };
    // The output gradient's M² channel vectors, by column.
    let columns: [[&[f32]; M]; M] = std::array::from_fn(|j| {
        std::array::from_fn(|i| {
            let (y, x) = (M * ti + i, M * tj + j);
            s.pixel(dyh, c, bi, y as isize, x as isize, zeros)
        })
    });
    sandwich(&a, &columns, p, out, c);
}

/// The 3x3, stride-1, padding-1 convolution of NHWC `x` `[B, H, W, C]` with `w`
/// `[C_out, C, 3, 3]`, plus `bias` where given, as NHWC `[B, H, W, C_out]`, by tiling `T`.
/// With `keep`, the transformed kernel is kept for later calls inside
/// [`crate::with_frozen_weights`] (forward passes; an input gradient's flipped kernel is new
/// on every call).
///
/// The tiles go in blocks of whole rows of tiles (whole images where an image has fewer than
/// a block takes); each block is transformed, multiplied (A² single-threaded products) and
/// transformed back by one task, into its own rows of the NHWC output, while its values are
/// still in cache. Blocks run in parallel.
fn conv3x3_by<T: Tiling<M, A>, const M: usize, const A: usize>(
    x: &[f32],
    kernel: Kernel<'_>,
    bias: Option<&[f32]>,
    s: Shape3x3,
    keep: bool,
) -> Vec<f32> {
    let (c, c_out, pp) = (s.c, s.c_out, A * A);
    // U into a kept vector inside a frozen scope (computed only when not kept already), else
    // into scratch.
    let transform = |u: &mut [f32]| kernel_transform::<T, M, A>(kernel, c, c_out, u);
    let (mut fresh, kept);
    let u: &[f32] = match kernel {
        Kernel::Forward(w) if keep && frozen::active() => {
            kept = frozen::kept(A, w, || {
                let mut u = vec![0f32; pp * c * c_out];
                transform(&mut u);
                u
            });
            &kept
        }
        _ => {
            fresh = Scratch::new(pp * c * c_out);
            transform(&mut fresh);
            &fresh
        }
    };
    let zeros = vec![0f32; c.max(c_out)];
    let bias = bias.unwrap_or(&zeros[..c_out]);
    let mut y = zeroed(s.b * s.h * s.w * c_out);
    // M for position xi of `n` tiles, `V [n, C] x U [C, C_out]`, into `dst` (row stride
    // `rs`).
    let product = |xi: usize, n: usize, v: &[f32], dst: &mut [f32], rs: usize| {
        let rhs = at_position::<A>(u, xi, c, c_out);
        matmul_serial(dst, rs, at_position::<A>(v, xi, n, c), rhs, false);
    };
    let tiles = s.tiles(M);
    if tiles < FEW_TILES {
        // Few tiles: one block, whose transforms run in parallel over tiles and whose
        // products run in parallel over positions, each `[tiles, C] x [C, C_out]` (blocks
        // would make products of a few dozen rows, each packing U's block anew).
        let mut v = Scratch::new(tiles * pp * c);
        v.par_chunks_mut(pp * c).enumerate().for_each(|(t, vt)| {
            with_local_scratch(pp * c, |tmp| {
                input_transform::<T, M, A>(x, &s, t, &zeros[..c], tmp, vt);
            })
        });
        // M as [A², tiles, C_out]; each tile's values then gathered as [A², C_out].
        let mut m = Scratch::new(pp * tiles * c_out);
        m.par_chunks_mut(tiles * c_out)
            .enumerate()
            .for_each(|(xi, dst)| {
                product(xi, tiles, &v, dst, c_out);
            });
        let per_image = tiles / s.b.max(1);
        y.par_chunks_mut(s.h * s.w * c_out)
            .enumerate()
            .for_each(|(bi, out)| {
                with_local_scratch(2 * pp * c_out, |buf| {
                    let (mt, tmp) = buf.split_at_mut(pp * c_out);
                    for t in bi * per_image..(bi + 1) * per_image {
                        for (xi, dst) in mt.chunks_exact_mut(c_out).enumerate() {
                            dst.copy_from_slice(&m[(xi * tiles + t) * c_out..][..c_out]);
                        }
                        output_transform::<T, M, A>(mt, &s, t, bi * s.h, bias, tmp, out);
                    }
                })
            });
        return y;
    }
    // At least 8 blocks where there are tiles enough, so that every core has work.
    let target = tiles.div_ceil(8).clamp(T::BLOCK / 8, T::BLOCK);
    // (first tile, tiles, first output row over the batch, the block's output rows): each
    // block's tiles cover whole output rows, contiguous in NHWC.
    let mut rest: &mut [f32] = &mut y;
    let mut blocks: Vec<(usize, usize, usize, &mut [f32])> = Vec::new();
    for (t0, n) in s.tile_blocks(M, target) {
        let (bi, ti, _) = s.tile(M, t0);
        let row0 = bi * s.h + M * ti;
        let (bl, tl, _) = s.tile(M, t0 + n - 1);
        let rows = (bl * s.h + (M * tl + M).min(s.h)) - row0;
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(rows * s.w * c_out);
        rest = tail;
        blocks.push((t0, n, row0, mine));
    }
    let most = blocks.iter().map(|b| b.1).max().unwrap_or(0);
    let (v_len, m_len) = (most * pp * c, most * pp * c_out);
    blocks.into_par_iter().for_each(|(t0, n, row0, out)| {
        with_local_scratch(v_len + m_len + pp * c.max(c_out), |buf| {
            let (v, rest) = buf.split_at_mut(v_len);
            let (m, tmp) = rest.split_at_mut(m_len);
            for (i, vt) in v.chunks_exact_mut(pp * c).take(n).enumerate() {
                input_transform::<T, M, A>(x, &s, t0 + i, &zeros[..c], tmp, vt);
            }
            for xi in 0..pp {
                product(xi, n, v, &mut m[xi * c_out..], pp * c_out);
            }
            for (i, mt) in m.chunks_exact(pp * c_out).take(n).enumerate() {
                output_transform::<T, M, A>(mt, &s, t0 + i, row0, bias, tmp, out);
            }
        })
    });
    y
}

/// The kernel gradient `[C_out, C, 3, 3]` of [`conv3x3_by`] from its input `x` and output
/// gradient `dy` (both NHWC). The forward pass is `Y = Aᵀ (U ⊙ V) A` per tile with
/// `U = G g Gᵀ`, so `dU = Σ_tiles V ⊙ (A dY Aᵀ)` and `dg = Gᵀ dU G`.
///
/// The tiles go in blocks large enough that a block's transforms outweigh `dU` (which each
/// block reads and writes): each block's sum over its tiles is A² products
/// `Vᵀ [C, tiles] x [tiles, C_out]`, added into one of [`LANES`] partial sums by a fixed rule,
/// and the lanes' sums are then added in order. Where that leaves one block (few tiles, many
/// channels), the products for the A² positions run in parallel instead. Either way the
/// result does not depend on the thread count.
fn kernel_grad3x3_by<T: Tiling<M, A>, const M: usize, const A: usize>(
    x: &[f32],
    dy: &[f32],
    s: Shape3x3,
) -> Vec<f32> {
    let (c, c_out, pp) = (s.c, s.c_out, A * A);
    assert!(pp <= MOST_POSITIONS, "A is at most 6");
    let target = T::BLOCK.max(4 * c * c_out / (c + c_out));
    let blocks = s.tile_blocks(M, target);
    let most = blocks.iter().map(|b| b.1).max().unwrap_or(0);
    let zeros = vec![0f32; c.max(c_out)];
    // dU as [A², C_out, C], each position's matrix followed by `GAP` unused values: with
    // `C C_out` a multiple of 4096 bytes, the A² rows that `dg` reads at once would otherwise
    // share one set of every cache level and evict each other.
    let stride = c * c_out + GAP;
    let size = pp * stride;
    let (v_len, g_len) = (most * pp * c, most * pp * c_out);
    // The block's transforms: V [tiles, A², C] and A dY Aᵀ [tiles, A², C_out].
    let transforms = |t0: usize, n: usize, v: &mut [f32], g: &mut [f32], tmp: &mut [f32]| {
        for (i, vt) in v.chunks_exact_mut(pp * c).take(n).enumerate() {
            input_transform::<T, M, A>(x, &s, t0 + i, &zeros[..c], tmp, vt);
        }
        for (i, gt) in g.chunks_exact_mut(pp * c_out).take(n).enumerate() {
            grad_transform::<T, M, A>(dy, &s, t0 + i, &zeros[..c_out], tmp, gt);
        }
    };
    // dU for position xi from the block's transforms, into `dst` `[C_out, C]`.
    let product = |xi: usize, n: usize, v: &[f32], g: &[f32], dst: &mut [f32], acc: bool| {
        let lhs = at_position::<A>(g, xi, n, c_out).t();
        let rhs = at_position::<A>(v, xi, n, c);
        matmul_serial(dst, c, lhs, rhs, acc);
    };
    let du = if blocks.len() < 2 {
        let mut v = Scratch::new(v_len);
        let mut g = Scratch::new(g_len);
        let tiles = s.tiles(M);
        v.par_chunks_mut(pp * c)
            .zip(g.par_chunks_mut(pp * c_out))
            .enumerate()
            .for_each(|(t, (vt, gt))| {
                with_local_scratch(pp * c.max(c_out), |tmp| {
                    transforms(t, 1, vt, gt, tmp);
                })
            });
        let mut du = zeroed(size);
        du.par_chunks_mut(stride)
            .enumerate()
            .for_each(|(xi, dst)| product(xi, tiles, &v, &g, dst, false));
        du
    } else {
        // Block i adds into lane i % LANES; the lanes run in parallel, each over its blocks
        // in order, so every sum has the same order whatever the thread count.
        let lanes = blocks.len().min(LANES);
        let mut partial = zeroed(lanes * size);
        partial
            .par_chunks_mut(size)
            .enumerate()
            .for_each(|(lane, du)| {
                with_local_scratch(v_len + g_len + pp * c.max(c_out), |buf| {
                    let (v, rest) = buf.split_at_mut(v_len);
                    let (g, tmp) = rest.split_at_mut(g_len);
                    for (k, &(t0, n)) in blocks.iter().enumerate().skip(lane).step_by(lanes) {
                        transforms(t0, n, v, g, tmp);
                        for xi in 0..pp {
                            product(xi, n, v, g, &mut du[xi * stride..], k >= lanes);
                        }
                    }
                })
            });
        // The lanes' sums added in order, in parallel over elements.
        sum_lanes(&partial, size)
    };
    // dg = Gᵀ dU G for every (output, input) channel pair, into `[C_out, C, 3, 3]`: per
    // output channel, the A² rows of dU it reads are runs along the input channels.
    let gt: [[f32; A]; 3] = const { transpose(T::G) };
    let mut dw = zeroed(c_out * c * 9);
    dw.par_chunks_mut(c * 9).enumerate().for_each(|(o, block)| {
        // 16 input channels at a time: their A² values of dU, `[A², 16]`, give their 3x3s.
        const LANE: usize = 16;
        let mut e = [[0f32; LANE]; MOST_POSITIONS];
        for (ch, k) in block.chunks_mut(9 * LANE).enumerate() {
            let (ci, n) = (ch * LANE, k.len() / 9);
            for (xi, e) in e.iter_mut().take(pp).enumerate() {
                e[..n].copy_from_slice(&du[xi * stride + o * c + ci..][..n]);
            }
            for i in 0..3 {
                // Row i of Gᵀ dU, then its product with column j of G.
                let row: [[f32; LANE]; A] = std::array::from_fn(|q| {
                    std::array::from_fn(|l| dot(&gt[i], std::array::from_fn(|r| e[r * A + q][l])))
                });
                for j in 0..3 {
                    let tap: [f32; LANE] =
                        std::array::from_fn(|l| dot(&gt[j], std::array::from_fn(|q| row[q][l])));
                    for (l, v) in tap.iter().take(n).enumerate() {
                        k[l * 9 + i * 3 + j] = *v;
                    }
                }
            }
        }
    });
    dw
}

/// The tiling that runs a convolution's forward pass (or its input gradient, the same shape
/// with the channels swapped), if Winograd's is the faster path for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Choice {
    F2,
    F4,
}

/// The most transform positions of a tiling, A² for F(4x4, 3x3): the size of the fixed
/// arrays that hold one value per position.
const MOST_POSITIONS: usize = 36;

/// Values left unused after each position's matrix in a kernel gradient's `dU`, so that the
/// positions' rows fall in different cache sets.
const GAP: usize = 16;

/// Below this many tiles, a forward pass runs as one block with its products in parallel over
/// positions.
const FEW_TILES: usize = 256;

/// F(4x4, 3x3) where it makes 256+ tiles, else F(2x2, 3x3) where that makes 128+; never for
/// fewer than 16 channels on either side. Both U (`A² C C_out`, written and then packed by
/// `gemm` for every block) and the products' shortest side grow costly next to the products
/// with few tiles. Measured per layer on a 2-core x86 machine (`cargo run --release -p
/// ddpm-kernels --example layers [seed]`, alternating builds): F(2x2, 3x3) forward 1.2-2.2x
/// faster than im2row on every 3x3 layer of the small seed model at batch 64; F(4x4, 3x3)
/// faster again on maps of 8x8 and up there (e.g. 128 -> 128 over 16x16 maps 18-22 -> 12-15
/// ms), but slower with under 256 tiles (the seed model's 256 -> 512 channels over 16x16 maps
/// at batch 8, 128 tiles: 26 -> 39 ms).
fn choose(s: &Shape3x3) -> Option<Choice> {
    if s.c.min(s.c_out) < 16 {
        None
    } else if s.tiles(4) >= FEW_TILES {
        Some(Choice::F4)
    } else if s.tiles(2) >= FEW_TILES / 2 {
        Some(Choice::F2)
    } else {
        None
    }
}

/// Whether the Winograd path is the faster one for `s`.
pub(crate) fn pays_off(s: &Shape3x3) -> bool {
    choose(s).is_some()
}

/// The convolution of [`conv3x3_by`] by the tiling that suits `s` (one that
/// [`pays_off`]).
pub(crate) fn conv3x3(
    x: &[f32],
    kernel: Kernel<'_>,
    bias: Option<&[f32]>,
    s: Shape3x3,
    keep: bool,
) -> Vec<f32> {
    match choose(&s) {
        Some(Choice::F4) => conv3x3_by::<F4, 4, 6>(x, kernel, bias, s, keep),
        _ => conv3x3_by::<F2, 2, 4>(x, kernel, bias, s, keep),
    }
}

/// The kernel gradient of [`kernel_grad3x3_by`] by the tiling that suits `s`: F(4x4, 3x3)
/// on maps of 16x16 and up with 256+ tiles, else F(2x2, 3x3). On smaller maps the gradient's
/// `dU` (`A² C C_out`, summed in lanes) outweighs the tiles: measured at batch 64, 512 -> 128
/// channels over 4x4 maps took 11-14 ms by F(2x2, 3x3) and 17-24 ms by F(4x4, 3x3), while 64
/// -> 64 over 32x32 took 28-37 ms and 17-20 ms.
pub(crate) fn kernel_grad3x3(x: &[f32], dy: &[f32], s: Shape3x3) -> Vec<f32> {
    if s.h.min(s.w) >= 16 && s.tiles(4) >= FEW_TILES {
        kernel_grad3x3_by::<F4, 4, 6>(x, dy, s)
    } else {
        kernel_grad3x3_by::<F2, 2, 4>(x, dy, s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.5 - 1.0)
            .collect()
    }

    /// Calls `f(at, g, tap)` for every output pixel and each of its 3x3 taps inside the map, in
    /// order: `at` and `g` are the NHWC offsets of the input pixel the tap reads (`C` values)
    /// and of the output pixel (`C_out` values), `tap` is `3 ky + kx`.
    fn for_each_tap(s: &Shape3x3, mut f: impl FnMut(usize, usize, usize)) {
        for bi in 0..s.b {
            for yy in 0..s.h {
                for xx in 0..s.w {
                    let g = ((bi * s.h + yy) * s.w + xx) * s.c_out;
                    for (i, j) in (0..3).flat_map(|i| (0..3).map(move |j| (i, j))) {
                        let (py, px) = (yy as isize + i as isize - 1, xx as isize + j as isize - 1);
                        if py < 0 || px < 0 || py as usize >= s.h || px as usize >= s.w {
                            continue;
                        }
                        let at = ((bi * s.h + py as usize) * s.w + px as usize) * s.c;
                        f(at, g, i * 3 + j);
                    }
                }
            }
        }
    }

    /// The direct 3x3 padding-1 convolution of NHWC `x` with `w` `[C_out, C, 3, 3]`, NHWC out,
    /// summed in f64.
    fn direct(x: &[f32], w: &[f32], bias: &[f32], s: &Shape3x3) -> Vec<f32> {
        let mut y: Vec<f64> = (0..s.b * s.h * s.w)
            .flat_map(|_| bias.iter().map(|&v| v as f64))
            .collect();
        for_each_tap(s, |at, g, tap| {
            for o in 0..s.c_out {
                for ci in 0..s.c {
                    y[g + o] += (x[at + ci] * w[(o * s.c + ci) * 9 + tap]) as f64;
                }
            }
        });
        y.into_iter().map(|v| v as f32).collect()
    }

    /// The direct kernel gradient of [`direct`] for output gradient `dy`.
    fn direct_kernel_grad(x: &[f32], dy: &[f32], s: &Shape3x3) -> Vec<f32> {
        let mut dw = vec![0f64; s.c_out * s.c * 9];
        for_each_tap(s, |at, g, tap| {
            for o in 0..s.c_out {
                for ci in 0..s.c {
                    dw[(o * s.c + ci) * 9 + tap] += (dy[g + o] * x[at + ci]) as f64;
                }
            }
        });
        dw.into_iter().map(|v| v as f32).collect()
    }

    /// The direct input gradient of [`direct`] for output gradient `dy`.
    fn direct_input_grad(w: &[f32], dy: &[f32], s: &Shape3x3) -> Vec<f32> {
        let mut dx = vec![0f64; s.b * s.h * s.w * s.c];
        for_each_tap(s, |at, g, tap| {
            for o in 0..s.c_out {
                for ci in 0..s.c {
                    dx[at + ci] += (dy[g + o] * w[(o * s.c + ci) * 9 + tap]) as f64;
                }
            }
        });
        dx.into_iter().map(|v| v as f32).collect()
    }

    fn assert_close(what: &str, ours: &[f32], reference: &[f32]) {
        let scale = reference.iter().fold(1f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * scale,
                "{what}: element {i}: {a} vs {b} (largest value {scale})"
            );
        }
    }

    /// Both tilings against the direct sums, forward and both gradients, on odd sizes (tiles
    /// cut by the map's edge), several blocks of rows and of whole images, one image and
    /// channel counts that are not multiples of 8. The kernel gradient's shapes include both
    /// its paths: lanes over several blocks, and one block with the positions in parallel.
    #[test]
    fn both_tilings_match_the_direct_sums() {
        for (b, c, c_out, h, w) in [
            (1, 3, 5, 7, 9),
            (2, 16, 8, 10, 6),
            (4, 9, 12, 18, 18),
            (9, 4, 4, 18, 17),
            (1, 24, 17, 5, 5),
        ] {
            let s = Shape3x3 { b, c, c_out, h, w };
            let x = values(b * h * w * c, 1);
            let wt = values(c_out * c * 9, 2);
            let bias = values(c_out, 3);
            let dy = values(b * h * w * c_out, 4);
            let y = direct(&x, &wt, &bias, &s);
            let dw = direct_kernel_grad(&x, &dy, &s);
            let dx = direct_input_grad(&wt, &dy, &s);
            // The input gradient: the same-size convolution of dy by the flipped kernel.
            let swapped = Shape3x3 {
                c: c_out,
                c_out: c,
                ..s
            };
            let what = format!("b{b} {c}->{c_out} {h}x{w}");
            assert_close(
                &format!("F2 forward {what}"),
                &conv3x3_by::<F2, 2, 4>(&x, Kernel::Forward(&wt), Some(&bias), s, false),
                &y,
            );
            assert_close(
                &format!("F4 forward {what}"),
                &conv3x3_by::<F4, 4, 6>(&x, Kernel::Forward(&wt), Some(&bias), s, false),
                &y,
            );
            assert_close(
                &format!("F2 input gradient {what}"),
                &conv3x3_by::<F2, 2, 4>(&dy, Kernel::Flipped(&wt), None, swapped, false),
                &dx,
            );
            assert_close(
                &format!("F4 input gradient {what}"),
                &conv3x3_by::<F4, 4, 6>(&dy, Kernel::Flipped(&wt), None, swapped, false),
                &dx,
            );
            assert_close(
                &format!("F2 kernel gradient {what}"),
                &kernel_grad3x3_by::<F2, 2, 4>(&x, &dy, s),
                &dw,
            );
            assert_close(
                &format!("F4 kernel gradient {what}"),
                &kernel_grad3x3_by::<F4, 4, 6>(&x, &dy, s),
                &dw,
            );
        }
    }

    /// The transform matrices: `Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A` is the 3x3 correlation of every
    /// `A x A` patch `d` with `g`, checked here in one dimension (the 2D form is its square).
    #[test]
    fn transforms_compute_a_correlation() {
        fn check<T: Tiling<M, A>, const M: usize, const A: usize>() {
            let d: [f32; A] = std::array::from_fn(|i| (i as f32 * 0.7).sin());
            let g = [0.3f32, -1.1, 0.6];
            let u: [f32; A] = std::array::from_fn(|r| dot(&T::G[r], g));
            let v: [f32; A] = std::array::from_fn(|r| dot(&T::BT[r], d));
            let m: [f32; A] = std::array::from_fn(|k| u[k] * v[k]);
            for (p, at) in T::AT.iter().enumerate() {
                let y = dot(at, m);
                let direct = g[0] * d[p] + g[1] * d[p + 1] + g[2] * d[p + 2];
                assert!(
                    (y - direct).abs() < 1e-5,
                    "F{M} output {p}: {y} vs {direct}"
                );
            }
        }
        check::<F2, 2, 4>();
        check::<F4, 4, 6>();
    }
}
