//! Small building blocks shared by both U-Nets: the forward mode, seeded dropout, attention.

use candle_core::{D, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Whether a forward pass trains or infers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Inference: BatchNorm uses its running statistics, dropout is off.
    Eval,
    /// Training: BatchNorm normalises with batch statistics and updates its running ones, dropout
    /// is on. Dropout masks derive from `seed` and each layer's weight path, so a step with the
    /// same seed drops the same units on every run and thread count (pass a seed that changes
    /// every step, e.g. derived from the run seed and the step number).
    Train {
        /// The seed for this step's dropout masks.
        seed: u64,
    },
}

impl Mode {
    /// True in [`Mode::Train`].
    pub fn is_train(self) -> bool {
        matches!(self, Mode::Train { .. })
    }
}

/// `bn(relu(x))`, NCHW or (`nhwc`, CPU f32 only) NHWC. On the CPU in f32 this is one fused
/// op: in training [`ddpm_kernels::relu_batch_norm`], which also updates the running
/// statistics as candle-nn does (momentum, unbiased variance); in inference
/// [`ddpm_kernels::relu_batch_norm_eval`]. Everything else runs candle-nn's BatchNorm.
pub(crate) fn relu_batch_norm(
    bn: &candle_nn::BatchNorm,
    x: &Tensor,
    train: bool,
    nhwc: bool,
) -> candle_core::Result<Tensor> {
    use candle_nn::ModuleT;
    let fused = ddpm_kernels::relu_batch_norm_supports(x);
    let Some((weight, bias)) = bn.weight_and_bias().filter(|_| fused) else {
        if nhwc {
            candle_core::bail!("channels-last BatchNorm runs f32 on the CPU with an affine part");
        }
        return bn.forward_t(&x.relu()?, train);
    };
    if !train {
        // candle-nn keeps the running statistics as variables: detached, as candle-nn's own
        // evaluation uses them, so that a sampling loop builds no graph through them.
        let (mean, var) = (bn.running_mean().detach(), bn.running_var().detach());
        return if nhwc {
            ddpm_kernels::relu_batch_norm_eval_nhwc(x, weight, bias, &mean, &var, bn.eps())
        } else {
            ddpm_kernels::relu_batch_norm_eval(x, weight, bias, &mean, &var, bn.eps())
        };
    }
    let (y, stats) = if nhwc {
        ddpm_kernels::relu_batch_norm_nhwc(x, weight, bias, bn.eps())?
    } else {
        ddpm_kernels::relu_batch_norm(x, weight, bias, bn.eps())?
    };
    if stats.count < 2 {
        candle_core::bail!("BatchNorm in training needs more than one value per channel");
    }
    let m = bn.momentum();
    let unbiased = stats.count as f64 / (stats.count as f64 - 1.0);
    let mean = Tensor::from_slice(&stats.mean, stats.mean.len(), x.device())?;
    let var = Tensor::from_slice(&stats.var, stats.var.len(), x.device())?;
    // The running statistics are variables shared with the VarMap: set them in place.
    let running_mean = candle_core::Var::from_tensor(bn.running_mean())?;
    running_mean.set(&((bn.running_mean() * (1.0 - m))? + (mean * m)?)?)?;
    let running_var = candle_core::Var::from_tensor(bn.running_var())?;
    running_var.set(&((bn.running_var() * (1.0 - m))? + (var * (m * unbiased))?)?)?;
    Ok(y)
}

/// Dropout whose masks come from a seeded generator rather than candle's unseedable one.
#[derive(Debug, Clone)]
pub(crate) struct Dropout {
    p: f64,
    id: u64,
}

impl Dropout {
    /// Dropout with probability `p`; `path` (the layer's weight prefix) makes its masks distinct.
    pub(crate) fn new(p: f64, path: &str) -> candle_core::Result<Self> {
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("dropout probability must be in [0, 1), got {p}");
        }
        // FNV-1a of the path: stable across runs and platforms.
        let id = path.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
        Ok(Self { p, id })
    }

    /// Drops from `x`; with `nhwc` (`x` `[B, H, W, C]`) the mask is the one `[B, C, H, W]`
    /// would get, moved channels-last, so both layouts drop the same units.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        mode: Mode,
        nhwc: bool,
    ) -> candle_core::Result<Tensor> {
        let Mode::Train { seed } = mode else {
            return Ok(x.clone());
        };
        if self.p == 0.0 {
            return Ok(x.clone());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ self.id);
        let keep = 1.0 - self.p;
        let scale = (1.0 / keep) as f32;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if rng.random::<f64>() < keep {
                    scale
                } else {
                    0.0
                }
            })
            .collect();
        let mask = if nhwc {
            let (b, h, w, c) = x.dims4()?;
            Tensor::from_vec(mask, (b, c, h, w), x.device())?.permute((0, 2, 3, 1))?
        } else {
            Tensor::from_vec(mask, x.shape(), x.device())?
        };
        x.mul(&mask.to_dtype(x.dtype())?)
    }
}

/// diffusers' `Attention` as `UNet2DModel` uses it (`_from_deprecated_attn_block`): GroupNorm,
/// multi-head self-attention over the `H * W` positions, output projection, residual, rescale.
#[derive(Debug, Clone)]
pub(crate) struct SpatialAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    rescale_output_factor: f64,
}

impl SpatialAttention {
    /// `heads` heads of `head_dim` over `channels`; weights at `group_norm`, `to_q`, `to_k`,
    /// `to_v`, `to_out.0` (older checkpoints' names are mapped to these on load).
    pub(crate) fn new(
        channels: usize,
        heads: usize,
        head_dim: usize,
        norm_groups: usize,
        eps: f64,
        rescale_output_factor: f64,
        vb: VarBuilder<'_>,
    ) -> candle_core::Result<Self> {
        if heads == 0 {
            candle_core::bail!(
                "attention over {channels} channels with head dim {head_dim} has no heads"
            );
        }
        let inner = heads * head_dim;
        Ok(Self {
            group_norm: group_norm(norm_groups, channels, eps, vb.pp("group_norm"))?,
            to_q: candle_nn::linear(channels, inner, vb.pp("to_q"))?,
            to_k: candle_nn::linear(channels, inner, vb.pp("to_k"))?,
            to_v: candle_nn::linear(channels, inner, vb.pp("to_v"))?,
            to_out: candle_nn::linear(inner, channels, vb.pp("to_out").pp("0"))?,
            heads,
            head_dim,
            rescale_output_factor,
        })
    }

    /// `x` is `[B, C, H, W]`, or `[B, H, W, C]` with `nhwc`.
    pub(crate) fn forward(&self, x: &Tensor, nhwc: bool) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = if nhwc {
            let (b, h, w, c) = x.dims4()?;
            (b, c, h, w)
        } else {
            x.dims4()?
        };
        let n = h * w;
        // -> [B, HW, C]
        let normed = self.group_norm.forward(x, nhwc)?;
        let hs = if nhwc {
            normed.reshape((b, n, c))?
        } else {
            normed.reshape((b, c, n))?.transpose(1, 2)?.contiguous()?
        };
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, n, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.to_q.forward(&hs)?)?;
        let k = split(self.to_k.forward(&hs)?)?;
        let v = split(self.to_v.forward(&hs)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
        // `softmax` (not `softmax_last_dim`, which records no gradient).
        let attn = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let out = attn
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, n, self.heads * self.head_dim))?;
        let out = self.to_out.forward(&out)?;
        let out = if nhwc {
            out.reshape((b, h, w, c))?
        } else {
            out.transpose(1, 2)?.reshape((b, c, h, w))?
        };
        let out = (out + x)?;
        if self.rescale_output_factor == 1.0 {
            Ok(out)
        } else {
            out / self.rescale_output_factor
        }
    }
}

/// PyTorch's `GroupNorm` (`weight` and `bias`), run by `ddpm-kernels`' fused op for f32 on the
/// CPU (one pass per statistic instead of a chain of tensor ops) and by candle-nn's elsewhere.
#[derive(Debug, Clone)]
pub(crate) struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// candle-nn's GroupNorm over the same weights, for the devices and dtypes the fused op
    /// does not run on.
    fn candle(&self) -> candle_core::Result<candle_nn::GroupNorm> {
        let (w, b) = (self.weight.clone(), self.bias.clone());
        candle_nn::GroupNorm::new(w, b, self.weight.dim(0)?, self.groups, self.eps)
    }

    /// The normalised `x` `[N, C, H, W]`, or `[N, H, W, C]` with `nhwc` (CPU f32 only).
    pub(crate) fn forward(&self, x: &Tensor, nhwc: bool) -> candle_core::Result<Tensor> {
        if nhwc {
            ddpm_kernels::group_norm_nhwc(x, self.groups, &self.weight, &self.bias, self.eps)
        } else if ddpm_kernels::group_norm_supports(x) {
            ddpm_kernels::group_norm(x, self.groups, &self.weight, &self.bias, self.eps)
        } else {
            self.candle()?.forward(x)
        }
    }

    /// `silu(self.forward(x))`, in one pass where the fused op runs.
    pub(crate) fn forward_silu(&self, x: &Tensor, nhwc: bool) -> candle_core::Result<Tensor> {
        if nhwc {
            ddpm_kernels::group_norm_silu_nhwc(x, self.groups, &self.weight, &self.bias, self.eps)
        } else if ddpm_kernels::group_norm_supports(x) {
            ddpm_kernels::group_norm_silu(x, self.groups, &self.weight, &self.bias, self.eps)
        } else {
            self.candle()?.forward(x)?.silu()
        }
    }
}

/// A GroupNorm whose group count divides the channels, or an error saying which does not.
pub(crate) fn group_norm(
    groups: usize,
    channels: usize,
    eps: f64,
    vb: VarBuilder<'_>,
) -> candle_core::Result<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        candle_core::bail!("GroupNorm: {channels} channels do not split into {groups} groups");
    }
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    Ok(GroupNorm {
        weight,
        bias,
        groups,
        eps,
    })
}

/// A convolution layer (PyTorch's `weight` and `bias` names, candle's initialisation) that runs
/// `ddpm-kernels` for f32 on the CPU (forward and backward as large matmuls) and candle's own
/// convolution elsewhere.
#[derive(Debug, Clone)]
pub(crate) enum Conv {
    /// `nn.Conv2d`.
    Forward(candle_nn::Conv2d),
    /// `nn.ConvTranspose2d`.
    Transpose(candle_nn::ConvTranspose2d),
}

impl Conv {
    /// `nn.Conv2d(c_in, c_out, k, stride, padding)` with bias.
    pub(crate) fn new(
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder<'_>,
    ) -> candle_core::Result<Self> {
        let cfg = candle_nn::Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        Ok(Self::Forward(candle_nn::conv2d(c_in, c_out, k, cfg, vb)?))
    }

    /// `nn.ConvTranspose2d(c_in, c_out, k, stride, padding)` with bias.
    pub(crate) fn transpose(
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder<'_>,
    ) -> candle_core::Result<Self> {
        let cfg = candle_nn::ConvTranspose2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        Ok(Self::Transpose(candle_nn::conv_transpose2d(
            c_in, c_out, k, cfg, vb,
        )?))
    }
}

impl Conv {
    /// Whether [`Conv::forward_nhwc`] runs for `x`: f32 on the CPU, no dilation, groups or
    /// output padding.
    pub(crate) fn runs_nhwc(&self, x: &Tensor) -> bool {
        match self {
            Self::Forward(c) => {
                let cfg = c.config();
                ddpm_kernels::supports(x, c.weight()) && cfg.dilation == 1 && cfg.groups == 1
            }
            Self::Transpose(c) => {
                let cfg = c.config();
                ddpm_kernels::supports(x, c.weight())
                    && cfg.dilation == 1
                    && cfg.output_padding == 0
            }
        }
    }

    /// [`Conv::forward_nhwc`] with `nhwc`, else the layer on `[B, C, H, W]`.
    pub(crate) fn forward_in(&self, x: &Tensor, nhwc: bool) -> candle_core::Result<Tensor> {
        if nhwc {
            self.forward_nhwc(x)
        } else {
            self.forward(x)
        }
    }

    /// A model's first layer: NCHW `x` in, channels-last out ([`Conv::forward_nhwc`] on `x`
    /// moved channels-last).
    pub(crate) fn forward_into_nhwc(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_nhwc(&x.permute((0, 2, 3, 1))?.contiguous()?)
    }

    /// A model's last layer: channels-last `x` in, NCHW out ([`Conv::forward_nhwc`] with its
    /// output moved back).
    pub(crate) fn forward_out_of_nhwc(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_nhwc(x)?.permute((0, 3, 1, 2))?.contiguous()
    }

    /// The layer on channels-last `x` `[B, H, W, C]`, giving `[B, H_out, W_out, C_out]`; an
    /// error where [`Conv::runs_nhwc`] is false.
    pub(crate) fn forward_nhwc(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !self.runs_nhwc(x) {
            candle_core::bail!("channels-last convolutions run f32 on the CPU, plain ones only");
        }
        match self {
            Self::Forward(c) => {
                let cfg = c.config();
                ddpm_kernels::conv2d_nhwc(x, c.weight(), c.bias(), cfg.padding, cfg.stride)
            }
            Self::Transpose(c) => {
                let cfg = c.config();
                let (w, b) = (c.weight(), c.bias());
                ddpm_kernels::conv_transpose2d_nhwc(x, w, b, cfg.padding, cfg.stride)
            }
        }
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Forward(c) if ddpm_kernels::supports(x, c.weight()) => {
                let cfg = c.config();
                if cfg.dilation != 1 || cfg.groups != 1 {
                    return c.forward(x);
                }
                ddpm_kernels::conv2d(x, c.weight(), c.bias(), cfg.padding, cfg.stride)
            }
            Self::Transpose(c) if ddpm_kernels::supports(x, c.weight()) => {
                let cfg = c.config();
                if cfg.dilation != 1 || cfg.output_padding != 0 {
                    return c.forward(x);
                }
                ddpm_kernels::conv_transpose2d(x, c.weight(), c.bias(), cfg.padding, cfg.stride)
            }
            Self::Forward(c) => c.forward(x),
            Self::Transpose(c) => c.forward(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::{ModuleT, VarBuilder, VarMap};

    /// The fused training path gives candle-nn's outputs and running statistics (momentum 0.1,
    /// unbiased variance) over two steps; evaluation uses the updated statistics.
    #[test]
    fn fused_batch_norm_matches_candle_nn() {
        let dev = Device::Cpu;
        let make = || {
            let map = VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
            let bn = candle_nn::batch_norm(3, 1e-5, vb.pp("bn")).unwrap();
            (map, bn)
        };
        let (map_a, a) = make();
        let (map_b, b) = make();
        let max_abs = |t: Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let close = |x: &Tensor, y: &Tensor, what: &str| {
            let d = max_abs((x - y).unwrap());
            assert!(d < 1e-4, "{what}: max |diff| {d}");
        };
        for step in 0..2 {
            let x = (Tensor::arange(0f32, 96., &dev)
                .unwrap()
                .reshape((2, 3, 4, 4))
                .unwrap()
                * (0.37 + step as f64))
                .unwrap()
                .sin()
                .unwrap();
            let ours = super::relu_batch_norm(&a, &x, true, false).unwrap();
            let theirs = b.forward_t(&x.relu().unwrap(), true).unwrap();
            close(&ours, &theirs, "train output");
        }
        let (va, vb) = (map_a.data().lock().unwrap(), map_b.data().lock().unwrap());
        for name in ["bn.running_mean", "bn.running_var"] {
            close(va[name].as_tensor(), vb[name].as_tensor(), name);
        }
        let moved = max_abs((va["bn.running_var"].as_tensor() - 1.0).unwrap());
        assert!(moved > 1e-3, "the running variance was updated");
        let single = Tensor::ones((1, 3, 1, 1), DType::F32, &dev).unwrap();
        let err = super::relu_batch_norm(&a, &single, true, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than one value per channel"), "{err}");
        // Inference folds the running statistics into one pass; values on both sides of 0.
        let x = (Tensor::arange(0f32, 12., &dev)
            .unwrap()
            .reshape((1, 3, 2, 2))
            .unwrap()
            - 5.5)
            .unwrap();
        close(
            &super::relu_batch_norm(&a, &x, false, false).unwrap(),
            &b.forward_t(&x.relu().unwrap(), false).unwrap(),
            "eval output",
        );
    }
}
