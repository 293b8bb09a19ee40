//! A checked, safe front to the `gemm` crate, and reusable scratch buffers.

use std::sync::Mutex;

/// A strided matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A contiguous row-major `rows x cols` matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = lhs * rhs`, or `dst += lhs * rhs` with `accumulate`; `dst` row-major with row stride
/// `dst_rs`. Runs on candle's thread count. The split among threads is over output blocks,
/// never over the shared dimension, so every element sums its products in the same order
/// whatever the thread count.
pub(crate) fn matmul(dst: &mut [f32], dst_rs: usize, lhs: Mat<'_>, rhs: Mat<'_>, accumulate: bool) {
    let threads = thread_count();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    product(dst, dst_rs, lhs, rhs, accumulate, parallelism);
}

/// [`matmul`] on the calling thread, for callers that run many small products in parallel
/// themselves.
pub(crate) fn matmul_serial(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    accumulate: bool,
) {
    product(dst, dst_rs, lhs, rhs, accumulate, gemm::Parallelism::None);
}

fn product(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "matmul: inner dimensions differ");
    assert!(lhs.fits() && rhs.fits(), "matmul: operand out of bounds");
    assert!(
        m == 0 || n == 0 || (m - 1) * dst_rs + n <= dst.len(),
        "matmul: destination out of bounds"
    );
    assert!(n <= dst_rs || m <= 1, "matmul: destination rows overlap");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..][..n].fill(0.0);
            }
        }
        return;
    }
    #[allow(unsafe_code)]
    // SAFETY: the asserts above keep every index the call computes, `i * rs + j * cs` for
    // `i < rows`, `j < cols`, inside its slice; `dst` is borrowed mutably, so it overlaps
    // neither operand, and its rows do not overlap each other.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `n` zeros, written by rayon's threads where `n` is large (from 1 MiB): `vec![0.0; n]` gets
/// memory the allocator has reused and clears it on the calling thread, while the others
/// wait. An op's outputs are made on the thread that runs the op.
pub(crate) fn zeroed(n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    if n < 1 << 18 {
        return vec![0.0; n];
    }
    let mut v = Vec::with_capacity(n);
    v.par_extend(rayon::iter::repeat_n(0f32, n));
    v
}

/// Scratch buffers kept between calls. A fresh large allocation costs a page fault and a
/// page clear per 4 KiB on first touch; a convolution's column matrix is tens of megabytes, so
/// reusing them saves a pass over memory per op. Callers overwrite what they use.
static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// Buffers kept at most: a forward pass holds three at once, a backward pass four.
const POOL_SIZE: usize = 4;

/// Requests below this many elements (256 KiB) bypass the pool: the allocator serves them from
/// memory it already holds, and one would otherwise take a large pooled buffer (a kernel's
/// rows while the next op's column matrix needs it), which sent another large buffer back to
/// the kernel and its replacement through page faults on every call.
const POOLED_FROM: usize = 1 << 16;

/// A scratch buffer of `len` elements (contents unspecified), back to the pool on drop.
pub(crate) struct Scratch {
    buf: Vec<f32>,
    len: usize,
}

impl Scratch {
    pub fn new(len: usize) -> Self {
        if len < POOLED_FROM {
            return Self {
                buf: vec![0.0; len],
                len,
            };
        }
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        // The smallest kept buffer that is large enough, else the largest (grown).
        let pick = pool
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= len)
            .min_by_key(|(_, b)| b.len())
            .or_else(|| pool.iter().enumerate().max_by_key(|(_, b)| b.len()))
            .map(|(i, _)| i);
        let mut buf = pick.map(|i| pool.swap_remove(i)).unwrap_or_default();
        drop(pool);
        if buf.len() < len {
            // Contents are unspecified: free the old buffer rather than have `realloc` copy it.
            buf = Vec::new();
            buf.resize(len, 0.0);
        }
        Self { buf, len }
    }
}

impl std::ops::Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[..self.len]
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[..self.len]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.buf.len() < POOLED_FROM {
            return;
        }
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        pool.push(std::mem::take(&mut self.buf));
        if pool.len() > POOL_SIZE {
            // Drop the smallest.
            let (i, _) = pool
                .iter()
                .enumerate()
                .min_by_key(|(_, b)| b.len())
                .expect("not empty");
            pool.swap_remove(i);
        }
    }
}

/// candle's thread count (`RAYON_NUM_THREADS`, else the physical cores), asked once per
/// process: candle works it out anew on every call, and on Linux that reads `/proc/cpuinfo`.
fn thread_count() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

thread_local! {
    /// Each thread's scratch for [`with_local_scratch`].
    static LOCAL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch buffer of `len` elements (contents unspecified), kept for
/// the thread's next call: the blocked passes run thousands of small tasks, and a fresh
/// buffer per task costs an allocation and a page fault per 4 KiB. `f` must not start
/// parallel work (a nested call on the same thread then gets a fresh buffer).
pub(crate) fn with_local_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    LOCAL.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                *buf = vec![0.0; len];
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0.0; len]),
    })
}
