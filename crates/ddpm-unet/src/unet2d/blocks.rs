//! `UNet2DModel`'s blocks: `ResnetBlock2D`, down- and upsampling, attention, and the down,
//! up and middle blocks built from them.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::Unet2dConfig;
use crate::Mode;
use crate::layers::{Conv, Dropout, GroupNorm, SpatialAttention, group_norm};

/// diffusers' `ResnetBlock2D` (time embedding added, `pre_norm`): GroupNorm, SiLU, conv3x3,
/// `+ time_emb_proj(silu(temb))`, GroupNorm, SiLU, dropout, conv3x3, shortcut, rescale.
#[derive(Debug, Clone)]
pub(super) struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv,
    pub(super) time_emb_proj: candle_nn::Linear,
    norm2: GroupNorm,
    pub(super) dropout: Dropout,
    conv2: Conv,
    pub(super) conv_shortcut: Option<Conv>,
    pub(super) output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub(super) fn new(
        cfg: &Unet2dConfig,
        in_ch: usize,
        out_ch: usize,
        output_scale_factor: f64,
        vb: VarBuilder<'_>,
    ) -> candle_core::Result<Self> {
        let conv_shortcut = if in_ch != out_ch {
            Some(Conv::new(in_ch, out_ch, 1, 1, 0, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(cfg.groups(), in_ch, cfg.norm_eps, vb.pp("norm1"))?,
            conv1: Conv::new(in_ch, out_ch, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: candle_nn::linear(cfg.time_embed_dim(), out_ch, vb.pp("time_emb_proj"))?,
            norm2: group_norm(cfg.groups(), out_ch, cfg.norm_eps, vb.pp("norm2"))?,
            dropout: Dropout::new(cfg.dropout, &vb.prefix())?,
            conv2: Conv::new(out_ch, out_ch, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut,
            output_scale_factor,
        })
    }

    /// `x` is `[B, C, H, W]`, or `[B, H, W, C]` with `nhwc`.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        mode: Mode,
        nhwc: bool,
    ) -> candle_core::Result<Tensor> {
        let h = self
            .conv1
            .forward_in(&self.norm1.forward_silu(x, nhwc)?, nhwc)?;
        let t = self.time_emb_proj.forward(&temb.silu()?)?;
        let h = if nhwc {
            ddpm_kernels::add_per_image_nhwc(&h, &t)?
        } else {
            h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?
        };
        let h = self.norm2.forward_silu(&h, nhwc)?;
        let h = self
            .conv2
            .forward_in(&self.dropout.forward(&h, mode, nhwc)?, nhwc)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward_in(x, nhwc)?,
            None => x.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// `v` (timesteps or class labels, named `what` in the error) as one value per sample of a
/// batch of `b`: `[b]` as it is, one value (`[1]` or a scalar) repeated, as diffusers allows.
pub(crate) fn per_sample(v: &Tensor, b: usize, what: &str) -> candle_core::Result<Tensor> {
    match v.dims() {
        [] | [1] => v.reshape(1)?.repeat(b),
        [n] if *n == b => Ok(v.clone()),
        other => candle_core::bail!("{what} must be [{b}] or a single value, got shape {other:?}"),
    }
}

/// `Downsample2D` with a conv: stride 2, kernel 3, padding 1, or padding 0 after padding the
/// right and bottom edges by one.
#[derive(Debug, Clone)]
pub(super) struct Downsample2D {
    pub(super) conv: Conv,
    pub(super) pad_right_bottom: bool,
}

impl Downsample2D {
    pub(super) fn new(ch: usize, padding: usize, vb: VarBuilder<'_>) -> candle_core::Result<Self> {
        Ok(Self {
            conv: Conv::new(ch, ch, 3, 2, padding, vb.pp("conv"))?,
            pad_right_bottom: padding == 0,
        })
    }

    pub(super) fn forward(&self, x: &Tensor, nhwc: bool) -> candle_core::Result<Tensor> {
        if self.pad_right_bottom {
            let (h_dim, w_dim) = if nhwc { (1, 2) } else { (2, 3) };
            let x = x.pad_with_zeros(w_dim, 0, 1)?.pad_with_zeros(h_dim, 0, 1)?;
            self.conv.forward_in(&x, nhwc)
        } else {
            self.conv.forward_in(x, nhwc)
        }
    }
}

/// `Upsample2D` with a conv: nearest-neighbour 2x, then conv3x3.
#[derive(Debug, Clone)]
pub(super) struct Upsample2D {
    pub(super) conv: Conv,
}

impl Upsample2D {
    pub(super) fn new(ch: usize, vb: VarBuilder<'_>) -> candle_core::Result<Self> {
        Ok(Self {
            conv: Conv::new(ch, ch, 3, 1, 1, vb.pp("conv"))?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor, nhwc: bool) -> candle_core::Result<Tensor> {
        if nhwc {
            // Nearest 2x channels-last: each position repeated over a 2x2 square.
            let (b, h, w, c) = x.dims4()?;
            let up = x
                .reshape((b, h, 1, w, 1, c))?
                .broadcast_as((b, h, 2, w, 2, c))?
                .reshape((b, 2 * h, 2 * w, c))?;
            return self.conv.forward_nhwc(&up);
        }
        let (_, _, h, w) = x.dims4()?;
        self.conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
    }
}

/// The attention layer of a block, with diffusers' head arithmetic: `channels / head_dim` heads
/// of `head_dim`, `head_dim` defaulting to all the channels (one head).
pub(super) fn attention(
    cfg: &Unet2dConfig,
    channels: usize,
    head_dim_default: usize,
    norm_groups: usize,
    rescale: f64,
    vb: VarBuilder<'_>,
) -> candle_core::Result<SpatialAttention> {
    let head_dim = cfg.attention_head_dim.unwrap_or(head_dim_default);
    SpatialAttention::new(
        channels,
        channels / head_dim,
        head_dim,
        norm_groups,
        cfg.norm_eps,
        rescale,
        vb,
    )
}

/// The resnets (`resnets.J`) of a down or up block, each followed by attention
/// (`attentions.J`) when `with_attention`; resnet `j` takes `in_channels(j)` channels.
pub(super) fn block_layers(
    cfg: &Unet2dConfig,
    layers: usize,
    in_channels: impl Fn(usize) -> usize,
    out: usize,
    with_attention: bool,
    vb: &VarBuilder<'_>,
) -> candle_core::Result<(Vec<ResnetBlock2D>, Vec<SpatialAttention>)> {
    let mut resnets = Vec::with_capacity(layers);
    let mut attentions = Vec::new();
    for j in 0..layers {
        resnets.push(ResnetBlock2D::new(
            cfg,
            in_channels(j),
            out,
            1.0,
            vb.pp("resnets").pp(j),
        )?);
        if with_attention {
            attentions.push(attention(
                cfg,
                out,
                out,
                cfg.groups(),
                1.0,
                vb.pp("attentions").pp(j),
            )?);
        }
    }
    Ok((resnets, attentions))
}

/// `DownBlock2D` / `AttnDownBlock2D`.
#[derive(Debug, Clone)]
pub(super) struct DownBlock {
    pub(super) resnets: Vec<ResnetBlock2D>,
    pub(super) attentions: Vec<SpatialAttention>,
    pub(super) downsampler: Option<Downsample2D>,
}

impl DownBlock {
    pub(super) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        mode: Mode,
        skips: &mut Vec<Tensor>,
        nhwc: bool,
    ) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, temb, mode, nhwc)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, nhwc)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h, nhwc)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// `UpBlock2D` / `AttnUpBlock2D`.
#[derive(Debug, Clone)]
pub(super) struct UpBlock {
    pub(super) resnets: Vec<ResnetBlock2D>,
    pub(super) attentions: Vec<SpatialAttention>,
    pub(super) upsampler: Option<Upsample2D>,
}

impl UpBlock {
    pub(super) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        mode: Mode,
        skips: &mut Vec<Tensor>,
        nhwc: bool,
    ) -> candle_core::Result<Tensor> {
        let channels = if nhwc { 3 } else { 1 };
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .expect("one skip per resnet, checked at construction");
            h = resnet.forward(&Tensor::cat(&[&h, &skip], channels)?, temb, mode, nhwc)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, nhwc)?;
            }
        }
        if let Some(up) = &self.upsampler {
            h = up.forward(&h, nhwc)?;
        }
        Ok(h)
    }
}

/// `UNetMidBlock2D`: resnet, then (attention, resnet).
#[derive(Debug, Clone)]
pub(super) struct MidBlock {
    pub(super) first: ResnetBlock2D,
    pub(super) attention: Option<SpatialAttention>,
    pub(super) second: ResnetBlock2D,
}
