//! Transformed kernels kept while the weights are frozen, as they are through a sampling loop.
//!
//! A Winograd convolution transforms its kernel on every call (`U = G g Gᵀ`, `A²/9` times the
//! kernel's size, written to memory): for the seed model's 512 -> 1024 channel layers that is
//! 13-21 ms per layer and call on 2 cores, memory-bound. Sampling calls the model a hundred
//! times or more with the same weights, so while a [`FrozenWeights`] guard is held each forward pass's
//! transformed kernel is kept, per thread, and reused while the kernel's values are the same.
//!
//! Reuse never changes a result: an entry is found by the kernel's address and length but
//! used only when the kernel's values are bit for bit the ones it was made from (compared on
//! every call, one read of the kernel), so a kernel changed in place (`Var::set`) or a new one
//! at a freed address is transformed afresh. The entries are dropped when the outermost
//! scope ends; at most [`BUDGET`] floats are kept.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;

use rayon::prelude::*;

/// Floats the entries of one thread may hold in all (copies of kernels and their transforms):
/// 512 MiB.
pub(crate) const BUDGET: usize = 1 << 27;

/// A kept transform: the kernel's values it was made from, and the transform.
struct Entry {
    kernel: Vec<f32>,
    transformed: Arc<Vec<f32>>,
}

impl Entry {
    /// Floats the entry holds.
    fn floats(&self) -> usize {
        self.kernel.len() + self.transformed.len()
    }
}

/// Entries by (what transform, kernel address, kernel length).
#[derive(Default)]
struct Cache {
    entries: HashMap<(usize, usize, usize), Entry>,
}

impl Cache {
    /// Floats the entries hold in all (a sum over a model's layers, on a miss only).
    fn floats(&self) -> usize {
        self.entries.values().map(Entry::floats).sum()
    }
}

thread_local! {
    static DEPTH: Cell<usize> = const { Cell::new(0) };
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
}

/// A scope in which the weights are frozen, held by a guard: while a `FrozenWeights` lives,
/// convolutions on the thread that made it keep the transformed kernels of their forward
/// passes and reuse them while a kernel's values are unchanged (checked on every call, so a
/// result is always the one without the scope). Hold one around a loop of forward passes with
/// fixed weights, such as a sampling loop (`ddpm_unet::Unet::freeze_weights` gives one).
/// Guards nest; the kept transforms are dropped when the outermost one is dropped, also by a
/// panic. The guard belongs to its thread (it is neither `Send` nor `Sync`).
///
/// ```
/// use candle_core::{Device, Tensor};
///
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let x = (Tensor::arange(0f32, 4096., &dev)?.reshape((4, 16, 16, 4))? / 300.)?.sin()?;
/// let x = x.repeat((1, 1, 1, 4))?; // NHWC, 16 channels
/// let w = (Tensor::arange(0f32, 16. * 16. * 9., &dev)?.reshape((16, 16, 3, 3))? / 9.)?.cos()?;
/// let plain = ddpm_kernels::conv2d_nhwc(&x, &w, None, 1, 1)?;
/// let frozen = {
///     let _frozen = ddpm_kernels::FrozenWeights::hold();
///     let mut y = ddpm_kernels::conv2d_nhwc(&x, &w, None, 1, 1)?;
///     for _ in 0..3 {
///         y = ddpm_kernels::conv2d_nhwc(&x, &w, None, 1, 1)?; // the kept transform
///     }
///     y
/// };
/// let diff = (plain - frozen)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert_eq!(diff, 0.0);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
#[must_use = "the weights are frozen only while the guard is held"]
pub struct FrozenWeights {
    /// Not `Send`: the scope is the creating thread's.
    _thread: std::marker::PhantomData<*const ()>,
}

impl FrozenWeights {
    /// Enters the scope on this thread until the guard is dropped.
    pub fn hold() -> Self {
        DEPTH.with(|d| d.set(d.get() + 1));
        Self {
            _thread: std::marker::PhantomData,
        }
    }
}

impl Drop for FrozenWeights {
    fn drop(&mut self) {
        let depth = DEPTH.with(|d| {
            d.set(d.get() - 1);
            d.get()
        });
        if depth == 0 {
            CACHE.with(|c| *c.borrow_mut() = Cache::default());
        }
    }
}

/// Runs `f` inside a [`FrozenWeights`] scope.
pub fn with_frozen_weights<R>(f: impl FnOnce() -> R) -> R {
    let _frozen = FrozenWeights::hold();
    f()
}

/// Whether `a` and `b` hold the same bits (not float equality: -0 and 0 differ, NaNs match
/// themselves). In parallel over pieces of 64 Ki values: it reads every kept kernel twice on
/// every call, which on one thread left the others waiting.
fn same_bits(a: &[f32], b: &[f32]) -> bool {
    const PIECE: usize = 1 << 16;
    a.len() == b.len()
        && a.par_chunks(PIECE).zip(b.par_chunks(PIECE)).all(|(x, y)| {
            x.chunks(256).zip(y.chunks(256)).all(|(x, y)| {
                x.iter()
                    .zip(y)
                    .fold(true, |same, (p, q)| same & (p.to_bits() == q.to_bits()))
            })
        })
}

/// Whether this thread holds a [`FrozenWeights`].
pub(crate) fn active() -> bool {
    DEPTH.with(|d| d.get()) > 0
}

/// The transform `tag` of `kernel`, inside a frozen scope: the kept one when `kernel`'s values
/// are the ones it was made from, else `compute()`, kept (within [`BUDGET`]).
pub(crate) fn kept(
    tag: usize,
    kernel: &[f32],
    compute: impl FnOnce() -> Vec<f32>,
) -> Arc<Vec<f32>> {
    kept_within(BUDGET, tag, kernel, compute)
}

/// [`kept`] with a budget of `budget` floats.
fn kept_within(
    budget: usize,
    tag: usize,
    kernel: &[f32],
    compute: impl FnOnce() -> Vec<f32>,
) -> Arc<Vec<f32>> {
    debug_assert!(active());
    let key = (tag, kernel.as_ptr() as usize, kernel.len());
    let found = CACHE.with(|c| {
        let cache = c.borrow();
        cache
            .entries
            .get(&key)
            .filter(|e| same_bits(&e.kernel, kernel))
            .map(|e| e.transformed.clone())
    });
    if let Some(t) = found {
        return t;
    }
    let transformed = Arc::new(compute());
    CACHE.with(|c| {
        let mut cache = c.borrow_mut();
        // A stale entry for the same key goes first, so its share is free again.
        cache.entries.remove(&key);
        if cache.floats() + kernel.len() + transformed.len() <= budget {
            let entry = Entry {
                kernel: kernel.to_vec(),
                transformed: transformed.clone(),
            };
            cache.entries.insert(key, entry);
        }
    });
    transformed
}

/// Entries kept on this thread (for tests).
#[cfg(test)]
fn count() -> usize {
    CACHE.with(|c| c.borrow().entries.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_bits_not_values() {
        assert!(same_bits(&[1.0, f32::NAN], &[1.0, f32::NAN]));
        assert!(!same_bits(&[0.0], &[-0.0]));
        assert!(!same_bits(&[1.0; 300], &[1.0; 299]));
        let mut b = vec![1.0f32; 300];
        assert!(same_bits(&b, &vec![1.0; 300]));
        b[299] = 2.0;
        assert!(!same_bits(&b, &vec![1.0; 300]));
    }

    #[test]
    fn keeps_transforms_only_inside_the_scope_and_only_for_the_same_values() {
        let calls = Cell::new(0);
        let double = |k: &[f32]| {
            calls.set(calls.get() + 1);
            k.iter().map(|v| 2.0 * v).collect::<Vec<f32>>()
        };
        let mut kernel = vec![1.0f32, 2.0, 3.0];
        assert!(!active());
        with_frozen_weights(|| {
            assert!(active());
            let first = kept(0, &kernel, || double(&kernel));
            let again = kept(0, &kernel, || double(&kernel));
            assert_eq!(
                calls.get(),
                1,
                "the second call reuses the first's transform"
            );
            assert!(Arc::ptr_eq(&first, &again));
            // Another transform of the same kernel is its own entry.
            kept(1, &kernel, || double(&kernel));
            assert_eq!((calls.get(), count()), (2, 2));
            // Changed in place (same address): transformed afresh, with the new values.
            kernel[1] = 5.0;
            let changed = kept(0, &kernel, || double(&kernel));
            assert_eq!(*changed, vec![2.0, 10.0, 6.0]);
            assert_eq!((calls.get(), count()), (3, 2));
            // Nested scopes keep the entries until the outermost ends.
            with_frozen_weights(|| kept(0, &kernel, || double(&kernel)));
            assert_eq!((calls.get(), count()), (3, 2));
        });
        assert!(!active());
        assert_eq!(count(), 0, "the outermost scope's end drops the entries");
    }

    #[test]
    fn keeps_no_more_than_the_budget() {
        let calls = Cell::new(0);
        let copy = |k: &[f32]| {
            calls.set(calls.get() + 1);
            k.to_vec()
        };
        let (mut a, b) = (vec![1.0f32; 30], vec![2.0f32; 30]);
        with_frozen_weights(|| {
            // 60 floats (kernel and transform) fit a budget of 100 once: b's transform is
            // used, not kept.
            kept_within(100, 0, &a, || copy(&a));
            let t = kept_within(100, 0, &b, || copy(&b));
            assert_eq!(*t, b);
            kept_within(100, 0, &b, || copy(&b));
            assert_eq!((calls.get(), count()), (3, 1));
            // A changed kernel replaces its entry, whose share is freed first: kept again.
            a[0] = 3.0;
            kept_within(100, 0, &a, || copy(&a));
            let t = kept_within(100, 0, &a, || copy(&a));
            assert_eq!(t[0], 3.0);
            assert_eq!((calls.get(), count()), (4, 1));
        });
    }

    #[test]
    fn a_panic_inside_the_scope_still_ends_it() {
        let kernel = vec![1.0f32; 4];
        let result = std::panic::catch_unwind(|| {
            with_frozen_weights(|| {
                kept(0, &kernel, || kernel.clone());
                panic!("inside");
            })
        });
        assert!(result.is_err());
        assert_eq!(count(), 0);
        assert!(!active());
    }
}
