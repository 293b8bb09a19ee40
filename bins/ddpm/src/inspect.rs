//! `ddpm inspect PATH`: what a run, checkpoint, model folder or safetensors file holds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use clap::Args;
use ddpm_trainer::{Checkpoint, RunPaths, list_checkpoints};
use ddpm_unet::count_parameters;

/// Appends a line to the report (printed once at the end, so a closed pipe is not a panic).
macro_rules! outln {
    ($($arg:tt)*) => {
        OUT.with(|o| {
            use std::fmt::Write;
            let _ = writeln!(o.borrow_mut(), $($arg)*);
        })
    };
}

thread_local! {
    static OUT: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A run folder, a checkpoint, a model folder or a safetensors file.
    pub path: PathBuf,
    /// List every tensor (default: the first 20).
    #[arg(long)]
    pub all: bool,
}

fn list_tensors(tensors: &HashMap<String, Tensor>, all: bool) {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let shown = if all {
        names.len()
    } else {
        names.len().min(20)
    };
    for n in &names[..shown] {
        let t = &tensors[*n];
        outln!("  {n}  {:?} {:?}", t.dtype(), t.dims());
    }
    if shown < names.len() {
        outln!("  ... {} more (--all lists them)", names.len() - shown);
    }
}

fn checkpoint(path: &Path, all: bool) -> Result<()> {
    let ck = Checkpoint::read(path, &Device::Cpu)?;
    outln!("checkpoint {}", path.display());
    outln!("step: {}", ck.step);
    outln!("dataset: {}", ck.dataset);
    outln!("parameters: {}", count_parameters(&ck.model));
    let config = serde_json::to_string_pretty(&ck.config)?;
    outln!("config: {config}");
    outln!("model tensors ({}):", ck.model.len());
    list_tensors(&ck.model, all);
    Ok(())
}

pub fn run(a: InspectArgs) -> Result<()> {
    let result = report(&a);
    let text = OUT.with(|o| std::mem::take(&mut *o.borrow_mut()));
    let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
    result
}

fn report(a: &InspectArgs) -> Result<()> {
    let p = &a.path;
    if !p.exists() {
        bail!("{} does not exist", p.display());
    }
    if p.is_dir() && p.join("checkpoints").is_dir() {
        let paths = RunPaths::new(p);
        outln!("run {}", p.display());
        let cks = list_checkpoints(&paths.checkpoints())
            .with_context(|| format!("reading {}", paths.checkpoints().display()))?;
        for (step, path) in &cks {
            outln!("  checkpoint step {step}: {}", path.display());
        }
        if let Ok(m) = std::fs::read_to_string(paths.metrics())
            && let Some(last) = m.lines().last()
        {
            outln!("last metrics: {last}");
        }
        return match cks.last() {
            Some((_, latest)) => checkpoint(latest, a.all),
            None => bail!("{} has no checkpoints", p.display()),
        };
    }
    if p.is_dir() {
        let (config, _) = ddpm_unet::Unet::from_pretrained(p, &Device::Cpu)?;
        let tensors =
            ddpm_unet::read_safetensors(&p.join(ddpm_unet::DIFFUSERS_WEIGHTS), &Device::Cpu)?;
        outln!("model folder {}", p.display());
        outln!("parameters: {}", count_parameters(&tensors));
        outln!("config: {}", config.to_json());
        let sched = p.join("scheduler_config.json");
        if sched.is_file() {
            let text = std::fs::read_to_string(&sched)?;
            let parsed = ddpm_sampler::SchedulerConfig::from_json(&text)
                .with_context(|| sched.display().to_string())?;
            outln!("scheduler: {parsed:?}");
        }
        outln!("tensors ({}):", tensors.len());
        list_tensors(&tensors, a.all);
        return Ok(());
    }
    if Checkpoint::read(p, &Device::Cpu).is_ok() {
        return checkpoint(p, a.all);
    }
    let tensors = ddpm_unet::read_safetensors(p, &Device::Cpu)?;
    outln!("safetensors file {}", p.display());
    outln!(
        "tensors ({}), {} values:",
        tensors.len(),
        tensors.values().map(|t| t.elem_count()).sum::<usize>()
    );
    list_tensors(&tensors, a.all);
    Ok(())
}
