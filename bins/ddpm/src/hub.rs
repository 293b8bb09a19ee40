//! `ddpm dataset download NAME`: Hugging Face hub datasets into the standard HF cache.
//!
//! Uses `hf-hub`, so `HF_HOME` (the cache) and `HF_ENDPOINT` (the server) are honoured;
//! with `HF_HUB_OFFLINE=1` nothing is fetched and only the cache is looked at.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use hf_hub::{Cache, Repo};

#[derive(Subcommand, Debug)]
pub enum DatasetCommand {
    /// Download a dataset's parquet files for one split into the HF cache, then check each
    /// opens. NAME is mnist, fashion-mnist, cifar10, stanford-cars, or any hub id (owner/name).
    Download {
        /// The dataset.
        name: String,
        /// The split whose files to fetch.
        #[arg(long, default_value = "train")]
        split: String,
    },
}

/// The hub id for a short name (or the name itself when it is already an id).
pub fn hub_id(name: &str) -> Result<String> {
    Ok(match name {
        "mnist" => "ylecun/mnist".into(),
        "fashion-mnist" | "fashion_mnist" => "zalando-datasets/fashion_mnist".into(),
        "cifar10" | "cifar-10" => "uoft-cs/cifar10".into(),
        "stanford-cars" | "stanford_cars" => "tanganke/stanford_cars".into(),
        id if id.contains('/') && !id.starts_with('/') && !id.ends_with('/') => id.into(),
        other => bail!(
            "{other:?} is neither a file nor a dataset name (mnist, fashion-mnist, cifar10, stanford-cars, or owner/name)"
        ),
    })
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"))
}

/// Parquet files of `split` among a repository's file names, in order.
fn split_files<'a>(files: impl Iterator<Item = &'a str>, split: &str) -> Vec<String> {
    let mut out: Vec<String> = files
        .filter(|f| f.ends_with(".parquet"))
        .filter(|f| {
            let name = f.rsplit('/').next().unwrap_or(f);
            name.starts_with(&format!("{split}-"))
                || name.starts_with(&format!("{split}."))
                || f.contains(&format!("/{split}/"))
        })
        .map(str::to_string)
        .collect();
    out.sort();
    out
}

/// The cached parquet files of a dataset's train split, without touching the network.
pub fn cached_parquet(name: &str) -> Result<Vec<PathBuf>> {
    let id = hub_id(name)?;
    let cache = Cache::from_env();
    let repo = Repo::dataset(id.clone());
    let root = cache.path().join(repo.folder_name());
    let revision = std::fs::read_to_string(root.join("refs").join("main")).ok();
    let snapshot = revision.map(|r| root.join("snapshots").join(r.trim()));
    let mut names = Vec::new();
    if let Some(s) = &snapshot {
        collect(s, s, &mut names);
    }
    let files = split_files(names.iter().map(String::as_str), "train");
    match (snapshot, files.is_empty()) {
        (Some(s), false) => Ok(files.iter().map(|f| s.join(f)).collect()),
        _ => bail!(
            "dataset {id} is not in the cache at {}: run `ddpm dataset download {name}` (or `cargo xtask dataset download {name}`) first",
            cache.path().display()
        ),
    }
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(root, &p, out);
        } else if let Ok(rel) = p.strip_prefix(root) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

pub fn run(command: DatasetCommand) -> Result<()> {
    match command {
        DatasetCommand::Download { name, split } => download(&name, &split),
    }
}

fn download(name: &str, split: &str) -> Result<()> {
    let id = hub_id(name)?;
    if offline() {
        let files = cached_parquet(name)?;
        println!("offline: {} cached file(s) for {id}", files.len());
        return check(&files);
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .context("setting up the hub client")?;
    let repo = api.dataset(id.clone());
    let info = repo
        .info()
        .with_context(|| format!("listing the files of dataset {id}"))?;
    let files = split_files(info.siblings.iter().map(|s| s.rfilename.as_str()), split);
    if files.is_empty() {
        bail!("dataset {id} has no parquet files for split {split:?}");
    }
    let mut paths = Vec::new();
    for f in &files {
        tracing::info!("fetching {id}/{f}");
        paths.push(
            repo.get(f)
                .with_context(|| format!("downloading {id}/{f}"))?,
        );
    }
    check(&paths)?;
    for p in &paths {
        println!("{}", p.display());
    }
    Ok(())
}

/// Opens every file as parquet and reads its first image, so a broken download shows now.
fn check(files: &[PathBuf]) -> Result<()> {
    for f in files {
        let (rows, columns) = ddpm_data::parquet_summary(f)?;
        println!(
            "{}: {rows} rows, columns {}",
            f.display(),
            columns.join(", ")
        );
    }
    Ok(())
}
