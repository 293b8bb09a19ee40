//! A seeded noise source whose numbers do not depend on the device or the thread count.

use candle_core::{Device, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

/// Seeded random numbers for diffusion: standard normal noise and uniform timesteps.
///
/// Numbers are drawn on the host from ChaCha20 (one stream, one thread) and uploaded, so a seed
/// gives the same tensors on a CPU or a GPU and under any `RAYON_NUM_THREADS`. The position in
/// the stream can be saved ([`NoiseSource::state`]) and restored ([`NoiseSource::from_state`]):
/// a restored source continues exactly where the saved one stood.
#[derive(Debug, Clone)]
pub struct NoiseSource {
    rng: ChaCha20Rng,
}

/// The complete state of a [`NoiseSource`]: seed, stream and position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoiseState {
    /// The 256-bit ChaCha key.
    pub key: [u8; 32],
    /// The ChaCha stream number.
    pub stream: u64,
    /// How many 32-bit words of the stream have been used.
    pub word_pos: u128,
}

impl NoiseSource {
    /// A source seeded from a `u64`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha20Rng::seed_from_u64(seed),
        }
    }

    /// A source seeded from `seed`, on an independent `stream`: use different streams for
    /// different purposes (noise, data order) from one user seed.
    pub fn with_stream(seed: u64, stream: u64) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        Self { rng }
    }

    /// The state to save.
    pub fn state(&self) -> NoiseState {
        NoiseState {
            key: self.rng.get_seed(),
            stream: self.rng.get_stream(),
            word_pos: self.rng.get_word_pos(),
        }
    }

    /// A source that continues exactly where the one that gave `state` stood.
    pub fn from_state(state: &NoiseState) -> Self {
        let mut rng = ChaCha20Rng::from_seed(state.key);
        rng.set_stream(state.stream);
        rng.set_word_pos(state.word_pos);
        Self { rng }
    }

    /// `n` standard normal `f32` values.
    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.rng.sample(StandardNormal)).collect()
    }

    /// A standard normal `f32` tensor of `shape` on `device`.
    pub fn randn<S: Into<Shape>>(
        &mut self,
        shape: S,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let shape = shape.into();
        let values = self.normal_vec(shape.elem_count());
        Tensor::from_vec(values, shape, device)
    }

    /// `batch` timesteps drawn uniformly from `0..num_train_timesteps`, a `[batch]` `u32` tensor.
    pub fn timesteps(
        &mut self,
        batch: usize,
        num_train_timesteps: usize,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        if num_train_timesteps == 0 || num_train_timesteps > u32::MAX as usize {
            candle_core::bail!(
                "num_train_timesteps {num_train_timesteps} out of range 1..=u32::MAX"
            );
        }
        let t: Vec<u32> = (0..batch)
            .map(|_| self.rng.random_range(0..num_train_timesteps as u32))
            .collect();
        Tensor::from_vec(t, batch, device)
    }

    /// A uniform `f64` in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        self.rng.random()
    }

    /// A uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.rng.random_range(0..n)
    }

    /// The underlying generator, for anything else a caller needs to draw reproducibly.
    pub fn rng(&mut self) -> &mut ChaCha20Rng {
        &mut self.rng
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bits_other_seed_other_bits() {
        let a = NoiseSource::new(1).normal_vec(1000);
        let b = NoiseSource::new(1).normal_vec(1000);
        let c = NoiseSource::new(2).normal_vec(1000);
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert!(a.iter().zip(&c).filter(|(x, y)| x != y).count() > 990);
        let s = NoiseSource::with_stream(1, 1).normal_vec(1000);
        assert!(a.iter().zip(&s).filter(|(x, y)| x != y).count() > 990);
    }

    #[test]
    fn normal_moments() {
        let v = NoiseSource::new(3).normal_vec(200_000);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        // Standard errors: 1/sqrt(n) = 0.0022 for the mean, ~0.0032 for the variance.
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.015, "variance {var}");
    }

    #[test]
    fn restored_state_continues_exactly() {
        let mut a = NoiseSource::with_stream(9, 4);
        a.normal_vec(37); // An odd count, to stop mid-block.
        a.below(10);
        let saved = a.state();
        let json = serde_json::to_string(&saved).unwrap();
        let mut b = NoiseSource::from_state(&serde_json::from_str(&json).unwrap());
        assert_eq!(a.normal_vec(100), b.normal_vec(100));
        assert_eq!(a.below(1000), b.below(1000));
    }

    #[test]
    fn timesteps_cover_the_range_and_nothing_else() {
        let t: Vec<u32> = NoiseSource::new(5)
            .timesteps(5000, 10, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut counts = [0usize; 10];
        for v in t {
            counts[v as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 400), "{counts:?}");
        assert!(NoiseSource::new(5).timesteps(1, 0, &Device::Cpu).is_err());
    }
}
