//! Denoising U-Nets for diffusion models, on candle.
//!
//! Two architectures behind one interface, [`Unet`]:
//!
//! - [`SimpleUnet`], the seed tutorial's model (BatchNorm, ReLU, strided convolutions, a time MLP
//!   added after each block's first conv), with the PyTorch `state_dict` names.
//! - [`Unet2d`], a port of diffusers' `UNet2DModel`, built from its `config.json`. It loads the
//!   checkpoints diffusers publishes (`google/ddpm-cifar10-32` and what `train_unconditional.py`
//!   writes, older attention names included) and saves folders that
//!   `UNet2DModel.from_pretrained` loads back with the same output.
//!
//! Both train (weights in a `VarMap`, BatchNorm and dropout in [`Mode::Train`]) and infer
//! (weights from safetensors, [`Mode::Eval`]). Loading checks every tensor: a missing,
//! misshaped or wrongly typed one is an error naming it and both shapes.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use ddpm_unet::{init_seeded, Mode, Unet, UnetConfig};
//!
//! # fn main() -> candle_core::Result<()> {
//! let device = Device::Cpu;
//! let config = UnetConfig::preset("seed-tiny")?;
//! let varmap = VarMap::new();
//! let unet = Unet::new(&config, VarBuilder::from_varmap(&varmap, DType::F32, &device))?;
//! init_seeded(&varmap, 0)?; // candle's own initialisation cannot be seeded
//!
//! let x = Tensor::zeros((2, 1, 16, 16), DType::F32, &device)?;
//! let t = Tensor::new(&[10u32, 200], &device)?;
//! let eps = unet.forward_t(&x, &t, Mode::Eval)?;
//! assert_eq!(eps.dims(), &[2, 1, 16, 16]);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod classes;
mod layers;
mod simple;
mod unet2d;
mod weights;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::{Map, Value};

pub use classes::{Classes, Guided};
/// Reuse of transformed convolution kernels while the weights stay fixed (sampling): see
/// [`Unet::freeze_weights`].
pub use ddpm_kernels::{FrozenWeights, with_frozen_weights};
pub use layers::Mode;
pub use simple::{SimpleUnet, SimpleUnetConfig};
pub use unet2d::{
    DownBlockType, MAX_CHANNELS, MAX_LAYERS, MAX_LEVELS, MidBlockType, Unet2d, Unet2dConfig,
    UpBlockType,
};
pub use weights::{
    build_checked, count_parameters, init_seeded, is_buffer, non_finite_count, read_pytorch,
    read_safetensors, rename_legacy_attention, trainable_vars, varmap_tensors, write_safetensors,
};

/// The diffusers version whose `UNet2DModel` this port was checked against.
pub use ddpm_forward::DIFFUSERS_VERSION;
/// The model interface of `ddpm-sampler`, implemented by [`Unet`] and [`Guided`].
pub use ddpm_forward::Denoiser;

/// The most parameters a model built here may have: 2^31 (8 GiB of f32 weights, before the
/// EMA and optimizer state training adds). An absurd config (10^8 channels) is refused before
/// anything is allocated.
pub const MAX_PARAMETERS: u64 = 1 << 31;

/// The largest image side a model here takes.
pub const MAX_IMAGE_SIZE: usize = 4096;

/// The most values one activation of a batch may hold: 2^31 (8 GiB of f32); see
/// [`UnetConfig::check_input`].
pub const MAX_ACTIVATION: u64 = 1 << 31;

/// The file name diffusers gives a model's weights.
pub const DIFFUSERS_WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// Which U-Net, with its hyper-parameters. In JSON, the `_class_name` key tells them apart, as in
/// a diffusers `config.json`: `UNet2DModel` or `SimpleUnet`.
#[derive(Debug, Clone, PartialEq)]
// Built once per model; boxing would only make matching clumsier.
#[allow(clippy::large_enum_variant)]
pub enum UnetConfig {
    /// The seed's `SimpleUnet`.
    Simple(SimpleUnetConfig),
    /// diffusers' `UNet2DModel`.
    Unet2d(Unet2dConfig),
}

/// The preset names [`UnetConfig::preset`] accepts.
pub const PRESETS: [&str; 7] = [
    "seed",
    "seed-small",
    "seed-tiny",
    "ddpm-cifar10",
    "mnist",
    "mnist-16",
    "mnist-16-classes",
];

impl UnetConfig {
    /// A named preset:
    /// - `seed`: the seed's `SimpleUnet`, 3x64x64 (62,438,883 parameters);
    /// - `seed-small`: `SimpleUnet` with channels 32, 64, 128, 256 for 1-channel 32x32 digits;
    /// - `seed-tiny`: `SimpleUnet` with channels 16, 32, 64 (for tests and examples);
    /// - `ddpm-cifar10`: `google/ddpm-cifar10-32`'s `UNet2DModel` (35.7M parameters);
    /// - `mnist`: a small `UNet2DModel` for 1-channel 32x32 digits;
    /// - `mnist-16`: a smaller one for 16x16 digits;
    /// - `mnist-16-classes`: `mnist-16` conditioned on the digit (10 classes and "no class"),
    ///   the default training recipe's.
    pub fn preset(name: &str) -> candle_core::Result<Self> {
        Ok(match name {
            "seed" => Self::Simple(SimpleUnetConfig::seed()),
            "seed-small" => Self::Simple(SimpleUnetConfig::seed_small()),
            "seed-tiny" => Self::Simple(SimpleUnetConfig::with_channels(1, &[16, 32, 64])),
            "ddpm-cifar10" => Self::Unet2d(Unet2dConfig::ddpm_cifar10()),
            "mnist" => Self::Unet2d(Unet2dConfig::mnist()),
            "mnist-16" => Self::Unet2d(Unet2dConfig::mnist_16()),
            "mnist-16-classes" => Self::Unet2d(Unet2dConfig::mnist_16_classes()),
            other => candle_core::bail!(
                "unknown model preset {other:?} (known: {})",
                PRESETS.join(", ")
            ),
        })
    }

    /// Parses a `config.json`: a diffusers `UNet2DModel` config, or ours for `SimpleUnet`.
    /// Keys starting with `_` other than `_class_name` are metadata; any other unknown key is
    /// an error naming it.
    pub fn from_json(text: &str) -> candle_core::Result<Self> {
        Self::parse(text, false).map(|(c, _)| c)
    }

    /// [`UnetConfig::from_json`], but a key it does not know (one a newer diffusers added) is
    /// left out with a warning, as diffusers itself does; the warnings come back, one line
    /// each. Unsupported values of known keys are still errors.
    pub fn from_json_lenient(text: &str) -> candle_core::Result<(Self, Vec<String>)> {
        Self::parse(text, true)
    }

    fn parse(text: &str, lenient: bool) -> candle_core::Result<(Self, Vec<String>)> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| msg(format!("config.json: {e}")))?;
        let Value::Object(mut map) = value else {
            return Err(msg("config.json: expected a JSON object".into()));
        };
        let class = match map.get("_class_name") {
            None => "UNet2DModel".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(msg(format!(
                    "config.json: _class_name must be a string, got {other}"
                )));
            }
        };
        map.retain(|k, _| !k.starts_with('_'));
        let mut warnings = Vec::new();
        if lenient {
            let preset = match class.as_str() {
                "SimpleUnet" => Some(Self::preset("seed-tiny")?),
                "UNet2DModel" => Some(Self::preset("mnist-16")?),
                _ => None,
            };
            if let Some(Value::Object(known)) = preset.map(|p| p.to_value()) {
                map.retain(|k, _| {
                    let keep = known.contains_key(k);
                    if !keep {
                        warnings.push(format!(
                            "config.json: unknown {class} key {k:?} ignored (this library reads diffusers {DIFFUSERS_VERSION}'s keys)"
                        ));
                    }
                    keep
                });
            }
        }
        let parse_err = |e: serde_json::Error| msg(format!("{class} config.json: {e}"));
        match class.as_str() {
            "UNet2DModel" => Ok((
                Self::Unet2d(serde_json::from_value(Value::Object(map)).map_err(parse_err)?),
                warnings,
            )),
            "SimpleUnet" => Ok((
                Self::Simple(serde_json::from_value(Value::Object(map)).map_err(parse_err)?),
                warnings,
            )),
            other => Err(msg(format!(
                "config.json: model class {other:?} is not supported (UNet2DModel or SimpleUnet)"
            ))),
        }
    }

    /// The `config.json` text: diffusers' layout for `UNet2DModel` (with `_class_name` and
    /// `_diffusers_version`), the same shape for `SimpleUnet`.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.to_value()).expect("JSON values serialize")
    }

    /// The `config.json` content as a JSON value.
    pub fn to_value(&self) -> Value {
        let (class, body) = match self {
            Self::Simple(c) => ("SimpleUnet", serde_json::to_value(c)),
            Self::Unet2d(c) => ("UNet2DModel", serde_json::to_value(c)),
        };
        let Value::Object(body) = body.expect("configs serialize") else {
            unreachable!("configs are structs")
        };
        let mut map = Map::new();
        map.insert("_class_name".into(), class.into());
        if matches!(self, Self::Unet2d(_)) {
            map.insert("_diffusers_version".into(), DIFFUSERS_VERSION.into());
        }
        map.extend(body);
        Value::Object(map)
    }

    /// The number of parameters (and buffers) of the model this config builds, counted by
    /// building it over views of one zero (no weight is allocated), so an absurd config can be
    /// refused before anything is allocated. Configs that fail to build are errors as
    /// [`Unet::new`] gives them.
    pub fn parameter_count(&self) -> candle_core::Result<u128> {
        weights::count_built(|vb| Unet::build(self, vb).map(|_| ()))
    }

    /// Input channels.
    pub fn in_channels(&self) -> usize {
        match self {
            Self::Simple(c) => c.image_channels,
            Self::Unet2d(c) => c.in_channels,
        }
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        match self {
            Self::Simple(c) => c.out_dim,
            Self::Unet2d(c) => c.out_channels,
        }
    }

    /// The image size the model was made for, where its config says (`sample_size`).
    pub fn sample_size(&self) -> Option<usize> {
        match self {
            Self::Simple(c) => c.sample_size,
            Self::Unet2d(c) => c.sample_size,
        }
    }

    /// Sets the informational `sample_size`.
    pub fn set_sample_size(&mut self, size: usize) {
        match self {
            Self::Simple(c) => c.sample_size = Some(size),
            Self::Unet2d(c) => c.sample_size = Some(size),
        }
    }

    /// `num_class_embeds` of a class-conditional `UNet2DModel`; `None` for an unconditional
    /// model.
    pub fn num_class_embeds(&self) -> Option<usize> {
        match self {
            Self::Simple(_) => None,
            Self::Unet2d(c) => c.num_class_embeds,
        }
    }

    /// Checks the config's structure (what a model of it would be) without building anything:
    /// every unsupported value and every absurd size is an error naming it.
    pub fn validate(&self) -> candle_core::Result<()> {
        match self {
            Self::Simple(c) => c.validate(),
            Self::Unet2d(c) => c.validate(),
        }
    }

    /// Input height and width must be multiples of this.
    pub fn downsampling_factor(&self) -> usize {
        match self {
            Self::Simple(c) => c.downsampling_factor(),
            Self::Unet2d(c) => c.downsampling_factor(),
        }
    }

    /// The most channels any of the model's activations has.
    pub fn widest_channels(&self) -> usize {
        let widest = match self {
            Self::Simple(c) => c.down_channels.iter().chain(&c.up_channels).max(),
            Self::Unet2d(c) => c.block_out_channels.iter().max(),
        };
        widest
            .copied()
            .unwrap_or(0)
            .max(self.in_channels())
            .max(self.out_channels())
    }

    /// Checks that a batch of `batch` images of `height` x `width` fits this model: sizes that
    /// are positive multiples of [`UnetConfig::downsampling_factor`] up to [`MAX_IMAGE_SIZE`],
    /// and a widest activation (`batch x widest channels x height x width`) of at most
    /// [`MAX_ACTIVATION`] values. An error names what is too large before anything is
    /// allocated.
    pub fn check_input(
        &self,
        batch: usize,
        height: usize,
        width: usize,
    ) -> candle_core::Result<()> {
        self.validate()?;
        let f = self.downsampling_factor();
        for (what, v) in [("height", height), ("width", width)] {
            if v == 0 || !v.is_multiple_of(f) || v > MAX_IMAGE_SIZE {
                candle_core::bail!(
                    "image {what} {v} must be a positive multiple of {f} up to {MAX_IMAGE_SIZE} for this model"
                );
            }
        }
        if batch == 0 {
            candle_core::bail!("a batch needs at least one image, got 0");
        }
        let values = batch as u128 * self.widest_channels() as u128 * (height * width) as u128;
        if values > MAX_ACTIVATION as u128 {
            candle_core::bail!(
                "{batch} images of {height}x{width} would need {:.1} GiB for each of this model's widest activations ({} channels), more than the {} GiB allowed: use fewer images at once",
                values as f64 * 4.0 / (1u64 << 30) as f64,
                self.widest_channels(),
                (MAX_ACTIVATION * 4) >> 30
            );
        }
        Ok(())
    }
}

fn msg(s: String) -> candle_core::Error {
    candle_core::Error::Msg(s)
}

/// Serialized as its `config.json` object (so a training config can embed it).
impl serde::Serialize for UnetConfig {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(serializer)
    }
}

impl<'de> serde::Deserialize<'de> for UnetConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Self::from_json(&value.to_string()).map_err(serde::de::Error::custom)
    }
}

/// A U-Net of either architecture.
#[derive(Debug, Clone)]
// One per model, never in a hot collection; boxing would only make matching clumsier.
#[allow(clippy::large_enum_variant)]
pub enum Unet {
    /// The seed's `SimpleUnet`.
    Simple(SimpleUnet),
    /// diffusers' `UNet2DModel`.
    Unet2d(Unet2d),
}

impl Unet {
    /// Builds the model for `config`, its weights from `vb` (a `VarMap` to train, loaded
    /// tensors to infer; see [`Unet::from_tensors`] for a checked load).
    /// A config whose model would have more than [`MAX_PARAMETERS`] parameters is an error
    /// before anything is allocated.
    pub fn new(config: &UnetConfig, vb: VarBuilder<'_>) -> candle_core::Result<Self> {
        let n = config.parameter_count()?;
        if n > MAX_PARAMETERS as u128 {
            candle_core::bail!(
                "this model config would have {n} parameters ({:.1} GiB in f32), more than the {} this library builds",
                n as f64 * 4.0 / (1u64 << 30) as f64,
                MAX_PARAMETERS
            );
        }
        Self::build(config, vb)
    }

    fn build(config: &UnetConfig, vb: VarBuilder<'_>) -> candle_core::Result<Self> {
        Ok(match config {
            UnetConfig::Simple(c) => Self::Simple(SimpleUnet::new(c, vb)?),
            UnetConfig::Unet2d(c) => Self::Unet2d(Unet2d::new(c, vb)?),
        })
    }

    /// Builds the model from named tensors, checking each (see [`build_checked`]).
    pub fn from_tensors(
        config: &UnetConfig,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> candle_core::Result<Self> {
        build_checked(tensors, device, |vb| Self::new(config, vb))
    }

    /// Loads a model folder: `config.json` and `diffusion_pytorch_model.safetensors` (a diffusers
    /// `UNet2DModel` folder, or one written by [`save_pretrained`]).
    pub fn from_pretrained(dir: &Path, device: &Device) -> candle_core::Result<(UnetConfig, Self)> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| msg(format!("reading {}: {e}", config_path.display())))?;
        let config = UnetConfig::from_json(&text)
            .map_err(|e| msg(format!("{}: {e}", config_path.display())))?;
        let weights = dir.join(DIFFUSERS_WEIGHTS);
        let tensors = read_safetensors(&weights, device)?;
        let unet = Self::from_tensors(&config, tensors, device)
            .map_err(|e| msg(format!("{}: {e}", weights.display())))?;
        Ok((config, unet))
    }

    /// Predicts from `x` `[B, C, H, W]` and timesteps `t` `[B]`.
    pub fn forward_t(&self, x: &Tensor, t: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        self.forward_with_labels(x, t, None, mode)
    }

    /// Predicts from `x` `[B, C, H, W]`, timesteps `t` `[B]` and, for a class-conditional
    /// model, class labels `[B]` (see [`Unet2d::forward_with_labels`]).
    pub fn forward_with_labels(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
        mode: Mode,
    ) -> candle_core::Result<Tensor> {
        match (self, labels) {
            (Self::Simple(m), None) => m.forward_t(x, t, mode),
            (Self::Simple(_), Some(_)) => {
                candle_core::bail!("SimpleUnet is unconditional: it takes no class labels")
            }
            (Self::Unet2d(m), labels) => m.forward_with_labels(x, t, labels, mode),
        }
    }

    /// The number of class embeddings of a class-conditional model (`num_class_embeds`);
    /// `None` for an unconditional one.
    pub fn num_class_embeds(&self) -> Option<usize> {
        match self {
            Self::Simple(_) => None,
            Self::Unet2d(m) => m.config().num_class_embeds,
        }
    }

    /// Promises that the weights stay as they are while the guard is held (a sampling loop),
    /// so the convolutions transform their kernels once instead of once per forward pass.
    /// The results are the same bits either way: a kept transform is used only while its
    /// kernel's values are unchanged. Hold it on the thread that runs the model:
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use candle_nn::{VarBuilder, VarMap};
    /// # use ddpm_unet::{Denoiser, Unet, UnetConfig};
    /// # fn main() -> candle_core::Result<()> {
    /// # let device = Device::Cpu;
    /// # let varmap = VarMap::new();
    /// # let unet = Unet::new(&UnetConfig::preset("seed-tiny")?, VarBuilder::from_varmap(&varmap, DType::F32, &device))?;
    /// # let x = Tensor::zeros((1, 1, 16, 16), DType::F32, &device)?;
    /// let _frozen = unet.freeze_weights();
    /// for t in [30u32, 20, 10] {
    ///     let eps = unet.predict(&x, &Tensor::new(&[t], &device)?)?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn freeze_weights(&self) -> FrozenWeights {
        FrozenWeights::hold()
    }
}

impl Denoiser for Unet {
    /// Inference ([`Mode::Eval`]), unconditional; a class-conditional model samples through
    /// [`Guided`].
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_t(x_t, t, Mode::Eval)
    }
}

/// Writes a model folder in diffusers' layout: `config.json` and
/// `diffusion_pytorch_model.safetensors` (metadata `format: pt`). For a `UNet2DModel`,
/// `UNet2DModel.from_pretrained(dir)` loads it. The folder is created if needed; each file goes
/// through a temporary file synced and renamed into place.
pub fn save_pretrained(
    config: &UnetConfig,
    tensors: &HashMap<String, Tensor>,
    dir: &Path,
) -> candle_core::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| msg(format!("creating {}: {e}", dir.display())))?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(tensors, Some(metadata), &dir.join(DIFFUSERS_WEIGHTS))?;
    weights::write_atomically(
        &dir.join("config.json"),
        (config.to_json() + "\n").as_bytes(),
    )
}
