//! What every op of this crate shares: reaching a CPU tensor's f32 data, making outputs,
//! and the checks of per-channel arguments.

use candle_core::{CpuStorage, Layout, Storage, Tensor};

/// Rows of channels-last values per task of the elementwise passes.
pub(crate) const ROWS_PER_TASK: usize = 256;

/// Whether `x` is f32 on the CPU, the one kind of tensor these kernels take.
pub(crate) fn is_cpu_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// The f32 values of a contiguous CPU storage.
pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("ddpm-kernels: the input must be contiguous"),
    }
}

/// Runs `f` on the f32 data of a CPU tensor (made contiguous first).
pub(crate) fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(contiguous_f32(cpu, layout)?)),
        _ => candle_core::bail!("ddpm-kernels runs on the CPU"),
    }
}

/// A tensor of `dims` from `data` on `like`'s device.
pub(crate) fn tensor(data: Vec<f32>, dims: &[usize], like: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::from_vec(data, dims, like.device())
}

/// Checks that `x` is f32 on the CPU, `[N, C, ...]` (or `[..., C]` with `nhwc`) and not
/// empty, and that the two vectors, described for errors as `names`, are `[C]`; returns `C`.
pub(crate) fn per_channel_dims(
    what: &str,
    x: &Tensor,
    (names, a, b): (&str, &Tensor, &Tensor),
    nhwc: bool,
) -> candle_core::Result<usize> {
    if !is_cpu_f32(x) {
        candle_core::bail!(
            "ddpm-kernels runs f32 on the CPU (got {:?} on {:?})",
            x.dtype(),
            x.device().location()
        );
    }
    let dims = x.dims();
    let c = if nhwc { dims.last() } else { dims.get(1) };
    let shape = if nhwc { "[..., C]" } else { "[N, C, ...]" };
    if dims.len() < 2 || c.is_none_or(|&c| a.dims() != [c] || b.dims() != [c]) {
        candle_core::bail!(
            "{what} takes x {shape} with {names}, got {:?}, {:?}, {:?}",
            dims,
            a.dims(),
            b.dims()
        );
    }
    if x.elem_count() == 0 {
        candle_core::bail!("{what}: x {dims:?} holds no values");
    }
    Ok(c.copied().unwrap_or(0))
}

/// Checks a normalisation's `eps`.
pub(crate) fn check_eps(what: &str, eps: f64) -> candle_core::Result<()> {
    if !(eps.is_finite() && eps >= 0.0) {
        candle_core::bail!("{what}: eps must be >= 0, got {eps}");
    }
    Ok(())
}
