//! Properties every valid schedule has, over random parameters.

use ddpm_schedule::{BetaSchedule, Schedule, ScheduleConfig, Table};
use proptest::prelude::*;

fn any_schedule() -> impl Strategy<Value = ScheduleConfig> {
    let n = 2usize..1500;
    let ends =
        (1e-5f64..0.05, 1.0f64..20.0).prop_map(|(start, ratio)| (start, (start * ratio).min(0.5)));
    (n, ends, 0u8..4, any::<bool>()).prop_map(|(n, (beta_start, beta_end), kind, scale)| {
        let beta_schedule = match kind {
            0 => BetaSchedule::Linear {
                beta_start,
                beta_end,
                scale_to_1000_steps: scale && n >= 1000,
            },
            1 => BetaSchedule::ScaledLinear {
                beta_start,
                beta_end,
            },
            2 => BetaSchedule::Cosine { max_beta: 0.999 },
            _ => BetaSchedule::Sigmoid {
                beta_start,
                beta_end,
            },
        };
        ScheduleConfig {
            num_train_timesteps: n,
            beta_schedule,
            rescale_betas_zero_snr: false,
        }
    })
}

proptest! {
    #[test]
    fn tables_are_well_formed(cfg in any_schedule()) {
        let s = Schedule::new(cfg).unwrap();
        let abar = s.alphas_cumprod();
        prop_assert!(abar[0] > 0.0 && abar[0] <= 1.0);
        for w in abar.windows(2) {
            prop_assert!(w[1] < w[0] && w[1] > 0.0, "abar not strictly decreasing in (0, 1]: {:?}", w);
        }
        for w in s.snr().windows(2) {
            prop_assert!(w[1] < w[0], "snr not decreasing: {:?}", w);
        }
        for &v in s.posterior_variance() {
            prop_assert!(v >= 0.0 && v.is_finite());
        }
        // The posterior variance never exceeds beta_t (DDPM section 3.2: the two extremes).
        for (v, b) in s.posterior_variance().iter().zip(s.betas()) {
            prop_assert!(v <= &(b * (1.0 + 1e-12)));
        }
        for table in Table::ALL {
            prop_assert!(s.table(table).iter().all(|x| x.is_finite()), "{:?} not finite", table);
        }
    }

    #[test]
    fn zero_terminal_snr_ends_at_zero(cfg in any_schedule()) {
        let mut cfg = cfg;
        cfg.rescale_betas_zero_snr = true;
        let s = Schedule::new(cfg).unwrap();
        let abar = s.alphas_cumprod();
        let n = abar.len();
        prop_assert_eq!(abar[n - 1], 0.0);
        prop_assert_eq!(s.snr()[n - 1], 0.0);
        for w in abar.windows(2) {
            prop_assert!(w[1] < w[0]);
        }
    }
}
