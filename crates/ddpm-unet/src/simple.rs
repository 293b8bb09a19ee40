//! The seed tutorial's `SimpleUnet`: BatchNorm, ReLU, strided convolutions, a time MLP.

use candle_core::{Module, Tensor};
use candle_nn::{BatchNorm, Linear, VarBuilder};
use ddpm_embeddings::SeedTimeMlp;
use serde::{Deserialize, Serialize};

use crate::Mode;
use crate::layers::{Conv, relu_batch_norm};

/// The seed's `SimpleUnet` hyper-parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimpleUnetConfig {
    /// Channels of the input image (3 for RGB, 1 for digits).
    pub image_channels: usize,
    /// Channels after `conv0` and after each down block; one down block per adjacent pair.
    pub down_channels: Vec<usize>,
    /// Channels entering and leaving each up block; the reverse of `down_channels` in the seed.
    pub up_channels: Vec<usize>,
    /// Channels of the output (the predicted noise), normally `image_channels`.
    pub out_dim: usize,
    /// Width of the sinusoidal time embedding and its MLP.
    pub time_emb_dim: usize,
    /// The image size the model is trained at (informational, as in diffusers' configs).
    #[serde(default)]
    pub sample_size: Option<usize>,
}

impl SimpleUnetConfig {
    /// The seed's model: 3 channels, 64..1024, time embedding 32 (62,438,883 parameters).
    pub fn seed() -> Self {
        Self {
            sample_size: Some(64),
            ..Self::with_channels(3, &[64, 128, 256, 512, 1024])
        }
    }

    /// A smaller seed model for digits: 1 channel, 32..256, 32x32.
    pub fn seed_small() -> Self {
        Self {
            sample_size: Some(32),
            ..Self::with_channels(1, &[32, 64, 128, 256])
        }
    }

    /// The seed architecture with the given image channels and down channels (up mirrored).
    pub fn with_channels(image_channels: usize, down_channels: &[usize]) -> Self {
        Self {
            image_channels,
            down_channels: down_channels.to_vec(),
            up_channels: down_channels.iter().rev().copied().collect(),
            out_dim: image_channels,
            time_emb_dim: 32,
            sample_size: None,
        }
    }

    /// Checks that the channel lists fit together.
    pub fn validate(&self) -> candle_core::Result<()> {
        let (d, u) = (&self.down_channels, &self.up_channels);
        if d.len() < 2 || d.len() > crate::MAX_LEVELS {
            candle_core::bail!(
                "SimpleUnet needs 2 to {} down_channels, got {d:?}",
                crate::MAX_LEVELS
            );
        }
        let widths = [self.image_channels, self.out_dim, self.time_emb_dim];
        if let Some(bad) = d.iter().chain(&widths).find(|&&c| c > crate::MAX_CHANNELS) {
            candle_core::bail!(
                "SimpleUnet: {bad} channels is more than the {} a layer may have",
                crate::MAX_CHANNELS
            );
        }
        if d.contains(&0) {
            candle_core::bail!("SimpleUnet down_channels must be positive, got {d:?}");
        }
        if !u.iter().eq(d.iter().rev()) {
            candle_core::bail!(
                "SimpleUnet up_channels {u:?} must be down_channels {d:?} reversed (each up block \
                 takes the skip of the down block it mirrors)"
            );
        }
        if self.image_channels == 0 || self.out_dim == 0 || self.time_emb_dim < 4 {
            candle_core::bail!(
                "SimpleUnet needs image_channels, out_dim > 0 and time_emb_dim >= 4"
            );
        }
        Ok(())
    }

    /// How many times the model halves the resolution: inputs must be divisible by `2^n`.
    pub fn downsampling_factor(&self) -> usize {
        let levels = self.down_channels.len().saturating_sub(1) as u32;
        1usize.checked_shl(levels).unwrap_or(usize::MAX)
    }
}

/// One seed `Block`: conv3x3 -> ReLU -> BatchNorm, add ReLU(Linear(t)), conv3x3 -> ReLU ->
/// BatchNorm, then a 4x4 stride-2 conv (down) or transposed conv (up).
#[derive(Debug, Clone)]
struct Block {
    time_mlp: Linear,
    conv1: Conv,
    conv2: Conv,
    bnorm1: BatchNorm,
    bnorm2: BatchNorm,
    /// A 4x4 stride-2 conv (down) or transposed conv (up).
    transform: Conv,
}

impl Block {
    fn new(
        in_ch: usize,
        out_ch: usize,
        time_emb_dim: usize,
        up: bool,
        vb: VarBuilder<'_>,
    ) -> candle_core::Result<Self> {
        let conv1_in = if up { 2 * in_ch } else { in_ch };
        let transform = if up {
            Conv::transpose(out_ch, out_ch, 4, 2, 1, vb.pp("transform"))?
        } else {
            Conv::new(out_ch, out_ch, 4, 2, 1, vb.pp("transform"))?
        };
        Ok(Self {
            time_mlp: candle_nn::linear(time_emb_dim, out_ch, vb.pp("time_mlp"))?,
            conv1: Conv::new(conv1_in, out_ch, 3, 1, 1, vb.pp("conv1"))?,
            conv2: Conv::new(out_ch, out_ch, 3, 1, 1, vb.pp("conv2"))?,
            bnorm1: candle_nn::batch_norm(out_ch, 1e-5, vb.pp("bnorm1"))?,
            bnorm2: candle_nn::batch_norm(out_ch, 1e-5, vb.pp("bnorm2"))?,
            transform,
        })
    }

    /// The block on NCHW `x`, or on NHWC `x` with `nhwc` (see [`SimpleUnet::forward_t`]).
    fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        train: bool,
        nhwc: bool,
    ) -> candle_core::Result<Tensor> {
        let conv = |c: &Conv, x: &Tensor| {
            if nhwc {
                c.forward_nhwc(x)
            } else {
                c.forward(x)
            }
        };
        let h = relu_batch_norm(&self.bnorm1, &conv(&self.conv1, x)?, train, nhwc)?;
        let time = self.time_mlp.forward(t)?.relu()?;
        let h = if nhwc {
            ddpm_kernels::add_per_image_nhwc(&h, &time)?
        } else {
            h.broadcast_add(&time.unsqueeze(2)?.unsqueeze(3)?)?
        };
        let h = relu_batch_norm(&self.bnorm2, &conv(&self.conv2, &h)?, train, nhwc)?;
        conv(&self.transform, &h)
    }

    /// Whether every layer runs channels-last for `x`.
    fn runs_nhwc(&self, x: &Tensor) -> bool {
        [&self.conv1, &self.conv2, &self.transform]
            .iter()
            .all(|c| c.runs_nhwc(x))
    }
}

/// The seed's `SimpleUnet`, with its PyTorch `state_dict` names (`conv0`, `downs.N.conv1`,
/// `downs.N.bnorm1.running_mean`, `ups.N.transform`, `time_mlp.1`, `output`).
#[derive(Debug, Clone)]
pub struct SimpleUnet {
    config: SimpleUnetConfig,
    time_mlp: SeedTimeMlp,
    conv0: Conv,
    downs: Vec<Block>,
    ups: Vec<Block>,
    output: Conv,
}

impl SimpleUnet {
    /// Builds the model, its weights from `vb`.
    pub fn new(config: &SimpleUnetConfig, vb: VarBuilder<'_>) -> candle_core::Result<Self> {
        config.validate()?;
        let c = config;
        let downs = (0..c.down_channels.len() - 1)
            .map(|i| {
                Block::new(
                    c.down_channels[i],
                    c.down_channels[i + 1],
                    c.time_emb_dim,
                    false,
                    vb.pp("downs").pp(i),
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let ups = (0..c.up_channels.len() - 1)
            .map(|i| {
                Block::new(
                    c.up_channels[i],
                    c.up_channels[i + 1],
                    c.time_emb_dim,
                    true,
                    vb.pp("ups").pp(i),
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            time_mlp: SeedTimeMlp::new(c.time_emb_dim, vb.pp("time_mlp"))?,
            conv0: Conv::new(
                c.image_channels,
                c.down_channels[0],
                3,
                1,
                1,
                vb.pp("conv0"),
            )?,
            downs,
            ups,
            output: Conv::new(
                c.up_channels[c.up_channels.len() - 1],
                c.out_dim,
                1,
                1,
                0,
                vb.pp("output"),
            )?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SimpleUnetConfig {
        &self.config
    }

    /// Predicts from `x` `[B, C, H, W]` and timesteps `t` `[B]`.
    ///
    /// f32 on the CPU, the layers run channels-last (NHWC) between the first and last
    /// convolutions, on `ddpm-kernels`' NHWC ops: the convolutions compute channels-last, so
    /// this saves transposing every activation and gradient around every convolution. Other
    /// devices and types run candle's NCHW ops; both give the same results up to float
    /// rounding.
    pub fn forward_t(&self, x: &Tensor, t: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        let f = self.config.downsampling_factor();
        if c != self.config.image_channels || h % f != 0 || w % f != 0 {
            candle_core::bail!(
                "SimpleUnet expects [B, {}, H, W] with H and W divisible by {f}, got {:?}",
                self.config.image_channels,
                x.dims()
            );
        }
        let train = mode.is_train();
        let t = self.time_mlp.forward(t)?;
        let nhwc = [&self.conv0, &self.output].iter().all(|c| c.runs_nhwc(x))
            && self.downs.iter().chain(&self.ups).all(|b| b.runs_nhwc(x));
        let (mut x, channels) = if nhwc {
            (self.conv0.forward_into_nhwc(x)?, 3)
        } else {
            (self.conv0.forward(x)?, 1)
        };
        let mut residuals = Vec::with_capacity(self.downs.len());
        for down in &self.downs {
            x = down.forward(&x, &t, train, nhwc)?;
            residuals.push(x.clone());
        }
        for up in &self.ups {
            let skip = residuals.pop().expect("one residual per down block");
            x = Tensor::cat(&[&x, &skip], channels)?;
            x = up.forward(&x, &t, train, nhwc)?;
        }
        if nhwc {
            self.output.forward_out_of_nhwc(&x)
        } else {
            self.output.forward(&x)
        }
    }
}
