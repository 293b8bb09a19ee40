//! Run folders that survive anything: real crashes (SIGKILL), a full disk, two writers at once,
//! damaged checkpoints, options that would change a resumed run, picture formats, and
//! non-finite weights. Each drives the built `ddpm` binary.

#[path = "support/cli.rs"]
mod cli;
#[path = "support/crash.rs"]
mod crash;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use candle_core::{Device, Tensor};
use cli::*;

/// A one-to-few-step run of the crash test's tiny recipe into `dir/run`, with `extra` options.
fn train_tiny(dir: &Path, steps: u64, extra: &[&str]) {
    let mut args = crash::train_args(steps, 3);
    args.extend(["--out", "run"].iter().chain(extra).map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&ddpm(dir, &args));
}

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ddpm"))
}

/// Files in a run folder that are neither results nor the lock: temporary files of writes that
/// were killed.
fn leftovers(run: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for dir in [
        run.to_path_buf(),
        run.join("checkpoints"),
        run.join("samples"),
    ] {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') && name != ".lock" {
                out.push(format!("{}/{name}", dir.display()));
            }
        }
    }
    out
}

/// SIGKILL at 10 seeded random moments of a 150-step run (checkpoints every step, so some kills
/// land inside a checkpoint write), resumed each time: the final weights, EMA and optimizer
/// moments are bitwise those of the run never interrupted, and nothing is left over.
#[test]
fn killed_and_resumed_runs_end_bitwise_equal_to_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (crashed, clean, report) =
        crash::crash_and_resume(bin(), tmp.path(), 150, 10, 2026, Duration::from_millis(600))
            .unwrap();
    assert_eq!(report.kills, 10, "{report:?}");
    let (a, b) = (
        crash::tensor_bytes(&crashed).unwrap(),
        crash::tensor_bytes(&clean).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{name} differs after {report:?}");
    }
    let left = leftovers(&tmp.path().join("crashed"));
    assert!(left.is_empty(), "left over: {left:?}");
    eprintln!("crash test: {report:?}");
}

/// A full disk during a checkpoint: a clean one-line error, exit 1, and the checkpoints written
/// before it intact and readable. The disk is a 10 MiB tmpfs mounted in a private mount
/// namespace (`unshare`), where that is allowed; elsewhere the file-size limit (`ulimit -f`,
/// SIGXFSZ ignored) makes the same writes fail with EFBIG.
#[test]
fn a_full_disk_fails_cleanly_and_keeps_earlier_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let args = crash::train_args(8, 10).join(" ");
    let exe = bin().display();
    // Each checkpoint of the tiny recipe is 3.8 MB: two fit in 10 MiB, a third does not.
    let mounted = format!(
        "mkdir -p {d}/disk && mount -t tmpfs -o size=10m tmpfs {d}/disk || exit 97; \
         {exe} {args} --out {d}/disk/run 2> {d}/stderr; echo $? > {d}/rc; \
         cp -r {d}/disk/run {d}/copy",
        d = dir.display()
    );
    let status = Command::new("unshare")
        .args(["--mount", "--map-root-user", "sh", "-c", &mounted])
        .status();
    let via_mount = matches!(status, Ok(s) if s.success());
    if !via_mount {
        // A file-size limit fails every write past it (EFBIG) as a full disk fails the write
        // that does not fit: two steps without it, then the resumed run's next checkpoint
        // (3.8 MB) with a limit of 7,000 blocks of 512 bytes.
        ok(&ddpm(
            dir,
            &{
                let mut a = crash::train_args(2, 10);
                a.extend(["--out".into(), "copy".into()]);
                a
            }
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        ));
        let limited = format!(
            "trap '' XFSZ; ulimit -f 7000; {exe} train --out {d}/copy --resume --steps 8 --limit 64 --no-progress 2> {d}/stderr; echo $? > {d}/rc",
            d = dir.display()
        );
        assert!(
            Command::new("sh")
                .args(["-c", &limited])
                .status()
                .unwrap()
                .success()
        );
    }
    eprintln!(
        "full disk by {}",
        if via_mount {
            "a 10 MiB tmpfs"
        } else {
            "a file-size limit"
        }
    );
    let rc = std::fs::read_to_string(dir.join("rc")).unwrap();
    let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap();
    assert_eq!(rc.trim(), "1", "exit status; stderr {stderr:?}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line of error: {stderr:?}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains("checkpoint"),
        "{stderr:?}"
    );
    assert!(
        lines[0].contains("No space left on device") || lines[0].contains("too large"),
        "{stderr:?} (via mount: {via_mount})"
    );
    let copy = dir.join("copy");
    let mut kept: Vec<_> = std::fs::read_dir(copy.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("step-"))
        .collect();
    kept.sort();
    assert!(!kept.is_empty(), "no checkpoint survived");
    for name in &kept {
        ddpm_trainer::Checkpoint::read(&copy.join("checkpoints").join(name), &Device::Cpu)
            .unwrap_or_else(|e| panic!("{name} is damaged: {e}"));
    }
    // The run resumes from the last good checkpoint once there is room again.
    if !via_mount {
        let out = ddpm(
            dir,
            &[
                "train",
                "--out",
                "copy",
                "--resume",
                "--limit",
                "64",
                "--no-progress",
            ],
        );
        let stdout = ok(&out);
        assert!(stdout.contains(&format!(
            "resuming copy/checkpoints/{}",
            kept[kept.len() - 1]
        )));
    }
}

/// Two writers on one run folder: the second fails at once naming the folder and the first's
/// pid; once the first is killed, its lock is gone and the folder can be resumed.
#[test]
fn a_second_writer_fails_at_once_and_a_killed_writer_never_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut first_args = crash::train_args(100_000, 3);
    first_args.extend(["--out".into(), "run".into()]);
    let mut first = Command::new(bin())
        .args(&first_args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until it has claimed the folder and written a checkpoint.
    let start = std::time::Instant::now();
    while !dir
        .join("run/checkpoints/step-00000002.safetensors")
        .is_file()
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the first run never got going"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = first.id();
    for args in [
        &[
            "train",
            "--out",
            "run",
            "--resume",
            "--limit",
            "64",
            "--no-progress",
        ][..],
        &[
            "train", "--out", "run", "--force", "--recipe", "tiny", "--limit", "64",
        ][..],
    ] {
        fails(
            &ddpm(dir, args),
            &format!("run folder run is in use by another ddpm process (pid {pid})"),
        );
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let stdout = ok(&ddpm(
        dir,
        &[
            "train",
            "--out",
            "run",
            "--resume",
            "--steps",
            "1",
            "--limit",
            "64",
            "--no-progress",
        ],
    ));
    assert!(stdout.contains("resuming"), "{stdout}");
}

/// A damaged newest checkpoint (one flipped bit) is refused by its checksum; --resume and
/// sampling fall back to the one before with a one-line warning naming the broken file.
#[test]
fn a_damaged_checkpoint_is_skipped_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    train_tiny(dir, 3, &[]);
    let newest = dir.join("run/checkpoints/step-00000003.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    let at = bytes.len() - 1000;
    bytes[at] ^= 0x10;
    std::fs::write(&newest, &bytes).unwrap();
    let err = ddpm_trainer::Checkpoint::read(&newest, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("damaged"), "{err}");

    let out = ddpm(
        dir,
        &[
            "sample",
            "--model",
            "run",
            "--num",
            "2",
            "--out",
            "g.png",
            "--no-progress",
        ],
    );
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = stderr.lines().collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].starts_with("warning: skipping checkpoint")
            && warnings[0].contains("step-00000003")
            && warnings[0].contains("damaged"),
        "{stderr}"
    );
    let out = ddpm(
        dir,
        &[
            "train",
            "--out",
            "run",
            "--resume",
            "--limit",
            "64",
            "--no-progress",
        ],
    );
    let stdout = ok(&out);
    assert!(
        stdout.contains("resuming run/checkpoints/step-00000002.safetensors at step 2"),
        "{stdout}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning: skipping checkpoint"));
    // It trains step 3 again, and writes a good one.
    ddpm_trainer::Checkpoint::read(&newest, &Device::Cpu).unwrap();
}

/// A resumed run keeps its configuration: an option that would change it is an error naming
/// the option, and nothing in the folder changes.
#[test]
fn resume_refuses_options_that_would_change_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    train_tiny(dir, 2, &[]);
    let before = snapshot(&dir.join("run"));
    for (option, value) in [
        ("--model", "mnist-16"),
        ("--lr", "0.1"),
        ("--recipe", "seed"),
        ("--batch-size", "4"),
        ("--seed", "3"),
        ("--schedule", "cosine"),
    ] {
        fails(
            &ddpm(
                dir,
                &[
                    "train", "--out", "run", "--resume", "--limit", "64", option, value,
                ],
            ),
            &format!("{option} would change it"),
        );
    }
    assert!(
        before == snapshot(&dir.join("run")),
        "a refused resume changed files"
    );
}

/// `--out` takes the format from the extension: PNG and JPEG are written as such, anything
/// else is an error before any work.
#[test]
fn pictures_take_their_format_from_the_extension() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    train_tiny(dir, 1, &[]);
    let sample = |out: &str| {
        ddpm(
            dir,
            &[
                "sample",
                "--model",
                "run",
                "--num",
                "2",
                "--steps",
                "2",
                "--out",
                out,
                "--no-progress",
            ],
        )
    };
    for (name, magic) in [
        ("grid.png", &b"\x89PNG"[..]),
        ("grid.jpg", &b"\xff\xd8\xff"[..]),
        ("grid.JPEG", &b"\xff\xd8\xff"[..]),
    ] {
        ok(&sample(name));
        let bytes = std::fs::read(dir.join(name)).unwrap();
        assert!(bytes.starts_with(magic), "{name} is not what its name says");
    }
    for bad in ["grid.gif", "grid", "out/grid.webp"] {
        fails(&sample(bad), "unknown picture format");
        assert!(!dir.join(bad).exists());
    }
    assert!(
        !dir.join("out").exists(),
        "a refused output created its folder"
    );
    fails(
        &ddpm(dir, &["show-forward", "--out", "strip.bmp"]),
        "unknown picture format",
    );
    ok(&ddpm(dir, &["show-forward", "--out", "strip.jpg"]));
}

/// Weights with NaN are refused when the model is loaded, naming the tensor; a model whose
/// prediction overflows stops sampling with an error naming the step.
#[test]
fn non_finite_weights_and_predictions_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    train_tiny(dir, 1, &[]);
    ok(&ddpm(dir, &["export", "run"]));
    let weights = dir.join("run/export/diffusion_pytorch_model.safetensors");
    let tensors = load(&weights);
    let edit = |name: &str, f: &dyn Fn(&Tensor) -> Tensor| {
        let mut t: HashMap<String, Tensor> = tensors.clone();
        let v = f(&t[name]);
        t.insert(name.to_string(), v);
        candle_core::safetensors::save(&t, &weights).unwrap();
    };
    let sample = || {
        ddpm(
            dir,
            &[
                "sample",
                "--model",
                "run/export",
                "--num",
                "1",
                "--steps",
                "3",
                "--out",
                "x.png",
                "--no-progress",
            ],
        )
    };
    let name = "output.weight";
    assert!(
        tensors.contains_key(name),
        "{:?}",
        tensors.keys().collect::<Vec<_>>()
    );
    edit(name, &|t| {
        let mut v = flat(t);
        v[3] = f32::NAN;
        Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
    });
    fails(
        &sample(),
        "tensor output.weight holds 1 value(s) that are NaN or infinite",
    );
    // Finite but huge: the prediction overflows to infinity within the three steps.
    edit(name, &|t| (t.ones_like().unwrap() * 3.0e38).unwrap());
    fails(&sample(), "of 3 (timestep");
    fails(&sample(), "the model predicted");
    assert!(!dir.join("x.png").exists());
}

/// A safetensors file from a header (JSON) and data bytes, as the format lays them out.
fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A PNG whose header claims `w` x `h` pixels, with no pixel data after it.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    let crc = crc32(&ihdr);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&ihdr);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// An IDX file: magic (0, 0, 8, rank), big-endian sizes, then `data`.
fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// One hostile input: files written under the case's folder (`M/...` paths get a copy of a
/// good model folder to damage first), the command, and what its one-line error must say.
struct Case {
    name: &'static str,
    files: Vec<(&'static str, Vec<u8>)>,
    args: Vec<&'static str>,
    needle: &'static str,
}

fn case(
    name: &'static str,
    files: Vec<(&'static str, Vec<u8>)>,
    args: &[&'static str],
    needle: &'static str,
) -> Case {
    Case {
        name,
        files,
        args: args.to_vec(),
        needle,
    }
}

/// More than 60 hostile inputs across every subcommand and loader: forged safetensors headers,
/// absurd and malformed configs, lying images and data files, wrong noise, impossible flags,
/// unwritable outputs. Each must exit 1 (not a panic, not an abort: memory is capped at 4 GB
/// of address space, so an absurd allocation would abort) with one line naming the bad file
/// or value, and leave every file as it was.
#[test]
fn hostile_inputs_fail_with_one_line_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    train_tiny(root, 1, &[]);
    ok(&ddpm(root, &["export", "run", "--out", "model"]));
    let model = root.join("model");
    let read = |name: &str| std::fs::read(model.join(name)).unwrap();
    let config: serde_json::Value = serde_json::from_slice(&read("config.json")).unwrap();
    let with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut c = config.clone();
        edit(&mut c);
        c.to_string().into_bytes()
    };
    let unet2d: serde_json::Value =
        serde_json::from_str(&ddpm_unet::UnetConfig::preset("mnist-16").unwrap().to_json())
            .unwrap();
    let unet2d_with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut c = unet2d.clone();
        edit(&mut c);
        c.to_string().into_bytes()
    };
    let scheduler: serde_json::Value =
        serde_json::from_slice(&read("scheduler_config.json")).unwrap();
    let sched = |key: &str, value: serde_json::Value| {
        let mut c = scheduler.clone();
        c[key] = value;
        c.to_string().into_bytes()
    };
    let weights = read("diffusion_pytorch_model.safetensors");
    let checkpoint = std::fs::read(root.join("run/checkpoints/step-00000001.safetensors")).unwrap();
    let f32s = |n: usize| vec![0u8; 4 * n];
    let noise = |header: &str, data: Vec<u8>| safetensors(header, &data);
    let good_png = {
        let img = image::GrayImage::from_pixel(16, 16, image::Luma([7]));
        let mut v = Vec::new();
        image::DynamicImage::ImageLuma8(img)
            .write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
            .unwrap();
        v
    };
    const SAMPLE: &[&str] = &[
        "sample", "--model", "M", "--num", "1", "--steps", "2", "--out", "x.png",
    ];
    const WEIGHTS: &str = "M/diffusion_pytorch_model.safetensors";
    let big_header = {
        let mut v = u64::MAX.to_le_bytes().to_vec();
        v.extend_from_slice(b"{}");
        v
    };
    let long_header = {
        let mut v = 1_000_000u64.to_le_bytes().to_vec();
        v.extend_from_slice(b"{\"a\":1}");
        v
    };
    let cases = vec![
        // A model folder's config.json.
        case(
            "config not JSON",
            vec![("M/config.json", b"{ not json".to_vec())],
            SAMPLE,
            "config.json",
        ),
        case(
            "config an array",
            vec![("M/config.json", b"[1, 2]".to_vec())],
            SAMPLE,
            "expected a JSON object",
        ),
        case(
            "config unknown class",
            vec![("M/config.json", with(&|c| c["_class_name"] = "Foo".into()))],
            SAMPLE,
            "\"Foo\" is not supported",
        ),
        case(
            "config class not a string",
            vec![("M/config.json", with(&|c| c["_class_name"] = 5.into()))],
            SAMPLE,
            "_class_name must be a string",
        ),
        case(
            "config 10^8 channels",
            vec![(
                "M/config.json",
                with(&|c| {
                    c["down_channels"] = serde_json::json!([100_000_000, 100_000_000, 100_000_000])
                }),
            )],
            SAMPLE,
            "100000000",
        ),
        case(
            "config 10^5 levels",
            vec![(
                "M/config.json",
                with(&|c| c["down_channels"] = serde_json::json!(vec![16; 100_000])),
            )],
            SAMPLE,
            "down_channels",
        ),
        case(
            "config zero channels",
            vec![(
                "M/config.json",
                with(&|c| c["down_channels"] = serde_json::json!([0, 16, 32])),
            )],
            SAMPLE,
            "down_channels must be positive",
        ),
        case(
            "config no image channels",
            vec![("M/config.json", with(&|c| c["image_channels"] = 0.into()))],
            SAMPLE,
            "image_channels",
        ),
        case(
            "config channels a string",
            vec![(
                "M/config.json",
                with(&|c| c["image_channels"] = "one".into()),
            )],
            SAMPLE,
            "config.json",
        ),
        case(
            "config negative",
            vec![("M/config.json", with(&|c| c["time_emb_dim"] = (-4).into()))],
            SAMPLE,
            "config.json",
        ),
        case(
            "UNet2DModel 10^8 channels",
            vec![(
                "M/config.json",
                unet2d_with(&|c| {
                    c["block_out_channels"] =
                        serde_json::json!([100_000_000, 100_000_000, 100_000_000])
                }),
            )],
            SAMPLE,
            "block_out_channels",
        ),
        case(
            "UNet2DModel 10^9 layers",
            vec![(
                "M/config.json",
                unet2d_with(&|c| c["layers_per_block"] = 1_000_000_000.into()),
            )],
            SAMPLE,
            "layers_per_block",
        ),
        case(
            "UNet2DModel mismatched blocks",
            vec![(
                "M/config.json",
                unet2d_with(&|c| c["block_out_channels"] = serde_json::json!([32, 64])),
            )],
            SAMPLE,
            "must have the same length",
        ),
        case(
            "UNet2DModel 10^10 parameters",
            vec![(
                "M/config.json",
                unet2d_with(&|c| {
                    c["block_out_channels"] = serde_json::json!([16384, 16384, 16384])
                }),
            )],
            SAMPLE,
            "parameters",
        ),
        case(
            "UNet2DModel groups",
            vec![(
                "M/config.json",
                unet2d_with(&|c| c["norm_num_groups"] = 7.into()),
            )],
            SAMPLE,
            "7",
        ),
        case(
            "config missing",
            vec![("M/config.json", Vec::new())],
            SAMPLE,
            "config.json",
        ),
        // Its weights.
        case(
            "weights random bytes",
            vec![(
                WEIGHTS,
                (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect(),
            )],
            SAMPLE,
            "diffusion_pytorch_model.safetensors",
        ),
        case(
            "weights empty",
            vec![(WEIGHTS, Vec::new())],
            SAMPLE,
            "diffusion_pytorch_model.safetensors",
        ),
        case(
            "weights header length 2^64-1",
            vec![(WEIGHTS, big_header.clone())],
            SAMPLE,
            "diffusion_pytorch_model.safetensors",
        ),
        case(
            "weights header past the end",
            vec![(WEIGHTS, long_header.clone())],
            SAMPLE,
            "diffusion_pytorch_model.safetensors",
        ),
        case(
            "weights header not JSON",
            vec![(WEIGHTS, safetensors("{ nope", &[]))],
            SAMPLE,
            "diffusion_pytorch_model.safetensors",
        ),
        case(
            "weights overlapping offsets",
            vec![(
                WEIGHTS,
                safetensors(
                    r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
                    &f32s(6),
                ),
            )],
            SAMPLE,
            "diffusion_pytorch_model.safetensors",
        ),
        case(
            "weights offsets past the data",
            vec![(
                WEIGHTS,
                safetensors(
                    r#"{"a":{"dtype":"F32","shape":[1000000],"data_offsets":[0,4000000]}}"#,
                    &f32s(4),
                ),
            )],
            SAMPLE,
            "diffusion_pytorch_model.safetensors",
        ),
        case(
            "weights shape unlike its bytes",
            vec![(
                WEIGHTS,
                safetensors(
                    r#"{"a":{"dtype":"F32","shape":[1000000000,1000000000],"data_offsets":[0,16]}}"#,
                    &f32s(4),
                ),
            )],
            SAMPLE,
            "diffusion_pytorch_model.safetensors",
        ),
        case(
            "weights unknown dtype",
            vec![(
                WEIGHTS,
                safetensors(
                    r#"{"a":{"dtype":"Q9","shape":[4],"data_offsets":[0,16]}}"#,
                    &f32s(4),
                ),
            )],
            SAMPLE,
            "diffusion_pytorch_model.safetensors",
        ),
        case(
            "weights a tensor only",
            vec![(
                WEIGHTS,
                safetensors(
                    r#"{"conv0.weight":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                    &f32s(4),
                ),
            )],
            SAMPLE,
            "is missing from the checkpoint",
        ),
        case(
            "weights wrong dtype",
            vec![(WEIGHTS, retyped(&weights, "output.weight", "I64"))],
            SAMPLE,
            "tensor output.weight has dtype I64",
        ),
        case(
            "weights extra tensor",
            vec![(WEIGHTS, with_extra(&weights))],
            SAMPLE,
            "does not use",
        ),
        case(
            "weights NaN",
            vec![(WEIGHTS, with_nan(&weights, "conv0.bias"))],
            SAMPLE,
            "conv0.bias",
        ),
        // Its scheduler_config.json and train_config.json.
        case(
            "scheduler not JSON",
            vec![("M/scheduler_config.json", b"]".to_vec())],
            SAMPLE,
            "scheduler_config.json",
        ),
        case(
            "scheduler unknown schedule",
            vec![(
                "M/scheduler_config.json",
                sched("beta_schedule", "zigzag".into()),
            )],
            SAMPLE,
            "zigzag",
        ),
        case(
            "scheduler zero timesteps",
            vec![(
                "M/scheduler_config.json",
                sched("num_train_timesteps", 0.into()),
            )],
            SAMPLE,
            "num_train_timesteps",
        ),
        case(
            "scheduler 10^12 timesteps",
            vec![(
                "M/scheduler_config.json",
                sched("num_train_timesteps", 1_000_000_000_000u64.into()),
            )],
            SAMPLE,
            "num_train_timesteps must be at most",
        ),
        case(
            "scheduler start after end",
            vec![("M/scheduler_config.json", sched("beta_start", 0.5.into()))],
            SAMPLE,
            "beta_start",
        ),
        case(
            "scheduler negative beta",
            vec![("M/scheduler_config.json", sched("beta_end", (-0.1).into()))],
            SAMPLE,
            "beta",
        ),
        case(
            "scheduler thresholding",
            vec![(
                "M/scheduler_config.json",
                sched("thresholding", true.into()),
            )],
            SAMPLE,
            "thresholding",
        ),
        case(
            "scheduler prediction",
            vec![(
                "M/scheduler_config.json",
                sched("prediction_type", "vibes".into()),
            )],
            SAMPLE,
            "vibes",
        ),
        case(
            "scheduler trained betas",
            vec![(
                "M/scheduler_config.json",
                sched("trained_betas", serde_json::json!([0.1, 0.2])),
            )],
            SAMPLE,
            "trained_betas",
        ),
        case(
            "scheduler variance",
            vec![(
                "M/scheduler_config.json",
                sched("variance_type", "learned".into()),
            )],
            SAMPLE,
            "learned",
        ),
        case(
            "scheduler huge offset",
            vec![(
                "M/scheduler_config.json",
                sched("steps_offset", 1_000_000_000u64.into()),
            )],
            SAMPLE,
            "steps_offset",
        ),
        case(
            "scheduler wrong type",
            vec![(
                "M/scheduler_config.json",
                sched("clip_sample", "yes".into()),
            )],
            SAMPLE,
            "clip_sample",
        ),
        case(
            "train config not JSON",
            vec![("M/train_config.json", b"{".to_vec())],
            SAMPLE,
            "train_config.json",
        ),
        case(
            "train config of another model",
            vec![(
                "M/train_config.json",
                other_model_train_config(&read("train_config.json")),
            )],
            SAMPLE,
            "describes another model",
        ),
        // Checkpoints and paths given as models.
        case(
            "checkpoint random bytes",
            vec![("ck.safetensors", vec![42; 100])],
            &["sample", "--model", "ck.safetensors", "--out", "x.png"],
            "ck.safetensors",
        ),
        case(
            "checkpoint of weights only",
            vec![("ck.safetensors", weights.clone())],
            &["sample", "--model", "ck.safetensors", "--out", "x.png"],
            "not a ddpm training checkpoint",
        ),
        case(
            "checkpoint truncated",
            vec![(
                "ck.safetensors",
                checkpoint[..checkpoint.len() / 2].to_vec(),
            )],
            &["sample", "--model", "ck.safetensors", "--out", "x.png"],
            "ck.safetensors",
        ),
        case(
            "checkpoint one bit flipped",
            vec![("ck.safetensors", flipped(&checkpoint))],
            &["sample", "--model", "ck.safetensors", "--out", "x.png"],
            "damaged",
        ),
        case(
            "model missing",
            vec![],
            &["sample", "--model", "nowhere", "--out", "x.png"],
            "nowhere does not exist",
        ),
        case(
            "model an empty folder",
            vec![("empty/.keep", Vec::new())],
            &["sample", "--model", "empty", "--out", "x.png"],
            "neither a run folder",
        ),
        case(
            "inspect random bytes",
            vec![("ck.safetensors", vec![7; 64])],
            &["inspect", "ck.safetensors"],
            "ck.safetensors",
        ),
        case(
            "export a non-checkpoint",
            vec![("ck.safetensors", weights.clone())],
            &["export", "ck.safetensors", "--out", "e"],
            "not a ddpm training checkpoint",
        ),
        case(
            "pickle random bytes",
            vec![("w.pt", vec![5; 300])],
            &[
                "sample",
                "--model",
                "w.pt",
                "--config",
                "seed-tiny",
                "--out",
                "x.png",
            ],
            "not a PyTorch state_dict file",
        ),
        case(
            "config for a non-pickle",
            vec![],
            &[
                "sample",
                "--model",
                "M",
                "--config",
                "seed-tiny",
                "--out",
                "x.png",
            ],
            "--config is for PyTorch weights files",
        ),
        // Data.
        case(
            "IDX bad magic",
            vec![("d.idx", vec![1, 2, 3, 4, 5, 6])],
            &["train", "--data", "d.idx", "--out", "r", "--recipe", "tiny"],
            "bad magic number",
        ),
        case(
            "IDX claims 4 billion images",
            vec![("d.idx", idx(&[u32::MAX, 28, 28], &[0; 100]))],
            &["train", "--data", "d.idx", "--out", "r", "--recipe", "tiny"],
            "need",
        ),
        case(
            "IDX claims 2^96 bytes",
            vec![("d.idx", idx(&[u32::MAX, u32::MAX, u32::MAX], &[0; 10]))],
            &["train", "--data", "d.idx", "--out", "r", "--recipe", "tiny"],
            "d.idx",
        ),
        case(
            "IDX truncated header",
            vec![("d.idx", vec![0, 0, 8, 3, 0, 0])],
            &["train", "--data", "d.idx", "--out", "r", "--recipe", "tiny"],
            "truncated",
        ),
        case(
            "IDX wrong rank",
            vec![("d.idx", idx(&[4], &[0; 4]))],
            &["train", "--data", "d.idx", "--out", "r", "--recipe", "tiny"],
            "rank",
        ),
        case(
            "image random bytes",
            vec![
                ("imgs/a.png", vec![1; 300]),
                ("imgs/b.png", good_png.clone()),
            ],
            &["train", "--data", "imgs", "--out", "r", "--recipe", "tiny"],
            "a.png",
        ),
        case(
            "PNG claiming 100000x100000",
            vec![
                ("imgs/a.png", png_claiming(100_000, 100_000)),
                ("imgs/b.png", good_png.clone()),
            ],
            &["train", "--data", "imgs", "--out", "r", "--recipe", "tiny"],
            "a.png",
        ),
        case(
            "PNG claiming 0x0",
            vec![("imgs/a.png", png_claiming(0, 0))],
            &["train", "--data", "imgs", "--out", "r", "--recipe", "tiny"],
            "a.png",
        ),
        case(
            "folder without images",
            vec![("imgs/notes.txt", b"hi".to_vec())],
            &["train", "--data", "imgs", "--out", "r", "--recipe", "tiny"],
            "imgs",
        ),
        case(
            "parquet random bytes",
            vec![("d.parquet", vec![9; 500])],
            &[
                "train",
                "--data",
                "d.parquet",
                "--out",
                "r",
                "--recipe",
                "tiny",
            ],
            "d.parquet",
        ),
        case(
            "data missing",
            vec![],
            &[
                "train",
                "--data",
                "missing.idx",
                "--out",
                "r",
                "--recipe",
                "tiny",
            ],
            "missing.idx",
        ),
        // Initial noise.
        case(
            "noise wrong shape",
            vec![(
                "n.safetensors",
                noise(
                    r#"{"noise":{"dtype":"F32","shape":[1,3,16,16],"data_offsets":[0,3072]}}"#,
                    f32s(768),
                ),
            )],
            &[
                "sample",
                "--model",
                "M",
                "--init-noise",
                "n.safetensors",
                "--out",
                "x.png",
            ],
            "noise has shape [1, 3, 16, 16]",
        ),
        case(
            "noise odd size",
            vec![(
                "n.safetensors",
                noise(
                    r#"{"noise":{"dtype":"F32","shape":[1,1,15,15],"data_offsets":[0,900]}}"#,
                    f32s(225),
                ),
            )],
            &[
                "sample",
                "--model",
                "M",
                "--init-noise",
                "n.safetensors",
                "--out",
                "x.png",
            ],
            "height 15",
        ),
        case(
            "noise integers",
            vec![(
                "n.safetensors",
                noise(
                    r#"{"noise":{"dtype":"I64","shape":[1,1,16,16],"data_offsets":[0,2048]}}"#,
                    vec![0; 2048],
                ),
            )],
            &[
                "sample",
                "--model",
                "M",
                "--init-noise",
                "n.safetensors",
                "--out",
                "x.png",
            ],
            "not a float",
        ),
        case(
            "noise NaN",
            vec![(
                "n.safetensors",
                noise(
                    r#"{"noise":{"dtype":"F32","shape":[1,1,16,16],"data_offsets":[0,1024]}}"#,
                    [0xffu8, 0xff, 0xff, 0x7f].repeat(256),
                ),
            )],
            &[
                "sample",
                "--model",
                "M",
                "--init-noise",
                "n.safetensors",
                "--out",
                "x.png",
            ],
            "NaN",
        ),
        case(
            "noise missing tensor",
            vec![(
                "n.safetensors",
                noise(
                    r#"{"other":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                    f32s(1),
                ),
            )],
            &[
                "sample",
                "--model",
                "M",
                "--init-noise",
                "n.safetensors",
                "--out",
                "x.png",
            ],
            "no tensor named noise",
        ),
        case(
            "noise lying header",
            vec![(
                "n.safetensors",
                noise(
                    r#"{"noise":{"dtype":"F32","shape":[100000000,1,16,16],"data_offsets":[0,1024]}}"#,
                    f32s(256),
                ),
            )],
            &[
                "sample",
                "--model",
                "M",
                "--init-noise",
                "n.safetensors",
                "--out",
                "x.png",
            ],
            "n.safetensors",
        ),
        // Impossible flags.
        case(
            "num 0",
            vec![],
            &["sample", "--model", "M", "--num", "0", "--out", "x.png"],
            "--num",
        ),
        case(
            "num 10^9",
            vec![],
            &[
                "sample",
                "--model",
                "M",
                "--num",
                "1000000000",
                "--out",
                "x.png",
            ],
            "fewer images",
        ),
        case(
            "size 10^6",
            vec![],
            &[
                "sample", "--model", "M", "--size", "1000000", "--out", "x.png",
            ],
            "1000000",
        ),
        case(
            "size 0",
            vec![],
            &["sample", "--model", "M", "--size", "0", "--out", "x.png"],
            "--size",
        ),
        case(
            "size 3",
            vec![],
            &["sample", "--model", "M", "--size", "3", "--out", "x.png"],
            "multiple of 4",
        ),
        case(
            "steps 0",
            vec![],
            &["sample", "--model", "M", "--steps", "0", "--out", "x.png"],
            "--steps",
        ),
        case(
            "steps 10^9",
            vec![],
            &[
                "sample",
                "--model",
                "M",
                "--steps",
                "1000000000",
                "--out",
                "x.png",
            ],
            "more than the 300 timesteps",
        ),
        case(
            "eta for DDPM",
            vec![],
            &[
                "sample",
                "--model",
                "M",
                "--sampler",
                "ddpm",
                "--eta",
                "0.5",
                "--out",
                "x.png",
            ],
            "--eta",
        ),
        case(
            "eta negative",
            vec![],
            &["sample", "--model", "M", "--eta=-1", "--out", "x.png"],
            "eta",
        ),
        case(
            "guidance unconditional",
            vec![],
            &[
                "sample",
                "--model",
                "M",
                "--guidance",
                "2",
                "--out",
                "x.png",
            ],
            "unconditional",
        ),
        case(
            "cols 0",
            vec![],
            &["sample", "--model", "M", "--cols", "0", "--out", "x.png"],
            "--cols",
        ),
        case(
            "nothing to write",
            vec![],
            &["sample", "--model", "M"],
            "nothing to write",
        ),
        case(
            "batch size 0",
            vec![],
            &[
                "train",
                "--recipe",
                "tiny",
                "--batch-size",
                "0",
                "--out",
                "r",
            ],
            "batch_size",
        ),
        case(
            "learning rate NaN",
            vec![],
            &["train", "--recipe", "tiny", "--lr", "NaN", "--out", "r"],
            "lr",
        ),
        case(
            "learning rate negative",
            vec![],
            &["train", "--recipe", "tiny", "--lr=-1", "--out", "r"],
            "lr",
        ),
        case(
            "image size 0",
            vec![],
            &[
                "train",
                "--recipe",
                "tiny",
                "--image-size",
                "0",
                "--out",
                "r",
            ],
            "height 0",
        ),
        case(
            "image size 10^6",
            vec![],
            &[
                "train",
                "--recipe",
                "tiny",
                "--image-size",
                "1000000",
                "--out",
                "r",
            ],
            "1000000",
        ),
        case(
            "steps 0 to train",
            vec![],
            &["train", "--recipe", "tiny", "--steps", "0", "--out", "r"],
            "steps",
        ),
        case(
            "unknown recipe",
            vec![],
            &["train", "--recipe", "gourmet", "--out", "r"],
            "gourmet",
        ),
        case(
            "unknown schedule",
            vec![],
            &[
                "train",
                "--recipe",
                "tiny",
                "--schedule",
                "zigzag",
                "--out",
                "r",
            ],
            "zigzag",
        ),
        case(
            "class dropout 1.5",
            vec![],
            &[
                "train",
                "--recipe",
                "tiny",
                "--model",
                "mnist-16-classes",
                "--class-dropout",
                "1.5",
                "--out",
                "r",
            ],
            "class_dropout",
        ),
        case(
            "classes 0",
            vec![],
            &[
                "train",
                "--recipe",
                "tiny",
                "--model",
                "mnist-16",
                "--classes",
                "0",
                "--out",
                "r",
            ],
            "--classes",
        ),
        case(
            "frames 0",
            vec![],
            &["show-forward", "--frames", "0", "--out", "s.png"],
            "--frames",
        ),
        case(
            "index past the data",
            vec![],
            &["show-forward", "--index", "1000000000", "--out", "s.png"],
            "--index",
        ),
        // Outputs that cannot be written.
        case(
            "out under a file",
            vec![("afile", b"x".to_vec())],
            &["sample", "--model", "M", "--out", "afile/x.png"],
            "afile",
        ),
        case(
            "out a folder",
            vec![("afolder/.keep", Vec::new())],
            &["sample", "--model", "M", "--out", "afolder"],
            "afolder",
        ),
        case(
            "out unwritable",
            vec![],
            &["sample", "--model", "M", "--out", "/proc/x.png"],
            "/proc",
        ),
        case(
            "out-dir a file",
            vec![("afile", b"x".to_vec())],
            &["sample", "--model", "M", "--out-dir", "afile"],
            "afile",
        ),
        case(
            "tensor out under a file",
            vec![("afile", b"x".to_vec())],
            &[
                "sample",
                "--model",
                "M",
                "--out-tensor",
                "afile/t.safetensors",
            ],
            "afile",
        ),
        case(
            "train out a file",
            vec![("afile", b"x".to_vec())],
            &["train", "--recipe", "tiny", "--out", "afile"],
            "is a file",
        ),
        case(
            "export out a file",
            vec![("afile", b"x".to_vec())],
            &["export", "../run", "--out", "afile"],
            "afile",
        ),
        case(
            "export out unwritable",
            vec![],
            &["export", "../run", "--out", "/proc/e"],
            "/proc",
        ),
    ];
    assert!(cases.len() >= 60, "{} cases", cases.len());
    for (i, c) in cases.iter().enumerate() {
        let dir = root.join(format!("case{i:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        let uses_model = c.args.contains(&"M") || c.files.iter().any(|(p, _)| p.starts_with("M/"));
        if uses_model {
            std::fs::create_dir_all(dir.join("M")).unwrap();
            for f in std::fs::read_dir(&model).unwrap().flatten() {
                std::fs::copy(f.path(), dir.join("M").join(f.file_name())).unwrap();
            }
        }
        for (path, bytes) in &c.files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            if path.ends_with("config.json") && bytes.is_empty() {
                std::fs::remove_file(&p).unwrap();
            } else {
                std::fs::write(&p, bytes).unwrap();
            }
        }
        let before = snapshot(&dir);
        let out = Command::new("sh")
            .args(["-c", "ulimit -v 4000000; exec \"$0\" \"$@\""])
            .arg(bin())
            .args(&c.args)
            .args(
                ["sample", "train", "show-reverse"]
                    .contains(&c.args[0])
                    .then_some("--no-progress"),
            )
            .current_dir(&dir)
            .env("RUST_BACKTRACE", "1")
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HOME", dir.join("hf-home"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "case {i} ({}): exit {:?}, stderr {stderr:?}",
            c.name,
            out.status
        );
        let lines: Vec<&str> = stderr.lines().collect();
        assert!(
            lines.len() == 1
                && lines[0].starts_with("error: ")
                && lines[0].contains(c.needle)
                && !has_backtrace(lines[0]),
            "case {i} ({}): expected one line naming {:?}, got {stderr:?}",
            c.name,
            c.needle
        );
        assert!(
            before == snapshot(&dir),
            "case {i} ({}): files changed",
            c.name
        );
    }
}

/// `weights` with tensor `name` relabelled as `dtype` (same bytes, a wrong type).
fn retyped(weights: &[u8], name: &str, dtype: &str) -> Vec<u8> {
    let n = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&weights[8..8 + n]).unwrap();
    let entry = &mut header[name];
    let (a, b) = (
        entry["data_offsets"][0].as_u64().unwrap(),
        entry["data_offsets"][1].as_u64().unwrap(),
    );
    entry["dtype"] = dtype.into();
    // I64 takes 8 bytes a value: half as many values in the same bytes.
    entry["shape"] = serde_json::json!([(b - a) / 8]);
    let text = header.to_string();
    safetensors(&text, &weights[8 + n..])
}

/// `weights` with one tensor more than the model has.
fn with_extra(weights: &[u8]) -> Vec<u8> {
    let n = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&weights[8..8 + n]).unwrap();
    let data = &weights[8 + n..];
    header["stowaway.weight"] = serde_json::json!({
        "dtype": "F32", "shape": [1], "data_offsets": [data.len(), data.len() + 4]
    });
    let mut bytes = data.to_vec();
    bytes.extend_from_slice(&[0; 4]);
    safetensors(&header.to_string(), &bytes)
}

/// `weights` with the first value of tensor `name` set to NaN.
fn with_nan(weights: &[u8], name: &str) -> Vec<u8> {
    let n = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&weights[8..8 + n]).unwrap();
    let at = 8 + n + header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    let mut out = weights.to_vec();
    out[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    out
}

/// A copy of `bytes` with one bit flipped in its last kilobyte.
fn flipped(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let at = out.len() - 700;
    out[at] ^= 0x04;
    out
}

/// A train_config.json naming another model than the folder's config.json.
fn other_model_train_config(train_config: &[u8]) -> Vec<u8> {
    let mut c: serde_json::Value = serde_json::from_slice(train_config).unwrap();
    c["model"]["time_emb_dim"] = 64.into();
    c.to_string().into_bytes()
}

/// A config key from a newer diffusers is ignored with a one-line warning, as diffusers does;
/// the model samples as before.
#[test]
fn unknown_config_keys_are_warnings() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    train_tiny(dir, 1, &[]);
    ok(&ddpm(dir, &["export", "run", "--out", "m"]));
    let sample = |out: &str| sample_two(dir, "m", out, &["--steps", "3"]);
    ok(&sample("a.safetensors"));
    for (file, key) in [
        ("config.json", "frobnicate"),
        ("scheduler_config.json", "shiny_new_option"),
    ] {
        let path = dir.join("m").join(file);
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v[key] = 1.into();
        std::fs::write(&path, v.to_string()).unwrap();
    }
    let out = sample("b.safetensors");
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].starts_with("warning: config.json: unknown SimpleUnet key \"frobnicate\" ignored"),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with(
            "warning: scheduler_config.json: unknown key \"shiny_new_option\" ignored"
        ),
        "{stderr}"
    );
    assert_eq!(samples(dir, "a.safetensors"), samples(dir, "b.safetensors"));
}

/// Without --sampler and --steps, a model samples as it was meant to: a run (and its export,
/// through train_config.json) with the sampler and steps of its own grids; a plain diffusers
/// folder as its scheduler_config.json's class says (DDPMScheduler: DDPM over every step).
#[test]
fn sampling_defaults_come_from_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    train_tiny(dir, 1, &["--sampler", "ddpm", "--sample-steps", "7"]);
    ok(&ddpm(dir, &["export", "run", "--out", "m"]));
    let sample = |model: &str, extra: &[&str], out: &str| {
        ok(&sample_two(dir, model, out, extra));
        samples(dir, out)
    };
    let own = sample("run", &[], "a.safetensors");
    assert_eq!(
        own,
        sample(
            "run",
            &["--sampler", "ddpm", "--steps", "7"],
            "b.safetensors"
        )
    );
    assert_ne!(
        own,
        sample(
            "run",
            &["--sampler", "ddim", "--steps", "7"],
            "c.safetensors"
        )
    );
    assert_eq!(own, sample("m", &[], "d.safetensors"));
    // A plain diffusers folder: its DDPMScheduler over all 300 steps.
    std::fs::remove_file(dir.join("m/train_config.json")).unwrap();
    let plain = sample("m", &[], "e.safetensors");
    assert_eq!(
        plain,
        sample(
            "m",
            &["--sampler", "ddpm", "--steps", "300"],
            "f.safetensors"
        )
    );
}

/// PyTorch weights from the command line: a `torch.save` state_dict with --config (the seed
/// tutorial's way of saving), and a diffusers folder that carries only
/// diffusion_pytorch_model.bin, which samples as its safetensors twin does.
#[test]
fn pytorch_weights_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let unet = root().join("assets/reference/unet");
    let pt = unet.join("seed_small/model.pt");
    let pt = pt.to_str().unwrap();
    let sample = |model: &str, extra: &[&str], out: &str| {
        sample_two(dir, model, out, &[&["--steps", "3"], extra].concat())
    };
    ok(&sample(
        pt,
        &["--config", "seed-tiny", "--size", "16"],
        "a.safetensors",
    ));
    assert_eq!(
        load(&dir.join("a.safetensors"))["samples"].dims(),
        &[2, 1, 16, 16]
    );
    fails(
        &sample(pt, &[], "x.safetensors"),
        "give its model with --config",
    );
    fails(
        &sample(
            pt,
            &["--config", "mnist-16", "--size", "16"],
            "x.safetensors",
        ),
        "model.pt",
    );
    let (bin, st) = (unet.join("diffusers_tiny_bin"), unet.join("diffusers_tiny"));
    ok(&sample(bin.to_str().unwrap(), &[], "b.safetensors"));
    ok(&sample(st.to_str().unwrap(), &[], "c.safetensors"));
    assert_eq!(samples(dir, "b.safetensors"), samples(dir, "c.safetensors"));
}

/// Unusual but valid pictures in an image folder are converted, not refused: 16-bit gray and
/// RGB, gray with alpha, RGBA, and a JPEG; the model trains on them.
#[test]
fn unusual_valid_images_are_converted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    let (w, h) = (20u32, 24u32);
    let v = |x: u32, y: u32| ((x * 13 + y * 7) % 256) as u16;
    let pictures: Vec<(&str, image::DynamicImage)> = vec![
        (
            "gray16.png",
            image::DynamicImage::ImageLuma16(image::ImageBuffer::from_fn(w, h, |x, y| {
                image::Luma([v(x, y) * 257])
            })),
        ),
        (
            "rgb16.png",
            image::DynamicImage::ImageRgb16(image::ImageBuffer::from_fn(w, h, |x, y| {
                image::Rgb([v(x, y) * 257, 0, 65535])
            })),
        ),
        (
            "gray_alpha.png",
            image::DynamicImage::ImageLumaA8(image::ImageBuffer::from_fn(w, h, |x, y| {
                image::LumaA([v(x, y) as u8, 128])
            })),
        ),
        (
            "rgba.png",
            image::DynamicImage::ImageRgba8(image::ImageBuffer::from_fn(w, h, |x, y| {
                image::Rgba([v(x, y) as u8, 9, 200, 30])
            })),
        ),
        (
            "photo.jpg",
            image::DynamicImage::ImageRgb8(image::ImageBuffer::from_fn(w, h, |x, y| {
                image::Rgb([v(x, y) as u8, 50, 100])
            })),
        ),
    ];
    for (name, img) in &pictures {
        img.save(imgs.join(name)).unwrap();
    }
    let stdout = ok(&ddpm(
        dir,
        &[
            "train",
            "--data",
            "imgs",
            "--recipe",
            "tiny",
            "--image-size",
            "16",
            "--steps",
            "1",
            "--out",
            "run",
            "--no-progress",
        ],
    ));
    assert!(stdout.contains("5 images of 1x16x16"), "{stdout}");
}
