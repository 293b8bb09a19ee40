//! `cargo xtask`: project automation for ddpm (matklad's cargo-xtask pattern).
//!
//! Thin by design: a clap enum of subcommands that run cargo, or the `ddpm` binary through
//! `cargo run --release`, from the workspace root.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[path = "../../tests/support/crash.rs"]
mod crash;
mod deps;
#[path = "../../bins/stats.rs"]
mod stats;
use stats::median;

#[derive(Parser)]
#[command(about = "Project automation for ddpm", version)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Everything `.ci/run` checks, cheapest first: formatting, lints, the test suite, the
    /// reuse examples, packaging, a short training run and the golden images.
    Ci,
    /// Train: with no arguments the default recipe on the embedded digits, offline, into
    /// runs/mnist. Takes every `ddpm train` argument (see `cargo xtask train --help`).
    #[command(disable_help_flag = true)]
    Train {
        /// Arguments for `ddpm train`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Export a run as a diffusers folder (RUN/export unless --out); takes `ddpm export`'s
    /// arguments.
    #[command(disable_help_flag = true)]
    Export {
        /// The run folder and any `ddpm export` arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Golden-image regression checks against assets/golden (--bless rewrites them).
    Golden {
        /// Rewrite the goldens from this machine's rendering.
        #[arg(long)]
        bless: bool,
    },
    /// Time SimpleUnet training and sampling steps (`ddpm-bench`, release), optionally side by
    /// side with PyTorch (`bench/torch_reference.py`), in alternation, and print the ratio.
    Bench(BenchArgs),
    /// Datasets on the Hugging Face hub.
    Dataset {
        #[command(subcommand)]
        command: DatasetCmd,
    },
    /// Check ARCHITECTURE.md's dependency tree against `cargo metadata`, printing the
    /// workspace's own dependencies of each package.
    Deps,
    /// Kill a real `ddpm train` (release) with SIGKILL at seeded random moments, resume it each
    /// time, and check its final weights are bitwise those of an uninterrupted run.
    CrashTest {
        /// How many kills.
        #[arg(long, default_value_t = 100)]
        kills: usize,
        /// Steps of the run (enough that it does not finish before the last kill).
        #[arg(long, default_value_t = 5000)]
        steps: u64,
        /// The seed of the kill moments.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The longest wait before a kill, in milliseconds.
        #[arg(long, default_value_t = 600)]
        max_delay_ms: u64,
    },
}

#[derive(clap::Args)]
struct BenchArgs {
    /// `small` (32,64,128,256 on 1x32x32, batch 64), `seed` (62.4M parameters, 3x64x64,
    /// batch 8) or `all`.
    #[arg(long, default_value = "all", value_parser = ["small", "seed", "all"])]
    config: String,
    /// `train`, `sample` or `all`.
    #[arg(long, default_value = "all", value_parser = ["train", "sample", "all"])]
    mode: String,
    /// Timed steps per process (each process reports its median).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Rounds: each round runs every measurement once (ours, then PyTorch's, if asked).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// A Python with torch: also run bench/torch_reference.py, alternating with ours.
    #[arg(long)]
    torch: Option<PathBuf>,
}

#[derive(Subcommand)]
enum DatasetCmd {
    /// Download a dataset (mnist, fashion-mnist, cifar10, stanford-cars or owner/name) into the
    /// HF cache and check it opens.
    Download {
        /// The dataset.
        name: String,
        /// The split.
        #[arg(long, default_value = "train")]
        split: String,
    },
}

fn main() -> Result<()> {
    run(Args::parse())
}

fn run(args: Args) -> Result<()> {
    match args.command {
        Cmd::Ci => ci(),
        Cmd::Train { args } => ddpm("train", args),
        Cmd::Export { args } => {
            if args.is_empty() {
                bail!("usage: cargo xtask export RUN [ddpm export options]");
            }
            ddpm("export", args)
        }
        Cmd::Golden { bless } => {
            let mut a: Vec<OsString> = Vec::new();
            if bless {
                a.push("--bless".into());
            }
            ddpm("golden", a)
        }
        Cmd::Bench(b) => bench(&b),
        Cmd::Deps => deps::check(),
        Cmd::CrashTest {
            kills,
            steps,
            seed,
            max_delay_ms,
        } => crash_test(kills, steps, seed, max_delay_ms),
        Cmd::Dataset {
            command: DatasetCmd::Download { name, split },
        } => ddpm(
            "dataset",
            vec![
                "download".into(),
                name.into(),
                "--split".into(),
                split.into(),
            ],
        ),
    }
}

/// The CI steps, in order. `.ci/run` runs the same commands.
fn ci() -> Result<()> {
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    cargo(&["test", "--workspace"])?;
    cargo(&["build", "--workspace", "--examples"])?;
    for example in ["own_model", "own_training_loop"] {
        let path = project_root().join("target/debug/examples").join(example);
        let status = Command::new(&path)
            .status()
            .with_context(|| format!("running {}", path.display()))?;
        if !status.success() {
            bail!("example {example} failed ({status})");
        }
    }
    // --allow-dirty: `cargo xtask ci` checks a working tree with uncommitted changes too (CI
    // runs on a clean clone, where it changes nothing).
    cargo(&[
        "package",
        "--allow-dirty",
        "--workspace",
        "--exclude",
        "ddpm-cli",
        "--exclude",
        "ddpm-bench",
        "--exclude",
        "xtask",
        "--exclude",
        "ddpm-testutil",
    ])?;
    let short_run = "--recipe tiny --steps 2 --image-size 16 --limit 64 --out target/ci-train --force --no-progress";
    ddpm("train", short_run.split(' ').map(OsString::from).collect())?;
    ddpm("golden", Vec::new())?;
    Ok(())
}

/// One measurement: a JSON line from `ddpm-bench` or `bench/torch_reference.py`.
#[derive(Debug, Clone, Copy)]
struct Measured {
    step_s: f64,
    gflop_per_s: f64,
    peak_rss_bytes: f64,
}

fn measure(mut cmd: Command) -> Result<Measured> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .current_dir(project_root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("{shown} printed no JSON line"))?;
    let json: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("{shown}: bad JSON line {line}"))?;
    let field = |name: &str| -> Result<f64> {
        json[name]
            .as_f64()
            .with_context(|| format!("{shown}: no number {name} in {line}"))
    };
    Ok(Measured {
        step_s: field("step_s")?,
        gflop_per_s: field("gflop_per_s")?,
        peak_rss_bytes: field("peak_rss_bytes").unwrap_or(f64::NAN),
    })
}

/// The speed-up cell: the median of the rounds' ratios, and with several rounds their range,
/// since the rounds of one run on a shared machine can differ by more than the margin that
/// matters (`1.25x (1.10-1.31)`).
fn ratio_cell(ratios: &[f64]) -> String {
    let mid = median(ratios.to_vec());
    if ratios.len() < 2 {
        return format!("{mid:.2}x");
    }
    let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{mid:.2}x ({lo:.2}-{hi:.2})")
}

/// `cargo xtask bench`: builds `ddpm-bench` once, then runs every (config, mode) pair `rounds`
/// times, ours and PyTorch's one right after the other, so both see the same machine state;
/// the ratio is the median over rounds of PyTorch's step time over ours (above 1: we are
/// faster), with the rounds' range beside it.
fn bench(a: &BenchArgs) -> Result<()> {
    if a.steps == 0 || a.rounds == 0 {
        bail!("--steps and --rounds must be at least 1");
    }
    cargo(&["build", "--quiet", "--release", "-p", "ddpm-bench"])?;
    let exe = project_root()
        .join("target/release/ddpm-bench")
        .with_extension(std::env::consts::EXE_EXTENSION);
    let script = project_root().join("bench/torch_reference.py");
    let pick = |v: &str, all: &[&'static str]| -> Vec<&'static str> {
        all.iter()
            .copied()
            .filter(|c| v == "all" || v == *c)
            .collect()
    };
    let configs = pick(&a.config, &["small", "seed"]);
    let modes = pick(&a.mode, &["train", "sample"]);
    let steps = a.steps.to_string();
    let mut rows: Vec<(String, Vec<Measured>, Vec<Measured>)> = Vec::new();
    for config in &configs {
        for mode in &modes {
            rows.push((format!("{config} {mode}"), Vec::new(), Vec::new()));
        }
    }
    for round in 0..a.rounds {
        let mut i = 0;
        for config in &configs {
            for mode in &modes {
                eprintln!("round {}/{}: {config} {mode}", round + 1, a.rounds);
                let args = ["--config", config, "--mode", mode, "--steps", &steps];
                let mut ours = Command::new(&exe);
                ours.args(args);
                rows[i].1.push(measure(ours)?);
                if let Some(py) = &a.torch {
                    let mut torch = Command::new(py);
                    torch.arg(&script).args(args);
                    rows[i].2.push(measure(torch)?);
                }
                i += 1;
            }
        }
    }
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all cores".into());
    println!(
        "SimpleUnet steps, medians of {} rounds x {} steps, threads: {threads}",
        a.rounds, a.steps
    );
    println!(
        "| step | ddpm s | ddpm GFLOP/s | ddpm peak RSS | PyTorch s | PyTorch GFLOP/s | PyTorch peak RSS | speed-up |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let gib = |b: f64| format!("{:.2} GiB", b / (1u64 << 30) as f64);
    for (name, ours, torch) in &rows {
        let m = |v: &[Measured], f: fn(&Measured) -> f64| median(v.iter().map(f).collect());
        let mut line = format!(
            "| {name} | {:.3} | {:.1} | {} |",
            m(ours, |x| x.step_s),
            m(ours, |x| x.gflop_per_s),
            gib(m(ours, |x| x.peak_rss_bytes))
        );
        if torch.is_empty() {
            line.push_str(" - | - | - | - |");
        } else {
            let ratios: Vec<f64> = ours
                .iter()
                .zip(torch)
                .map(|(o, t)| t.step_s / o.step_s)
                .collect();
            line.push_str(&format!(
                " {:.3} | {:.1} | {} | {} |",
                m(torch, |x| x.step_s),
                m(torch, |x| x.gflop_per_s),
                gib(m(torch, |x| x.peak_rss_bytes)),
                ratio_cell(&ratios)
            ));
        }
        println!("{line}");
    }
    Ok(())
}

/// `ddpm SUBCOMMAND ARGS...`, built in release (training and sampling want it).
fn crash_test(kills: usize, steps: u64, seed: u64, max_delay_ms: u64) -> Result<()> {
    cargo(&["build", "--release", "-p", "ddpm-cli", "--bin", "ddpm"])?;
    let exe = project_root().join("target/release/ddpm");
    let dir = project_root().join("target/crash-test");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let start = std::time::Instant::now();
    let (crashed, clean, report) = crash::crash_and_resume(
        &exe,
        &dir,
        steps,
        kills,
        seed,
        std::time::Duration::from_millis(max_delay_ms),
    )
    .map_err(anyhow::Error::msg)?;
    let (a, b) = (
        crash::tensor_bytes(&crashed).map_err(anyhow::Error::msg)?,
        crash::tensor_bytes(&clean).map_err(anyhow::Error::msg)?,
    );
    let differing: Vec<&str> = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x != y)
        .map(|(x, _)| x.0.as_str())
        .collect();
    println!(
        "{} kills ({} during a checkpoint write), {} starts, {} steps, {:.0} s",
        report.kills,
        report.kills_mid_write,
        report.starts,
        steps,
        start.elapsed().as_secs_f64()
    );
    if a.len() != b.len() || !differing.is_empty() {
        bail!(
            "the resumed run differs from the uninterrupted one in {} tensor(s), e.g. {:?}",
            differing.len(),
            differing.first()
        );
    }
    if report.kills < kills {
        bail!(
            "the run finished after {} of {kills} kills: give more --steps",
            report.kills
        );
    }
    println!(
        "final weights, EMA and optimizer moments bitwise equal to the uninterrupted run's ({} tensors)",
        a.len()
    );
    Ok(())
}

fn ddpm(subcommand: &str, args: Vec<OsString>) -> Result<()> {
    let mut all: Vec<OsString> = [
        "run",
        "--quiet",
        "--release",
        "-p",
        "ddpm-cli",
        "--bin",
        "ddpm",
        "--",
        subcommand,
    ]
    .iter()
    .map(OsString::from)
    .collect();
    all.extend(args);
    let status = Command::new(cargo_path())
        .args(&all)
        .current_dir(project_root())
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("ddpm {subcommand} failed ({status})");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(cargo_path())
        .args(args)
        .current_dir(project_root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn cargo_path() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_speed_up_cell_gives_the_median_and_the_range_of_the_rounds() {
        assert_eq!(ratio_cell(&[1.31, 1.10, 1.25]), "1.25x (1.10-1.31)");
        assert_eq!(ratio_cell(&[1.2, 1.4]), "1.30x (1.20-1.40)");
        assert_eq!(ratio_cell(&[1.5]), "1.50x");
    }
}
