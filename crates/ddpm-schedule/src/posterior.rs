//! The posterior between two noise levels, in f64 on the host.

/// The coefficients of the posterior `q(x_prev | x_t, x_0)` between noise levels
/// `abar_t` and `abar_prev` (DDPM eqs. 6 and 7; for `prev = t - 1` these are the tables
/// [`crate::Table::PosteriorMeanCoef1`], [`crate::Table::PosteriorMeanCoef2`] and
/// [`crate::Table::PosteriorVariance`]). With `alpha = abar_t / abar_prev`, the mean is
/// `x0 * sqrt(abar_prev) (1 - alpha) / (1 - abar_t) + x_t * sqrt(alpha) (1 - abar_prev) / (1 - abar_t)`
/// and the variance `(1 - abar_prev) / (1 - abar_t) * (1 - alpha)`: the same arithmetic, in
/// the same order, as diffusers' `DDPMScheduler.step` (and the variance of
/// `DDIMScheduler._get_variance`), so a spaced sampling step is the posterior too.
///
/// ```
/// use ddpm_schedule::PosteriorCoefficients;
///
/// let p = PosteriorCoefficients::new(0.5, 0.8);
/// let alpha = 0.5 / 0.8;
/// assert!((p.x0 - 0.8f64.sqrt() * (1.0 - alpha) / 0.5).abs() < 1e-15);
/// assert!((p.x_t - alpha.sqrt() * 0.2 / 0.5).abs() < 1e-15);
/// assert!((p.variance - 0.2 / 0.5 * (1.0 - alpha)).abs() < 1e-15);
/// // From the clean image (abar_prev = 1) the posterior is x_0 itself, exactly.
/// assert_eq!(PosteriorCoefficients::new(0.9, 1.0).variance, 0.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PosteriorCoefficients {
    /// The weight of `x_0` in the mean.
    pub x0: f64,
    /// The weight of `x_t` in the mean.
    pub x_t: f64,
    /// The variance (exactly 0 when `abar_prev` is 1).
    pub variance: f64,
}

impl PosteriorCoefficients {
    /// The posterior from noise level `abar_t` back to the less noisy `abar_prev`.
    pub fn new(abar_t: f64, abar_prev: f64) -> Self {
        let (beta_prod_t, beta_prod_prev) = (1.0 - abar_t, 1.0 - abar_prev);
        let alpha = abar_t / abar_prev;
        let beta = 1.0 - alpha;
        Self {
            x0: abar_prev.sqrt() * beta / beta_prod_t,
            x_t: alpha.sqrt() * beta_prod_prev / beta_prod_t,
            variance: beta_prod_prev / beta_prod_t * beta,
        }
    }
}
