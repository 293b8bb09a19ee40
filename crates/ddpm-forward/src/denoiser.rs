//! What a sampler calls: a model that predicts from a noisy batch and its timesteps.

use candle_core::Tensor;

/// Anything that predicts from a noisy batch `x_t` `[B, C, H, W]` and its timesteps `t` `[B]`
/// (`u32`): a U-Net, your own model, or a closure `Fn(&Tensor, &Tensor) -> Result<Tensor>`.
///
/// The prediction is whatever the model was trained for ([`crate::Prediction`]: the noise,
/// `x_0` or the velocity); the sampler is told which. This trait is all a sampler knows of a
/// model, so `ddpm-sampler` works with any network, not only `ddpm-unet`'s.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use ddpm_forward::Denoiser;
///
/// struct Zero;
/// impl Denoiser for Zero {
///     fn predict(&self, x_t: &Tensor, _t: &Tensor) -> candle_core::Result<Tensor> {
///         x_t.zeros_like()
///     }
/// }
///
/// # fn main() -> candle_core::Result<()> {
/// let x = Tensor::ones((2, 1, 4, 4), candle_core::DType::F32, &Device::Cpu)?;
/// let t = Tensor::new(&[5u32, 9], &Device::Cpu)?;
/// assert_eq!(Zero.predict(&x, &t)?.sum_all()?.to_scalar::<f32>()?, 0.0);
/// // A closure is a model too.
/// let halve = |x: &Tensor, _t: &Tensor| x / 2.0;
/// assert_eq!(halve.predict(&x, &t)?.sum_all()?.to_scalar::<f32>()?, 16.0);
/// # Ok(())
/// # }
/// ```
pub trait Denoiser {
    /// The prediction (noise, `x_0` or velocity, as the model was trained), shaped like `x_t`.
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> candle_core::Result<Tensor>;
}

impl<F> Denoiser for F
where
    F: Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
{
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        self(x_t, t)
    }
}
