//! `UNet2DModel`'s `config.json`: the block types, every key with diffusers' default, presets
//! and validation.

use serde::{Deserialize, Serialize};

/// The most resolution levels a U-Net config may have (a 4096-pixel side halves 12 times).
pub const MAX_LEVELS: usize = 12;
/// The most channels a U-Net config may give any layer.
pub const MAX_CHANNELS: usize = 65536;
/// The most resnet layers a `UNet2DModel` block may have.
pub const MAX_LAYERS: usize = 64;

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
        if n > MAX_LEVELS {
            return Err(unsupported(
                "block_out_channels",
                &n,
                &format!("at most {MAX_LEVELS} levels"),
            ));
        }
        for (key, v) in self
            .block_out_channels
            .iter()
            .map(|&c| ("block_out_channels", c))
            .chain([
                ("in_channels", self.in_channels),
                ("out_channels", self.out_channels),
            ])
        {
            if v == 0 || v > MAX_CHANNELS {
                return Err(unsupported(
                    key,
                    &v,
                    &format!("1 to {MAX_CHANNELS} channels"),
                ));
            }
        }
        if self.layers_per_block == 0 || self.layers_per_block > MAX_LAYERS {
            return Err(unsupported(
                "layers_per_block",
                &self.layers_per_block,
                &format!("1 to {MAX_LAYERS}"),
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
        let levels = self.block_out_channels.len().saturating_sub(1) as u32;
        1usize.checked_shl(levels).unwrap_or(usize::MAX)
    }

    pub(crate) fn groups(&self) -> usize {
        self.norm_num_groups.expect("validated")
    }
}
