//! `ddpm`: train diffusion models, sample from them, export, inspect, download datasets.
//!
//! Every subcommand has `--help`. Logging goes to stderr, controlled by `RUST_LOG`
//! (e.g. `RUST_LOG=ddpm=debug`). Errors print one line and exit with status 1.

mod data;
mod export;
mod golden;
mod hub;
mod inspect;
mod report;
mod sample;
mod show;
mod train;

use anyhow::{Result, bail};

#[path = "../../alloc.rs"]
mod alloc;
use candle_core::Device;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "ddpm",
    version,
    about = "Denoising diffusion models in Rust, on candle"
)]
struct Cli {
    /// Where to compute: cpu, or cuda / metal when built with that cargo feature.
    #[arg(long, global = true, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
    Metal,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model (the embedded MNIST digits unless --data says otherwise).
    Train(Box<train::TrainArgs>),
    /// Sample images from a run, a checkpoint, an exported folder or a diffusers model folder.
    Sample(sample::SampleArgs),
    /// Export a run's EMA (or raw) weights as a diffusers folder or a plain safetensors file.
    Export(export::ExportArgs),
    /// Draw the forward process: one image noised at evenly spaced timesteps, as a strip.
    ShowForward(show::ForwardArgs),
    /// Draw the reverse process: the sample at evenly spaced steps of sampling, as a strip.
    ShowReverse(show::ReverseArgs),
    /// Describe a run, a checkpoint or a diffusers folder: config, parameters, step, tensors.
    Inspect(inspect::InspectArgs),
    /// Golden-image regression checks (what `cargo xtask golden` runs).
    Golden(golden::GoldenArgs),
    /// Datasets on the Hugging Face hub.
    Dataset {
        #[command(subcommand)]
        command: hub::DatasetCommand,
    },
}

fn device(arg: DeviceArg) -> Result<Device> {
    Ok(match arg {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => Device::new_cuda(0)
            .map_err(|e| anyhow::anyhow!("cuda device: {e} (build with --features cuda)"))?,
        DeviceArg::Metal => Device::new_metal(0)
            .map_err(|e| anyhow::anyhow!("metal device: {e} (build with --features metal)"))?,
    })
}

fn run(cli: Cli, given: Vec<String>) -> Result<()> {
    let dev = || device(cli.device);
    match cli.command {
        Command::Train(a) => train::run(*a, &given, &dev()?),
        Command::Sample(a) => sample::run(a, &dev()?),
        Command::Export(a) => export::run(a),
        Command::ShowForward(a) => show::forward(a),
        Command::ShowReverse(a) => show::reverse(a, &dev()?),
        Command::Inspect(a) => inspect::run(a),
        Command::Golden(a) => golden::run(a),
        Command::Dataset { command } => hub::run(command),
    }
}

fn main() {
    alloc::keep_freed_memory();
    alloc::configure_threads();
    no_library_backtraces();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let command = Cli::command();
    let matches = command.clone().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The subcommand's options given on the command line (not defaulted; not argument groups).
    let given = matches
        .subcommand()
        .and_then(|(name, sub)| {
            let args = command.find_subcommand(name)?;
            Some(
                args.get_arguments()
                    .map(|a| a.get_id().as_str())
                    .filter(|id| {
                        sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
                    })
                    .map(String::from)
                    .collect(),
            )
        })
        .unwrap_or_default();
    if let Err(e) = run(cli, given) {
        tracing::debug!("error chain: {e:?}");
        eprintln!("error: {}", report::one_line(&e));
        std::process::exit(1);
    }
}

/// A model config named on the command line: a preset, or a `config.json` path.
fn model_config(name: &str) -> Result<ddpm_unet::UnetConfig> {
    use anyhow::Context;
    Ok(if name.ends_with(".json") {
        let text = std::fs::read_to_string(name)
            .with_context(|| format!("reading model config {name}"))?;
        ddpm_unet::UnetConfig::from_json(&text).with_context(|| format!("model config {name}"))?
    } else {
        ddpm_unet::UnetConfig::preset(name)?
    })
}

/// Turns off the backtraces that libraries capture into their errors (`RUST_LIB_BACKTRACE=0`;
/// panics still follow `RUST_BACKTRACE`). candle captures one into every error it makes when
/// `RUST_BACKTRACE` is set, and an error formatted into another's message (`format!("{e}")`,
/// anywhere in any crate) would carry its frames into the one line a user sees. Call it first
/// in `main`, before any thread starts and before any error is made.
#[allow(unsafe_code)]
fn no_library_backtraces() {
    // SAFETY: called at the start of `main`, before any other thread exists that could read
    // the environment concurrently.
    unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") }
}

/// Prints a warning: one line, `warning: ...`.
fn warn(text: impl std::fmt::Display) {
    let text = text.to_string();
    eprintln!("warning: {}", text.lines().collect::<Vec<_>>().join("; "));
}

/// Fails if `n` is zero, naming the option.
fn positive(option: &str, n: usize) -> Result<()> {
    if n == 0 {
        bail!("{option} must be at least 1, got 0");
    }
    Ok(())
}

/// `--sampler`: the names `ddpm_sampler::SamplerKind` takes.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum SamplerArg {
    /// DDPM ancestral sampling (every training step unless --steps).
    Ddpm,
    /// DDIM (50 steps unless --steps).
    Ddim,
}

impl From<SamplerArg> for ddpm_sampler::SamplerKind {
    fn from(a: SamplerArg) -> Self {
        match a {
            SamplerArg::Ddpm => Self::Ddpm,
            SamplerArg::Ddim => Self::Ddim,
        }
    }
}
