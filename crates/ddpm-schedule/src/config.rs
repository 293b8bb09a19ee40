//! Schedule configuration: which betas, how many steps, and the named presets.

use serde::{Deserialize, Serialize};

/// The most training timesteps a schedule may have (diffusers' models use 1000 to 4000); more
/// is refused before the tables are allocated.
pub const MAX_TIMESTEPS: usize = 1_000_000;

/// Why a schedule could not be built. Every variant names the value at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ScheduleError {
    /// `num_train_timesteps` was zero.
    #[error("num_train_timesteps must be at least 1, got 0")]
    ZeroTimesteps,
    /// `num_train_timesteps` is more than [`MAX_TIMESTEPS`].
    #[error("num_train_timesteps must be at most {MAX_TIMESTEPS}, got {0}")]
    TooManyTimesteps(usize),
    /// A schedule parameter is outside its allowed range.
    #[error("{name} must be in {range}, got {value}")]
    ParameterOutOfRange {
        /// The parameter, e.g. `beta_start`.
        name: &'static str,
        /// The value given.
        value: f64,
        /// The allowed range, written out.
        range: &'static str,
    },
    /// `beta_start` is greater than `beta_end`.
    #[error("beta_start ({start}) must not exceed beta_end ({end})")]
    StartAfterEnd {
        /// The given `beta_start`.
        start: f64,
        /// The given `beta_end`.
        end: f64,
    },
    /// The schedule produced a beta outside (0, 1), e.g. a linear schedule rescaled to few steps.
    #[error("beta at timestep {t} is {value}, outside (0, 1)")]
    BetaOutOfRange {
        /// The timestep (0-based).
        t: usize,
        /// The beta computed there.
        value: f64,
    },
    /// A preset name that does not exist.
    #[error("unknown schedule preset {name:?} (known: {known})")]
    UnknownPreset {
        /// The name asked for.
        name: String,
        /// The known names, comma separated.
        known: String,
    },
}

/// A schedule error where candle's is expected (`?` in a function returning
/// `candle_core::Result`), kept whole as the error's source.
impl From<ScheduleError> for candle_core::Error {
    fn from(e: ScheduleError) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// How the betas `beta_0..beta_{T-1}` are laid out over the `T` training timesteps.
///
/// Serialized with a `kind` tag, e.g. `{"kind": "linear", "beta_start": 0.0001, "beta_end": 0.02}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BetaSchedule {
    /// Evenly spaced betas (DDPM, section 4; diffusers `linear`).
    Linear {
        /// The first beta.
        beta_start: f64,
        /// The last beta.
        beta_end: f64,
        /// improved-diffusion's `get_named_beta_schedule("linear", T)`: multiply both ends by
        /// `1000 / T`, so that schedules with fewer steps keep the same total noise.
        #[serde(default)]
        scale_to_1000_steps: bool,
    },
    /// Evenly spaced square roots of beta, then squared (diffusers `scaled_linear`, latent
    /// diffusion and Stable Diffusion).
    ScaledLinear {
        /// The first beta.
        beta_start: f64,
        /// The last beta.
        beta_end: f64,
    },
    /// The cosine schedule of improved DDPM (Nichol and Dhariwal 2021, eq. 17; diffusers
    /// `squaredcos_cap_v2`): `abar(t) = cos^2((t/T + 0.008) / 1.008 * pi/2)`,
    /// `beta_t = min(1 - abar((t+1)/T) / abar(t/T), max_beta)`.
    Cosine {
        /// The cap on each beta (diffusers uses 0.999).
        max_beta: f64,
    },
    /// A sigmoid over `linspace(-6, 6, T)`, scaled to `[beta_start, beta_end]` (diffusers `sigmoid`).
    Sigmoid {
        /// The lower asymptote.
        beta_start: f64,
        /// The upper asymptote.
        beta_end: f64,
    },
}

/// The `beta_schedule` names of diffusers' schedulers that [`BetaSchedule::from_diffusers`]
/// takes.
pub const DIFFUSERS_BETA_SCHEDULES: [&str; 4] =
    ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"];

impl BetaSchedule {
    /// The schedule diffusers' schedulers build from `beta_schedule`, `beta_start` and
    /// `beta_end` (the cosine one ignores both ends and caps betas at 0.999, as diffusers does);
    /// `None` for a name diffusers does not have (see [`DIFFUSERS_BETA_SCHEDULES`]).
    pub fn from_diffusers(name: &str, beta_start: f64, beta_end: f64) -> Option<Self> {
        Some(match name {
            "linear" => Self::Linear {
                beta_start,
                beta_end,
                scale_to_1000_steps: false,
            },
            "scaled_linear" => Self::ScaledLinear {
                beta_start,
                beta_end,
            },
            "squaredcos_cap_v2" => Self::Cosine { max_beta: 0.999 },
            "sigmoid" => Self::Sigmoid {
                beta_start,
                beta_end,
            },
            _ => return None,
        })
    }

    /// The diffusers `(beta_schedule, beta_start, beta_end)` that [`BetaSchedule::from_diffusers`]
    /// turns back into this schedule; `None` where diffusers has no equivalent (a linear schedule
    /// scaled to 1000 steps, a cosine one capped other than at 0.999).
    pub fn to_diffusers(&self) -> Option<(&'static str, f64, f64)> {
        match *self {
            Self::Linear {
                scale_to_1000_steps: true,
                ..
            } => None,
            Self::Linear {
                beta_start,
                beta_end,
                ..
            } => Some(("linear", beta_start, beta_end)),
            Self::ScaledLinear {
                beta_start,
                beta_end,
            } => Some(("scaled_linear", beta_start, beta_end)),
            Self::Sigmoid {
                beta_start,
                beta_end,
            } => Some(("sigmoid", beta_start, beta_end)),
            // diffusers' defaults for the ends it ignores.
            Self::Cosine { max_beta: 0.999 } => Some(("squaredcos_cap_v2", 1e-4, 0.02)),
            Self::Cosine { .. } => None,
        }
    }
}

/// A complete, serializable description of a noise schedule.
///
/// Build one from a preset ([`ScheduleConfig::seed_linear`], [`ScheduleConfig::ddpm_linear`],
/// [`ScheduleConfig::cosine`], [`ScheduleConfig::preset`]) and adjust fields as needed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// The number of diffusion steps `T` the model is trained with.
    pub num_train_timesteps: usize,
    /// How the betas are laid out.
    pub beta_schedule: BetaSchedule,
    /// Rescale the betas so the final step has zero SNR (Lin et al. 2023, algorithm 1; diffusers
    /// `rescale_betas_zero_snr`). The last `abar` becomes exactly 0 and the last beta exactly 1.
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

/// The preset names [`ScheduleConfig::preset`] accepts.
pub const PRESETS: [&str; 5] = [
    "seed-linear",
    "ddpm-linear",
    "cosine",
    "scaled-linear",
    "sigmoid",
];

impl ScheduleConfig {
    /// The seed tutorial's schedule: linear betas 1e-4..0.02 over T = 300.
    pub fn seed_linear() -> Self {
        Self::linear(300, 1e-4, 0.02)
    }

    /// The DDPM paper's schedule (and `google/ddpm-cifar10-32`'s): linear 1e-4..0.02 over T = 1000.
    pub fn ddpm_linear() -> Self {
        Self::linear(1000, 1e-4, 0.02)
    }

    /// Linear betas from `beta_start` to `beta_end` over `num_train_timesteps`.
    pub fn linear(num_train_timesteps: usize, beta_start: f64, beta_end: f64) -> Self {
        Self {
            num_train_timesteps,
            beta_schedule: BetaSchedule::Linear {
                beta_start,
                beta_end,
                scale_to_1000_steps: false,
            },
            rescale_betas_zero_snr: false,
        }
    }

    /// The improved-DDPM cosine schedule over `num_train_timesteps`, betas capped at 0.999.
    pub fn cosine(num_train_timesteps: usize) -> Self {
        Self {
            num_train_timesteps,
            beta_schedule: BetaSchedule::Cosine { max_beta: 0.999 },
            rescale_betas_zero_snr: false,
        }
    }

    /// Latent diffusion's scaled-linear schedule: sqrt-spaced 0.00085..0.012 over T = 1000.
    pub fn scaled_linear() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_schedule: BetaSchedule::ScaledLinear {
                beta_start: 0.00085,
                beta_end: 0.012,
            },
            rescale_betas_zero_snr: false,
        }
    }

    /// A sigmoid schedule 1e-4..0.02 over T = 1000.
    pub fn sigmoid() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_schedule: BetaSchedule::Sigmoid {
                beta_start: 1e-4,
                beta_end: 0.02,
            },
            rescale_betas_zero_snr: false,
        }
    }

    /// A preset by name: one of [`PRESETS`]. `cosine` has T = 1000.
    pub fn preset(name: &str) -> Result<Self, ScheduleError> {
        match name {
            "seed-linear" => Ok(Self::seed_linear()),
            "ddpm-linear" => Ok(Self::ddpm_linear()),
            "cosine" => Ok(Self::cosine(1000)),
            "scaled-linear" => Ok(Self::scaled_linear()),
            "sigmoid" => Ok(Self::sigmoid()),
            _ => Err(ScheduleError::UnknownPreset {
                name: name.to_string(),
                known: PRESETS.join(", "),
            }),
        }
    }

    /// Checks the parameters, before any betas are computed.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        if self.num_train_timesteps == 0 {
            return Err(ScheduleError::ZeroTimesteps);
        }
        if self.num_train_timesteps > MAX_TIMESTEPS {
            return Err(ScheduleError::TooManyTimesteps(self.num_train_timesteps));
        }
        match self.beta_schedule {
            BetaSchedule::Linear {
                beta_start,
                beta_end,
                ..
            }
            | BetaSchedule::ScaledLinear {
                beta_start,
                beta_end,
            }
            | BetaSchedule::Sigmoid {
                beta_start,
                beta_end,
            } => {
                open_unit("beta_start", beta_start)?;
                open_unit("beta_end", beta_end)?;
                if beta_start > beta_end {
                    return Err(ScheduleError::StartAfterEnd {
                        start: beta_start,
                        end: beta_end,
                    });
                }
            }
            BetaSchedule::Cosine { max_beta } => {
                if !(max_beta > 0.0 && max_beta < 1.0) {
                    return Err(ScheduleError::ParameterOutOfRange {
                        name: "max_beta",
                        value: max_beta,
                        range: "(0, 1)",
                    });
                }
            }
        }
        Ok(())
    }

    /// The betas, in `f64`, following diffusers' `DDPMScheduler.__init__`.
    pub(crate) fn betas(&self) -> Result<Vec<f64>, ScheduleError> {
        self.validate()?;
        let n = self.num_train_timesteps;
        let mut betas = match self.beta_schedule {
            BetaSchedule::Linear {
                beta_start,
                beta_end,
                scale_to_1000_steps,
            } => {
                let scale = if scale_to_1000_steps {
                    1000.0 / n as f64
                } else {
                    1.0
                };
                linspace(scale * beta_start, scale * beta_end, n)
            }
            BetaSchedule::ScaledLinear {
                beta_start,
                beta_end,
            } => linspace(beta_start.sqrt(), beta_end.sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            BetaSchedule::Cosine { max_beta } => {
                // Floating-point division throughout: an integer `t / T` here gives all-zero
                // betas, a bug other ports have.
                let abar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let t1 = i as f64 / n as f64;
                        let t2 = (i + 1) as f64 / n as f64;
                        (1.0 - abar(t2) / abar(t1)).min(max_beta)
                    })
                    .collect()
            }
            BetaSchedule::Sigmoid {
                beta_start,
                beta_end,
            } => linspace(-6.0, 6.0, n)
                .into_iter()
                .map(|x| 1.0 / (1.0 + (-x).exp()) * (beta_end - beta_start) + beta_start)
                .collect(),
        };
        if self.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        for (t, &b) in betas.iter().enumerate() {
            let last_of_zero_snr = self.rescale_betas_zero_snr && t + 1 == n;
            let ok = b > 0.0 && (b < 1.0 || (last_of_zero_snr && b <= 1.0));
            if !ok {
                return Err(ScheduleError::BetaOutOfRange { t, value: b });
            }
        }
        Ok(betas)
    }
}

fn open_unit(name: &'static str, value: f64) -> Result<(), ScheduleError> {
    if value > 0.0 && value < 1.0 {
        Ok(())
    } else {
        Err(ScheduleError::ParameterOutOfRange {
            name,
            value,
            range: "(0, 1)",
        })
    }
}

/// `n` evenly spaced values from `start` to `end` inclusive (`torch.linspace`).
fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    (0..n)
        .map(|i| {
            // Like torch, fill the second half from the end so both endpoints are exact.
            if i < n / 2 {
                start + step * i as f64
            } else {
                end - step * (n - 1 - i) as f64
            }
        })
        .collect()
}

/// Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", algorithm 1:
/// shift and scale `sqrt(abar)` so the last one is 0 and the first is unchanged.
fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let mut abar = 1.0;
    let mut sqrt_abar: Vec<f64> = betas
        .iter()
        .map(|b| {
            abar *= 1.0 - b;
            abar.sqrt()
        })
        .collect();
    let first = sqrt_abar[0];
    let last = sqrt_abar[sqrt_abar.len() - 1];
    for s in &mut sqrt_abar {
        *s = (*s - last) * first / (first - last);
    }
    let abar: Vec<f64> = sqrt_abar.iter().map(|s| s * s).collect();
    let mut out = Vec::with_capacity(abar.len());
    out.push(1.0 - abar[0]);
    for w in abar.windows(2) {
        out.push(1.0 - w[1] / w[0]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_err(cfg: ScheduleConfig, needle: &str) {
        let err = cfg.betas().unwrap_err().to_string();
        assert!(
            err.contains(needle),
            "error {err:?} should mention {needle:?}"
        );
    }

    #[test]
    fn linspace_hits_both_ends() {
        let v = linspace(1e-4, 0.02, 300);
        assert_eq!(v.len(), 300);
        assert_eq!(v[0], 1e-4);
        assert_eq!(v[299], 0.02);
        assert!((v[150] - (1e-4 + 150.0 * (0.02 - 1e-4) / 299.0)).abs() < 1e-15);
        assert_eq!(linspace(0.5, 0.5, 1), vec![0.5]);
    }

    #[test]
    fn invalid_parameters_name_the_value() {
        check_err(ScheduleConfig::linear(0, 1e-4, 0.02), "got 0");
        check_err(
            ScheduleConfig::linear(10, 0.0, 0.02),
            "beta_start must be in (0, 1), got 0",
        );
        check_err(
            ScheduleConfig::linear(10, 1e-4, 1.5),
            "beta_end must be in (0, 1), got 1.5",
        );
        check_err(ScheduleConfig::linear(10, -0.1, 0.02), "got -0.1");
        check_err(
            ScheduleConfig::linear(10, 0.02, 1e-4),
            "beta_start (0.02) must not exceed beta_end (0.0001)",
        );
        check_err(ScheduleConfig::linear(10, f64::NAN, 0.02), "NaN");
        let mut cos = ScheduleConfig::cosine(10);
        cos.beta_schedule = BetaSchedule::Cosine { max_beta: 1.0 };
        check_err(cos, "max_beta");
        // Rescaling 0.02 by 1000/T for T = 10 gives beta = 2: outside (0, 1).
        let mut scaled = ScheduleConfig::linear(10, 1e-4, 0.02);
        scaled.beta_schedule = BetaSchedule::Linear {
            beta_start: 1e-4,
            beta_end: 0.02,
            scale_to_1000_steps: true,
        };
        check_err(scaled, "beta at timestep");
    }

    #[test]
    fn unknown_preset_lists_the_known_ones() {
        let err = ScheduleConfig::preset("quadratic").unwrap_err().to_string();
        assert!(
            err.contains("\"quadratic\"") && err.contains("seed-linear"),
            "{err}"
        );
        for name in PRESETS {
            ScheduleConfig::preset(name).unwrap().betas().unwrap();
        }
    }

    #[test]
    fn scale_to_1000_steps_matches_improved_diffusion() {
        let cfg = ScheduleConfig {
            num_train_timesteps: 500,
            beta_schedule: BetaSchedule::Linear {
                beta_start: 1e-4,
                beta_end: 0.02,
                scale_to_1000_steps: true,
            },
            rescale_betas_zero_snr: false,
        };
        let b = cfg.betas().unwrap();
        assert!((b[0] - 2e-4).abs() < 1e-15);
        assert!((b[499] - 0.04).abs() < 1e-15);
    }

    #[test]
    fn zero_snr_rescale_ends_at_beta_one() {
        let mut cfg = ScheduleConfig::ddpm_linear();
        cfg.rescale_betas_zero_snr = true;
        let b = cfg.betas().unwrap();
        assert!((b[999] - 1.0).abs() < 1e-12, "{}", b[999]);
        // The first abar is unchanged by the rescale.
        assert!((b[0] - 1e-4).abs() < 1e-12, "{}", b[0]);
    }

    #[test]
    fn config_round_trips_through_json() {
        let mut cfg = ScheduleConfig::cosine(123);
        cfg.rescale_betas_zero_snr = true;
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(json.contains("\"kind\":\"cosine\""), "{json}");
        let back: ScheduleConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg);
        let typo = json.replace("max_beta", "max_betta");
        assert!(serde_json::from_str::<ScheduleConfig>(&typo).is_err());
    }
}
