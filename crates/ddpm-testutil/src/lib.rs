//! Test helpers shared by the ddpm crates (a dev-dependency only; never published).
//!
//! Reference vectors live in `assets/reference/` at the workspace root; each file's `meta` names
//! the Python that wrote it.
#![warn(missing_docs)]

use std::path::PathBuf;

use serde_json::Value;

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A file under `assets/reference/`.
pub fn reference_path(name: &str) -> PathBuf {
    workspace_root().join("assets/reference").join(name)
}

/// Parses `assets/reference/<name>` as JSON.
#[track_caller]
pub fn reference_json(name: &str) -> Value {
    let path = reference_path(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// A JSON array of numbers as `f32` (the files store the shortest decimal that round-trips to f32).
#[track_caller]
pub fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array, got {v}"))
        .iter()
        .map(|x| {
            x.as_f64()
                .unwrap_or_else(|| panic!("expected a number, got {x}")) as f32
        })
        .collect()
}

/// A JSON array of integers.
#[track_caller]
pub fn i64s(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array, got {v}"))
        .iter()
        .map(|x| {
            x.as_i64()
                .unwrap_or_else(|| panic!("expected an integer, got {x}"))
        })
        .collect()
}

/// Asserts `|a - e| <= atol + rtol * |e|` element-wise, naming the first failing index.
#[track_caller]
pub fn assert_close(what: &str, actual: &[f32], expected: &[f32], atol: f32, rtol: f32) {
    assert_eq!(actual.len(), expected.len(), "{what}: length differs");
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let err = (a - e).abs();
        let allowed = atol + rtol * e.abs();
        assert!(
            err <= allowed,
            "{what}[{i}]: got {a}, expected {e} (|diff| {err} > {allowed})"
        );
    }
}

/// The largest absolute element-wise difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length differs");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// How far diffusers' own float32 tables may sit from the exact values, per timestep, as a
/// relative error: the standard rounding model applied to the way `DDPMScheduler` computes them.
///
/// diffusers forms `alpha = 1 - beta` and `abar = cumprod(alpha)` in float32, then the posterior
/// variance `beta (1 - abar_prev) / (1 - abar)`. Each rounding adds `f32::EPSILON / 2`; the
/// subtraction `1 - beta` magnifies the error of `beta` by `beta / (1 - beta)`, and `1 - abar`
/// magnifies the error of `abar` by `abar / (1 - abar)`. Our tables are exact to f64, so the
/// difference between the two is bounded by diffusers' error, returned here for
/// `(alphas_cumprod, posterior_variance)`.
pub fn diffusers_f32_rtol(betas: &[f64]) -> Vec<(f64, f64)> {
    let eps = f32::EPSILON as f64;
    let mut kappa = 0.0; // condition of abar_t, in units of eps
    let mut abar = 1.0;
    let (mut prev_kappa, mut prev_abar) = (0.0, 1.0);
    betas
        .iter()
        .map(|&b| {
            kappa += 1.0 + b / (1.0 - b);
            abar *= 1.0 - b;
            let cancel = |k: f64, a: f64| if a < 1.0 { k * a / (1.0 - a) } else { 0.0 };
            let pv = 4.0 + cancel(prev_kappa, prev_abar) + cancel(kappa, abar);
            (prev_kappa, prev_abar) = (kappa, abar);
            (kappa * eps, pv * eps)
        })
        .collect()
}

/// Runs `fingerprint` here, twice, and in child processes of this test binary with
/// `RAYON_NUM_THREADS` set to each of `threads`, and asserts every run gave the same value.
///
/// Call it from the test named `test_name`; in the children (marked by the variable
/// `child_env`) it prints the fingerprint and returns.
#[track_caller]
pub fn assert_same_across_thread_counts(
    test_name: &str,
    child_env: &str,
    threads: &[&str],
    fingerprint: impl Fn() -> u64,
) {
    if std::env::var_os(child_env).is_some() {
        println!("fingerprint={:016x}", fingerprint());
        return;
    }
    let here = format!("{:016x}", fingerprint());
    assert_eq!(
        here,
        format!("{:016x}", fingerprint()),
        "two runs in one process differ"
    );
    let exe = std::env::current_exe().expect("the test binary's path");
    for n in threads {
        let out = std::process::Command::new(&exe)
            .args(["--exact", test_name, "--nocapture"])
            .env(child_env, "1")
            .env("RAYON_NUM_THREADS", n)
            .output()
            .expect("the test binary runs");
        assert!(
            out.status.success(),
            "child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("fingerprint="))
            .unwrap_or_else(|| panic!("no fingerprint in {stdout}"));
        assert_eq!(line, here, "RAYON_NUM_THREADS={n} gives other bits");
    }
}

/// FNV-1a over 32-bit words.
pub fn fnv1a(words: impl IntoIterator<Item = u32>) -> u64 {
    words.into_iter().fold(0xcbf29ce484222325u64, |h, w| {
        (h ^ w as u64).wrapping_mul(0x100000001b3)
    })
}
