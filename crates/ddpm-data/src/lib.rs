//! Image datasets for diffusion training: load, shape, shuffle, batch, and write PNG grids.
//!
//! Every source becomes an [`ImageSet`]: `u8` pixels in CHW layout, one size and channel count,
//! optional labels. [`Batches`] turns one into `f32` tensors in `[-1, 1]`, shuffled per epoch by
//! a seed, with optional random horizontal flips; its [`DataPosition`] can be saved and
//! restored so a resumed run sees exactly the batches an uninterrupted one would.
//!
//! Sources:
//! - [`ImageSet::embedded_mnist`]: 10,000 MNIST digits compiled into the crate (no network, no
//!   set-up; provenance in `data/mnist/README.md`).
//! - [`ImageSet::read_idx`]: MNIST-format IDX files, raw or gzipped.
//! - [`ImageSet::image_folder`]: PNG and JPEG files, resized and centre-cropped, labelled by
//!   class subfolder as torchvision's `ImageFolder` does.
//! - [`ImageSet::read_parquet`]: Hugging Face parquet files whose image column holds encoded
//!   bytes (`ylecun/mnist`, `uoft-cs/cifar10`, ...).
//!
//! ```
//! use candle_core::Device;
//! use ddpm_data::{Batches, ImageSet};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let digits = ImageSet::embedded_mnist()?.pad_to(32)?; // 28x28 -> 32x32, as U-Nets like
//! assert_eq!((digits.len(), digits.channels(), digits.height()), (10_000, 1, 32));
//! let mut batches = Batches::new(digits.into(), 16, 0, false);
//! let x = batches.next_batch(&Device::Cpu)?;
//! assert_eq!(x.dims(), &[16, 1, 32, 32]);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod batches;
mod grid;
mod sources;

use std::path::PathBuf;

pub use batches::{Batches, DataPosition};
pub use grid::{grid_image, image_format, tensor_to_images, write_grid, write_image, write_strip};
pub use sources::parquet_summary;

/// Why data could not be loaded. Every variant names the file at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The file or folder could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not what its kind requires (bad magic number, truncated, wrong column).
    #[error("{path}: {message}")]
    Format {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An image could not be decoded.
    #[error("{path}: cannot decode image: {message}")]
    Decode {
        /// The file (or `file#row` for a parquet row).
        path: String,
        /// The decoder's message.
        message: String,
    },
    /// Writing an output picture failed.
    #[error("writing {path}: {message}")]
    Write {
        /// The path.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A data error where candle's is expected (`?` in a function returning
/// `candle_core::Result`): a tensor error as it was, any other kept whole as the source.
impl From<DataError> for candle_core::Error {
    fn from(e: DataError) -> Self {
        match e {
            DataError::Candle(e) => e,
            other => candle_core::Error::wrap(other),
        }
    }
}

/// Images of one size and channel count, as `u8` pixels in CHW layout, with optional labels.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSet {
    pixels: Vec<u8>,
    len: usize,
    channels: usize,
    height: usize,
    width: usize,
    labels: Option<Vec<u8>>,
}

impl ImageSet {
    /// Wraps pixels laid out `[len, channels, height, width]`.
    pub fn from_pixels(
        pixels: Vec<u8>,
        len: usize,
        channels: usize,
        height: usize,
        width: usize,
        labels: Option<Vec<u8>>,
    ) -> Result<Self, String> {
        if pixels.len() != len * channels * height * width {
            return Err(format!(
                "{} pixels do not make {len} images of {channels}x{height}x{width}",
                pixels.len()
            ));
        }
        if let Some(l) = &labels
            && l.len() != len
        {
            return Err(format!("{} labels for {len} images", l.len()));
        }
        Ok(Self {
            pixels,
            len,
            channels,
            height,
            width,
            labels,
        })
    }

    /// The number of images.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Channels per image (1 or 3).
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Image height.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Image width.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The labels, where the source has them (MNIST, parquet `label` columns).
    pub fn labels(&self) -> Option<&[u8]> {
        self.labels.as_deref()
    }

    /// The pixels of image `i`, CHW.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.channels * self.height * self.width;
        &self.pixels[i * n..(i + 1) * n]
    }

    /// Appends `other` (e.g. the next shard of a dataset); sizes and channels must match, and
    /// both or neither must have labels.
    pub fn extend(&mut self, other: ImageSet) -> Result<(), String> {
        if (other.channels, other.height, other.width) != (self.channels, self.height, self.width) {
            return Err(format!(
                "cannot join {}x{}x{} images to {}x{}x{} ones",
                other.channels, other.height, other.width, self.channels, self.height, self.width
            ));
        }
        match (&mut self.labels, other.labels) {
            (Some(a), Some(b)) => a.extend(b),
            (None, None) => {}
            _ => return Err("cannot join labelled and unlabelled images".into()),
        }
        self.pixels.extend(other.pixels);
        self.len += other.len;
        Ok(())
    }

    /// The first `n` images (all of them if there are fewer).
    pub fn take(mut self, n: usize) -> Self {
        let n = n.min(self.len);
        self.pixels
            .truncate(n * self.channels * self.height * self.width);
        if let Some(l) = &mut self.labels {
            l.truncate(n);
        }
        self.len = n;
        self
    }

    /// All but the first `n` images.
    pub fn skip(mut self, n: usize) -> Self {
        let n = n.min(self.len);
        self.pixels
            .drain(..n * self.channels * self.height * self.width);
        if let Some(l) = &mut self.labels {
            l.drain(..n);
        }
        self.len -= n;
        self
    }

    /// Pads every image with black borders to `size` x `size`, centred (the 28 -> 32 padding
    /// that lets digits through four halvings). Fails if an image is larger than `size`.
    pub fn pad_to(self, size: usize) -> Result<Self, DataError> {
        if self.height > size || self.width > size {
            return Err(candle_core::Error::Msg(format!(
                "cannot pad {}x{} images to {size}x{size}",
                self.height, self.width
            ))
            .into());
        }
        let (top, left) = ((size - self.height) / 2, (size - self.width) / 2);
        let mut out = vec![0u8; self.len * self.channels * size * size];
        for i in 0..self.len {
            for c in 0..self.channels {
                for y in 0..self.height {
                    let src = ((i * self.channels + c) * self.height + y) * self.width;
                    let dst = ((i * self.channels + c) * size + y + top) * size + left;
                    out[dst..dst + self.width].copy_from_slice(&self.pixels[src..src + self.width]);
                }
            }
        }
        Ok(Self {
            pixels: out,
            height: size,
            width: size,
            ..self
        })
    }

    /// Every image resized to `size` x `size` (bilinear, after a centre crop to a square), for
    /// training at a lower resolution.
    pub fn resize_to(self, size: usize) -> Self {
        if self.height == size && self.width == size {
            return self;
        }
        let mut pixels = Vec::with_capacity(self.len * self.channels * size * size);
        for i in 0..self.len {
            let img = self.image(i);
            let (h, w) = (self.height, self.width);
            let planes: Vec<Vec<u8>> = (0..self.channels)
                .map(|c| {
                    let plane = img[c * h * w..(c + 1) * h * w].to_vec();
                    let gray =
                        image::GrayImage::from_raw(w as u32, h as u32, plane).expect("sizes match");
                    sources::fit(image::DynamicImage::ImageLuma8(gray), size)
                        .to_luma8()
                        .into_raw()
                })
                .collect();
            for p in planes {
                pixels.extend(p);
            }
        }
        Self {
            pixels,
            height: size,
            width: size,
            ..self
        }
    }

    /// Images `indices` as an `f32` tensor `[B, C, H, W]` in `[-1, 1]`, each flipped left-right
    /// where `flips[i]` is true.
    pub fn batch(
        &self,
        indices: &[usize],
        flips: &[bool],
        device: &candle_core::Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        let (c, h, w) = (self.channels, self.height, self.width);
        let mut out = Vec::with_capacity(indices.len() * c * h * w);
        for (k, &i) in indices.iter().enumerate() {
            let img = self.image(i);
            let flip = flips.get(k).copied().unwrap_or(false);
            for row in img.chunks_exact(w) {
                if flip {
                    out.extend(row.iter().rev().map(|&p| p as f32 / 127.5 - 1.0));
                } else {
                    out.extend(row.iter().map(|&p| p as f32 / 127.5 - 1.0));
                }
            }
        }
        candle_core::Tensor::from_vec(out, (indices.len(), c, h, w), device)
    }
}
