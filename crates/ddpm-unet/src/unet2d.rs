//! A port of diffusers' `UNet2DModel` (unconditional, or class-conditional through a learned
//! class embedding), read from its `config.json`.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use ddpm_embeddings::{SinusoidalConfig, TimestepEmbedding, timestep_embedding};
use serde::{Deserialize, Serialize};

use crate::Mode;
use crate::layers::{Conv, Dropout, GroupNorm, SpatialAttention, group_norm};

/// A down block type of `UNet2DModel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownBlockType {
    /// Resnets, then a stride-2 conv.
    DownBlock2D,
    /// Resnets each followed by self-attention, then a stride-2 conv.
    AttnDownBlock2D,
}

/// An up block type of `UNet2DModel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpBlockType {
    /// Resnets over the skip concatenation, then nearest 2x upsampling and a conv.
    UpBlock2D,
    /// The same with self-attention after each resnet.
    AttnUpBlock2D,
}

/// The middle block type of `UNet2DModel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MidBlockType {
    /// Resnet, (attention, resnet) per layer.
    UNetMidBlock2D,
}

/// diffusers' `UNet2DModel` configuration: the keys of its `config.json`.
///
/// Missing keys take diffusers' defaults; keys starting with `_` (`_class_name`,
/// `_diffusers_version`) are metadata. Any other key this port does not know, and any value it
/// does not support (a `fourier` time embedding, a `timestep` or `identity` class embedding,
/// `scale_shift`), is an error
/// naming it: nothing is silently ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unet2dConfig {
    /// Input height and width (informational; the model runs at any size divisible by its
    /// downsampling factor).
    #[serde(default)]
    pub sample_size: Option<usize>,
    /// Input channels.
    #[serde(default = "three")]
    pub in_channels: usize,
    /// Output channels.
    #[serde(default = "three")]
    pub out_channels: usize,
    /// Map inputs from [0, 1] to [-1, 1] first (`2x - 1`).
    #[serde(default)]
    pub center_input_sample: bool,
    /// Only `positional` is supported.
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    /// Width of the time embedding MLP; `null` means `4 * block_out_channels[0]`.
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    /// `downscale_freq_shift` of the sinusoidal embedding.
    #[serde(default)]
    pub freq_shift: f64,
    /// Cosines before sines in the sinusoidal embedding.
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    /// One down block per resolution.
    pub down_block_types: Vec<DownBlockType>,
    /// The middle block, or `null` for none.
    #[serde(default = "mid_default")]
    pub mid_block_type: Option<MidBlockType>,
    /// One up block per resolution.
    pub up_block_types: Vec<UpBlockType>,
    /// Channels at each resolution.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    #[serde(default = "two")]
    pub layers_per_block: usize,
    /// Output scale of the middle block's resnets and attention.
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    /// Padding of the stride-2 downsampling conv: 1, or 0 (pad right and bottom by one first).
    #[serde(default = "one")]
    pub downsample_padding: usize,
    /// Only `conv` is supported.
    #[serde(default = "conv")]
    pub downsample_type: String,
    /// Only `conv` is supported.
    #[serde(default = "conv")]
    pub upsample_type: String,
    /// Dropout inside each resnet, in training.
    #[serde(default)]
    pub dropout: f64,
    /// `silu` (or its alias `swish`).
    #[serde(default = "silu")]
    pub act_fn: String,
    /// Channels per attention head; `null` means one head over all channels.
    #[serde(default = "eight")]
    pub attention_head_dim: Option<usize>,
    /// Groups of every GroupNorm.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: Option<usize>,
    /// Groups of the middle block's attention GroupNorm; `null` means `norm_num_groups`.
    #[serde(default)]
    pub attn_norm_num_groups: Option<usize>,
    /// Epsilon of every GroupNorm.
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    /// Only `default` (the time embedding is added) is supported.
    #[serde(default = "default_str")]
    pub resnet_time_scale_shift: String,
    /// Attention in the middle block.
    #[serde(default = "yes")]
    pub add_attention: bool,
    /// Must be `null`: the `timestep` and `identity` class embeddings are not supported.
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// Class conditioning: a learned embedding (`class_embedding`, `[n, time_embed_dim]`) of
    /// each image's class, added to the time embedding. `null` is unconditional. Models trained
    /// here for classifier-free guidance keep the last class, `n - 1`, for "no class" (see
    /// [`crate::Guided`]).
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// Used by diffusers only for learned time embeddings; kept for round trips.
    #[serde(default)]
    pub num_train_timesteps: Option<usize>,
}

fn three() -> usize {
    3
}
fn two() -> usize {
    2
}
fn one() -> usize {
    1
}
fn eight() -> Option<usize> {
    Some(8)
}
fn thirty_two() -> Option<usize> {
    Some(32)
}
fn one_f() -> f64 {
    1.0
}
fn norm_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn positional() -> String {
    "positional".into()
}
fn conv() -> String {
    "conv".into()
}
fn silu() -> String {
    "silu".into()
}
fn default_str() -> String {
    "default".into()
}
fn mid_default() -> Option<MidBlockType> {
    Some(MidBlockType::UNetMidBlock2D)
}

impl Unet2dConfig {
    /// The architecture of `google/ddpm-cifar10-32`, the DDPM paper's CIFAR-10 model:
    /// channels 128, 256, 256, 256, two resnets per block, attention at 16x16, single-head
    /// attention, `downsample_padding` 0 (35.7M parameters).
    pub fn ddpm_cifar10() -> Self {
        use DownBlockType::*;
        use UpBlockType::*;
        Self {
            sample_size: Some(32),
            in_channels: 3,
            out_channels: 3,
            center_input_sample: false,
            time_embedding_type: positional(),
            time_embedding_dim: None,
            freq_shift: 1.0,
            flip_sin_to_cos: false,
            down_block_types: vec![DownBlock2D, AttnDownBlock2D, DownBlock2D, DownBlock2D],
            mid_block_type: mid_default(),
            up_block_types: vec![UpBlock2D, UpBlock2D, AttnUpBlock2D, UpBlock2D],
            block_out_channels: vec![128, 256, 256, 256],
            layers_per_block: 2,
            mid_block_scale_factor: 1.0,
            downsample_padding: 0,
            downsample_type: conv(),
            upsample_type: conv(),
            dropout: 0.0,
            act_fn: silu(),
            attention_head_dim: None,
            norm_num_groups: Some(32),
            attn_norm_num_groups: None,
            norm_eps: 1e-6,
            resnet_time_scale_shift: default_str(),
            add_attention: true,
            class_embed_type: None,
            num_class_embeds: None,
            num_train_timesteps: None,
        }
    }

    /// A small model for 32x32 digits: channels 32, 64, 128, one resnet per block, attention
    /// at 8x8 and in the middle (heads of 32 channels).
    pub fn mnist() -> Self {
        use DownBlockType::*;
        use UpBlockType::*;
        Self {
            sample_size: Some(32),
            in_channels: 1,
            out_channels: 1,
            time_embedding_dim: None,
            freq_shift: 0.0,
            flip_sin_to_cos: true,
            down_block_types: vec![DownBlock2D, DownBlock2D, AttnDownBlock2D],
            up_block_types: vec![AttnUpBlock2D, UpBlock2D, UpBlock2D],
            block_out_channels: vec![32, 64, 128],
            layers_per_block: 1,
            downsample_padding: 1,
            attention_head_dim: Some(32),
            norm_num_groups: Some(8),
            norm_eps: 1e-5,
            ..Self::ddpm_cifar10()
        }
    }

    /// The default training recipe's model, for 1-channel 16x16 digits: channels 32, 64, 64,
    /// one resnet per block, no attention, 8 groups per GroupNorm.
    pub fn mnist_16() -> Self {
        use DownBlockType::*;
        use UpBlockType::*;
        Self {
            sample_size: Some(16),
            down_block_types: vec![DownBlock2D, DownBlock2D, DownBlock2D],
            up_block_types: vec![UpBlock2D, UpBlock2D, UpBlock2D],
            block_out_channels: vec![32, 64, 64],
            add_attention: false,
            ..Self::mnist()
        }
    }

    /// [`Unet2dConfig::mnist_16`] conditioned on the digit: 11 class embeddings, the ten
    /// digits and "no class" for classifier-free guidance.
    pub fn mnist_16_classes() -> Self {
        Self {
            num_class_embeds: Some(11),
            ..Self::mnist_16()
        }
    }

    /// Checks every value this port supports, naming the first that it does not.
    pub fn validate(&self) -> candle_core::Result<()> {
        let n = self.block_out_channels.len();
        let unsupported = |key: &str, value: &dyn std::fmt::Debug, supported: &str| {
            candle_core::Error::Msg(format!(
                "UNet2DModel config: {key} = {value:?} is not supported ({supported})"
            ))
        };
        if n == 0 {
            return Err(unsupported(
                "block_out_channels",
                &self.block_out_channels,
                "need at least one",
            ));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            candle_core::bail!(
                "UNet2DModel config: down_block_types ({}), up_block_types ({}) and \
                 block_out_channels ({n}) must have the same length",
                self.down_block_types.len(),
                self.up_block_types.len()
            );
        }
        if self.time_embedding_type != "positional" {
            return Err(unsupported(
                "time_embedding_type",
                &self.time_embedding_type,
                "only \"positional\"",
            ));
        }
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            return Err(unsupported("act_fn", &self.act_fn, "only \"silu\""));
        }
        if self.downsample_type != "conv" {
            return Err(unsupported(
                "downsample_type",
                &self.downsample_type,
                "only \"conv\"",
            ));
        }
        if self.upsample_type != "conv" {
            return Err(unsupported(
                "upsample_type",
                &self.upsample_type,
                "only \"conv\"",
            ));
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(unsupported(
                "resnet_time_scale_shift",
                &self.resnet_time_scale_shift,
                "only \"default\"",
            ));
        }
        if self.class_embed_type.is_some() {
            return Err(unsupported(
                "class_embed_type",
                &self.class_embed_type,
                "only null (a learned embedding when num_class_embeds is set)",
            ));
        }
        if self.num_class_embeds == Some(0) {
            return Err(unsupported(
                "num_class_embeds",
                &self.num_class_embeds,
                "positive or null",
            ));
        }
        if self.norm_num_groups.is_none() {
            return Err(unsupported(
                "norm_num_groups",
                &self.norm_num_groups,
                "a number of groups",
            ));
        }
        if self.downsample_padding > 1 {
            return Err(unsupported(
                "downsample_padding",
                &self.downsample_padding,
                "0 or 1",
            ));
        }
        if self.layers_per_block == 0 {
            return Err(unsupported(
                "layers_per_block",
                &self.layers_per_block,
                "at least 1",
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(unsupported("dropout", &self.dropout, "in [0, 1)"));
        }
        if self.attention_head_dim == Some(0) {
            return Err(unsupported(
                "attention_head_dim",
                &self.attention_head_dim,
                "positive or null",
            ));
        }
        if self.block_out_channels.contains(&0) || self.in_channels == 0 || self.out_channels == 0 {
            candle_core::bail!("UNet2DModel config: channel counts must be positive");
        }
        Ok(())
    }

    /// The width of the time embedding MLP.
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(4 * self.block_out_channels[0])
    }

    /// How many times the model halves the resolution: inputs must be divisible by `2^n`.
    pub fn downsampling_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    fn groups(&self) -> usize {
        self.norm_num_groups.expect("validated")
    }
}

/// diffusers' `ResnetBlock2D` (time embedding added, `pre_norm`): GroupNorm, SiLU, conv3x3,
/// `+ time_emb_proj(silu(temb))`, GroupNorm, SiLU, dropout, conv3x3, shortcut, rescale.
#[derive(Debug, Clone)]
struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv,
    time_emb_proj: candle_nn::Linear,
    norm2: GroupNorm,
    dropout: Dropout,
    conv2: Conv,
    conv_shortcut: Option<Conv>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    fn new(
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
    fn forward(
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
struct Downsample2D {
    conv: Conv,
    pad_right_bottom: bool,
}

impl Downsample2D {
    fn new(ch: usize, padding: usize, vb: VarBuilder<'_>) -> candle_core::Result<Self> {
        Ok(Self {
            conv: Conv::new(ch, ch, 3, 2, padding, vb.pp("conv"))?,
            pad_right_bottom: padding == 0,
        })
    }

    fn forward(&self, x: &Tensor, nhwc: bool) -> candle_core::Result<Tensor> {
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
struct Upsample2D {
    conv: Conv,
}

impl Upsample2D {
    fn new(ch: usize, vb: VarBuilder<'_>) -> candle_core::Result<Self> {
        Ok(Self {
            conv: Conv::new(ch, ch, 3, 1, 1, vb.pp("conv"))?,
        })
    }

    fn forward(&self, x: &Tensor, nhwc: bool) -> candle_core::Result<Tensor> {
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
fn attention(
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
fn block_layers(
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
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialAttention>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    fn forward(
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
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialAttention>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    fn forward(
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
struct MidBlock {
    first: ResnetBlock2D,
    attention: Option<SpatialAttention>,
    second: ResnetBlock2D,
}

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
