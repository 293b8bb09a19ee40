//! Faster CPU convolutions for candle, forward and backward, and a fused training-mode
//! BatchNorm ([`relu_batch_norm`]) and GroupNorm ([`group_norm`], [`group_norm_silu`]).
//!
//! candle 0.11's CPU `conv2d` backward computes the input gradient with a direct
//! `conv_transpose2d` loop (15-19 GFLOP/s on a 2-core x86 machine, where its matmul reaches
//! ~110-180), and `conv_transpose2d` forward uses the same loop. Here both convolutions, with
//! their bias, are one candle custom op each whose forward and backward passes are large
//! matmuls (the `gemm` crate, called directly; its AVX-512 kernels are used where the CPU has
//! them) around data rearrangements:
//!
//! - [`conv2d`]: the NCHW input is transposed to NHWC, each output position's receptive field
//!   becomes one row of `rows` `[B*L, k*k*C]` (im2row), and `rows` times the kernel transposed
//!   gives the output channels-last; a transpose back adds the bias. Backward: `dw = dy^T rows`,
//!   `dx = row2im(dy w)`, `db` = sums of `dy`.
//! - [`conv_transpose2d`]: the same pieces the other way round: `x` (NHWC) times the kernel
//!   gives rows, which row2im sums into the output; backward: `dx = im2row(dy) w^T`,
//!   `dw = x^T im2row(dy)`.
//!
//! - Channels-last forms ([`conv2d_nhwc`], [`conv_transpose2d_nhwc`], and `_nhwc` forms of
//!   the BatchNorms) take and give NHWC tensors and skip the transposes: a model that keeps its
//!   activations channels-last between convolutions (as `ddpm-unet`'s SimpleUnet does) pays
//!   for no transposes at all; [`add_per_image_nhwc`] adds a per-image vector (a projected
//!   time embedding) at every position.
//! - 3x3 stride-1 padding-1 convolutions with 16+ channels each side run forward and backward
//!   by Winograd's minimal filtering instead: F(4x4, 3x3) where it makes 256+ tiles of 4x4
//!   outputs (36 products `[tiles, C] x [C, C_out]` per block of tiles, 4x fewer multiplies),
//!   else F(2x2, 3x3) where it makes 128+ tiles of 2x2 (16 products, 2.25x fewer), the
//!   transforms done while the block is in cache (see `winograd.rs`). Inside
//!   a [`FrozenWeights`] scope (a sampling loop) each forward pass's transformed kernel is kept
//!   and reused while the kernel's values are unchanged (see `frozen.rs`).
//!
//! Why this orientation: gemm runs a product fastest with the long side along its rows. On
//! the 2-core machine this was measured on, the 3x3 convolution 32 -> 64 channels on 32x32 at
//! batch 64 as `[64, 288] x [288, 65536]` (kernel times Caffe-style columns, NCHW out) ran at
//! 36 GFLOP/s, and as `[65536, 288] x [288, 64]` (rows times the kernel, NHWC out) at ~100.
//! The forward passes and `conv2d`'s input gradient run in blocks of whole images (256+
//! output positions each, so the 4x4 maps deep in a U-Net still make products of useful size):
//! each task builds its block's rows in a per-thread buffer and multiplies them while they
//! are in cache, instead of writing the whole batch's rows (tens of megabytes) to memory and
//! reading them back. The kernel gradients, which sum over the batch, add each block's
//! product into one of 8 partial sums by a fixed rule (block i into lane i mod 8), summed in
//! order at the end; where the kernel gradient is large next to a block's rows (deep layers
//! with few positions), one product over the whole batch's rows instead. Every piece writes disjoint memory per task and sums in a fixed
//! order, and the matmuls split work over output blocks only, so results are bitwise the same
//! for every thread count.
//!
//! ```
//! use candle_core::{Device, Tensor};
//!
//! # fn main() -> candle_core::Result<()> {
//! let x = (Tensor::arange(0f32, 384., &Device::Cpu)?.reshape((2, 3, 8, 8))? / 100.)?.sin()?;
//! let w = (Tensor::arange(0f32, 108., &Device::Cpu)?.reshape((4, 3, 3, 3))? / 7.)?.cos()?;
//! let ours = ddpm_kernels::conv2d(&x, &w, None, 1, 1)?;
//! let candle = x.conv2d(&w, 1, 1, 1, 1)?;
//! let diff = (ours - candle)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(diff < 1e-4);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod conv;
mod frozen;
mod group_norm;
mod layout;
mod matmul;
mod norm;
mod ops;
mod per_image;
mod winograd;

pub(crate) use conv::LANES;
pub use conv::{conv_transpose2d, conv_transpose2d_nhwc, conv2d, conv2d_nhwc, supports};
pub use frozen::{FrozenWeights, with_frozen_weights};
pub use group_norm::{
    group_norm, group_norm_nhwc, group_norm_silu, group_norm_silu_nhwc, group_norm_supports,
};
pub use norm::{
    BatchStats, relu_batch_norm, relu_batch_norm_eval, relu_batch_norm_eval_nhwc,
    relu_batch_norm_nhwc, relu_batch_norm_supports, relu_channel_affine, relu_channel_affine_nhwc,
};
pub use per_image::add_per_image_nhwc;
