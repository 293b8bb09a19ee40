//! Adding a per-image vector (a projected time embedding) at every position of NHWC images.

use candle_core::{CpuStorage, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::matmul::zeroed;
use crate::ops::{ROWS_PER_TASK, contiguous_f32, is_cpu_f32, tensor, with_data};

/// `x + v[b]` at every position of image `b`, channels last.
struct AddPerImage;

impl candle_core::CustomOp2 for AddPerImage {
    fn name(&self) -> &'static str {
        "add-per-image"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, v) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        let (b, c) = l2.shape().dims2()?;
        let image = x.len() / b.max(1);
        let mut y = zeroed(x.len());
        y.par_chunks_mut(ROWS_PER_TASK * c)
            .zip(x.par_chunks(ROWS_PER_TASK * c))
            .enumerate()
            .for_each(|(task, (ys, xs))| {
                let start = task * ROWS_PER_TASK * c;
                for (i, (yr, xr)) in ys.chunks_exact_mut(c).zip(xs.chunks_exact(c)).enumerate() {
                    let vb = &v[(start + i * c) / image * c..][..c];
                    for ((o, &a), &add) in yr.iter_mut().zip(xr).zip(vb) {
                        *o = a + add;
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, c) = v.dims2()?;
        // dv[b] = the sum of dy over image b's positions, in f64, one task per image.
        let dv = with_data(grad_res, |dy| {
            let image = dy.len() / b.max(1);
            dy.par_chunks(image.max(1))
                .flat_map_iter(|img| {
                    let mut acc = vec![0f64; c];
                    for row in img.chunks_exact(c) {
                        for (a, &g) in acc.iter_mut().zip(row) {
                            *a += f64::from(g);
                        }
                    }
                    acc.into_iter().map(|s| s as f32)
                })
                .collect::<Vec<f32>>()
        })?;
        Ok((Some(grad_res.clone()), Some(tensor(dv, &[b, c], v)?)))
    }
}

/// `x + v[b]` at every position of image `b`: `x` is channels-last `[B, ..., C]` (NHWC
/// images), `v` is `[B, C]` (a per-image vector, such as a projected time embedding), both f32
/// on the CPU. One pass, where candle's `broadcast_add` of `v` as `[B, 1, 1, C]` takes its
/// strided path; gradients flow to both.
pub fn add_per_image_nhwc(x: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    if !is_cpu_f32(x) || !is_cpu_f32(v) {
        candle_core::bail!(
            "ddpm-kernels runs f32 on the CPU (got {:?} on {:?} and {:?} on {:?})",
            x.dtype(),
            x.device().location(),
            v.dtype(),
            v.device().location()
        );
    }
    let dims = x.dims();
    let fits = dims.len() >= 2 && v.dims() == [dims[0], dims[dims.len() - 1]];
    if !fits || x.elem_count() == 0 {
        candle_core::bail!(
            "add_per_image_nhwc takes x [B, ..., C] with values and v [B, C], got {:?} and {:?}",
            dims,
            v.dims()
        );
    }
    x.contiguous()?.apply_op2(&v.contiguous()?, AddPerImage)
}
