//! `ddpm export`: a run's weights as a diffusers folder or one safetensors file.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use candle_core::Device;
use clap::{Args, ValueEnum};
use ddpm_pipeline::ExportFormat;
use ddpm_trainer::Checkpoint;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FormatArg {
    /// A diffusers folder: config.json, diffusion_pytorch_model.safetensors, scheduler_config.json
    /// (and the run's train_config.json).
    Diffusers,
    /// One safetensors file of weights with PyTorch's names.
    Safetensors,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The run folder (its newest checkpoint is exported) or a checkpoint file.
    pub run: PathBuf,
    /// Where to write: a folder (diffusers) or a file (safetensors). Default: RUN/export
    /// (or RUN/export.safetensors).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// What to write.
    #[arg(long, value_enum, default_value_t = FormatArg::Diffusers)]
    pub format: FormatArg,
    /// Export the raw weights rather than the EMA.
    #[arg(long)]
    pub raw: bool,
    /// Replace an existing export.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: ExportArgs) -> Result<()> {
    if let Some(out) = &a.out {
        match a.format {
            FormatArg::Diffusers if out.is_file() => {
                bail!("--out {} is a file, not a folder", out.display())
            }
            FormatArg::Diffusers => crate::sample::check_folder(out)?,
            FormatArg::Safetensors => crate::sample::check_output(out)?,
        }
    }
    let (ck_path, ck) = if a.run.is_dir() {
        let (path, ck, warnings) = ddpm_pipeline::latest_checkpoint(&a.run)?;
        warnings.iter().for_each(crate::warn);
        (path, ck)
    } else {
        (a.run.clone(), Checkpoint::read(&a.run, &Device::Cpu)?)
    };
    let base = if a.run.is_dir() {
        a.run.clone()
    } else {
        a.run.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let format = match a.format {
        FormatArg::Diffusers => ExportFormat::Diffusers,
        FormatArg::Safetensors => ExportFormat::Safetensors,
    };
    let out = a.out.clone().unwrap_or_else(|| match format {
        ExportFormat::Diffusers => base.join("export"),
        ExportFormat::Safetensors => base.join("export.safetensors"),
    });
    let occupied = out.is_file()
        || (out.is_dir()
            && out
                .read_dir()
                .map(|mut d| d.next().is_some())
                .unwrap_or(true));
    if occupied && !a.force {
        bail!(
            "{} already exists: pass --force to replace it",
            out.display()
        );
    }
    let tensors = if a.raw { &ck.model } else { &ck.ema };
    ddpm_pipeline::export(&ck.config, tensors, format, &out)?;
    println!(
        "exported {} weights of {} (step {}) to {}",
        if a.raw { "raw" } else { "EMA" },
        ck_path.display(),
        ck.step,
        out.display()
    );
    Ok(())
}
