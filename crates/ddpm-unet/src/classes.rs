//! Class-conditional models: which labels are classes, which one means "no class", and
//! classifier-free guidance.

use candle_core::{Device, Tensor};

use crate::{Denoiser, Mode, Unet};

/// The classes of a class-conditional model (`num_class_embeds` embeddings), and whether its
/// last embedding is the "no class" label.
///
/// This is the one place the rule lives. A model trained with label dropout (classifier-free
/// guidance; `class_dropout` in `ddpm-trainer`) keeps its last embedding,
/// `num_class_embeds - 1`, for "no class": its images are trained as that label one time in
/// `1 / class_dropout`, and guidance predicts with it for the unconditional half. Such a model
/// draws classes `0..num_class_embeds - 1`; one without a "no class" label draws all of them.
///
/// ```
/// use ddpm_unet::Classes;
///
/// # fn main() -> candle_core::Result<()> {
/// let digits = Classes::new(11, true)?; // ten digits and "no class"
/// assert_eq!((digits.count(), digits.null_label()), (10, Some(10)));
/// assert!(digits.check(9).is_ok());
/// assert!(digits.check(10).is_err()); // "no class" is not a class to draw
/// assert_eq!(digits.cycle(12), vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]);
///
/// // A model of unknown training (a diffusers folder) has a "no class" label exactly when
/// // it is asked to guide.
/// assert_eq!(Classes::assumed(11, 1.5)?.null_label(), Some(10));
/// assert_eq!(Classes::assumed(11, 1.0)?.null_label(), None);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classes {
    num_class_embeds: usize,
    null_class: bool,
}

impl Classes {
    /// `num_class_embeds` embeddings, the last one "no class" when `null_class`.
    pub fn new(num_class_embeds: usize, null_class: bool) -> candle_core::Result<Self> {
        if num_class_embeds == 0 {
            candle_core::bail!("num_class_embeds must be at least 1, got 0");
        }
        if null_class && num_class_embeds < 2 {
            candle_core::bail!(
                "a \"no class\" label needs a class besides it: num_class_embeds is {num_class_embeds}"
            );
        }
        Ok(Self {
            num_class_embeds,
            null_class,
        })
    }

    /// The classes of a model whose training is not known (a diffusers folder without a
    /// training config): its last embedding is taken as "no class" exactly when it is asked to
    /// guide (`guidance_scale` other than 1), since guidance needs one.
    pub fn assumed(num_class_embeds: usize, guidance_scale: f64) -> candle_core::Result<Self> {
        Self::new(num_class_embeds, guidance_scale != 1.0)
    }

    /// The model's `num_class_embeds`.
    pub fn num_class_embeds(&self) -> usize {
        self.num_class_embeds
    }

    /// The number of real classes (labels `0..count`).
    pub fn count(&self) -> usize {
        self.num_class_embeds - usize::from(self.null_class)
    }

    /// The "no class" label, if the model has one.
    pub fn null_label(&self) -> Option<u32> {
        self.null_class.then(|| (self.num_class_embeds - 1) as u32)
    }

    /// An error naming `label` unless it is a real class.
    pub fn check(&self, label: u32) -> candle_core::Result<()> {
        if (label as usize) < self.count() {
            return Ok(());
        }
        let null = match self.null_label() {
            Some(n) => format!(" (class {n} is the \"no class\" label of guidance)"),
            None => String::new(),
        };
        candle_core::bail!("class {label} out of range 0..{}{null}", self.count())
    }

    /// `count` labels taking the classes in turn (`i % classes`), so a grid as wide as the
    /// number of classes shows one class per column.
    pub fn cycle(&self, count: usize) -> Vec<u32> {
        (0..count).map(|i| (i % self.count()) as u32).collect()
    }
}

/// A class-conditional U-Net as a [`Denoiser`] for one batch of class labels, with
/// classifier-free guidance (Ho and Salimans 2022):
/// `prediction = uncond + scale (cond - uncond)`, where `uncond` is the prediction for the
/// "no class" label.
///
/// The "no class" label is the one [`Classes`] names. A scale of 1 is plain conditional
/// sampling (one forward pass per step); any other scale runs the conditional and
/// unconditional predictions as one batch of twice the size. Guidance is linear in the
/// model's output, so it applies the same way to an eps, `x_0` or v prediction.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use ddpm_unet::{init_seeded, Classes, Denoiser, Guided, Mode, Unet, UnetConfig};
///
/// # fn main() -> candle_core::Result<()> {
/// let device = Device::Cpu;
/// // The ten digits and "no class".
/// let config = UnetConfig::preset("mnist-16-classes")?;
/// let varmap = VarMap::new();
/// let unet = Unet::new(&config, VarBuilder::from_varmap(&varmap, DType::F32, &device))?;
/// init_seeded(&varmap, 0)?;
///
/// let x = Tensor::zeros((3, 1, 16, 16), DType::F32, &device)?;
/// let t = Tensor::new(&[500u32], &device)?; // one timestep for the batch
/// let classes = Classes::new(11, true)?;
/// // A 3, a 5 and a 7, guided with scale 1.5: pass it to `ddpm_sampler::sample`.
/// let guided = Guided::new(&unet, classes, &[3, 5, 7], 1.5, &device)?;
/// let eps = guided.predict(&x, &t)?;
///
/// // The same by hand.
/// let predict = |labels: &[u32]| {
///     unet.forward_with_labels(&x, &t, Some(&Tensor::new(labels, &device)?), Mode::Eval)
/// };
/// let (cond, uncond) = (predict(&[3, 5, 7])?, predict(&[10, 10, 10])?);
/// let by_hand = (&uncond + ((cond - &uncond)? * 1.5)?)?;
/// let diff = (eps - by_hand)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-5, "{diff}");
///
/// // Class 10 is "no class", not a digit to draw.
/// assert!(Guided::new(&unet, classes, &[10], 1.5, &device).is_err());
/// // Guidance needs a "no class" label.
/// assert!(Guided::new(&unet, Classes::new(11, false)?, &[3], 1.5, &device).is_err());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Guided<'a> {
    unet: &'a Unet,
    labels: Tensor,
    /// The labels of the doubled batch (`labels`, then "no class" for each) when guided.
    doubled: Option<Tensor>,
    scale: f64,
}

impl<'a> Guided<'a> {
    /// `labels` are the classes of the batch's images, in order, each a real class of
    /// `classes`; a `scale` other than 1 needs `classes` to have a "no class" label.
    pub fn new(
        unet: &'a Unet,
        classes: Classes,
        labels: &[u32],
        scale: f64,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let Some(n) = unet.num_class_embeds() else {
            candle_core::bail!("the model is unconditional: it cannot sample given classes");
        };
        if n != classes.num_class_embeds() {
            candle_core::bail!(
                "the model has {n} class embeddings, the classes given are of {}",
                classes.num_class_embeds()
            );
        }
        if !scale.is_finite() {
            candle_core::bail!("guidance scale must be finite, got {scale}");
        }
        let null = match (scale != 1.0, classes.null_label()) {
            (false, _) => None,
            (true, Some(null)) => Some(null),
            (true, None) => candle_core::bail!(
                "guidance scale {scale} needs a \"no class\" label, and these {n} class embeddings have none"
            ),
        };
        for &label in labels {
            classes.check(label)?;
        }
        let tensor = Tensor::new(labels, device)?;
        let doubled = match null {
            Some(null) => Some(Tensor::cat(
                &[&tensor, &Tensor::new(vec![null; labels.len()], device)?],
                0,
            )?),
            None => None,
        };
        Ok(Self {
            unet,
            labels: tensor,
            doubled,
            scale,
        })
    }

    /// The guidance scale.
    pub fn scale(&self) -> f64 {
        self.scale
    }
}

impl Denoiser for Guided<'_> {
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        let Some(doubled) = &self.doubled else {
            return self
                .unet
                .forward_with_labels(x_t, t, Some(&self.labels), Mode::Eval);
        };
        let b = x_t.dim(0)?;
        let t = crate::unet2d::per_sample(t, b, "timesteps")?;
        let x2 = Tensor::cat(&[x_t, x_t], 0)?;
        let t2 = Tensor::cat(&[&t, &t], 0)?;
        let out = self
            .unet
            .forward_with_labels(&x2, &t2, Some(doubled), Mode::Eval)?;
        let (cond, uncond) = (out.narrow(0, 0, b)?, out.narrow(0, b, b)?);
        &uncond + ((cond - &uncond)? * self.scale)?
    }
}
