//! Every dataset kind, on small files each test writes itself.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use ddpm_data::{Batches, DataError, ImageSet};
use image::{DynamicImage, GrayImage, RgbImage};
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

/// An IDX file of unsigned bytes.
fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn embedded_mnist_has_every_digit() {
    let set = ImageSet::embedded_mnist().unwrap();
    assert_eq!(
        (set.len(), set.channels(), set.height(), set.width()),
        (10_000, 1, 28, 28)
    );
    let mut counts = [0usize; 10];
    for &l in set.labels().unwrap() {
        counts[l as usize] += 1;
    }
    // The counts the dataset's README states.
    assert_eq!(
        counts,
        [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    );
    // Digits are white on black: the border is dark, the centre has ink.
    let img = set.image(0);
    assert_eq!(img[0], 0);
    assert!(img.iter().any(|&p| p > 200));
}

#[test]
fn idx_files_raw_and_gzipped_with_labels() {
    let dir = tempfile::tempdir().unwrap();
    let pixels: Vec<u8> = (0..3 * 4 * 5).map(|i| (i * 4) as u8).collect();
    std::fs::write(dir.path().join("img.idx"), idx(&[3, 4, 5], &pixels)).unwrap();
    std::fs::write(
        dir.path().join("img.idx.gz"),
        gzip(&idx(&[3, 4, 5], &pixels)),
    )
    .unwrap();
    std::fs::write(dir.path().join("lab.idx.gz"), gzip(&idx(&[3], &[7, 8, 9]))).unwrap();
    let raw = ImageSet::read_idx(&dir.path().join("img.idx"), None).unwrap();
    let gz = ImageSet::read_idx(
        &dir.path().join("img.idx.gz"),
        Some(&dir.path().join("lab.idx.gz")),
    )
    .unwrap();
    assert_eq!((raw.len(), raw.height(), raw.width()), (3, 4, 5));
    assert_eq!(raw.image(2), gz.image(2));
    assert_eq!(raw.image(1)[0], 80);
    assert_eq!(gz.labels().unwrap(), &[7, 8, 9]);
}

#[track_caller]
fn check_err(r: Result<ImageSet, DataError>, needles: &[&str]) {
    let err = r.unwrap_err().to_string();
    for n in needles {
        assert!(err.contains(n), "error {err:?} should contain {n:?}");
    }
}

#[test]
fn bad_idx_files_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("bad-magic"), [1u8, 2, 3, 4, 5]).unwrap();
    std::fs::write(p("short"), idx(&[2, 2, 2], &[1, 2, 3])).unwrap();
    std::fs::write(p("bad.gz"), [0x1f, 0x8b, 0, 0, 1]).unwrap();
    std::fs::write(p("img"), idx(&[2, 1, 1], &[1, 2])).unwrap();
    std::fs::write(p("labels"), idx(&[3], &[1, 2, 3])).unwrap();
    check_err(
        ImageSet::read_idx(&p("bad-magic"), None),
        &["bad-magic", "magic"],
    );
    check_err(
        ImageSet::read_idx(&p("short"), None),
        &["short", "need 8 bytes", "found 3"],
    );
    check_err(ImageSet::read_idx(&p("bad.gz"), None), &["bad.gz", "gzip"]);
    check_err(
        ImageSet::read_idx(&p("img"), Some(&p("labels"))),
        &["labels", "3 labels for 2 images"],
    );
    check_err(ImageSet::read_idx(&p("missing"), None), &["missing"]);
}

fn gradient_rgb(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 10) as u8, (y * 10) as u8, 200])
    }))
}

#[test]
fn image_folders_resize_crop_and_convert() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    gradient_rgb(8, 8).save(dir.path().join("a.png")).unwrap();
    // Wider than tall: resized to height 8 and centre-cropped.
    gradient_rgb(16, 8)
        .save(dir.path().join("sub/b.jpg"))
        .unwrap();
    DynamicImage::ImageLuma8(GrayImage::from_pixel(4, 4, image::Luma([90])))
        .save(dir.path().join("c.PNG"))
        .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();

    let rgb = ImageSet::image_folder(dir.path(), 8, 3).unwrap();
    assert_eq!(
        (rgb.len(), rgb.channels(), rgb.height(), rgb.width()),
        (3, 3, 8, 8)
    );
    // a.png is already 8x8: kept exactly; channel 0 is the x gradient, channel 2 constant.
    let a = rgb.image(0);
    assert_eq!(&a[..8], &[0, 10, 20, 30, 40, 50, 60, 70]);
    assert!(a[128..].iter().all(|&v| v == 200));
    // The grey image upscaled stays grey in all three channels.
    assert!(
        rgb.image(1).iter().all(|&v| v == 90),
        "{:?}",
        &rgb.image(1)[..8]
    );
    // The wide JPEG's crop is its middle: x from 4 to 12 of 16, i.e. red about 40..120 halved.
    let b = rgb.image(2);
    assert!(b[0] > 30 && b[0] < 70, "{}", b[0]);

    let gray = ImageSet::image_folder(dir.path(), 4, 1).unwrap();
    assert_eq!((gray.channels(), gray.height()), (1, 4));
    // a.png and c.PNG sit in the folder itself: no classes.
    assert_eq!(rgb.labels(), None);

    std::fs::write(dir.path().join("broken.png"), b"\x89PNG not really").unwrap();
    check_err(
        ImageSet::image_folder(dir.path(), 8, 3),
        &["broken.png", "decode"],
    );
    let empty = tempfile::tempdir().unwrap();
    check_err(ImageSet::image_folder(empty.path(), 8, 3), &["no .png"]);
    check_err(
        ImageSet::image_folder(dir.path(), 8, 2),
        &["1 or 3 channels"],
    );
}

/// Images in class subfolders are labelled by the subfolder's place in name order, as
/// torchvision's `ImageFolder` does, nested folders included.
#[test]
fn class_subfolders_label_the_images() {
    let dir = tempfile::tempdir().unwrap();
    for (path, value) in [
        ("dog/1.png", 10u8),
        ("cat/b.png", 20),
        ("cat/a.png", 30),
        ("emu/deep/x.png", 40),
    ] {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        DynamicImage::ImageLuma8(GrayImage::from_pixel(2, 2, image::Luma([value])))
            .save(path)
            .unwrap();
    }
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    let set = ImageSet::image_folder(dir.path(), 2, 1).unwrap();
    // Path order: cat/a, cat/b, dog/1, emu/deep/x; classes cat 0, dog 1, emu 2.
    let firsts: Vec<u8> = (0..set.len()).map(|i| set.image(i)[0]).collect();
    assert_eq!(firsts, [30, 20, 10, 40]);
    assert_eq!(set.labels(), Some(&[0u8, 0, 1, 2][..]));

    // One image beside the class folders: unlabelled.
    DynamicImage::ImageLuma8(GrayImage::from_pixel(2, 2, image::Luma([0])))
        .save(dir.path().join("stray.png"))
        .unwrap();
    assert_eq!(
        ImageSet::image_folder(dir.path(), 2, 1).unwrap().labels(),
        None
    );
}

fn png_bytes(img: &DynamicImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A parquet file laid out as `datasets` writes image datasets: `image: struct<bytes, path>`,
/// `label: int64`, snappy-compressed.
fn write_parquet(path: &Path, column: &str, images: &[Vec<u8>], labels: &[i64]) {
    let schema = parse_message_type(&format!(
        "message schema {{ optional group {column} {{ optional binary bytes; optional binary path (UTF8); }} optional int64 label; }}"
    ))
    .unwrap();
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props)).unwrap();
    let mut rg = writer.next_row_group().unwrap();
    let mut index = 0;
    while let Some(mut col) = rg.next_column().unwrap() {
        match index {
            0 => {
                let values: Vec<ByteArray> =
                    images.iter().map(|b| ByteArray::from(b.clone())).collect();
                col.typed::<ByteArrayType>()
                    .write_batch(&values, Some(&vec![2; images.len()]), None)
                    .unwrap();
            }
            // `path` is null in every row: the group is present (level 1), the value is not.
            1 => {
                col.typed::<ByteArrayType>()
                    .write_batch(&[], Some(&vec![1; images.len()]), None)
                    .unwrap();
            }
            _ => {
                col.typed::<Int64Type>()
                    .write_batch(labels, Some(&vec![1; labels.len()]), None)
                    .unwrap();
            }
        }
        col.close().unwrap();
        index += 1;
    }
    rg.close().unwrap();
    writer.close().unwrap();
}

#[test]
fn parquet_files_like_the_hub_writes() {
    let dir = tempfile::tempdir().unwrap();
    let imgs: Vec<Vec<u8>> = [30u8, 60, 90]
        .iter()
        .map(|&v| {
            png_bytes(&DynamicImage::ImageLuma8(GrayImage::from_pixel(
                28,
                28,
                image::Luma([v]),
            )))
        })
        .collect();
    let path = dir.path().join("train-00000-of-00001.parquet");
    write_parquet(&path, "image", &imgs, &[3, 1, 4]);
    let set = ImageSet::read_parquet(&path, None, 28, 1).unwrap();
    assert_eq!((set.len(), set.height()), (3, 28));
    assert_eq!(set.labels().unwrap(), &[3, 1, 4]);
    assert!(set.image(2).iter().all(|&v| v == 90));
    let rgb = ImageSet::read_parquet(&path, Some("image"), 32, 3).unwrap();
    assert_eq!((rgb.channels(), rgb.height()), (3, 32));

    // CIFAR-10's column is `img`: found without being named.
    let cifar = dir.path().join("cifar.parquet");
    write_parquet(&cifar, "img", &[png_bytes(&gradient_rgb(32, 32))], &[9]);
    let set = ImageSet::read_parquet(&cifar, None, 32, 3).unwrap();
    assert_eq!(set.image(0)[..3], [0, 10, 20]);

    check_err(
        ImageSet::read_parquet(&cifar, Some("pixels"), 32, 3),
        &["cifar.parquet", "no column \"pixels\"", "img"],
    );
    let broken = dir.path().join("broken.parquet");
    write_parquet(&broken, "image", &[b"garbage".to_vec()], &[0]);
    check_err(
        ImageSet::read_parquet(&broken, None, 28, 1),
        &["broken.parquet#row0", "decode"],
    );
    let not_parquet = dir.path().join("x.parquet");
    std::fs::write(&not_parquet, b"PAR1 nope").unwrap();
    check_err(
        ImageSet::read_parquet(&not_parquet, None, 28, 1),
        &["x.parquet", "not a parquet file"],
    );
}

#[test]
fn resizing_keeps_content_and_channels() {
    let set = ImageSet::from_pixels(vec![200; 2 * 3 * 8 * 8], 2, 3, 8, 8, Some(vec![1, 2]))
        .unwrap()
        .resize_to(4);
    assert_eq!(
        (set.len(), set.channels(), set.height(), set.width()),
        (2, 3, 4, 4)
    );
    assert!(set.image(1).iter().all(|&v| v == 200));
    assert_eq!(set.labels().unwrap(), &[1, 2]);
    let digits = ImageSet::embedded_mnist().unwrap().take(3).resize_to(16);
    assert_eq!(digits.height(), 16);
    assert!(digits.image(0).iter().any(|&p| p > 100));
}

#[test]
fn padding_centres_digits() {
    let set = ImageSet::from_pixels(vec![255; 2 * 28 * 28], 2, 1, 28, 28, None)
        .unwrap()
        .pad_to(32)
        .unwrap();
    assert_eq!((set.height(), set.width()), (32, 32));
    let img = set.image(1);
    assert_eq!(img[2 * 32 + 1], 0);
    assert_eq!(img[2 * 32 + 2], 255);
    assert_eq!(img[29 * 32 + 29], 255);
    assert_eq!(img[30 * 32 + 30], 0);
    assert!(
        ImageSet::from_pixels(vec![0; 40 * 40], 1, 1, 40, 40, None)
            .unwrap()
            .pad_to(32)
            .is_err()
    );
}

fn tiny_set(n: usize) -> Arc<ImageSet> {
    // Image i is a 1x1x2 image [i, 255 - i]: values identify it and show flips.
    let pixels: Vec<u8> = (0..n).flat_map(|i| [i as u8, 255 - i as u8]).collect();
    Arc::new(ImageSet::from_pixels(pixels, n, 1, 1, 2, None).unwrap())
}

fn ids(batch: &candle_core::Tensor) -> Vec<(u8, bool)> {
    let v: Vec<f32> = batch.flatten_all().unwrap().to_vec1().unwrap();
    v.chunks(2)
        .map(|p| {
            let (a, b) = (
                ((p[0] + 1.0) * 127.5).round() as u8,
                ((p[1] + 1.0) * 127.5).round() as u8,
            );
            if a < b { (a, false) } else { (b, true) }
        })
        .collect()
}

#[test]
fn epochs_visit_every_image_once_in_a_seeded_order() {
    let set = tiny_set(10);
    let mut b = Batches::new(set.clone(), 5, 42, false);
    let mut epoch0: Vec<u8> = ids(&b.next_batch(&Device::Cpu).unwrap())
        .iter()
        .map(|p| p.0)
        .collect();
    epoch0.extend(
        ids(&b.next_batch(&Device::Cpu).unwrap())
            .iter()
            .map(|p| p.0),
    );
    let mut sorted = epoch0.clone();
    sorted.sort();
    assert_eq!(sorted, (0..10).collect::<Vec<u8>>());
    assert_ne!(epoch0, sorted, "not shuffled");
    let epoch1: Vec<u8> = ids(&b.next_batch(&Device::Cpu).unwrap())
        .iter()
        .map(|p| p.0)
        .collect();
    assert_ne!(epoch1, epoch0[..5]);
    // Same seed, same order; other seed, other order.
    let mut again = Batches::new(set.clone(), 10, 42, false);
    let again: Vec<u8> = ids(&again.next_batch(&Device::Cpu).unwrap())
        .iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(again, epoch0);
    let mut other = Batches::new(set, 10, 43, false);
    let other: Vec<u8> = ids(&other.next_batch(&Device::Cpu).unwrap())
        .iter()
        .map(|p| p.0)
        .collect();
    assert_ne!(other, epoch0);
}

#[test]
fn a_restored_position_continues_the_same_stream() {
    let set = tiny_set(7);
    let mut a = Batches::new(set.clone(), 3, 9, true);
    for _ in 0..4 {
        a.next_batch(&Device::Cpu).unwrap();
    }
    let pos = a.position();
    assert_eq!(pos.epoch, 1);
    let mut b = Batches::new(set, 3, 9, true).with_position(pos);
    for _ in 0..5 {
        assert_eq!(
            ids(&a.next_batch(&Device::Cpu).unwrap()),
            ids(&b.next_batch(&Device::Cpu).unwrap())
        );
    }
}

#[test]
fn flips_mirror_some_images_when_asked() {
    let set = tiny_set(64);
    let mut b = Batches::new(set.clone(), 64, 1, true);
    let flips = ids(&b.next_batch(&Device::Cpu).unwrap())
        .iter()
        .filter(|p| p.1)
        .count();
    assert!((16..48).contains(&flips), "{flips} of 64 flipped");
    let mut none = Batches::new(set, 64, 1, false);
    assert!(
        ids(&none.next_batch(&Device::Cpu).unwrap())
            .iter()
            .all(|p| !p.1)
    );
}
