//! Your own model with our sampler: anything that implements `Denoiser` samples, no ddpm-unet.
use candle_core::{Device, Result, Tensor};
use ddpm_sampler::{DdimConfig, DdimSampler, Denoiser, sample};
use ddpm_schedule::{Schedule, ScheduleConfig};
struct MyModel; // your network: predicts the noise in x_t at timesteps t
impl Denoiser for MyModel {
    fn predict(&self, x_t: &Tensor, _t: &Tensor) -> Result<Tensor> {
        x_t * 0.5
    }
}

fn main() -> Result<()> {
    let schedule = Schedule::new(ScheduleConfig::ddpm_linear())?;
    let ddim = DdimSampler::new(&schedule, DdimConfig::new(20, 0.0))?;
    let mut rng = ddpm_forward::NoiseSource::new(0);
    let x_t = rng.randn((4, 3, 32, 32), &Device::Cpu)?;
    let images = sample(&MyModel, &ddim, x_t, &mut rng, |_| {})?;
    println!("sampled {:?}", images.dims());
    Ok(())
}
