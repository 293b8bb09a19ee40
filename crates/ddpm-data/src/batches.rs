//! Deterministic shuffled batches with a restorable position.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use ddpm_forward::NoiseSource;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::ImageSet;

/// Where a [`Batches`] stands: the epoch and the next index into that epoch's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DataPosition {
    /// Completed passes over the data.
    pub epoch: u64,
    /// The next position in this epoch's shuffled order.
    pub index: usize,
}

/// An endless stream of batches: each epoch visits every image once in an order that depends on
/// the seed and the epoch alone; batches run on across epoch boundaries.
#[derive(Debug, Clone)]
pub struct Batches {
    set: Arc<ImageSet>,
    batch_size: usize,
    seed: u64,
    flip: bool,
    position: DataPosition,
    order: Vec<usize>,
    flips: Vec<bool>,
}

impl Batches {
    /// Batches of `batch_size` from `set`, shuffled from `seed`, with random horizontal flips
    /// when `flip` is set.
    pub fn new(set: Arc<ImageSet>, batch_size: usize, seed: u64, flip: bool) -> Self {
        let mut b = Self {
            set,
            batch_size: batch_size.max(1),
            seed,
            flip,
            position: DataPosition::default(),
            order: Vec::new(),
            flips: Vec::new(),
        };
        b.shuffle();
        b
    }

    /// The same stream, continued from `position`.
    pub fn with_position(mut self, position: DataPosition) -> Self {
        self.position = position;
        self.shuffle();
        self
    }

    /// Where the stream stands (save this with a checkpoint).
    pub fn position(&self) -> DataPosition {
        self.position
    }

    /// The dataset.
    pub fn set(&self) -> &ImageSet {
        &self.set
    }

    /// The batch size.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// This epoch's order and flips: a function of (seed, epoch) only. Streams 1 + 2e and
    /// 2 + 2e of the seed keep them apart from each other and from training noise (stream 0).
    fn shuffle(&mut self) {
        let e = self.position.epoch;
        let mut order: Vec<usize> = (0..self.set.len()).collect();
        let mut rng = NoiseSource::with_stream(self.seed, 1 + 2 * e);
        order.shuffle(rng.rng());
        let mut flip_rng = NoiseSource::with_stream(self.seed, 2 + 2 * e);
        self.flips = (0..order.len())
            .map(|_| self.flip && flip_rng.below(2) == 1)
            .collect();
        self.order = order;
    }

    /// The next batch, `[B, C, H, W]` in `[-1, 1]`.
    pub fn next_batch(&mut self, device: &Device) -> candle_core::Result<Tensor> {
        Ok(self.next_batch_with_indices(device)?.0)
    }

    /// The next batch and the dataset index of each of its images (to look up labels).
    pub fn next_batch_with_indices(
        &mut self,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Vec<usize>)> {
        if self.set.is_empty() {
            candle_core::bail!("the dataset is empty");
        }
        let mut indices = Vec::with_capacity(self.batch_size);
        let mut flips = Vec::with_capacity(self.batch_size);
        while indices.len() < self.batch_size {
            if self.position.index >= self.order.len() {
                self.position = DataPosition {
                    epoch: self.position.epoch + 1,
                    index: 0,
                };
                self.shuffle();
            }
            indices.push(self.order[self.position.index]);
            flips.push(self.flips[self.position.index]);
            self.position.index += 1;
        }
        let batch = self.set.batch(&indices, &flips, device)?;
        Ok((batch, indices))
    }
}
