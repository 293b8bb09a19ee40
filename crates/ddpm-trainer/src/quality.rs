//! A sample-quality measure for digits that runs inside the project: a small classifier trained
//! on the embedded MNIST digits gives features for a Fréchet distance (FID's recipe with a
//! digit network instead of Inception) and predicted classes for the spread over digits.

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, Optimizer, VarBuilder, VarMap};
use ddpm_data::{Batches, ImageSet};
use nalgebra::{DMatrix, DVector, SymmetricEigen};
use serde::Serialize;

/// The classifier's weights, trained by `cargo run --release -p ddpm-trainer --example
/// train_classifier` on images 0..9000 of the embedded digits (1x32x32, padded).
const WEIGHTS: &[u8] = include_bytes!("../data/classifier/digits-32.safetensors");

/// A small CNN for 1x32x32 digits: three stride-2 convolutions, a 64-wide feature layer, ten
/// logits.
#[derive(Debug, Clone)]
pub struct DigitClassifier {
    convs: [Conv2d; 3],
    features: Linear,
    logits: Linear,
}

impl DigitClassifier {
    /// The architecture, weights from `vb` (`conv0..2`, `features`, `logits`).
    pub fn new(vb: VarBuilder<'_>) -> candle_core::Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        Ok(Self {
            convs: [
                candle_nn::conv2d(1, 16, 3, cfg, vb.pp("conv0"))?,
                candle_nn::conv2d(16, 32, 3, cfg, vb.pp("conv1"))?,
                candle_nn::conv2d(32, 64, 3, cfg, vb.pp("conv2"))?,
            ],
            features: candle_nn::linear(64 * 4 * 4, 64, vb.pp("features"))?,
            logits: candle_nn::linear(64, 10, vb.pp("logits"))?,
        })
    }

    /// The shipped, trained classifier.
    pub fn pretrained(device: &Device) -> candle_core::Result<Self> {
        let tensors = candle_core::safetensors::load_buffer(WEIGHTS, device)?;
        ddpm_unet::build_checked(tensors, device, Self::new)
    }

    /// Features `[B, 64]` and logits `[B, 10]` of digits `[B, 1, H, W]` in `[-1, 1]`; other
    /// sizes than 32x32 go through [`to_classifier_input`].
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let mut h = to_classifier_input(x)?;
        for c in &self.convs {
            h = c.forward(&h)?.relu()?;
        }
        let f = self.features.forward(&h.flatten_from(1)?)?.relu()?;
        let logits = self.logits.forward(&f)?;
        Ok((f, logits))
    }
}

/// Digits of any size as the classifier saw them in training: 32x32 as they are; others
/// scaled (nearest neighbour) to 28x28, MNIST's size, then padded by 2 with background (-1).
pub fn to_classifier_input(x: &Tensor) -> candle_core::Result<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    if c != 1 {
        candle_core::bail!("the digit classifier takes 1-channel images, got {c}");
    }
    if (h, w) == (32, 32) {
        return Ok(x.clone());
    }
    let x = (x.upsample_nearest2d(28, 28)? + 1.0)?;
    x.pad_with_zeros(2, 2, 2)?.pad_with_zeros(3, 2, 2)? - 1.0
}

/// Trains a classifier on `set` (1x32x32 digits with labels) with Adam, from `seed`.
pub fn train_classifier(
    set: ImageSet,
    steps: usize,
    seed: u64,
    device: &Device,
) -> candle_core::Result<(VarMap, DigitClassifier)> {
    let labels = set
        .labels()
        .map(<[u8]>::to_vec)
        .ok_or_else(|| candle_core::Error::Msg("the digits have no labels".into()))?;
    let varmap = VarMap::new();
    let model = DigitClassifier::new(VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    ddpm_unet::init_seeded(&varmap, seed)?;
    let mut order = Batches::new(std::sync::Arc::new(set), 64, seed, false);
    let mut opt = candle_nn::AdamW::new(
        varmap.all_vars(),
        candle_nn::ParamsAdamW {
            lr: 2e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    for _ in 0..steps {
        let (x, ids) = order.next_batch_with_indices(device)?;
        let y: Vec<u32> = ids.iter().map(|&i| labels[i] as u32).collect();
        let y = Tensor::new(y.as_slice(), device)?;
        let (_, logits) = model.forward(&x)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        opt.backward_step(&loss)?;
    }
    Ok((varmap, model))
}

/// Fraction of `set`'s digits the classifier labels correctly.
pub fn accuracy(
    model: &DigitClassifier,
    set: &ImageSet,
    device: &Device,
) -> candle_core::Result<f64> {
    let labels = set
        .labels()
        .ok_or_else(|| candle_core::Error::Msg("the digits have no labels".into()))?;
    let mut correct = 0;
    for start in (0..set.len()).step_by(256) {
        let ids: Vec<usize> = (start..(start + 256).min(set.len())).collect();
        let (_, logits) = model.forward(&set.batch(&ids, &[], device)?)?;
        let pred: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        correct += ids
            .iter()
            .zip(pred)
            .filter(|(i, p)| labels[**i] as u32 == *p)
            .count();
    }
    Ok(correct as f64 / set.len() as f64)
}

/// What the quality measure reports.
#[derive(Debug, Clone, Serialize)]
pub struct QualityReport {
    /// Images compared on each side.
    pub samples: usize,
    /// The Fréchet distance between the classifier features of the samples and of real digits
    /// (lower is better; real against real digits gives the noise floor).
    pub frechet_distance: f64,
    /// The same distance between two disjoint sets of real digits of the same size.
    pub real_floor: f64,
    /// How many samples the classifier puts in each class 0..9.
    pub class_counts: [usize; 10],
    /// Classes with at least 2% of the samples.
    pub classes_present: usize,
    /// The mean top-class probability (confident classifications suggest legible digits).
    pub mean_confidence: f64,
    /// For samples drawn given classes: the fraction the classifier puts in the class asked
    /// for (`null` for unconditional samples).
    pub class_agreement: Option<f64>,
}

fn features(
    model: &DigitClassifier,
    x: &Tensor,
) -> candle_core::Result<(DMatrix<f64>, Vec<u32>, f64)> {
    let mut rows = Vec::new();
    let mut classes = Vec::new();
    let mut confidence = 0.0;
    let n = x.dim(0)?;
    for start in (0..n).step_by(256) {
        let len = 256.min(n - start);
        let (f, logits) = model.forward(&x.narrow(0, start, len)?)?;
        rows.extend(f.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?);
        classes.extend(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
        let p = candle_nn::ops::softmax(&logits, D::Minus1)?.max(D::Minus1)?;
        confidence += p.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let d = rows.len() / n.max(1);
    Ok((
        DMatrix::from_row_slice(n, d, &rows),
        classes,
        confidence / n as f64,
    ))
}

/// The Fréchet distance between Gaussians fitted to the rows of `a` and `b`:
/// `|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`.
pub fn frechet_distance(a: &DMatrix<f64>, b: &DMatrix<f64>) -> f64 {
    let stats = |m: &DMatrix<f64>| {
        let n = m.nrows() as f64;
        let mean: DVector<f64> = m.row_mean().transpose();
        let centred = m - DMatrix::from_fn(m.nrows(), m.ncols(), |_, j| mean[j]);
        let cov = centred.transpose() * &centred / (n - 1.0).max(1.0);
        (mean, cov)
    };
    let sqrt_psd = |m: DMatrix<f64>| {
        let e = SymmetricEigen::new((&m + m.transpose()) * 0.5);
        let d = DMatrix::from_diagonal(&e.eigenvalues.map(|v| v.max(0.0).sqrt()));
        &e.eigenvectors * d * e.eigenvectors.transpose()
    };
    let (ma, sa) = stats(a);
    let (mb, sb) = stats(b);
    let ra = sqrt_psd(sa.clone());
    let covmean = sqrt_psd(&ra * &sb * &ra);
    (ma - mb).norm_squared() + sa.trace() + sb.trace() - 2.0 * covmean.trace()
}

/// Compares generated digits `[N, 1, 32, 32]` in `[-1, 1]` with `N` real ones from `real`
/// (and two disjoint real sets with each other, for the floor). `labels`, for samples drawn
/// given classes, are the `N` classes asked for.
pub fn evaluate(
    model: &DigitClassifier,
    samples: &Tensor,
    labels: Option<&[u32]>,
    real: &ImageSet,
    device: &Device,
) -> candle_core::Result<QualityReport> {
    let n = samples.dim(0)?;
    if let Some(l) = labels
        && l.len() != n
    {
        candle_core::bail!("{} labels for {n} samples", l.len());
    }
    if real.len() < 2 * n {
        candle_core::bail!(
            "need {} real digits to compare {n} samples, have {}",
            2 * n,
            real.len()
        );
    }
    let (fs, classes, mean_confidence) = features(model, samples)?;
    let real_a = real.batch(&(0..n).collect::<Vec<_>>(), &[], device)?;
    let real_b = real.batch(&(n..2 * n).collect::<Vec<_>>(), &[], device)?;
    let (fa, _, _) = features(model, &real_a)?;
    let (fb, _, _) = features(model, &real_b)?;
    let mut class_counts = [0usize; 10];
    for &c in &classes {
        class_counts[c as usize] += 1;
    }
    let class_agreement = labels.map(|l| {
        let agree = l.iter().zip(&classes).filter(|(a, b)| a == b).count();
        agree as f64 / n.max(1) as f64
    });
    Ok(QualityReport {
        samples: n,
        frechet_distance: frechet_distance(&fs, &fa),
        real_floor: frechet_distance(&fb, &fa),
        classes_present: class_counts
            .iter()
            .filter(|&&c| c as f64 >= 0.02 * n as f64)
            .count(),
        class_counts,
        mean_confidence,
        class_agreement,
    })
}

/// Scores generated digits `[N, 1, H, W]` in `[-1, 1]` on any device with the shipped
/// classifier ([`DigitClassifier::pretrained`]) against the first `2 N` digits of `real`,
/// on the CPU (see [`evaluate`]).
pub fn score_digits(
    samples: &Tensor,
    labels: Option<&[u32]>,
    real: &ImageSet,
) -> candle_core::Result<QualityReport> {
    let model = DigitClassifier::pretrained(&Device::Cpu)?;
    evaluate(
        &model,
        &samples.to_device(&Device::Cpu)?,
        labels,
        real,
        &Device::Cpu,
    )
}

/// One line: `quality (digit classifier, N samples): Frechet distance ...`.
impl std::fmt::Display for QualityReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "quality (digit classifier, {} samples): Frechet distance {:.2} (real digits: {:.2}), {} of 10 classes present, mean confidence {:.2}, class counts {:?}",
            self.samples,
            self.frechet_distance,
            self.real_floor,
            self.classes_present,
            self.mean_confidence,
            self.class_counts
        )?;
        if let Some(a) = self.class_agreement {
            write!(f, ", {:.1}% of the class asked for", 100.0 * a)?;
        }
        Ok(())
    }
}
