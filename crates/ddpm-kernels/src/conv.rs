//! `conv2d` and `conv_transpose2d` with bias as candle custom ops: im2row / row2im around
//! large `gemm` products, in blocks of images, with Winograd for wide 3x3 convolutions (see
//! the crate documentation).

use rayon::prelude::*;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use crate::layout::{
    Geometry, channel_sums_nhwc, im2row, im2row_serial, kernel_from_rows, kernel_to_columns,
    kernel_to_rows, nchw_to_nhwc, nhwc_to_nchw, row2im, row2im_serial, sum_lanes, transpose,
};
use crate::matmul::{Mat, Scratch, matmul, matmul_serial, with_local_scratch, zeroed};
use crate::ops::{contiguous_f32, tensor, with_data};
use crate::winograd;

/// `conv2d` with bias: the geometry of the input side, the output channels and the layout of
/// input and output.
struct Conv2d {
    g: Geometry,
    c_out: usize,
    nhwc: bool,
}

/// `conv_transpose2d` with bias: the geometry of the *output* side (the forward pass of this
/// op is the backward pass of a `conv2d` on that side), the input channels and the layout.
struct ConvTranspose2d {
    g: Geometry,
    c_in: usize,
    nhwc: bool,
}

/// What a convolution op computes on plain slices; [`Op`] makes any of them a candle op.
/// Both convolutions compute channels-last; their NCHW forms transpose around that.
trait Passes {
    /// The op's name in candle's graph.
    const NAME: &'static str;

    /// `[C, H, W]` of the input, the kernel's shape and the bias length.
    fn operand_dims(&self) -> ([usize; 3], [usize; 4], usize);

    /// `[C, H, W]` of the output.
    fn out_dims(&self) -> [usize; 3];

    /// Whether input and output are NHWC (else NCHW).
    fn nhwc(&self) -> bool;

    /// The NHWC output from the NHWC input, the kernel and the bias of a batch of `b`.
    fn forward(&self, x: &[f32], w: &[f32], bias: &[f32], b: usize) -> Vec<f32>;

    /// `(dx, dw, db)` from the NHWC input, the kernel and the NHWC output gradient.
    fn backward(&self, x: &[f32], w: &[f32], dy: &[f32], b: usize) -> [Vec<f32>; 3];
}

/// Output positions per block of images in the im2row passes: rows enough for `gemm`, few
/// enough that a block's rows (`positions x k*k*C`) stay in cache between being written and
/// multiplied.
const BLOCK_ROWS: usize = 256;

/// Images per block for maps of `l` positions in a batch of `b`, where blocks pay: at least
/// [`BLOCK_ROWS`] positions each, but at least 8 blocks where the batch allows. `None` where
/// that leaves one block, or where a block's rows (`positions x k*k*C`) are less than twice
/// the kernel (`k*k*C x width`, `width` its other side): `gemm` packs the kernel anew for
/// every block's products, and the kernel gradient's lanes read and write its size per block,
/// which then costs more than the cache saves (measured per layer: 256 -> 256 channels 4x4
/// stride 2 over 8x8 maps at batch 64 ran 1.6x slower blocked, 64 -> 64 over 32x32 1.3x
/// faster). Depends on the shape alone.
fn blocking(b: usize, l: usize, width: usize) -> Option<usize> {
    let per = BLOCK_ROWS.div_ceil(l.max(1)).min(b.div_ceil(8)).max(1);
    (b.div_ceil(per) >= 2 && per * l >= 2 * width).then_some(per)
}

/// Partial sums a blocked kernel gradient keeps at most: lanes that accumulate blocks.
pub(crate) const LANES: usize = 8;

/// Floats the lanes of a blocked kernel gradient may take in all (64 MiB).
const LANE_FLOATS: usize = 1 << 24;

/// Lanes for a kernel gradient of `size` floats over `blocks` blocks: 0 where fewer than 2
/// fit (the caller then takes its unblocked path). Depends on the shape alone.
fn lanes_for(blocks: usize, size: usize) -> usize {
    let lanes = blocks.min(LANES).min(LANE_FLOATS / size.max(1));
    if lanes < 2 { 0 } else { lanes }
}

/// The blocked backward pass: `out` in chunks of `chunk` floats, one per block of images;
/// block `i` runs on lane `i % lanes` as `f(acc, i, out_chunk, first)`, which adds the block's
/// kernel gradient into its lane's `acc` (`size` floats; overwriting it when `first`) and
/// writes `out_chunk`. The lanes run in parallel, each over its blocks in order, and their
/// sums are added in lane order: the same arithmetic for every thread count.
fn over_lanes(
    out: &mut [f32],
    chunk: usize,
    lanes: usize,
    size: usize,
    f: impl Fn(&mut [f32], usize, &mut [f32], bool) + Sync,
) -> Vec<f32> {
    let mut work: Vec<Vec<(usize, &mut [f32])>> = (0..lanes).map(|_| Vec::new()).collect();
    for (i, part) in out.chunks_mut(chunk.max(1)).enumerate() {
        work[i % lanes].push((i, part));
    }
    let mut partial = zeroed(lanes * size);
    partial
        .par_chunks_mut(size.max(1))
        .zip(work)
        .for_each(|(acc, blocks)| {
            for (k, (i, part)) in blocks.into_iter().enumerate() {
                f(acc, i, part, k == 0);
            }
        });
    sum_lanes(&partial, size)
}

/// `len` values of `bias` repeated: the rows a product then accumulates onto.
fn bias_rows(bias: &[f32], len: usize) -> Vec<f32> {
    let mut y = zeroed(len);
    if !bias.is_empty() {
        y.par_chunks_mut(bias.len() * 256).for_each(|block| {
            for row in block.chunks_exact_mut(bias.len()) {
                row.copy_from_slice(bias);
            }
        });
    }
    y
}

impl Conv2d {
    /// The receptive fields of NHWC `x` as rows `[B*L, k*k*C]`.
    fn rows(&self, x: &[f32], b: usize) -> Scratch {
        let g = &self.g;
        let mut rows = Scratch::new(b * g.l() * g.ckk());
        im2row(x, b, g, &mut rows);
        rows
    }

    /// The shape for [`winograd::conv3x3`] where it applies (3x3, stride 1, padding 1) and
    /// pays off; the input gradient, the same shape with the channels swapped, goes with it.
    fn winograd(&self, b: usize) -> Option<winograd::Shape3x3> {
        let g = &self.g;
        let s = winograd::Shape3x3 {
            b,
            c: g.c,
            c_out: self.c_out,
            h: g.h,
            w: g.w,
        };
        let fits = g.k == 3 && g.stride == 1 && g.padding == 1;
        (fits && winograd::pays_off(&s)).then_some(s)
    }

    /// The kernel as `[C_out, k*k*C]`, the column order of the rows.
    fn kernel_rows(&self, w: &[f32]) -> Scratch {
        let mut wr = Scratch::new(w.len());
        kernel_to_rows(w, self.c_out, self.g.c, self.g.k * self.g.k, &mut wr);
        wr
    }

    /// The kernel as `[k*k*C, C_out]`, the right-hand side of `rows x kernel`.
    fn kernel_columns(&self, w: &[f32]) -> Scratch {
        let mut wc = Scratch::new(w.len());
        kernel_to_columns(w, self.c_out, self.g.c, self.g.k * self.g.k, &mut wc);
        wc
    }
}

impl Passes for Conv2d {
    const NAME: &'static str = "ddpm-conv2d";

    fn operand_dims(&self) -> ([usize; 3], [usize; 4], usize) {
        let g = &self.g;
        ([g.c, g.h, g.w], [self.c_out, g.c, g.k, g.k], self.c_out)
    }

    fn out_dims(&self) -> [usize; 3] {
        let (ho, wo) = self.g.out_hw().expect("checked when the op was built");
        [self.c_out, ho, wo]
    }

    fn nhwc(&self) -> bool {
        self.nhwc
    }

    fn forward(&self, x: &[f32], w: &[f32], bias: &[f32], b: usize) -> Vec<f32> {
        if let Some(s) = self.winograd(b) {
            return winograd::conv3x3(x, winograd::Kernel::Forward(w), Some(bias), s, true);
        }
        let (g, c_out) = (&self.g, self.c_out);
        let (l, ckk, image) = (g.l(), g.ckk(), g.h * g.w * g.c);
        let wc = self.kernel_columns(w);
        let wt = Mat::rows(&wc, ckk, c_out);
        let mut y = bias_rows(bias, b * l * c_out);
        let Some(per) = blocking(b, l, c_out) else {
            // bias + rows [B*L, k*k*C] times the kernel transposed, [B*L, C_out]: positions
            // along the product's long side, the shape `gemm` runs fastest.
            let rows = self.rows(x, b);
            matmul(&mut y, c_out, Mat::rows(&rows, b * l, ckk), wt, true);
            return y;
        };
        // The same per block of images, while the block's rows are in cache.
        y.par_chunks_mut((per * l * c_out).max(1))
            .zip(x.par_chunks((per * image).max(1)))
            .for_each(|(yb, xb)| {
                let n = yb.len() / (l * c_out);
                with_local_scratch(n * l * ckk, |rows| {
                    im2row_serial(xb, n, g, rows);
                    matmul_serial(yb, c_out, Mat::rows(rows, n * l, ckk), wt, true);
                });
            });
        y
    }

    fn backward(&self, x: &[f32], w: &[f32], dy: &[f32], b: usize) -> [Vec<f32>; 3] {
        let (g, c_out) = (&self.g, self.c_out);
        let (l, ckk, hw) = (g.l(), g.ckk(), g.h * g.w);
        let db = channel_sums_nhwc(dy, c_out);
        if let Some(s) = self.winograd(b) {
            let dw = winograd::kernel_grad3x3(x, dy, s);
            // dx is the same-size 3x3 convolution of dy with the flipped kernel.
            let s = winograd::Shape3x3 {
                c: c_out,
                c_out: g.c,
                ..s
            };
            let dx = winograd::conv3x3(dy, winograd::Kernel::Flipped(w), None, s, false);
            return [dx, dw, db];
        }
        let wr = self.kernel_rows(w);
        let image = hw * g.c;
        let mut dx = zeroed(b * image);
        let mut dwr = Scratch::new(c_out * ckk);
        let per = blocking(b, l, c_out);
        let lanes = per.map_or(0, |per| lanes_for(b.div_ceil(per), c_out * ckk));
        if let (Some(per), true) = (per, lanes > 0) {
            // Per block of images, while its rows are in cache: dw^T [k*k*C, C_out] += rows^T
            // dy into the block's lane, then the rows' gradient dy w and row2im into dx.
            let dwt = over_lanes(
                &mut dx,
                per * image,
                lanes,
                ckk * c_out,
                |acc, i, dxb, first| {
                    let n = dxb.len() / image;
                    with_local_scratch(n * l * ckk, |rows| {
                        im2row_serial(&x[i * per * image..][..n * image], n, g, rows);
                        let dyb =
                            Mat::rows(&dy[i * per * l * c_out..][..n * l * c_out], n * l, c_out);
                        let lhs = Mat::rows(rows, n * l, ckk).t();
                        matmul_serial(acc, c_out, lhs, dyb, !first);
                        matmul_serial(rows, ckk, dyb, Mat::rows(&wr, c_out, ckk), false);
                        row2im_serial(rows, n, g, None, dxb);
                    });
                },
            );
            transpose(&dwt, ckk, c_out, &mut dwr);
        } else {
            // Over the whole batch: dw = dy^T rows, then the rows' gradient (in their buffer)
            // dy w and row2im.
            let dyh = Mat::rows(dy, b * l, c_out);
            let mut rows = self.rows(x, b);
            matmul(&mut dwr, ckk, dyh.t(), Mat::rows(&rows, b * l, ckk), false);
            matmul(&mut rows, ckk, dyh, Mat::rows(&wr, c_out, ckk), false);
            row2im(&rows, b, g, None, &mut dx);
        }
        let mut dw = zeroed(c_out * ckk);
        kernel_from_rows(&dwr, c_out, g.c, g.k * g.k, &mut dw);
        [dx, dw, db]
    }
}

impl ConvTranspose2d {
    /// The kernel `[C_in, C_out, k, k]` as `[C_in, k*k*C_out]`.
    fn kernel_rows(&self, w: &[f32]) -> Scratch {
        let mut wr = Scratch::new(w.len());
        kernel_to_rows(w, self.c_in, self.g.c, self.g.k * self.g.k, &mut wr);
        wr
    }

    /// The kernel `[C_in, C_out, k, k]` as `[k*k*C_out, C_in]`, the right-hand side of
    /// `rows x kernel` in the input gradient.
    fn kernel_columns(&self, w: &[f32]) -> Scratch {
        let mut wc = Scratch::new(w.len());
        kernel_to_columns(w, self.c_in, self.g.c, self.g.k * self.g.k, &mut wc);
        wc
    }
}

impl Passes for ConvTranspose2d {
    const NAME: &'static str = "ddpm-conv-transpose2d";

    fn operand_dims(&self) -> ([usize; 3], [usize; 4], usize) {
        let g = &self.g;
        let (h, w) = g.out_hw().expect("checked when the op was built");
        ([self.c_in, h, w], [self.c_in, g.c, g.k, g.k], g.c)
    }

    fn out_dims(&self) -> [usize; 3] {
        [self.g.c, self.g.h, self.g.w]
    }

    fn nhwc(&self) -> bool {
        self.nhwc
    }

    fn forward(&self, x: &[f32], w: &[f32], bias: &[f32], b: usize) -> Vec<f32> {
        let (g, c_in) = (&self.g, self.c_in);
        let (l, ckk, image) = (g.l(), g.ckk(), g.h * g.w * g.c);
        let wr = self.kernel_rows(w);
        let wm = Mat::rows(&wr, c_in, ckk);
        let mut y = zeroed(b * image);
        let Some(per) = blocking(b, l, c_in) else {
            // rows = x w [B*L, k*k*C_out], summed by row2im onto the bias.
            let mut rows = Scratch::new(b * l * ckk);
            matmul(&mut rows, ckk, Mat::rows(x, b * l, c_in), wm, false);
            row2im(&rows, b, g, Some(bias), &mut y);
            return y;
        };
        // The same per block of images, while the block's rows are in cache.
        y.par_chunks_mut((per * image).max(1))
            .zip(x.par_chunks((per * l * c_in).max(1)))
            .for_each(|(yb, xb)| {
                let n = yb.len() / image;
                with_local_scratch(n * l * ckk, |rows| {
                    matmul_serial(rows, ckk, Mat::rows(xb, n * l, c_in), wm, false);
                    row2im_serial(rows, n, g, Some(bias), yb);
                });
            });
        y
    }

    fn backward(&self, x: &[f32], w: &[f32], dy: &[f32], b: usize) -> [Vec<f32>; 3] {
        let (g, c_in) = (&self.g, self.c_in);
        let (l, ckk, image) = (g.l(), g.ckk(), g.h * g.w * g.c);
        let db = channel_sums_nhwc(dy, g.c);
        let wc = self.kernel_columns(w);
        let wc = Mat::rows(&wc, ckk, c_in);
        let mut dx = zeroed(b * l * c_in);
        let per = blocking(b, l, c_in);
        let lanes = per.map_or(0, |per| lanes_for(b.div_ceil(per), c_in * ckk));
        let dwr = if let (Some(per), true) = (per, lanes > 0) {
            // Per block of images, while its rows im2row(dy) are in cache: dx = rows w^T, and
            // dw [C_in, k*k*C_out] += x^T rows into the block's lane.
            over_lanes(
                &mut dx,
                per * l * c_in,
                lanes,
                c_in * ckk,
                |acc, i, dxb, first| {
                    let n = dxb.len() / (l * c_in);
                    with_local_scratch(n * l * ckk, |rows| {
                        im2row_serial(&dy[i * per * image..][..n * image], n, g, rows);
                        let rows = Mat::rows(rows, n * l, ckk);
                        matmul_serial(dxb, c_in, rows, wc, false);
                        let xb = Mat::rows(&x[i * per * l * c_in..][..n * l * c_in], n * l, c_in);
                        matmul_serial(acc, ckk, xb.t(), rows, !first);
                    });
                },
            )
        } else {
            // No lanes: both over the whole batch's rows.
            let mut rows = Scratch::new(b * l * ckk);
            im2row(dy, b, g, &mut rows);
            let rows = Mat::rows(&rows, b * l, ckk);
            matmul(&mut dx, c_in, rows, wc, false);
            let mut dwr = zeroed(c_in * ckk);
            matmul(&mut dwr, ckk, Mat::rows(x, b * l, c_in).t(), rows, false);
            dwr
        };
        let mut dw = zeroed(c_in * ckk);
        kernel_from_rows(&dwr, c_in, g.c, g.k * g.k, &mut dw);
        [dx, dw, db]
    }
}

/// A [`Passes`] as a candle op over `(x, w, bias)`.
struct Op<P>(P);

impl<P: Passes> CustomOp3 for Op<P> {
    fn name(&self) -> &'static str {
        P::NAME
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
        let (x_dims, w_dims, c_bias) = self.0.operand_dims();
        let nhwc = self.0.nhwc();
        let (b, d1, d2, d3) = l1.shape().dims4()?;
        let chw = if nhwc { [d3, d1, d2] } else { [d1, d2, d3] };
        if chw != x_dims || l2.shape().dims() != w_dims || l3.shape().dims() != [c_bias] {
            let [c, h, w] = x_dims;
            let input = if nhwc {
                format!("[B, {h}, {w}, {c}]")
            } else {
                format!("[B, {c}, {h}, {w}]")
            };
            candle_core::bail!(
                "{}: operands {:?}, {:?}, {:?} do not match the op (input {input}, kernel \
                 {w_dims:?}, bias [{c_bias}])",
                P::NAME,
                l1.shape(),
                l2.shape(),
                l3.shape(),
            );
        }
        let (x, w, bias) = (
            contiguous_f32(s1, l1)?,
            contiguous_f32(s2, l2)?,
            contiguous_f32(s3, l3)?,
        );
        let [c, h, wd] = self.0.out_dims();
        if nhwc {
            let y = self.0.forward(x, w, bias, b);
            return Ok((CpuStorage::F32(y), Shape::from((b, h, wd, c))));
        }
        let yh = self.0.forward(&to_nhwc(x, b, x_dims[0]), w, bias, b);
        let y = to_nchw(&yh, b, c);
        Ok((CpuStorage::F32(y), Shape::from((b, c, h, wd))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let b = x.dim(0)?;
        let nhwc = self.0.nhwc();
        let (c_in, c_out) = (self.0.operand_dims().0[0], self.0.out_dims()[0]);
        let [dx, dw, db] = with_data(x, |x| {
            with_data(w, |w| {
                with_data(grad_res, |dy| {
                    if nhwc {
                        return self.0.backward(x, w, dy, b);
                    }
                    let (xh, dyh) = (to_nhwc(x, b, c_in), to_nhwc(dy, b, c_out));
                    let [dxh, dw, db] = self.0.backward(&xh, w, &dyh, b);
                    [to_nchw(&dxh, b, c_in), dw, db]
                })
            })
        })???;
        Ok((
            Some(tensor(dx, x.dims(), x)?),
            Some(tensor(dw, w.dims(), w)?),
            Some(tensor(db, bias.dims(), bias)?),
        ))
    }
}

/// NCHW `x` (batch `b`, `c` channels) as NHWC, in scratch.
fn to_nhwc(x: &[f32], b: usize, c: usize) -> Scratch {
    let mut xh = Scratch::new(x.len());
    nchw_to_nhwc(x, b, c, x.len() / (b * c).max(1), &mut xh);
    xh
}

/// NHWC `x` (batch `b`, `c` channels) as NCHW.
fn to_nchw(x: &[f32], b: usize, c: usize) -> Vec<f32> {
    let mut y = zeroed(x.len());
    nhwc_to_nchw(x, b, c, x.len() / (b * c).max(1), None, &mut y);
    y
}

/// Whether these kernels run for `x` and `w`: f32 on the CPU.
pub fn supports(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32
}

fn check_supported(x: &Tensor, w: &Tensor) -> candle_core::Result<()> {
    if !supports(x, w) {
        candle_core::bail!(
            "ddpm-kernels runs f32 on the CPU (got {:?} on {:?}); use candle's convolutions \
             elsewhere",
            x.dtype(),
            x.device().location()
        );
    }
    Ok(())
}

fn bias_or_zeros(bias: Option<&Tensor>, c: usize, like: &Tensor) -> candle_core::Result<Tensor> {
    match bias {
        Some(b) => {
            if b.dims() != [c] {
                candle_core::bail!("bias {:?} must be [{c}]", b.dims());
            }
            Ok(b.clone())
        }
        None => Tensor::zeros(c, DType::F32, like.device()),
    }
}

/// `(C, H, W)` of `x`, NCHW or NHWC.
fn chw(x: &Tensor, nhwc: bool) -> candle_core::Result<(usize, usize, usize)> {
    let (_, d1, d2, d3) = x.dims4()?;
    Ok(if nhwc { (d3, d1, d2) } else { (d1, d2, d3) })
}

/// `conv2d` of `x` `[B, C_in, H, W]` with `w` `[C_out, C_in, k, k]` and an optional bias
/// `[C_out]` (no groups, no dilation): candle's `x.conv2d(w, padding, stride, 1, 1)` plus the
/// bias, with gradients for all three.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    conv2d_in(x, w, bias, padding, stride, false)
}

/// [`conv2d`] on channels-last tensors: `x` `[B, H, W, C_in]` gives `[B, H_out, W_out,
/// C_out]`; the kernel is `[C_out, C_in, k, k]` as in [`conv2d`]. The convolutions compute
/// channels-last, so this form skips the two transposes [`conv2d`] makes forward and the
/// three it makes backward.
pub fn conv2d_nhwc(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    conv2d_in(x, w, bias, padding, stride, true)
}

fn conv2d_in(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    nhwc: bool,
) -> candle_core::Result<Tensor> {
    check_supported(x, w)?;
    let (c, h, wd) = chw(x, nhwc)?;
    let (c_out, c_in, k, k2) = w.dims4()?;
    if c_in != c || k != k2 {
        candle_core::bail!(
            "conv2d: input {:?} ({}) and kernel {:?} do not fit",
            x.dims(),
            if nhwc { "NHWC" } else { "NCHW" },
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
    g.out_hw()?;
    let bias = bias_or_zeros(bias, c_out, x)?;
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &bias.contiguous()?,
        Op(Conv2d { g, c_out, nhwc }),
    )
}

/// `conv_transpose2d` of `x` `[B, C_in, H, W]` with `w` `[C_in, C_out, k, k]` and an
/// optional bias `[C_out]` (no output padding, no dilation): candle's
/// `x.conv_transpose2d(w, padding, 0, stride, 1)` plus the bias, with gradients for all three.
pub fn conv_transpose2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    conv_transpose2d_in(x, w, bias, padding, stride, false)
}

/// [`conv_transpose2d`] on channels-last tensors: `x` `[B, H, W, C_in]` gives `[B, H_out,
/// W_out, C_out]`; the kernel is `[C_in, C_out, k, k]` as in [`conv_transpose2d`].
pub fn conv_transpose2d_nhwc(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    conv_transpose2d_in(x, w, bias, padding, stride, true)
}

fn conv_transpose2d_in(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    nhwc: bool,
) -> candle_core::Result<Tensor> {
    check_supported(x, w)?;
    let (c_in, h, wd) = chw(x, nhwc)?;
    let (w_in, c_out, k, k2) = w.dims4()?;
    if w_in != c_in || k != k2 {
        candle_core::bail!(
            "conv_transpose2d: input {:?} ({}) and kernel {:?} do not fit",
            x.dims(),
            if nhwc { "NHWC" } else { "NCHW" },
            w.dims()
        );
    }
    let out = |n: usize| -> candle_core::Result<usize> {
        let size = (n * stride + k).checked_sub(stride + 2 * padding);
        match size {
            Some(v) if v > 0 && n > 0 && stride > 0 => Ok(v),
            _ => candle_core::bail!(
                "conv_transpose2d of size {n} with kernel {k} stride {stride} padding {padding} \
                 has no output"
            ),
        }
    };
    let g = Geometry {
        c: c_out,
        h: out(h)?,
        w: out(wd)?,
        k,
        stride,
        padding,
    };
    if g.out_hw()? != (h, wd) {
        candle_core::bail!("conv_transpose2d: geometry {g:?} does not invert {h}x{wd}");
    }
    let bias = bias_or_zeros(bias, c_out, x)?;
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &bias.contiguous()?,
        Op(ConvTranspose2d { g, c_in, nhwc }),
    )
}
