//! Writing samples as pictures (PNG or JPEG, by the file's extension): single images, grids
//! and strips.

use std::path::Path;

use candle_core::{DType, Tensor};
use image::{DynamicImage, GrayImage, RgbImage};

use crate::DataError;

/// A `[B, C, H, W]` tensor in `[-1, 1]` (clamped) as `u8` images, `C` in {1, 3}.
pub fn tensor_to_images(x: &Tensor) -> Result<Vec<DynamicImage>, DataError> {
    let (b, c, h, w) = x.dims4()?;
    if c != 1 && c != 3 {
        return Err(
            candle_core::Error::Msg(format!("images need 1 or 3 channels, got {c}")).into(),
        );
    }
    let v: Vec<f32> = x
        .to_dtype(DType::F32)?
        .clamp(-1f32, 1f32)?
        .flatten_all()?
        .to_vec1()?;
    let to_u8 = |f: f32| ((f + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8;
    let n = c * h * w;
    Ok((0..b)
        .map(|i| {
            let img = &v[i * n..(i + 1) * n];
            if c == 1 {
                DynamicImage::ImageLuma8(GrayImage::from_fn(w as u32, h as u32, |x, y| {
                    image::Luma([to_u8(img[y as usize * w + x as usize])])
                }))
            } else {
                DynamicImage::ImageRgb8(RgbImage::from_fn(w as u32, h as u32, |x, y| {
                    let p = y as usize * w + x as usize;
                    image::Rgb([
                        to_u8(img[p]),
                        to_u8(img[h * w + p]),
                        to_u8(img[2 * h * w + p]),
                    ])
                }))
            }
        })
        .collect())
}

/// The picture format a path's extension names: `.png`, or `.jpg` / `.jpeg` (any case). Any
/// other extension, or none, is an error naming the path, so a caller can check an output
/// before any work.
pub fn image_format(path: &Path) -> Result<image::ImageFormat, DataError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("png") => Ok(image::ImageFormat::Png),
        Some("jpg" | "jpeg") => Ok(image::ImageFormat::Jpeg),
        _ => Err(DataError::Write {
            path: path.to_path_buf(),
            message: "unknown picture format: give a .png, .jpg or .jpeg file name".into(),
        }),
    }
}

/// Saves one image in the format its extension names ([`image_format`]), through a
/// temporary file synced and renamed into place (the `atomic-write-file` crate): a failure
/// leaves whatever was at `path` as it was.
pub fn write_image(img: &DynamicImage, path: &Path) -> Result<(), DataError> {
    let format = image_format(path)?;
    let err = |m: String| DataError::Write {
        path: path.to_path_buf(),
        message: m,
    };
    let mut file =
        atomic_write_file::AtomicWriteFile::open(path).map_err(|e| err(e.to_string()))?;
    img.write_to(&mut file, format)
        .map_err(|e| err(e.to_string()))?;
    file.commit().map_err(|e| err(e.to_string()))
}

/// Tiles a `[B, C, H, W]` batch in `[-1, 1]` into a grid of `ncols` columns with a 2-pixel
/// white border.
pub fn grid_image(x: &Tensor, ncols: usize) -> Result<DynamicImage, DataError> {
    Ok(tile(&tensor_to_images(x)?, ncols.max(1)))
}

/// [`grid_image`], saved in the format `path`'s extension names ([`write_image`]).
pub fn write_grid(x: &Tensor, ncols: usize, path: &Path) -> Result<(), DataError> {
    write_image(&grid_image(x, ncols)?, path)
}

/// One row of images (the forward-process strip, the denoising progression), saved as
/// [`write_image`] does.
pub fn write_strip(x: &Tensor, path: &Path) -> Result<(), DataError> {
    let images = tensor_to_images(x)?;
    write_image(&tile(&images, images.len().max(1)), path)
}

fn tile(images: &[DynamicImage], ncols: usize) -> DynamicImage {
    let pad = 2u32;
    let (w, h) = images
        .first()
        .map(|i| (i.width(), i.height()))
        .unwrap_or((1, 1));
    let cols = ncols.min(images.len().max(1)) as u32;
    let rows = images.len().div_ceil(ncols).max(1) as u32;
    let mut canvas = RgbImage::from_pixel(
        cols * (w + pad) + pad,
        rows * (h + pad) + pad,
        image::Rgb([255, 255, 255]),
    );
    for (i, img) in images.iter().enumerate() {
        let (col, row) = (i as u32 % cols, i as u32 / cols);
        image::imageops::replace(
            &mut canvas,
            &img.to_rgb8(),
            (pad + col * (w + pad)) as i64,
            (pad + row * (h + pad)) as i64,
        );
    }
    DynamicImage::ImageRgb8(canvas)
}
