//! The allocator and thread-count setting of the `ddpm` and `ddpm-bench` binaries, shared by
//! `#[path]`.
//!
//! mimalloc keeps freed memory for reuse instead of handing large blocks back to the kernel at
//! once: every training step frees and allocates tensors of megabytes, and with the system
//! allocator each costs page faults, page clears and TLB shootdowns (a training step of the
//! 32..256 seed model took 3.2 s with it, 2.1 s with mimalloc, on 2 cores).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tells mimalloc never to purge freed memory. By default it hands freed pages back to the
/// kernel after a delay; the next step's tensors then fault them in again and the kernel
/// clears each (transparent huge) page: 22% of a 3-step `ddpm-bench --config small --mode
/// train` profile, 8% with purging off, for 3% more peak memory. Call it first in `main`.
#[allow(unsafe_code)]
pub fn keep_freed_memory() {
    // `mi_option_purge_delay`: entry 15 of `mi_option_e` in both mimalloc 2 and 3 (the
    // bindings name no constant for it). -1 turns purging off.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: `mi_option_set` stores an integer option; it reads no pointers.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) }
}

/// Fixes candle's thread count for the process in `RAYON_NUM_THREADS`, and shortens the spin
/// of candle's own worker threads in `CANDLE_BARRIER_POOL_SPIN_LIMIT` (each unless set
/// already). Call it first in `main`, before any thread starts.
///
/// - candle works the thread count out anew on every matmul, and without the variable that
///   reads and formats `/proc/cpuinfo` on Linux: 9% of a UNet2DModel training step (its Linear
///   layers and attention are candle matmuls), measured as 72.8 -> 82.1 images/s with the
///   variable set.
/// - candle's element-wise ops run on a pool of its own beside rayon's, whose workers spin
///   25,000 times after each op before they sleep. Our convolutions and norms run on rayon's
///   workers right after such ops (every gradient candle adds up, for one), so the spinning
///   worker takes a core from them. With 1,000 spins the small `ddpm-bench` training step ran
///   faster in 9 of 10 alternating pairs on 2 cores (by -2% to 15%); the sampling steps and
///   the default recipe's training did not change beyond the noise.
#[allow(unsafe_code)]
pub fn configure_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        // SAFETY: called at the start of `main`, before any other thread exists that could
        // read the environment concurrently.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) }
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: as above.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000") }
    }
}
