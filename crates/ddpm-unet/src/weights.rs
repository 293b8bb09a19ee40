//! Loading weights with checks that name what is wrong, saving them, and seeded initialisation.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::StandardNormal;

/// Older diffusers checkpoints (e.g. `google/ddpm-cifar10-32`) name the attention projections
/// `query`, `key`, `value`, `proj_attn`; current diffusers names them `to_q`, `to_k`, `to_v`,
/// `to_out.0`. Renames the old names to the new, as diffusers does on load.
pub fn rename_legacy_attention(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    const RENAMES: [(&str, &str); 4] = [
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ];
    tensors
        .into_iter()
        .map(|(name, t)| {
            if !name.contains("attentions.") {
                return (name, t);
            }
            let renamed = RENAMES
                .iter()
                .find(|(old, _)| name.contains(old))
                .map(|(old, new)| name.replacen(old, new, 1));
            (renamed.unwrap_or(name), t)
        })
        .collect()
}

/// A `VarBuilder` backend over loaded tensors that checks every request: a missing tensor, a
/// shape that differs, or a dtype other than f32 is an error naming the tensor.
struct Checked {
    tensors: HashMap<String, Tensor>,
    used: Arc<Mutex<HashSet<String>>>,
}

impl SimpleBackend for Checked {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "tensor {name} has shape {:?}, the model expects {:?}",
                t.dims(),
                s.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("tensor {name} is missing from the checkpoint"))
        })?;
        // Half-precision weights (`*.fp16.safetensors`, bf16 checkpoints) are widened to the
        // model's float type, as diffusers does with `torch_dtype=torch.float32`; any other
        // type is an error.
        let half = matches!(t.dtype(), DType::F16 | DType::BF16);
        let t = if t.dtype() == dtype {
            t.clone()
        } else if half && dtype.is_float() {
            t.to_dtype(dtype)?
        } else {
            candle_core::bail!(
                "tensor {name} has dtype {:?}, the model expects {dtype:?}",
                t.dtype()
            );
        };
        let t = &t;
        let bad = non_finite_count(t)?;
        if bad > 0 {
            candle_core::bail!(
                "tensor {name} holds {bad} value(s) that are NaN or infinite: the weights are damaged"
            );
        }
        self.used
            .lock()
            .expect("not poisoned")
            .insert(name.to_string());
        t.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// How many of `t`'s values are NaN or infinite (`x - x` is 0 exactly for the finite ones).
pub fn non_finite_count(t: &Tensor) -> candle_core::Result<usize> {
    if !t.dtype().is_float() {
        return Ok(0);
    }
    let t = t.to_dtype(DType::F32)?;
    // NaN for NaN and infinite values (NaN != 0), exactly 0 for the rest; the count of NaNs
    // is summed in f64 so that it is exact.
    let nan_if_bad = t.sub(&t)?;
    let bad = nan_if_bad.ne(0f32)?.to_dtype(DType::F64)?.sum_all()?;
    Ok(bad.to_scalar::<f64>()? as usize)
}

/// Builds a model from named tensors, checking that every tensor the model asks for is there
/// with the right shape and dtype (f32; f16 and bf16 are widened to it) and finite values, and that the checkpoint holds nothing the model does
/// not use (PyTorch's `num_batches_tracked` counters excepted). Legacy attention names are
/// accepted ([`rename_legacy_attention`]).
pub fn build_checked<M>(
    tensors: HashMap<String, Tensor>,
    device: &Device,
    build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<M>,
) -> candle_core::Result<M> {
    let tensors = rename_legacy_attention(tensors);
    let names: Vec<String> = tensors.keys().cloned().collect();
    let used = Arc::new(Mutex::new(HashSet::new()));
    let backend = Checked {
        tensors,
        used: used.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
    let model = build(vb)?;
    let used = used.lock().expect("not poisoned");
    let mut unexpected: Vec<&String> = names
        .iter()
        .filter(|n| !used.contains(*n) && !n.ends_with("num_batches_tracked"))
        .collect();
    if !unexpected.is_empty() {
        unexpected.sort();
        let shown: Vec<&str> = unexpected.iter().take(5).map(|s| s.as_str()).collect();
        candle_core::bail!(
            "the checkpoint has {} tensor(s) the model does not use: {}{}",
            unexpected.len(),
            shown.join(", "),
            if unexpected.len() > 5 { ", ..." } else { "" }
        );
    }
    Ok(model)
}

/// Reads every tensor of a safetensors file onto `device`, with the file named in any error.
pub fn read_safetensors(
    path: &Path,
    device: &Device,
) -> candle_core::Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device)
        .map_err(|e| candle_core::Error::Msg(format!("reading {}: {e}", path.display())))
}

/// Reads the tensors of a PyTorch file (`torch.save` of a `state_dict`: diffusers'
/// `diffusion_pytorch_model.bin`, a `.pt` or `.pth`, or a checkpoint holding one under
/// `state_dict`) with candle's pickle reader, which interprets the pickle's data without
/// running any of its code. A file that is not such an archive, and a tensor that claims more
/// bytes than the file holds, are errors naming the file, found before anything is allocated.
pub fn read_pytorch(path: &Path, device: &Device) -> candle_core::Result<HashMap<String, Tensor>> {
    let err = |e: String| candle_core::Error::Msg(format!("reading {}: {e}", path.display()));
    let file_len = std::fs::metadata(path)
        .map_err(|e| err(e.to_string()))?
        .len() as u128;
    let open = |key| {
        candle_core::pickle::PthTensors::new(path, key)
            .map_err(|e| err(format!("not a PyTorch state_dict file ({e})")))
    };
    let mut pth = open(None)?;
    if pth.tensor_infos().is_empty() {
        pth = open(Some("state_dict"))?;
    }
    if pth.tensor_infos().is_empty() {
        return Err(err("no tensors in it (not a state_dict)".into()));
    }
    for (name, info) in pth.tensor_infos() {
        let bytes = info
            .layout
            .dims()
            .iter()
            .try_fold(info.dtype.size_in_bytes() as u128, |acc, &d| {
                acc.checked_mul(d as u128)
            });
        if bytes.is_none_or(|b| b > file_len) {
            return Err(err(format!(
                "tensor {name} claims shape {:?}, more than the file's {file_len} bytes hold",
                info.layout.dims()
            )));
        }
    }
    let mut out = HashMap::new();
    let names: Vec<String> = pth.tensor_infos().keys().cloned().collect();
    for name in names {
        let t = pth
            .get(&name)
            .map_err(|e| err(format!("tensor {name}: {e}")))?
            .ok_or_else(|| err(format!("tensor {name} vanished")))?;
        out.insert(name, t.to_device(device)?);
    }
    Ok(out)
}

/// The tensors of a `VarMap`, by name.
pub fn varmap_tensors(varmap: &VarMap) -> HashMap<String, Tensor> {
    varmap
        .data()
        .lock()
        .expect("not poisoned")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect()
}

/// The trainable variables of `varmap` (not the [`is_buffer`] statistics), sorted by name:
/// what an optimizer steps, in an order that does not depend on the map's hashing.
pub fn trainable_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let mut params: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .expect("not poisoned")
        .iter()
        .filter(|(k, _)| !is_buffer(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    params
}

/// True for tensors that are state but not trainable parameters (BatchNorm running statistics).
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("num_batches_tracked")
}

/// The number of trainable parameters among `tensors` (buffers excluded, as PyTorch's
/// `parameters()` does).
pub fn count_parameters(tensors: &HashMap<String, Tensor>) -> usize {
    tensors
        .iter()
        .filter(|(k, _)| !is_buffer(k))
        .map(|(_, t)| t.elem_count())
        .sum()
}

/// Re-initialises every variable of `varmap` from `seed`, the way PyTorch initialises a fresh
/// module: conv and linear weights and biases uniform in `+-1/sqrt(fan_in)` (PyTorch's
/// `kaiming_uniform_(a=sqrt(5))`), class embeddings N(0, 1) (`nn.Embedding`), norm scales 1 and
/// shifts 0, running means 0 and variances 1.
///
/// candle's own initialisation cannot be seeded; this makes a model's starting point a function
/// of the seed alone. Variables are visited in name order, each from its own stream.
pub fn init_seeded(varmap: &VarMap, seed: u64) -> candle_core::Result<()> {
    let data = varmap.data().lock().expect("not poisoned");
    let shapes: HashMap<&str, Vec<usize>> = data
        .iter()
        .map(|(k, v)| (k.as_str(), v.dims().to_vec()))
        .collect();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for (stream, name) in names.into_iter().enumerate() {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let fan_in = |w: &[usize]| -> usize { w.iter().skip(1).product::<usize>().max(1) };
        let values: Vec<f32> = if name.ends_with("running_var") {
            vec![1.0; n]
        } else if name.ends_with("running_mean") {
            vec![0.0; n]
        } else {
            let weight_shape = if name.ends_with(".bias") {
                shapes.get(format!("{}.weight", &name[..name.len() - 5]).as_str())
            } else {
                Some(&dims)
            };
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            rng.set_stream(stream as u64);
            match weight_shape {
                // Embedding tables: PyTorch's `nn.Embedding` draws N(0, 1).
                Some(_) if name.ends_with("class_embedding.weight") => (0..n)
                    .map(|_| rng.sample::<f64, _>(StandardNormal) as f32)
                    .collect(),
                // Conv (rank 4) and linear (rank 2) weights, and their biases.
                Some(w) if w.len() >= 2 => {
                    let bound = 1.0 / (fan_in(w) as f64).sqrt();
                    (0..n)
                        .map(|_| rng.random_range(-bound..bound) as f32)
                        .collect()
                }
                // Norm scales and shifts.
                _ if name.ends_with(".weight") => vec![1.0; n],
                _ => vec![0.0; n],
            }
        };
        var.set(&Tensor::from_vec(values, dims, var.device())?)?;
    }
    Ok(())
}

/// Writes `tensors` to a safetensors file with `metadata` (e.g. `format: pt`, which diffusers
/// and transformers expect), through a temporary file renamed into place. The file takes the
/// usual permissions of a new file (`0666` less the umask): safetensors' own
/// `serialize_to_file` writes through a private (`0600`) temporary file, which left exported
/// models unreadable to other users.
pub fn write_safetensors(
    tensors: &HashMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> candle_core::Result<()> {
    let mut views: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    views.sort_by(|a, b| a.0.cmp(&b.0));
    let bytes =
        safetensors::tensor::serialize(views.iter().map(|(k, t)| (k.as_str(), t)), metadata)
            .map_err(|e| candle_core::Error::Msg(format!("serializing {}: {e}", path.display())))?;
    write_atomically(path, &bytes)
}

/// Replaces `path` with `bytes` durably: a temporary file beside it, synced, renamed into place,
/// the folder synced (the `atomic-write-file` crate). A failure leaves `path` as it was.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> candle_core::Result<()> {
    let err =
        |e: std::io::Error| candle_core::Error::Msg(format!("writing {}: {e}", path.display()));
    let mut file = atomic_write_file::AtomicWriteFile::open(path).map_err(err)?;
    std::io::Write::write_all(&mut file, bytes).map_err(err)?;
    file.commit().map_err(err)
}

/// A backend that hands out views of one zero of any shape, adding up their elements.
struct Counting {
    count: Arc<Mutex<u128>>,
}

impl SimpleBackend for Counting {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = s
            .dims()
            .iter()
            .try_fold(1u128, |acc, &d| acc.checked_mul(d as u128))
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "tensor {name} of shape {:?} is absurdly large",
                    s.dims()
                ))
            })?;
        *self.count.lock().expect("not poisoned") += n;
        if n > u64::MAX as u128 / 8 {
            candle_core::bail!("tensor {name} of shape {:?} is absurdly large", s.dims());
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("counting parameters: tensor {name} has no known shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// The elements of every tensor `build` asks its `VarBuilder` for, without allocating them.
pub(crate) fn count_built(
    build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<()>,
) -> candle_core::Result<u128> {
    let count = Arc::new(Mutex::new(0u128));
    let backend = Counting {
        count: count.clone(),
    };
    build(VarBuilder::from_backend(
        Box::new(backend),
        DType::F32,
        Device::Cpu,
    ))?;
    Ok(*count.lock().expect("not poisoned"))
}
