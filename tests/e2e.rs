//! End-to-end tests that drive the built `ddpm` binary: train, resume, export, sample, inspect,
//! golden images, hub download against a local server, and bad arguments.
//!
//! Part of the `ddpm-cli` package (so Cargo builds the binary first); lives in the workspace's
//! top-level `tests/` folder.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;

use std::process::Command;

use candle_core::{Device, Tensor};

#[path = "support/cli.rs"]
mod cli;
use cli::*;

#[test]
fn train_resume_export_sample_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut args = vec![
        "train",
        "--out",
        "run",
        "--steps",
        "4",
        "--checkpoint-every",
        "2",
    ];
    args.extend_from_slice(TINY);
    let stdout = ok(&ddpm(dir, &args));
    assert!(
        stdout.contains("checkpoint: run/checkpoints/step-00000004.safetensors"),
        "{stdout}"
    );
    assert!(
        stdout.contains("samples:") && stdout.contains("metrics:"),
        "{stdout}"
    );

    // An existing run is never overwritten without --resume or --force.
    let before = snapshot(&dir.join("run"));
    fails(&ddpm(dir, &args), "already holds a run");
    assert!(
        before == snapshot(&dir.join("run")),
        "a refused run changed files"
    );

    // --force with a bad argument fails before it deletes anything.
    fails(
        &ddpm(
            dir,
            &["train", "--out", "run", "--force", "--model", "huge"],
        ),
        "unknown model preset",
    );
    assert!(
        before == snapshot(&dir.join("run")),
        "a failed --force run changed files"
    );

    // Resume to 6 steps.
    let stdout = ok(&ddpm(
        dir,
        &[
            "train",
            "--out",
            "run",
            "--resume",
            "--steps",
            "6",
            "--limit",
            "64",
            "--no-progress",
        ],
    ));
    assert!(
        stdout.contains("resuming") && stdout.contains("step-00000006"),
        "{stdout}"
    );
    let inspect = ok(&ddpm(dir, &["inspect", "run"]));
    assert!(
        inspect.contains("step: 6") && inspect.contains("parameters: "),
        "{inspect}"
    );

    // Export, then sample the run (EMA) and the export from the same noise: identical.
    ok(&ddpm(dir, &["export", "run"]));
    for f in [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "scheduler_config.json",
        "train_config.json",
    ] {
        assert!(
            dir.join("run/export").join(f).is_file(),
            "{f} missing from the export"
        );
    }
    fails(&ddpm(dir, &["export", "run"]), "already exists");
    let noise = Tensor::from_vec(
        (0..2 * 16 * 16)
            .map(|i| ((i * 7919 % 200) as f32 / 100.0) - 1.0)
            .collect::<Vec<_>>(),
        (2, 1, 16, 16),
        &Device::Cpu,
    )
    .unwrap();
    candle_core::safetensors::save(
        &HashMap::from([("noise", noise)]),
        dir.join("noise.safetensors"),
    )
    .unwrap();
    for (model, out) in [("run", "a.safetensors"), ("run/export", "b.safetensors")] {
        ok(&ddpm(
            dir,
            &[
                "sample",
                "--model",
                model,
                "--init-noise",
                "noise.safetensors",
                "--steps",
                "5",
                "--out-tensor",
                out,
                "--out",
                &format!("{out}.png"),
                "--no-progress",
            ],
        ));
    }
    let (a, b) = (
        load(&dir.join("a.safetensors")),
        load(&dir.join("b.safetensors")),
    );
    assert_eq!(a["samples"].dims(), &[2, 1, 16, 16]);
    assert_eq!(
        flat(&a["samples"]),
        flat(&b["samples"]),
        "the export samples differently from the run"
    );
    assert!(flat(&a["samples"]).iter().all(|v| (-1.0..=1.0).contains(v)));

    // One PNG per image at the model's resolution.
    ok(&ddpm(
        dir,
        &[
            "sample",
            "--model",
            "run",
            "--num",
            "3",
            "--steps",
            "3",
            "--out-dir",
            "imgs",
            "--no-progress",
        ],
    ));
    let img = image::open(dir.join("imgs/00002.png")).unwrap();
    assert_eq!((img.width(), img.height()), (16, 16));

    // The pictures of the seed tutorial.
    ok(&ddpm(dir, &["show-forward", "--out", "fwd.png"]));
    ok(&ddpm(
        dir,
        &[
            "show-reverse",
            "--model",
            "run",
            "--steps",
            "10",
            "--frames",
            "5",
            "--out",
            "rev.png",
            "--no-progress",
        ],
    ));
    assert_eq!(
        image::open(dir.join("fwd.png")).unwrap().width(),
        10 * 34 + 2
    );
}

#[test]
fn bad_arguments_fail_with_one_line_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("a-file"), b"x").unwrap();
    std::fs::write(dir.join("corrupt.safetensors"), b"not a checkpoint").unwrap();
    let before = snapshot(dir);
    fails(
        &ddpm(dir, &["train", "--model", "huge", "--out", "r1"]),
        "unknown model preset \"huge\"",
    );
    fails(
        &ddpm(dir, &["train", "--recipe", "giant", "--out", "r2"]),
        "unknown recipe \"giant\"",
    );
    fails(
        &ddpm(
            dir,
            &["train", "--data", "missing/images.idx", "--out", "r3"],
        ),
        "missing/images.idx",
    );
    fails(
        &ddpm(dir, &["train", "--steps", "0", "--out", "r4"]),
        "steps must be positive, got 0",
    );
    fails(
        &ddpm(
            dir,
            &[
                "train",
                "--out",
                "a-file/run",
                "--recipe",
                "tiny",
                "--no-progress",
            ],
        ),
        "a-file/run",
    );
    fails(&ddpm(dir, &["train", "--out", "a-file"]), "is a file");
    fails(
        &ddpm(
            dir,
            &["sample", "--model", "corrupt.safetensors", "--out", "x.png"],
        ),
        "corrupt.safetensors",
    );
    fails(
        &ddpm(dir, &["sample", "--model", "nowhere", "--out", "x.png"]),
        "nowhere does not exist",
    );
    fails(
        &ddpm(dir, &["sample", "--model", "corrupt.safetensors"]),
        "nothing to write",
    );
    fails(
        &ddpm(
            dir,
            &[
                "sample",
                "--model",
                "corrupt.safetensors",
                "--out",
                "a-file/x.png",
            ],
        ),
        "a-file",
    );
    fails(
        &ddpm(
            dir,
            &[
                "sample",
                "--model",
                "corrupt.safetensors",
                "--quality",
                "--num",
                "10",
            ],
        ),
        "--quality needs --num between 50 and 5000",
    );
    fails(
        &ddpm(dir, &["inspect", "corrupt.safetensors"]),
        "corrupt.safetensors",
    );
    fails(
        &ddpm(dir, &["train", "--data", "mnist", "--out", "r5"]),
        "not in the cache",
    );
    assert!(before == snapshot(dir), "a failed command changed files");
    for sub in [
        "train",
        "sample",
        "export",
        "show-forward",
        "show-reverse",
        "inspect",
        "golden",
        "dataset",
    ] {
        let help = ok(&ddpm(dir, &[sub, "--help"]));
        assert!(help.contains("Usage:"), "{sub} --help: {help}");
    }
}

#[test]
fn ddim_from_a_diffusers_folder_reproduces_the_pipeline() {
    // legacy_tiny's weights and config with the DDIMPipeline's scheduler_config.json, sampled
    // with the same initial noise: diffusers' output to 1e-3 (clamped as --out-tensor is).
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let reference = root().join("assets/reference/unet");
    let model = dir.join("model");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(reference.join("legacy_tiny").join(f), model.join(f)).unwrap();
    }
    std::fs::copy(
        reference.join("ddim_pipeline/scheduler_config.json"),
        model.join("scheduler_config.json"),
    )
    .unwrap();
    let io = load(&reference.join("ddim_pipeline/io.safetensors"));
    candle_core::safetensors::save(
        &HashMap::from([("noise", io["noise"].clone())]),
        dir.join("noise.safetensors"),
    )
    .unwrap();
    ok(&ddpm(
        dir,
        &[
            "sample",
            "--model",
            "model",
            "--sampler",
            "ddim",
            "--steps",
            "20",
            "--eta",
            "0",
            "--init-noise",
            "noise.safetensors",
            "--out-tensor",
            "out.safetensors",
            "--no-progress",
        ],
    ));
    let ours = flat(&load(&dir.join("out.safetensors"))["samples"]);
    let theirs = flat(&io["output"].clamp(-1f32, 1f32).unwrap());
    let worst = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-3, "max |diff| {worst}");
}

/// `sample --quality` scores the shipped golden model's digits far better than noise scores
/// (a Fréchet distance near 1,000), and refuses models that do not make digits.
#[test]
fn sample_quality_scores_digits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let golden = root().join("assets/golden/model");
    let golden = golden.to_str().unwrap();
    let stdout = ok(&ddpm(
        dir,
        &[
            "sample",
            "--model",
            golden,
            "--sampler",
            "ddpm",
            "--steps",
            "50",
            "--num",
            "100",
            "--quality",
            "--no-progress",
        ],
    ));
    let json = stdout
        .lines()
        .find_map(|l| l.strip_prefix("quality json: "))
        .unwrap_or_else(|| panic!("no quality line: {stdout}"));
    let report: serde_json::Value = serde_json::from_str(json).unwrap();
    let fd = report["frechet_distance"].as_f64().unwrap();
    let floor = report["real_floor"].as_f64().unwrap();
    assert!(floor < fd && fd < 200.0, "{report}");
    assert!(report["classes_present"].as_u64().unwrap() >= 8, "{report}");
    assert_eq!(report["samples"], 100);
    assert_eq!(
        report["class_counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .sum::<u64>(),
        100
    );
    let rgb = root().join("assets/reference/unet/legacy_tiny");
    fails(
        &ddpm(
            dir,
            &[
                "sample",
                "--model",
                rgb.to_str().unwrap(),
                "--num",
                "50",
                "--quality",
            ],
        ),
        "--quality scores digits: the model makes 3-channel images",
    );
}

#[test]
fn golden_images_match() {
    let tmp = tempfile::tempdir().unwrap();
    let golden = root().join("assets/golden");
    let out = ddpm(
        tmp.path(),
        &[
            "golden",
            "--dir",
            golden.to_str().unwrap(),
            "--actual",
            "actual",
        ],
    );
    let stdout = ok(&out);
    assert_eq!(stdout.matches("ok ").count(), 3, "{stdout}");
}

/// A minimal stand-in for the hub's file-resolution API: repository info and byte ranges.
fn serve_hub(files: HashMap<String, Vec<u8>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
            let mut range_start = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range_start = v
                        .trim()
                        .split('-')
                        .next()
                        .and_then(|s| s.parse::<usize>().ok());
                }
            }
            let (status, headers, body): (&str, String, Vec<u8>) = if path
                == "/api/datasets/ylecun/mnist/revision/main"
            {
                let siblings: Vec<String> = files
                    .keys()
                    .map(|f| format!("{{\"rfilename\":\"{f}\"}}"))
                    .collect();
                let body = format!(
                    "{{\"sha\":\"abc123\",\"siblings\":[{},{{\"rfilename\":\"README.md\"}}]}}",
                    siblings.join(",")
                );
                (
                    "200 OK",
                    "Content-Type: application/json\r\n".into(),
                    body.into_bytes(),
                )
            } else if let Some(data) = path
                .strip_prefix("/datasets/ylecun/mnist/resolve/main/")
                .and_then(|f| files.get(f))
            {
                // Every range request gets the rest of the file from its start; the size is in
                // Content-Range, which is what the client reads from its first, 0-0 request.
                let start = range_start.unwrap_or(0).min(data.len());
                let headers = format!(
                    "ETag: \"etag-{}\"\r\nX-Repo-Commit: abc123\r\nContent-Range: bytes {start}-{}/{}\r\n",
                    data.len(),
                    data.len().saturating_sub(1),
                    data.len()
                );
                ("206 Partial Content", headers, data[start..].to_vec())
            } else {
                ("404 Not Found", String::new(), b"not found".to_vec())
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(&body);
            let _ = stream.flush();
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
        }
    });
    format!("http://{addr}")
}

#[test]
fn dataset_download_from_a_local_hub_then_train_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let endpoint = serve_hub(HashMap::from([(
        "mnist/train-00000-of-00001.parquet".to_string(),
        mnist_parquet(40),
    )]));
    let out = Command::new(env!("CARGO_BIN_EXE_ddpm"))
        .args(["dataset", "download", "mnist"])
        .current_dir(dir)
        .env("HF_HOME", dir.join("hf-home"))
        .env("HF_ENDPOINT", &endpoint)
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let stdout = ok(&out);
    assert!(
        stdout.contains("40 rows") && stdout.contains("image, label"),
        "{stdout}"
    );
    let cached = dir.join(
        "hf-home/hub/datasets--ylecun--mnist/snapshots/abc123/mnist/train-00000-of-00001.parquet",
    );
    assert!(
        cached.is_file(),
        "not in the standard HF cache layout: {stdout}"
    );
    // Offline (the helper sets HF_HUB_OFFLINE=1), the name resolves to the cached files.
    let stdout = ok(&ddpm(
        dir,
        &[
            "train",
            "--data",
            "mnist",
            "--recipe",
            "tiny",
            "--steps",
            "1",
            "--image-size",
            "16",
            "--out",
            "run",
            "--no-progress",
        ],
    ));
    assert!(stdout.contains("hub dataset mnist: 40 images"), "{stdout}");
    let stdout = ok(&ddpm(dir, &["dataset", "download", "mnist"]));
    assert!(
        stdout.contains("offline") && stdout.contains("40 rows"),
        "{stdout}"
    );
}

/// A class-conditional run: trained with label dropout, sampled given classes with guidance,
/// exported and sampled again from the folder; bad classes and guidance are errors.
#[test]
fn class_conditional_train_sample_export() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut args = vec![
        "train",
        "--out",
        "run",
        "--steps",
        "2",
        "--model",
        "mnist-16-classes",
        "--class-dropout",
        "0.2",
        "--guidance",
        "2",
        "--sample-steps",
        "2",
    ];
    args.extend_from_slice(TINY);
    ok(&ddpm(dir, &args));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("run/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["train"]["class_dropout"], 0.2);
    assert_eq!(config["train"]["guidance_scale"], 2.0);
    assert_eq!(config["train"]["model"]["num_class_embeds"], 11);

    let sample = |model: &str, extra: &[&str], out: &str| {
        let mut a = vec![
            "sample",
            "--model",
            model,
            "--num",
            "3",
            "--sampler",
            "ddim",
            "--steps",
            "2",
            "--no-progress",
            "--out-tensor",
            out,
        ];
        a.extend_from_slice(extra);
        ddpm(dir, &a)
    };
    // The run's own guidance (2) by default, or given; a different class gives other images.
    ok(&sample("run", &["--class", "3"], "a.safetensors"));
    ok(&sample(
        "run",
        &["--class", "3", "--guidance", "2"],
        "b.safetensors",
    ));
    ok(&sample("run", &["--class", "4"], "c.safetensors"));
    let s = |f: &str| flat(&load(&dir.join(f))["samples"]);
    assert_eq!(s("a.safetensors"), s("b.safetensors"));
    assert_ne!(s("a.safetensors"), s("c.safetensors"));

    // Class 10 is the "no class" label of a run trained with label dropout.
    fails(
        &sample("run", &["--class", "10"], "x.safetensors"),
        "--class 10 out of range: the model draws classes 0..10",
    );

    // Exported, the folder samples the same, its train_config.json giving the guidance and
    // the "no class" label.
    ok(&ddpm(dir, &["export", "run", "--out", "exported"]));
    ok(&sample("exported", &["--class", "3"], "d.safetensors"));
    assert_eq!(s("a.safetensors"), s("d.safetensors"));
    fails(
        &sample("exported", &["--class", "10"], "x.safetensors"),
        "--class 10 out of range",
    );
    // A train_config.json that does not parse, or describes another model, is an error naming
    // it.
    let train_config = dir.join("exported/train_config.json");
    let good = std::fs::read_to_string(&train_config).unwrap();
    std::fs::write(&train_config, "{}").unwrap();
    fails(
        &sample("exported", &["--class", "3"], "x.safetensors"),
        "train_config.json",
    );
    let mut other: serde_json::Value = serde_json::from_str(&good).unwrap();
    other["model"]["num_class_embeds"] = 5.into();
    std::fs::write(&train_config, other.to_string()).unwrap();
    fails(
        &sample("exported", &["--class", "3"], "x.safetensors"),
        "describes another model than",
    );
    assert!(!dir.join("x.safetensors").exists());
    // Without it, a folder is plain diffusers: guidance 1 unless asked, the last class
    // embedding taken as "no class" only when asked to guide.
    std::fs::remove_file(&train_config).unwrap();
    ok(&sample(
        "exported",
        &["--class", "3", "--guidance", "2"],
        "e.safetensors",
    ));
    assert_eq!(s("a.safetensors"), s("e.safetensors"));
    ok(&sample("exported", &["--class", "10"], "f.safetensors"));

    // An unconditional model takes no classes.
    let mut plain = vec!["train", "--out", "plain", "--steps", "1"];
    plain.extend_from_slice(TINY);
    ok(&ddpm(dir, &plain));
    fails(
        &sample("plain", &["--class", "1"], "y.safetensors"),
        "--class and --guidance need a class-conditional model",
    );
    // Label dropout needs a conditional model.
    let mut bad = vec!["train", "--out", "bad", "--class-dropout", "0.1"];
    bad.extend_from_slice(TINY);
    fails(
        &ddpm(dir, &bad),
        "class_dropout 0.1 needs a class-conditional model",
    );
    assert!(!dir.join("bad").exists());
}

/// A folder of class subfolders trains a class-conditional model with `--classes`; a class the
/// model has no room for, or `--classes` on a SimpleUnet, is an error before anything is written.
#[test]
fn class_folders_train_with_classes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for (class, value) in [("circle", 40u8), ("square", 200)] {
        std::fs::create_dir_all(dir.join("shapes").join(class)).unwrap();
        for i in 0..4u8 {
            image::RgbImage::from_pixel(20, 20, image::Rgb([value, value + i, 90]))
                .save(dir.join(format!("shapes/{class}/{i}.png")))
                .unwrap();
        }
    }
    let base = [
        "train",
        "--data",
        "shapes",
        "--image-size",
        "16",
        "--recipe",
        "tiny",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--sample-count",
        "2",
        "--sample-steps",
        "2",
        "--no-progress",
    ];
    let mut args = base.to_vec();
    args.extend(["--out", "run", "--model", "mnist-16", "--classes", "2"]);
    // mnist-16 takes one channel: the RGB shapes are read as grey.
    let stdout = ok(&ddpm(dir, &args));
    assert!(
        stdout.contains("8 images of 1x16x16, labelled 0..2"),
        "{stdout}"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("run/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["train"]["model"]["num_class_embeds"], 3);
    assert_eq!(config["train"]["class_dropout"], 0.1);
    ok(&ddpm(
        dir,
        &[
            "sample",
            "--model",
            "run",
            "--class",
            "1",
            "--num",
            "2",
            "--steps",
            "2",
            "--no-progress",
            "--out",
            "squares.png",
        ],
    ));

    // One class of room for two classes of data.
    let mut args = base.to_vec();
    args.extend(["--out", "small", "--model", "mnist-16", "--classes", "1"]);
    fails(
        &ddpm(dir, &args),
        "the data has class 1, the model takes classes 0..1",
    );
    let mut args = base.to_vec();
    args.extend(["--out", "simple", "--classes", "2"]);
    fails(&ddpm(dir, &args), "--classes needs a UNet2DModel");
    let mut args = base.to_vec();
    args.extend(["--out", "small", "--model", "mnist-16", "--classes", "0"]);
    fails(&ddpm(dir, &args), "--classes must be at least 1, got 0");
    assert!(!dir.join("small").exists() && !dir.join("simple").exists());
}

/// diffusers' own layouts: a DDPMPipeline folder written by `save_pretrained`
/// (`scripts/reference/pipeline_fixtures.py`) samples as its model folder with its scheduler;
/// `--subfolder unet` opens the same model; `--variant fp16` reads the half-precision file,
/// and a missing variant is an error naming the files looked for.
#[test]
fn diffusers_pipeline_folders_subfolders_and_variants() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let unet = root().join("assets/reference/unet");
    let pipeline = unet.join("ddpm_pipeline_tiny");
    let pipeline = pipeline.to_str().unwrap();
    let tiny = unet.join("diffusers_tiny");
    let tiny = tiny.to_str().unwrap();
    let sample = |model: &str, extra: &[&str], out: &str| {
        sample_two(dir, model, out, &[&["--steps", "4"], extra].concat())
    };
    // The pipeline's scheduler clips x0 like the default DDPMScheduler the bare model folder
    // gets; both default to DDPM (as DDPMPipeline does).
    let out = sample(pipeline, &[], "a.safetensors");
    ok(&out);
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ok(&sample(tiny, &[], "b.safetensors"));
    ok(&sample(pipeline, &["--subfolder", "unet"], "c.safetensors"));
    ok(&sample(tiny, &["--sampler", "ddpm"], "d.safetensors"));
    assert_eq!(samples(dir, "a.safetensors"), samples(dir, "b.safetensors"));
    assert_eq!(samples(dir, "a.safetensors"), samples(dir, "c.safetensors"));
    assert_eq!(samples(dir, "a.safetensors"), samples(dir, "d.safetensors"));
    // fp16 weights: close to the f32 model's samples, not the same bits.
    ok(&sample(tiny, &["--variant", "fp16"], "e.safetensors"));
    let (a, e) = (samples(dir, "a.safetensors"), samples(dir, "e.safetensors"));
    assert_ne!(a, e);
    let worst = a
        .iter()
        .zip(&e)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 0.1, "fp16 samples differ by {worst}");
    fails(
        &sample(tiny, &["--variant", "int3"], "x.safetensors"),
        "diffusion_pytorch_model.int3.safetensors",
    );
    // A pipeline this library does not sample is named.
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(
        other.join("model_index.json"),
        r#"{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}"#,
    )
    .unwrap();
    fails(
        &sample("other", &[], "x.safetensors"),
        "\"StableDiffusionPipeline\" is not supported",
    );
}
