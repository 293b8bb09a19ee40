//! What the kernel tests share.

use candle_core::Tensor;

/// Asserts `a` and `b` have one shape and differ by at most 1e-4 of `b`'s largest magnitude.
pub fn close(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    let worst = ddpm_testutil::max_abs_diff(&a, &b);
    assert!(
        worst <= 1e-4 * scale,
        "{what}: max |diff| {worst} against scale {scale}"
    );
}
