//! `cargo xtask`: project automation for ddpm (matklad's cargo-xtask pattern).
//!
//! Thin by design: a clap enum of subcommands that run cargo, or the `ddpm` binary through
//! `cargo run --release`, from the workspace root.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Project automation for ddpm", version)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Everything `.ci/run` checks, cheapest first: formatting, lints, then the test suite.
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
    /// Datasets on the Hugging Face hub.
    Dataset {
        #[command(subcommand)]
        command: DatasetCmd,
    },
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
    let short_run = "--recipe tiny --steps 2 --image-size 16 --limit 64 --out target/ci-train --force --no-progress";
    ddpm("train", short_run.split(' ').map(OsString::from).collect())?;
    ddpm("golden", Vec::new())?;
    Ok(())
}

/// `ddpm SUBCOMMAND ARGS...`, built in release (training and sampling want it).
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
