//! Checkpoints: one safetensors file per save, written atomically, holding everything a run
//! needs to continue bit for bit.
//!
//! Tensors: `model/NAME` (weights and BatchNorm statistics), `ema/NAME`, `adam_m/NAME`,
//! `adam_v/NAME`. Metadata (strings): `format`, `step`, `adam_step`, `ema_step`, `config` (the
//! resolved [`TrainConfig`] as JSON), `rng` and `data` (JSON states), `dataset`, and `crc32`:
//! the CRC-32 of the whole file with that value's eight hex digits read as `00000000`, so a
//! damaged checkpoint (a flipped bit, a torn or truncated write) is refused when it is read.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use ddpm_data::{DataPosition, ImageSet};
use ddpm_forward::{NoiseSource, NoiseState};

use crate::trainer::AdamW;
use crate::{TrainConfig, Trainer};

/// The `format` metadata value of our checkpoints.
pub const CHECKPOINT_FORMAT: &str = "ddpm-checkpoint-v1";

/// The checksum's metadata key and the placeholder its value is computed with.
const CHECKSUM_KEY: &str = "crc32";
const CHECKSUM_PLACEHOLDER: &str = "00000000";

/// Where the eight hex digits of the checksum sit in a serialized checkpoint: the one
/// occurrence of `"crc32":"` inside the header. `None` for a file without one (written
/// before checksums existed) or whose header is not there.
fn checksum_at(bytes: &[u8]) -> Option<usize> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header = bytes.get(8..8usize.checked_add(n)?)?;
    let needle = format!("\"{CHECKSUM_KEY}\":\"");
    let needle = needle.as_bytes();
    let mut found = header
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| 8 + i + needle.len());
    let at = found.next()?;
    (found.next().is_none() && at + 8 <= 8 + n).then_some(at)
}

/// The CRC-32 of `bytes` with the eight bytes at `at` read as the placeholder.
fn checksum(bytes: &[u8], at: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[..at]);
    h.update(CHECKSUM_PLACEHOLDER.as_bytes());
    h.update(&bytes[at + 8..]);
    h.finalize()
}

fn msg(s: String) -> candle_core::Error {
    candle_core::Error::Msg(s)
}

/// Writes a file atomically: `write` fills a temporary file beside `path` (named
/// `.NAME.XXXXXX`), which is flushed to disk and renamed over `path` only if `write` succeeds,
/// and the folder is synced so the rename is durable (the `atomic-write-file` crate). A failure
/// (or a crash) at any point leaves whatever was at `path` untouched; a failed attempt removes
/// its temporary file.
pub fn atomic_write(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut file = atomic_write_file::AtomicWriteFile::open(path)?;
    write(file.as_file_mut())?;
    file.flush()?;
    file.commit()
}

/// The checkpoint file name for `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("step-{step:08}.safetensors")
}

/// The checkpoints in `dir` (files named `step-NNNNNNNN.safetensors`), oldest first.
pub fn list_checkpoints(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    if !dir.exists() {
        return Ok(found);
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.strip_suffix(".safetensors"))
            .and_then(|s| s.parse::<u64>().ok())
        {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

impl Trainer {
    /// Writes the complete state to `path`, atomically ([`atomic_write`]).
    pub fn save_checkpoint(&self, path: &Path) -> candle_core::Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (name, t) in self.model_tensors() {
            tensors.push((format!("model/{name}"), t));
        }
        for (name, t) in &self.ema {
            tensors.push((format!("ema/{name}"), t.clone()));
        }
        for (name, t) in &self.opt.m {
            tensors.push((format!("adam_m/{name}"), t.clone()));
        }
        for (name, t) in &self.opt.v {
            tensors.push((format!("adam_v/{name}"), t.clone()));
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let tensors: Vec<(String, Tensor)> = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?.contiguous()?)))
            .collect::<candle_core::Result<_>>()?;
        let json = |v: &dyn erased::Json| v.json();
        let metadata = HashMap::from([
            ("format".to_string(), CHECKPOINT_FORMAT.to_string()),
            ("step".to_string(), self.step.to_string()),
            ("adam_step".to_string(), self.opt.t.to_string()),
            ("ema_step".to_string(), self.ema_steps.to_string()),
            ("config".to_string(), json(&self.config)),
            ("rng".to_string(), json(&self.rng.state())),
            ("data".to_string(), json(&self.data.position())),
            ("dataset".to_string(), self.dataset.clone()),
            (CHECKSUM_KEY.to_string(), CHECKSUM_PLACEHOLDER.to_string()),
        ]);
        let mut bytes = safetensors::tensor::serialize(
            tensors.iter().map(|(k, t)| (k.as_str(), t)),
            Some(metadata),
        )
        .map_err(|e| msg(format!("serializing checkpoint {}: {e}", path.display())))?;
        let at = checksum_at(&bytes).ok_or_else(|| {
            msg(format!(
                "serializing checkpoint {}: no single checksum field in the header",
                path.display()
            ))
        })?;
        let sum = format!("{:08x}", checksum(&bytes, at));
        bytes[at..at + 8].copy_from_slice(sum.as_bytes());
        atomic_write(path, |f| f.write_all(&bytes))
            .map_err(|e| msg(format!("writing checkpoint {}: {e}", path.display())))
    }

    /// Restores a run from a checkpoint, with the data it was trained on. `steps`, when given,
    /// replaces the configured total (to train on past the original end). The result continues
    /// exactly as the run that wrote the checkpoint would have.
    pub fn resume(
        path: &Path,
        data: Arc<ImageSet>,
        device: &Device,
        steps: Option<u64>,
    ) -> candle_core::Result<Self> {
        let ck = Checkpoint::read(path, device)?;
        Self::resume_from(&ck, path, data, device, steps)
    }

    /// [`Trainer::resume`] from a checkpoint already read from `path` (named in errors).
    pub fn resume_from(
        ck: &Checkpoint,
        path: &Path,
        data: Arc<ImageSet>,
        device: &Device,
        steps: Option<u64>,
    ) -> candle_core::Result<Self> {
        let ctx = |e: String| msg(format!("checkpoint {}: {e}", path.display()));
        let mut config = ck.config.clone();
        if let Some(s) = steps {
            config.steps = s;
        }
        let Checkpoint {
            model,
            ema,
            adam_m: m,
            adam_v: v,
            ..
        } = ck.clone();
        let mut trainer = Trainer::new(config, data, &ck.dataset, device)?;
        // Every tensor the model has must be in the checkpoint with its shape (checked load).
        ddpm_unet::Unet::from_tensors(&trainer.config.model, model.clone(), device)
            .map_err(|e| ctx(format!("model: {e}")))?;
        ddpm_unet::Unet::from_tensors(&trainer.config.model, ema.clone(), device)
            .map_err(|e| ctx(format!("ema: {e}")))?;
        for (name, var) in trainer.varmap.data().lock().expect("not poisoned").iter() {
            var.set(&model[name])?;
        }
        for (name, _) in ddpm_unet::trainable_vars(&trainer.varmap) {
            for (moments, what) in [(&m, "adam_m"), (&v, "adam_v")] {
                let t = moments
                    .get(&name)
                    .ok_or_else(|| ctx(format!("{what}/{name} is missing")))?;
                if t.dims() != model[&name].dims() {
                    return Err(ctx(format!(
                        "{what}/{name} has shape {:?}, the model {:?}",
                        t.dims(),
                        model[&name].dims()
                    )));
                }
            }
        }
        trainer.ema = ema;
        trainer.opt = AdamW {
            config: trainer.config.optimizer,
            m,
            v,
            t: ck.adam_step,
        };
        trainer.ema_steps = ck.ema_step;
        trainer.step = ck.step;
        trainer.rng = NoiseSource::from_state(&ck.rng);
        trainer.data = trainer.data.clone().with_position(ck.data);
        Ok(trainer)
    }
}

/// The contents of a checkpoint file.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The run's configuration.
    pub config: TrainConfig,
    /// Optimizer steps taken.
    pub step: u64,
    /// AdamW's step count.
    pub adam_step: u64,
    /// EMA updates made.
    pub ema_step: u64,
    /// The data description.
    pub dataset: String,
    /// The RNG state.
    pub rng: NoiseState,
    /// The data position.
    pub data: DataPosition,
    /// Raw weights and BatchNorm statistics.
    pub model: HashMap<String, Tensor>,
    /// EMA weights.
    pub ema: HashMap<String, Tensor>,
    /// AdamW first moments.
    pub adam_m: HashMap<String, Tensor>,
    /// AdamW second moments.
    pub adam_v: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Reads a checkpoint written by [`Trainer::save_checkpoint`]; anything else is an error
    /// naming the file.
    pub fn read(path: &Path, device: &Device) -> candle_core::Result<Self> {
        let ctx = |e: String| msg(format!("checkpoint {}: {e}", path.display()));
        let bytes = std::fs::read(path).map_err(|e| ctx(e.to_string()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| ctx(format!("not a safetensors file: {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if let Some(written) = meta.get(CHECKSUM_KEY) {
            let at =
                checksum_at(&bytes).ok_or_else(|| ctx("its checksum field is misplaced".into()))?;
            let computed = format!("{:08x}", checksum(&bytes, at));
            if *written != computed {
                return Err(ctx(format!(
                    "damaged: its checksum does not match (written {written}, computed {computed})"
                )));
            }
        }
        let get = |key: &str| {
            meta.get(key)
                .cloned()
                .ok_or_else(|| ctx(format!("metadata {key:?} is missing")))
        };
        if meta.get("format").map(String::as_str) != Some(CHECKPOINT_FORMAT) {
            return Err(ctx(format!(
                "format {:?} is not {CHECKPOINT_FORMAT} (not a ddpm training checkpoint)",
                meta.get("format")
            )));
        }
        let parse_u64 = |key: &str| -> candle_core::Result<u64> {
            get(key)?
                .parse()
                .map_err(|e| ctx(format!("metadata {key}: {e}")))
        };
        let config: TrainConfig =
            serde_json::from_str(&get("config")?).map_err(|e| ctx(format!("config: {e}")))?;
        let rng: NoiseState =
            serde_json::from_str(&get("rng")?).map_err(|e| ctx(format!("rng: {e}")))?;
        let data: DataPosition =
            serde_json::from_str(&get("data")?).map_err(|e| ctx(format!("data: {e}")))?;
        let all = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| ctx(e.to_string()))?;
        let mut groups: HashMap<String, HashMap<String, Tensor>> = HashMap::new();
        for (name, t) in all {
            let (group, rest) = name
                .split_once('/')
                .ok_or_else(|| ctx(format!("unexpected tensor {name}")))?;
            if !matches!(group, "model" | "ema" | "adam_m" | "adam_v") {
                return Err(ctx(format!("unexpected tensor group {group:?}")));
            }
            groups
                .entry(group.to_string())
                .or_default()
                .insert(rest.to_string(), t);
        }
        let mut take = |g: &str| groups.remove(g).unwrap_or_default();
        Ok(Self {
            config,
            step: parse_u64("step")?,
            adam_step: parse_u64("adam_step")?,
            ema_step: parse_u64("ema_step")?,
            dataset: get("dataset")?,
            rng,
            data,
            model: take("model"),
            ema: take("ema"),
            adam_m: take("adam_m"),
            adam_v: take("adam_v"),
        })
    }
}

/// JSON for the metadata values, without a generic parameter on the closure.
mod erased {
    pub trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).expect("state serializes")
        }
    }
}
