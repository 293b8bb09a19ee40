//! `--data PATH|NAME`: which images to train on or draw.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use ddpm_data::ImageSet;

/// Options naming the training images.
#[derive(Args, Debug, Clone, Default)]
pub struct DataArgs {
    /// The images: a folder of PNG/JPEG, a .parquet file, an IDX file (raw or .gz), or a
    /// dataset name downloaded with `ddpm dataset download` (mnist, fashion-mnist, cifar10,
    /// stanford-cars, or a hub id). Default: the embedded 10,000 MNIST digits.
    #[arg(long)]
    pub data: Option<String>,
    /// The parquet column holding the images (default: image, else img).
    #[arg(long)]
    pub data_column: Option<String>,
    /// Use only the first N images.
    #[arg(long)]
    pub limit: Option<usize>,
}

impl DataArgs {
    /// Loads the images at `size` x `size` with `channels`, and a description for the record.
    /// Digits (28x28) are padded to 32 rather than stretched when `size` is 32.
    pub fn load(&self, size: usize, channels: usize) -> Result<(ImageSet, String)> {
        let (set, what) = match &self.data {
            None => (
                ImageSet::embedded_mnist()?,
                "embedded mnist (10,000 digits)".to_string(),
            ),
            Some(spec) => {
                let path = PathBuf::from(spec);
                if path.exists() {
                    (
                        load_path(&path, self.data_column.as_deref(), size, channels)?,
                        path.display().to_string(),
                    )
                } else {
                    let files = crate::hub::cached_parquet(spec)?;
                    let mut shards = files.iter();
                    let first = shards
                        .next()
                        .expect("cached_parquet returns at least one file");
                    let mut set = load_path(first, self.data_column.as_deref(), size, channels)?;
                    for f in shards {
                        set.extend(load_path(f, self.data_column.as_deref(), size, channels)?)
                            .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
                    }
                    (set, format!("hub dataset {spec}"))
                }
            }
        };
        let set = match self.limit {
            Some(0) => bail!("--limit must be at least 1, got 0"),
            Some(n) => set.take(n),
            None => set,
        };
        fit(set, size, channels).map(|s| (s, what))
    }
}

fn load_path(path: &Path, column: Option<&str>, size: usize, channels: usize) -> Result<ImageSet> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    Ok(if path.is_dir() {
        ImageSet::image_folder(path, size, channels)?
    } else if name.ends_with(".parquet") {
        ImageSet::read_parquet(path, column, size, channels)?
    } else {
        ImageSet::read_idx(path, None)
            .with_context(|| "reading as an IDX file (.parquet and folders are the other kinds)")?
    })
}

/// Shapes a set to what the model takes: grayscale digits padded 28 -> 32, others resized.
fn fit(set: ImageSet, size: usize, channels: usize) -> Result<ImageSet> {
    if set.channels() != channels {
        bail!(
            "the images have {} channel(s), the model takes {channels}",
            set.channels()
        );
    }
    if set.height() == size && set.width() == size {
        return Ok(set);
    }
    if set.height() == 28 && set.width() == 28 && size == 32 {
        return Ok(set.pad_to(32)?);
    }
    Ok(set.resize_to(size))
}
