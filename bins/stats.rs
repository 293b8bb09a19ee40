//! Statistics shared by `ddpm-bench` and `cargo xtask bench` (included by `#[path]`).

/// The median of `v` (the mean of the middle two for an even count); NaN-free input assumed,
/// NaNs sort last.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
