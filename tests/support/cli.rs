//! Helpers shared by the end-to-end test files: run the built `ddpm`, check its exit and its
//! one-line errors, snapshot folders.
#![allow(dead_code)] // each test file uses some of them

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn ddpm(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddpm"))
        .args(args)
        .current_dir(dir)
        .env("HF_HOME", dir.join("hf-home"))
        .env("HF_HUB_OFFLINE", "1")
        // Many users set RUST_BACKTRACE globally: errors must stay one line with it on
        // (candle then captures a backtrace into every error it makes).
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1")
        .output()
        .expect("the ddpm binary runs")
}

#[track_caller]
pub fn ok(out: &Output) -> String {
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "ddpm failed\nstdout: {stdout}\nstderr: {stderr}"
    );
    stdout.into_owned()
}

/// The command failed with a one-line error containing `needle`.
#[track_caller]
pub fn fails(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line of error, got {stderr:?}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "error {:?} should contain {needle:?}",
        lines[0]
    );
    assert!(!has_backtrace(lines[0]), "a backtrace in {:?}", lines[0]);
}

/// Whether `text` holds frames of a captured backtrace (the ones every Rust backtrace ends in).
pub fn has_backtrace(text: &str) -> bool {
    text.contains("lang_start") || text.contains("rust_begin_short_backtrace")
}

/// Every file under `dir` with its bytes, to show nothing changed.
pub fn snapshot(dir: &Path) -> HashMap<PathBuf, Vec<u8>> {
    let mut out = HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

pub fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// `ddpm sample --model MODEL --num 2 --no-progress --out-tensor OUT EXTRA...` in `dir`.
pub fn sample_two(dir: &Path, model: &str, out: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "sample",
        "--model",
        model,
        "--num",
        "2",
        "--no-progress",
        "--out-tensor",
        out,
    ];
    args.extend_from_slice(extra);
    ddpm(dir, &args)
}

/// The `samples` tensor `ddpm sample --out-tensor FILE` wrote under `dir`, flattened.
pub fn samples(dir: &Path, file: &str) -> Vec<f32> {
    flat(&load(&dir.join(file))["samples"])
}

pub fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

pub const TINY: &[&str] = &[
    "--recipe",
    "tiny",
    "--limit",
    "64",
    "--image-size",
    "16",
    "--no-progress",
];

/// A parquet file of digits laid out as the hub's `ylecun/mnist` (image struct, int64 label).
pub fn mnist_parquet(n: usize) -> Vec<u8> {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::writer::SerializedFileWriter;
    let digits = ddpm_data::ImageSet::embedded_mnist().unwrap().take(n);
    let pngs: Vec<ByteArray> = (0..n)
        .map(|i| {
            let img = image::GrayImage::from_raw(28, 28, digits.image(i).to_vec()).unwrap();
            let mut buf = std::io::Cursor::new(Vec::new());
            image::DynamicImage::ImageLuma8(img)
                .write_to(&mut buf, image::ImageFormat::Png)
                .unwrap();
            ByteArray::from(buf.into_inner())
        })
        .collect();
    let labels: Vec<i64> = digits.labels().unwrap().iter().map(|&l| l as i64).collect();
    let schema = parquet::schema::parser::parse_message_type(
        "message schema { optional group image { optional binary bytes; optional binary path (UTF8); } optional int64 label; }",
    )
    .unwrap();
    let mut out = Vec::new();
    {
        let mut writer =
            SerializedFileWriter::new(&mut out, std::sync::Arc::new(schema), Default::default())
                .unwrap();
        let mut rg = writer.next_row_group().unwrap();
        let mut i = 0;
        while let Some(mut col) = rg.next_column().unwrap() {
            match i {
                0 => col
                    .typed::<ByteArrayType>()
                    .write_batch(&pngs, Some(&vec![2; n]), None)
                    .unwrap(),
                1 => col
                    .typed::<ByteArrayType>()
                    .write_batch(&[], Some(&vec![1; n]), None)
                    .unwrap(),
                _ => col
                    .typed::<Int64Type>()
                    .write_batch(&labels, Some(&vec![1; n]), None)
                    .unwrap(),
            };
            col.close().unwrap();
            i += 1;
        }
        rg.close().unwrap();
        writer.close().unwrap();
    }
    out
}
