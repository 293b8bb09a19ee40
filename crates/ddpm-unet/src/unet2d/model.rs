//! `UNet2DModel` itself: the blocks put together, with diffusers' weight names.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use ddpm_embeddings::{SinusoidalConfig, TimestepEmbedding, timestep_embedding};

use super::blocks::{
    DownBlock, Downsample2D, MidBlock, ResnetBlock2D, UpBlock, Upsample2D, attention, block_layers,
    per_sample,
};
use super::{DownBlockType, MidBlockType, Unet2dConfig, UpBlockType};
use crate::Mode;
use crate::layers::{Conv, GroupNorm, group_norm};

/// diffusers' `UNet2DModel` with its weight names (`conv_in`, `time_embedding.linear_1`,
/// `class_embedding`, `down_blocks.N.resnets.M.conv1`, `mid_block.attentions.0.to_q`, ...).
#[derive(Debug, Clone)]
pub struct Unet2d {
    config: Unet2dConfig,
    conv_in: Conv,
    time_embedding: TimestepEmbedding,
    class_embedding: Option<candle_nn::Embedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv,
}

impl Unet2d {
    /// Builds the model, its weights from `vb`.
    pub fn new(config: &Unet2dConfig, vb: VarBuilder<'_>) -> candle_core::Result<Self> {
        config.validate()?;
        let cfg = config;
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let groups = cfg.groups();
        let conv_in = Conv::new(cfg.in_channels, boc[0], 3, 1, 1, vb.pp("conv_in"))?;
        let time_embedding = TimestepEmbedding::new(
            boc[0],
            cfg.time_embed_dim(),
            cfg.time_embed_dim(),
            vb.pp("time_embedding"),
        )?;
        let class_embedding = match cfg.num_class_embeds {
            Some(n) => Some(candle_nn::embedding(
                n,
                cfg.time_embed_dim(),
                vb.pp("class_embedding"),
            )?),
            None => None,
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut output_channel = boc[0];
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let input_channel = output_channel;
            output_channel = boc[i];
            let vb = vb.pp("down_blocks").pp(i);
            let (resnets, attentions) = block_layers(
                cfg,
                cfg.layers_per_block,
                |j| {
                    if j == 0 {
                        input_channel
                    } else {
                        output_channel
                    }
                },
                output_channel,
                *kind == DownBlockType::AttnDownBlock2D,
                &vb,
            )?;
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(
                    output_channel,
                    cfg.downsample_padding,
                    vb.pp("downsamplers").pp(0),
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        let last = boc[n - 1];
        let mid_block = match cfg.mid_block_type {
            None => None,
            Some(MidBlockType::UNetMidBlock2D) => {
                let vb = vb.pp("mid_block");
                let s = cfg.mid_block_scale_factor;
                let attention = if cfg.add_attention {
                    let attn_groups = cfg.attn_norm_num_groups.unwrap_or(groups);
                    Some(attention(
                        cfg,
                        last,
                        last,
                        attn_groups,
                        s,
                        vb.pp("attentions").pp(0),
                    )?)
                } else {
                    None
                };
                Some(MidBlock {
                    first: ResnetBlock2D::new(cfg, last, last, s, vb.pp("resnets").pp(0))?,
                    attention,
                    second: ResnetBlock2D::new(cfg, last, last, s, vb.pp("resnets").pp(1))?,
                })
            }
        };

        let mut up_blocks = Vec::with_capacity(n);
        let reversed: Vec<usize> = boc.iter().rev().copied().collect();
        let mut output_channel = reversed[0];
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let prev_output_channel = output_channel;
            output_channel = reversed[i];
            let input_channel = reversed[(i + 1).min(n - 1)];
            let vb = vb.pp("up_blocks").pp(i);
            let layers = cfg.layers_per_block + 1;
            // Each resnet takes the previous output and one skip; the last skip is the block
            // input's width.
            let (resnets, attentions) = block_layers(
                cfg,
                layers,
                |j| {
                    let skip = if j == layers - 1 {
                        input_channel
                    } else {
                        output_channel
                    };
                    skip + if j == 0 {
                        prev_output_channel
                    } else {
                        output_channel
                    }
                },
                output_channel,
                *kind == UpBlockType::AttnUpBlock2D,
                &vb,
            )?;
            let upsampler = if i + 1 < n {
                Some(Upsample2D::new(output_channel, vb.pp("upsamplers").pp(0))?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        Ok(Self {
            config: config.clone(),
            conv_in,
            time_embedding,
            class_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(groups, boc[0], cfg.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: Conv::new(boc[0], cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Unet2dConfig {
        &self.config
    }

    /// Predicts from `x` `[B, C, H, W]` and timesteps `t` `[B]` (or one timestep, `[1]` or a
    /// scalar, broadcast over the batch, as diffusers allows). A class-conditional model needs
    /// its labels: see [`Unet2d::forward_with_labels`].
    pub fn forward_t(&self, x: &Tensor, t: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        self.forward_with_labels(x, t, None, mode)
    }

    /// Predicts from `x` `[B, C, H, W]`, timesteps `t` `[B]` (or one) and, for a
    /// class-conditional model (`num_class_embeds` set), class labels `[B]` (or one, for the
    /// whole batch) of an integer dtype, each below `num_class_embeds`: diffusers'
    /// `UNet2DModel(sample, timestep, class_labels)`. Labels for an unconditional model, or none
    /// for a conditional one, are an error, as in diffusers.
    pub fn forward_with_labels(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
        mode: Mode,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let (b, c, h, w) = x.dims4()?;
        let f = cfg.downsampling_factor();
        if c != cfg.in_channels || h % f != 0 || w % f != 0 {
            candle_core::bail!(
                "UNet2DModel expects [B, {}, H, W] with H and W divisible by {f}, got {:?}",
                cfg.in_channels,
                x.dims()
            );
        }
        let t = per_sample(t, b, "timesteps")?;
        let x = if cfg.center_input_sample {
            x.affine(2.0, -1.0)?
        } else {
            x.clone()
        };

        let sin = SinusoidalConfig::diffusers(
            cfg.block_out_channels[0],
            cfg.flip_sin_to_cos,
            cfg.freq_shift,
        );
        // The sinusoidal features are f32; the model's dtype is the input's (diffusers casts
        // them to its own dtype the same way).
        let temb = self
            .time_embedding
            .forward(&timestep_embedding(&t, &sin)?.to_dtype(x.dtype())?)?;
        let temb = match (&self.class_embedding, labels) {
            (None, None) => temb,
            (Some(embedding), Some(labels)) => {
                let labels = per_sample(labels, b, "class labels")?;
                if labels.dtype().is_float() {
                    candle_core::bail!(
                        "class labels must be integers (u8, u32 or i64), got {:?}",
                        labels.dtype()
                    );
                }
                (temb + embedding.forward(&labels)?.to_dtype(x.dtype())?)?
            }
            (Some(_), None) => candle_core::bail!(
                "this UNet2DModel is class-conditional (num_class_embeds {}): give class labels",
                cfg.num_class_embeds.unwrap_or_default()
            ),
            (None, Some(_)) => candle_core::bail!(
                "this UNet2DModel is unconditional (num_class_embeds null): it takes no class labels"
            ),
        };

        // Every convolution of the model is a plain one with the same weights' dtype and
        // device as `conv_in`, so where it runs channels-last, they all do.
        let nhwc = self.conv_in.runs_nhwc(&x) && ddpm_kernels::group_norm_supports(&x);
        let mut h = if nhwc {
            self.conv_in.forward_into_nhwc(&x)?
        } else {
            self.conv_in.forward(&x)?
        };
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            h = block.forward(&h, &temb, mode, &mut skips, nhwc)?;
        }
        if let Some(mid) = &self.mid_block {
            h = mid.first.forward(&h, &temb, mode, nhwc)?;
            if let Some(attn) = &mid.attention {
                h = attn.forward(&h, nhwc)?;
            }
            h = mid.second.forward(&h, &temb, mode, nhwc)?;
        }
        for block in &self.up_blocks {
            h = block.forward(&h, &temb, mode, &mut skips, nhwc)?;
        }
        let h = self.conv_norm_out.forward_silu(&h, nhwc)?;
        if nhwc {
            self.conv_out.forward_out_of_nhwc(&h)
        } else {
            self.conv_out.forward(&h)
        }
    }
}
