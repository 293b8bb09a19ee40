//! The sample-quality measure: the shipped digit classifier, the Fréchet distance, the report.

use candle_core::Device;
use ddpm_data::ImageSet;
use ddpm_forward::NoiseSource;
use ddpm_trainer::quality::{DigitClassifier, accuracy, evaluate, frechet_distance};
use nalgebra::DMatrix;

#[test]
fn the_shipped_classifier_reads_held_out_digits() {
    let model = DigitClassifier::pretrained(&Device::Cpu).unwrap();
    let digits = ImageSet::embedded_mnist().unwrap();
    // Digits 9000..10000 were held out of its training (see the train_classifier example).
    let held_out = digits.clone().skip(9000);
    let acc = accuracy(&model, &held_out.clone().pad_to(32).unwrap(), &Device::Cpu).unwrap();
    assert!(acc > 0.95, "held-out accuracy {acc}");
    // At 16x16 (the default recipe's size), through the resize-and-pad path.
    let acc16 = accuracy(&model, &held_out.resize_to(16), &Device::Cpu).unwrap();
    assert!(acc16 > 0.85, "16x16 held-out accuracy {acc16}");
}

#[test]
fn frechet_distance_of_known_gaussians() {
    let mut rng = NoiseSource::new(1);
    let n = 4000;
    let a = DMatrix::from_row_slice(
        n,
        3,
        &rng.normal_vec(3 * n)
            .iter()
            .map(|&v| v as f64)
            .collect::<Vec<_>>(),
    );
    let b = DMatrix::from_row_slice(
        n,
        3,
        &rng.normal_vec(3 * n)
            .iter()
            .map(|&v| v as f64)
            .collect::<Vec<_>>(),
    );
    // Same distribution: near 0. Mean shifted by (2, 0, 0): near 4. Scaled by 3: 3 (3 - 1)^2 = 12.
    assert!(
        frechet_distance(&a, &b).abs() < 0.02,
        "{}",
        frechet_distance(&a, &b)
    );
    let shifted = b.map_with_location(|_, j, v| if j == 0 { v + 2.0 } else { v });
    assert!(
        (frechet_distance(&a, &shifted) - 4.0).abs() < 0.15,
        "{}",
        frechet_distance(&a, &shifted)
    );
    let scaled = b.map(|v| 3.0 * v);
    assert!(
        (frechet_distance(&a, &scaled) - 12.0).abs() < 0.6,
        "{}",
        frechet_distance(&a, &scaled)
    );
}

#[test]
fn real_digits_score_far_better_than_noise() {
    let model = DigitClassifier::pretrained(&Device::Cpu).unwrap();
    let digits = ImageSet::embedded_mnist().unwrap().pad_to(32).unwrap();
    let real = digits.clone().take(400);
    let held: Vec<usize> = (5000..5200).collect();
    let samples = digits.batch(&held, &[], &Device::Cpu).unwrap();
    let good = evaluate(&model, &samples, None, &real, &Device::Cpu).unwrap();
    let noise = NoiseSource::new(3)
        .randn((200, 1, 32, 32), &Device::Cpu)
        .unwrap()
        .clamp(-1f32, 1f32)
        .unwrap();
    let bad = evaluate(&model, &noise, None, &real, &Device::Cpu).unwrap();
    assert!(
        good.frechet_distance < 3.0 * good.real_floor.max(1.0),
        "{good:?}"
    );
    assert!(
        bad.frechet_distance > 10.0 * good.frechet_distance,
        "noise {} vs digits {}",
        bad.frechet_distance,
        good.frechet_distance
    );
    assert_eq!(good.classes_present, 10, "{good:?}");
    assert!(good.mean_confidence > 0.9);
    assert_eq!(good.class_agreement, None);
}

#[test]
fn class_agreement_counts_samples_of_the_class_asked_for() {
    let model = DigitClassifier::pretrained(&Device::Cpu).unwrap();
    let digits = ImageSet::embedded_mnist().unwrap().pad_to(32).unwrap();
    let real = digits.clone().take(200);
    let held: Vec<usize> = (5000..5100).collect();
    let samples = digits.batch(&held, &[], &Device::Cpu).unwrap();
    let truth: Vec<u32> = held
        .iter()
        .map(|&i| digits.labels().unwrap()[i] as u32)
        .collect();
    let right = evaluate(&model, &samples, Some(&truth), &real, &Device::Cpu).unwrap();
    // The classifier is right on ~99% of held-out digits.
    let agreement = right.class_agreement.unwrap();
    assert!(agreement > 0.95, "{agreement}");
    // Asking for the next class instead: the same images almost never agree.
    let shifted: Vec<u32> = truth.iter().map(|l| (l + 1) % 10).collect();
    let wrong = evaluate(&model, &samples, Some(&shifted), &real, &Device::Cpu).unwrap();
    assert!(wrong.class_agreement.unwrap() < 0.05, "{wrong:?}");
    // As many labels as samples.
    let err = evaluate(&model, &samples, Some(&truth[..10]), &real, &Device::Cpu).unwrap_err();
    assert!(
        err.to_string().contains("10 labels for 100 samples"),
        "{err}"
    );
}
