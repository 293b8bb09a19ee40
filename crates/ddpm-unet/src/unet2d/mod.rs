//! A port of diffusers' `UNet2DModel` (unconditional, or class-conditional through a learned
//! class embedding), read from its `config.json`, split as diffusers splits it: the
//! configuration, the blocks, and the model.

mod blocks;
mod config;
mod model;

pub(crate) use blocks::per_sample;
pub use config::{
    DownBlockType, MAX_CHANNELS, MAX_LAYERS, MAX_LEVELS, MidBlockType, Unet2dConfig, UpBlockType,
};
pub use model::Unet2d;
