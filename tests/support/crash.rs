//! The crash test: a real `ddpm train` killed with SIGKILL at seeded random moments and resumed
//! each time, against the same run never interrupted. Shared by the end-to-end tests (a short
//! one) and `cargo xtask crash-test --kills N` (a long one), through `#[path]`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The training run under test: the `tiny` recipe on 64 digits at 16x16, a checkpoint after
/// every step (so many kills land inside a checkpoint write), the last `keep` kept.
pub fn train_args(steps: u64, keep: usize) -> Vec<String> {
    [
        "train",
        "--recipe",
        "tiny",
        "--limit",
        "64",
        "--image-size",
        "16",
        "--no-progress",
        "--checkpoint-every",
        "1",
        "--sample-every",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--keep-checkpoints".to_string(),
        keep.to_string(),
        "--steps".to_string(),
        steps.to_string(),
    ])
    .collect()
}

/// What a crash test did.
#[derive(Debug, Default)]
pub struct CrashReport {
    /// Processes killed with SIGKILL.
    pub kills: usize,
    /// Of those, kills that found a checkpoint being written (a temporary file in
    /// `checkpoints/` at the moment of the kill).
    pub kills_mid_write: usize,
    /// Processes started in all (the last one finished).
    pub starts: usize,
}

/// xorshift64*: a seeded stream of delays, no dependency needed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A temporary checkpoint file in `dir` (`.step-N.safetensors.XXXXXX`), if any.
fn writing(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".step-"))
        })
        .unwrap_or(false)
}

fn run_to_end(ddpm: &Path, cwd: &Path, args: &[String]) -> Result<(), String> {
    let out = Command::new(ddpm)
        .args(args)
        .current_dir(cwd)
        .output()
        .map_err(|e| format!("running {}: {e}", ddpm.display()))?;
    if !out.status.success() {
        return Err(format!(
            "ddpm {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Trains `steps` steps into `dir/crashed`, killing the process `kills` times at delays drawn
/// from `seed` (up to `max_delay`; each kill waits until the previous run has got somewhere),
/// resuming after each kill (starting over with `--force` while no checkpoint exists), then
/// trains the same run uninterrupted into `dir/clean`. Returns the two final checkpoints.
pub fn crash_and_resume(
    ddpm: &Path,
    dir: &Path,
    steps: u64,
    kills: usize,
    seed: u64,
    max_delay: Duration,
) -> Result<(PathBuf, PathBuf, CrashReport), String> {
    let args = train_args(steps, 3);
    let crashed = dir.join("crashed");
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut report = CrashReport::default();
    let checkpoints = crashed.join("checkpoints");
    let finished = |dir: &Path| dir.join(format!("step-{steps:08}.safetensors")).is_file();
    loop {
        let resumable = std::fs::read_dir(&checkpoints)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("step-"))
            })
            .unwrap_or(false);
        let mut a = args.clone();
        a.extend(["--out".to_string(), crashed.display().to_string()]);
        if resumable {
            // A resumed run takes only --steps, --no-progress and the data options.
            a = vec![
                "train".into(),
                "--out".into(),
                crashed.display().to_string(),
                "--resume".into(),
                "--limit".into(),
                "64".into(),
                "--no-progress".into(),
            ];
        } else if crashed.exists() {
            a.push("--force".into());
        }
        report.starts += 1;
        if report.kills == kills {
            run_to_end(ddpm, dir, &a)?;
            break;
        }
        let mut child = Command::new(ddpm)
            .args(&a)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("running {}: {e}", ddpm.display()))?;
        let delay = Duration::from_micros(rng.next() % (max_delay.as_micros() as u64).max(1));
        let start = Instant::now();
        let mut exited = None;
        while start.elapsed() < delay {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                exited = Some(status);
                break;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        match exited {
            Some(status) if status.success() => {
                if finished(&checkpoints) {
                    break;
                }
                return Err("a run exited early without finishing".into());
            }
            Some(status) => {
                let mut err = String::new();
                use std::io::Read;
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!("ddpm {} exited with {status}: {err}", a.join(" ")));
            }
            None => {
                let mid_write = writing(&checkpoints);
                child.kill().map_err(|e| e.to_string())?; // SIGKILL
                child.wait().map_err(|e| e.to_string())?;
                report.kills += 1;
                report.kills_mid_write += usize::from(mid_write);
            }
        }
    }
    let clean = dir.join("clean");
    let mut a = args;
    a.extend(["--out".to_string(), clean.display().to_string()]);
    run_to_end(ddpm, dir, &a)?;
    let name = format!("checkpoints/step-{steps:08}.safetensors");
    Ok((crashed.join(&name), clean.join(name), report))
}

/// The tensors of a checkpoint whose bits must match between the two runs (weights, EMA,
/// optimizer moments), as raw bytes by name; the metadata is left out.
pub fn tensor_bytes(path: &Path) -> Result<Vec<(String, Vec<u8>)>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + n]).map_err(|e| format!("{}: {e}", path.display()))?;
    let data = &bytes[8 + n..];
    let mut out: Vec<(String, Vec<u8>)> = header
        .as_object()
        .ok_or("header is not an object")?
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let off = &v["data_offsets"];
            let (a, b) = (
                off[0].as_u64().unwrap_or(0) as usize,
                off[1].as_u64().unwrap_or(0) as usize,
            );
            (k.clone(), data[a..b].to_vec())
        })
        .collect();
    out.sort();
    Ok(out)
}
