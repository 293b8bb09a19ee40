//! Reading images: the embedded digits, IDX files, image folders, parquet files.

use std::io::Read;
use std::path::{Path, PathBuf};

use image::DynamicImage;
use image::imageops::FilterType;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;

use crate::{DataError, ImageSet};

const MNIST_IMAGES: &[u8] = include_bytes!("../data/mnist/mnist-10k-images-idx3-ubyte.gz");
const MNIST_LABELS: &[u8] = include_bytes!("../data/mnist/mnist-10k-labels-idx1-ubyte.gz");

fn format_err(path: &Path, message: impl Into<String>) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The most bytes a gzipped data file may inflate to (4 GiB): more is refused, not allocated.
const MAX_INFLATED: u64 = 1 << 32;

/// Inflates gzip data (by its magic bytes); passes anything else through.
fn maybe_gunzip(bytes: Vec<u8>, path: &Path) -> Result<Vec<u8>, DataError> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .take(MAX_INFLATED + 1)
            .read_to_end(&mut out)
            .map_err(|e| format_err(path, format!("not valid gzip data: {e}")))?;
        if out.len() as u64 > MAX_INFLATED {
            return Err(format_err(
                path,
                format!("inflates to more than {MAX_INFLATED} bytes"),
            ));
        }
        Ok(out)
    } else {
        Ok(bytes)
    }
}

/// Parses an IDX file: big-endian magic (0, 0, type 0x08 = u8, rank), sizes, then data.
fn parse_idx(bytes: &[u8], path: &Path, want_rank: u8) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        return Err(format_err(
            path,
            "not an IDX file of unsigned bytes (bad magic number)",
        ));
    }
    let rank = bytes[3];
    if rank != want_rank {
        return Err(format_err(
            path,
            format!("IDX rank {rank}, expected {want_rank}"),
        ));
    }
    let header = 4 + 4 * rank as usize;
    if bytes.len() < header {
        return Err(format_err(path, "truncated IDX header"));
    }
    let dims: Vec<usize> = (0..rank as usize)
        .map(|i| {
            u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize
        })
        .collect();
    let n = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format_err(path, format!("IDX sizes {dims:?} are impossibly large")))?;
    let data = &bytes[header..];
    if data.len() != n {
        return Err(format_err(
            path,
            format!(
                "IDX sizes {dims:?} need {n} bytes of data, found {}",
                data.len()
            ),
        ));
    }
    Ok((dims, data.to_vec()))
}

fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(io_err(path))
}

impl ImageSet {
    /// The 10,000 embedded MNIST digits, 1x28x28, with labels. No file system, no network.
    pub fn embedded_mnist() -> Result<Self, DataError> {
        Self::idx_from_bytes(
            MNIST_IMAGES.to_vec(),
            Path::new("<embedded mnist images>"),
            Some((MNIST_LABELS.to_vec(), Path::new("<embedded mnist labels>"))),
        )
    }

    /// MNIST-format IDX files (raw or gzipped): an images file of rank 3 and, optionally, a
    /// labels file of rank 1.
    pub fn read_idx(images: &Path, labels: Option<&Path>) -> Result<Self, DataError> {
        let labels = match labels {
            Some(p) => Some((read_file(p)?, p)),
            None => None,
        };
        Self::idx_from_bytes(read_file(images)?, images, labels)
    }

    fn idx_from_bytes(
        images: Vec<u8>,
        path: &Path,
        labels: Option<(Vec<u8>, &Path)>,
    ) -> Result<Self, DataError> {
        let (dims, pixels) = parse_idx(&maybe_gunzip(images, path)?, path, 3)?;
        let labels = match labels {
            Some((bytes, lpath)) => {
                let (ldims, l) = parse_idx(&maybe_gunzip(bytes, lpath)?, lpath, 1)?;
                if ldims[0] != dims[0] {
                    return Err(format_err(
                        lpath,
                        format!("{} labels for {} images", ldims[0], dims[0]),
                    ));
                }
                Some(l)
            }
            None => None,
        };
        Self::from_pixels(pixels, dims[0], 1, dims[1], dims[2], labels)
            .map_err(|m| format_err(path, m))
    }

    /// Every PNG and JPEG under `dir` (recursively, in path order), resized so the shorter side
    /// is `size`, centre-cropped to `size` x `size`, as `channels` (1: grayscale, 3: RGB).
    /// A file that cannot be decoded is an error naming it; other files are skipped.
    ///
    /// Labels follow torchvision's `ImageFolder`: where every image sits in a subfolder of
    /// `dir` (`dir/cat/1.png`, `dir/dog/x/2.jpg`), an image's class is the index of its
    /// first-level subfolder among them in name order; up to 256 such classes. With an image
    /// directly in `dir`, or more classes, the set has no labels.
    pub fn image_folder(dir: &Path, size: usize, channels: usize) -> Result<Self, DataError> {
        check_channels(channels, dir)?;
        let mut files = Vec::new();
        collect_images(dir, &mut files)?;
        files.sort();
        if files.is_empty() {
            return Err(format_err(dir, "no .png, .jpg or .jpeg files"));
        }
        let mut pixels = Vec::with_capacity(files.len() * channels * size * size);
        for f in &files {
            let img = image::open(f).map_err(|e| DataError::Decode {
                path: f.display().to_string(),
                message: e.to_string(),
            })?;
            push_chw(&mut pixels, &fit(img, size), channels);
        }
        let labels = folder_labels(dir, &files);
        Self::from_pixels(pixels, files.len(), channels, size, size, labels)
            .map_err(|m| format_err(dir, m))
    }

    /// A Hugging Face parquet file whose `column` (default: `image`, else `img`) holds encoded
    /// images, either as bytes or as the `{bytes, path}` struct `datasets` writes. A `label`
    /// column of integers 0..=255 is kept. Images are fitted to `size` and `channels` as in
    /// [`ImageSet::image_folder`].
    pub fn read_parquet(
        path: &Path,
        column: Option<&str>,
        size: usize,
        channels: usize,
    ) -> Result<Self, DataError> {
        check_channels(channels, path)?;
        let file = std::fs::File::open(path).map_err(io_err(path))?;
        let reader = SerializedFileReader::new(file)
            .map_err(|e| format_err(path, format!("not a parquet file: {e}")))?;
        let fields: Vec<String> = reader
            .metadata()
            .file_metadata()
            .schema_descr()
            .root_schema()
            .get_fields()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        let column = match column {
            Some(c) if fields.iter().any(|f| f == c) => c.to_string(),
            Some(c) => {
                return Err(format_err(
                    path,
                    format!("no column {c:?} (columns: {})", fields.join(", ")),
                ));
            }
            None => find_image_column(&fields)
                .map(str::to_string)
                .ok_or_else(|| {
                    format_err(
                        path,
                        format!(
                            "no image column (looked for image, img; columns: {})",
                            fields.join(", ")
                        ),
                    )
                })?,
        };
        let has_labels = fields.iter().any(|f| f == "label");
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        let mut n = 0;
        let rows = reader
            .get_row_iter(None)
            .map_err(|e| format_err(path, e.to_string()))?;
        for (i, row) in rows.enumerate() {
            let row = row.map_err(|e| format_err(path, format!("row {i}: {e}")))?;
            let mut bytes = None;
            let mut label = None;
            for (name, field) in row.get_column_iter() {
                if *name == column {
                    bytes = image_bytes(field);
                } else if name == "label" {
                    label = match field {
                        Field::Long(v) => u8::try_from(*v).ok(),
                        Field::Int(v) => u8::try_from(*v).ok(),
                        Field::Short(v) => u8::try_from(*v).ok(),
                        Field::Byte(v) => u8::try_from(*v).ok(),
                        Field::UByte(v) => Some(*v),
                        _ => None,
                    };
                }
            }
            let where_ = format!("{}#row{i}", path.display());
            let bytes = bytes.ok_or_else(|| DataError::Decode {
                path: where_.clone(),
                message: format!("column {column:?} holds no image bytes"),
            })?;
            let img = image::load_from_memory(bytes).map_err(|e| DataError::Decode {
                path: where_.clone(),
                message: e.to_string(),
            })?;
            push_chw(&mut pixels, &fit(img, size), channels);
            if has_labels {
                labels.push(label.ok_or_else(|| {
                    format_err(path, format!("row {i}: label is not an integer in 0..=255"))
                })?);
            }
            n += 1;
        }
        if n == 0 {
            return Err(format_err(path, "no rows"));
        }
        let labels = has_labels.then_some(labels);
        Self::from_pixels(pixels, n, channels, size, size, labels).map_err(|m| format_err(path, m))
    }
}

/// The image column `datasets` writes: `image` (MNIST, Fashion-MNIST, ...), else `img` (CIFAR-10).
fn find_image_column(fields: &[String]) -> Option<&'static str> {
    ["image", "img"]
        .into_iter()
        .find(|c| fields.iter().any(|f| f == c))
}

fn image_bytes(field: &Field) -> Option<&[u8]> {
    match field {
        Field::Bytes(b) => Some(b.data()),
        Field::Group(g) => g
            .get_column_iter()
            .find_map(|(k, v)| match (k.as_str(), v) {
                ("bytes", Field::Bytes(b)) => Some(b.data()),
                _ => None,
            }),
        _ => None,
    }
}

fn check_channels(channels: usize, path: &Path) -> Result<(), DataError> {
    if channels == 1 || channels == 3 {
        Ok(())
    } else {
        Err(format_err(
            path,
            format!("images can be loaded with 1 or 3 channels, not {channels}"),
        ))
    }
}

/// Each file's first-level subfolder of `dir` as a class index (the subfolders in name order),
/// or `None` where a file sits in `dir` itself or there are more than 256 classes.
fn folder_labels(dir: &Path, files: &[PathBuf]) -> Option<Vec<u8>> {
    let class_of = |f: &PathBuf| -> Option<std::ffi::OsString> {
        let mut parts = f.strip_prefix(dir).ok()?.components();
        let first = parts.next()?;
        parts.next()?; // the file itself lies below it
        Some(first.as_os_str().to_os_string())
    };
    let names: Vec<std::ffi::OsString> = files.iter().map(class_of).collect::<Option<_>>()?;
    let mut classes = names.clone();
    classes.sort();
    classes.dedup();
    if classes.len() > 256 {
        return None;
    }
    Some(
        names
            .iter()
            .map(|n| classes.binary_search(n).expect("listed") as u8)
            .collect(),
    )
}

fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.is_dir() {
            collect_images(&path, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Resize so the shorter side is `size` (bilinear), then centre-crop to a square.
pub(crate) fn fit(img: DynamicImage, size: usize) -> DynamicImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == size && h == size {
        return img;
    }
    let scale = size as f64 / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * scale).round() as u32).max(size as u32),
        ((h as f64 * scale).round() as u32).max(size as u32),
    );
    let resized = img.resize_exact(nw, nh, FilterType::Triangle);
    let (x, y) = ((nw - size as u32) / 2, (nh - size as u32) / 2);
    resized.crop_imm(x, y, size as u32, size as u32)
}

fn push_chw(out: &mut Vec<u8>, img: &DynamicImage, channels: usize) {
    if channels == 1 {
        out.extend_from_slice(img.to_luma8().as_raw());
    } else {
        let rgb = img.to_rgb8();
        let raw = rgb.as_raw();
        for c in 0..3 {
            out.extend(raw.iter().skip(c).step_by(3));
        }
    }
}

/// The number of rows and the top-level column names of a parquet file, after decoding its first
/// image (a quick check that a download is usable).
pub fn parquet_summary(path: &Path) -> Result<(usize, Vec<String>), DataError> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| format_err(path, format!("not a parquet file: {e}")))?;
    let meta = reader.metadata().file_metadata();
    let rows = meta.num_rows() as usize;
    let columns: Vec<String> = meta
        .schema_descr()
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    if let Some(column) = find_image_column(&columns) {
        let first = reader
            .get_row_iter(None)
            .map_err(|e| format_err(path, e.to_string()))?
            .next()
            .transpose()
            .map_err(|e| format_err(path, e.to_string()))?;
        if let Some(row) = first {
            let bytes = row
                .get_column_iter()
                .find(|(n, _)| n.as_str() == column)
                .and_then(|(_, f)| image_bytes(f));
            let bytes = bytes.ok_or_else(|| {
                format_err(path, format!("column {column:?} holds no image bytes"))
            })?;
            image::load_from_memory(bytes).map_err(|e| DataError::Decode {
                path: format!("{}#row0", path.display()),
                message: e.to_string(),
            })?;
        }
    }
    Ok((rows, columns))
}
