//! Mutation fuzzing on stable Rust: every parser of outside bytes gets seeded random damage of
//! a valid file (bit flips, overwritten bytes, truncation, duplicated and inserted runs) and
//! must answer with an error or a value, never a panic and never an absurd allocation (the
//! parsers bound what a header may claim). The committed fixtures are the corpus.
//! `DDPM_FUZZ_ITERATIONS=N` runs N mutations per parser (default 150, kept short for CI).

#[path = "support/cli.rs"]
mod cli;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use candle_core::Device;
use ddpm_data::ImageSet;
use ddpm_sampler::{SamplerKind, SchedulerConfig};
use ddpm_trainer::{Checkpoint, TrainConfig};
use ddpm_unet::{Unet, UnetConfig};

/// xorshift64*, seeded per parser.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// `seed` with one to four random mutations.
fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let n = v.len();
        match rng.below(6) {
            0 if n > 0 => {
                let i = rng.below(n);
                v[i] ^= 1 << rng.below(8);
            }
            1 if n > 0 => {
                let i = rng.below(n);
                v[i] = [0, 0xff, 0x7f, 0x80, rng.next() as u8][rng.below(5)];
            }
            2 => v.truncate(rng.below(n + 1)),
            3 if n > 0 => {
                let (a, len) = (rng.below(n), 1 + rng.below(64));
                let run: Vec<u8> = v[a..(a + len).min(n)].to_vec();
                let at = rng.below(n + 1);
                v.splice(at..at, run);
            }
            4 => {
                let at = rng.below(n + 1);
                let junk: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                v.splice(at..at, junk);
            }
            _ if n >= 8 => {
                // A length field made huge: the first 8 bytes of a safetensors header, say.
                let i = rng.below(n - 7);
                v[i..i + 8].copy_from_slice(&u64::MAX.to_le_bytes());
            }
            _ => {}
        }
    }
    v
}

fn iterations() -> usize {
    std::env::var("DDPM_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150)
}

/// Runs `parse` on `iterations()` mutations of `seed` written to `path`; a panic fails the
/// test, with the input kept under target/ for a rerun.
fn fuzz(name: &str, seed: &[u8], path: &Path, parse: impl Fn(&Path)) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64 ^ seed.len() as u64);
    let n = iterations();
    for i in 0..n {
        let input = mutate(seed, &mut rng);
        std::fs::write(path, &input).unwrap();
        let result = catch_unwind(AssertUnwindSafe(|| parse(path)));
        if result.is_err() {
            let keep = cli::root().join(format!("target/fuzz-failure-{name}-{i}"));
            std::fs::write(&keep, &input).unwrap();
            panic!(
                "{name}: mutation {i} panicked; input kept at {}",
                keep.display()
            );
        }
    }
    eprintln!("{name}: {n} mutations, no panic");
}

#[test]
fn parsers_of_outside_bytes_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let reference = cli::root().join("assets/reference/unet");
    let cpu = Device::Cpu;

    // safetensors weights, with the model they must fit.
    let tiny = std::fs::read(reference.join("diffusers_tiny/diffusion_pytorch_model.safetensors"))
        .unwrap();
    let tiny_config = UnetConfig::from_json(
        &std::fs::read_to_string(reference.join("diffusers_tiny/config.json")).unwrap(),
    )
    .unwrap();
    fuzz("safetensors", &tiny, &dir.join("w.safetensors"), |p| {
        if let Ok(t) = ddpm_unet::read_safetensors(p, &cpu) {
            let _ = Unet::from_tensors(&tiny_config, t, &cpu);
        }
    });
    // PyTorch pickles.
    let pt = std::fs::read(reference.join("seed_small/model.pt")).unwrap();
    fuzz("pickle", &pt, &dir.join("m.pt"), |p| {
        let _ = ddpm_unet::read_pytorch(p, &cpu);
    });
    // config.json, scheduler_config.json, train_config.json.
    let config = std::fs::read(reference.join("legacy_tiny/config.json")).unwrap();
    fuzz("config.json", &config, &dir.join("config.json"), |p| {
        let text = String::from_utf8_lossy(&std::fs::read(p).unwrap()).to_string();
        if let Ok((c, _)) = UnetConfig::from_json_lenient(&text) {
            let _ = c.parameter_count();
            let _ = c.check_input(1, 32, 32);
        }
    });
    let scheduler = SchedulerConfig::for_training(
        ddpm_schedule::ScheduleConfig::ddpm_linear(),
        ddpm_forward::Prediction::Epsilon,
    )
    .to_json()
    .unwrap();
    fuzz(
        "scheduler_config.json",
        scheduler.as_bytes(),
        &dir.join("s.json"),
        |p| {
            let text = String::from_utf8_lossy(&std::fs::read(p).unwrap()).to_string();
            if let Ok((s, _)) = SchedulerConfig::from_json_lenient(&text) {
                let _ = s.sampler(SamplerKind::Ddim, Some(10), 0.0);
            }
        },
    );
    let train = serde_json::to_vec(&TrainConfig::preset("mnist").unwrap()).unwrap();
    fuzz("train_config.json", &train, &dir.join("t.json"), |p| {
        if let Ok(c) = serde_json::from_slice::<TrainConfig>(&std::fs::read(p).unwrap()) {
            let _ = c.validate();
        }
    });
    // IDX, parquet, PNG and JPEG.
    let digits = ImageSet::embedded_mnist().unwrap().take(20);
    let mut idx = vec![0, 0, 8, 3, 0, 0, 0, 20, 0, 0, 0, 28, 0, 0, 0, 28];
    for i in 0..20 {
        idx.extend_from_slice(digits.image(i));
    }
    fuzz("IDX", &idx, &dir.join("d.idx"), |p| {
        let _ = ImageSet::read_idx(p, None);
    });
    let parquet = cli::mnist_parquet(8);
    fuzz("parquet", &parquet, &dir.join("d.parquet"), |p| {
        let _ = ImageSet::read_parquet(p, None, 16, 1);
    });
    let img = image::DynamicImage::ImageLuma8(
        image::GrayImage::from_raw(28, 28, digits.image(0).to_vec()).unwrap(),
    );
    for (format, ext) in [
        (image::ImageFormat::Png, "png"),
        (image::ImageFormat::Jpeg, "jpg"),
    ] {
        let mut bytes = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut bytes), format)
            .unwrap();
        let folder = dir.join(format!("images-{ext}"));
        std::fs::create_dir_all(&folder).unwrap();
        fuzz(ext, &bytes, &folder.join(format!("a.{ext}")), |_| {
            let _ = ImageSet::image_folder(&folder, 16, 3);
        });
    }
    // A training checkpoint (fewer: each is 3.8 MB).
    let run = dir.join("run");
    let mut trainer = ddpm_trainer::Trainer::new(
        TrainConfig::preset("tiny").unwrap(),
        std::sync::Arc::new(digits.resize_to(16)),
        "d",
        &cpu,
    )
    .unwrap();
    trainer.train_step().unwrap();
    std::fs::create_dir_all(&run).unwrap();
    trainer
        .save_checkpoint(&run.join("ck.safetensors"))
        .unwrap();
    let ck = std::fs::read(run.join("ck.safetensors")).unwrap();
    fuzz("checkpoint", &ck, &dir.join("ck.safetensors"), |p| {
        let _ = Checkpoint::read(p, &cpu);
    });
}
