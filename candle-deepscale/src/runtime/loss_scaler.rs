//! fp16 loss scaling as DeepSpeed's `DynamicLossScaler` / `LossScaler` do it.
//!
//! Dynamic: every step whose gradients overflow is skipped; with `hysteresis` h the scale is only
//! lowered (divided by 2, never below `min_loss_scale`) at the h-th overflow since it was last
//! reset, and after `loss_scale_window` clean iterations since the last overflow it doubles (and the
//! hysteresis budget is restored). Static: a fixed scale; an overflow still skips the step.
use crate::runtime::config::Fp16Config;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    pub cur_scale: f64,
    dynamic: bool,
    scale_factor: f64,
    scale_window: u64,
    min_scale: f64,
    delayed_shift: u32,
    cur_hysteresis: u32,
    cur_iter: u64,
    last_overflow_iter: i64,
}

impl LossScaler {
    /// A fixed scale (1.0 = no scaling, fp32/bf16 training).
    pub fn fixed(scale: f64) -> Self {
        Self {
            cur_scale: scale,
            dynamic: false,
            scale_factor: 2.0,
            scale_window: 1000,
            min_scale: 1.0,
            delayed_shift: 1,
            cur_hysteresis: 1,
            cur_iter: 0,
            last_overflow_iter: -1,
        }
    }

    /// DeepSpeed's defaults: initial scale 2^initial_scale_power (16), window 1000, hysteresis 2,
    /// min 1.
    pub fn dynamic(
        initial_scale_power: u32,
        scale_window: u64,
        hysteresis: u32,
        min_scale: f64,
    ) -> Self {
        Self {
            cur_scale: 2f64.powi(initial_scale_power as i32),
            dynamic: true,
            scale_window: scale_window.max(1),
            min_scale,
            delayed_shift: hysteresis.max(1),
            cur_hysteresis: hysteresis.max(1),
            ..Self::fixed(1.0)
        }
    }

    /// From the `fp16` section: `loss_scale: 0` (or absent) is dynamic, anything else static.
    pub fn from_config(c: &Fp16Config) -> Self {
        match c.loss_scale {
            Some(s) if s > 0.0 => Self::fixed(s),
            _ => Self::dynamic(
                c.initial_scale_power.unwrap_or(16),
                c.loss_scale_window.unwrap_or(1000),
                c.hysteresis.unwrap_or(2),
                c.min_loss_scale.unwrap_or(1.0),
            ),
        }
    }

    pub fn is_dynamic(&self) -> bool {
        self.dynamic
    }

    /// Records one iteration's outcome; returns true when its optimizer step must be skipped.
    pub fn update(&mut self, overflow: bool) -> bool {
        if !self.dynamic {
            self.cur_iter += 1;
            return overflow;
        }
        if overflow {
            if self.delayed_shift == 1 || self.cur_hysteresis == 1 {
                self.cur_scale = (self.cur_scale / self.scale_factor).max(self.min_scale);
            } else {
                self.cur_hysteresis -= 1;
            }
            self.last_overflow_iter = self.cur_iter as i64;
        } else if (self.cur_iter as i64 - self.last_overflow_iter) % self.scale_window as i64 == 0 {
            self.cur_hysteresis = self.delayed_shift;
            self.cur_scale *= self.scale_factor;
        }
        self.cur_iter += 1;
        overflow
    }
}

/// True when any value is infinite or NaN (an fp16 overflow).
pub fn has_overflow(values: &[f32]) -> bool {
    values.iter().any(|v| !v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_overflow_skips_and_hysteresis_delays_the_cut() {
        let mut s = LossScaler::dynamic(16, 1000, 2, 1.0);
        let start = s.cur_scale;
        assert!(s.update(true), "an overflow skips the step");
        assert_eq!(
            s.cur_scale, start,
            "hysteresis 2: the first overflow keeps the scale"
        );
        assert!(s.update(true));
        assert_eq!(s.cur_scale, start / 2.0, "the second overflow halves it");
        assert!(s.update(true));
        assert_eq!(
            s.cur_scale,
            start / 4.0,
            "budget spent: each further overflow halves"
        );
        assert!(!s.update(false));
    }

    #[test]
    fn doubles_after_a_clean_window_and_restores_hysteresis() {
        let mut s = LossScaler::dynamic(10, 4, 2, 1.0);
        s.update(true); // iter 0: overflow, hysteresis 2 -> 1, scale kept
        assert_eq!(s.cur_scale, 1024.0);
        for _ in 0..3 {
            s.update(false); // iters 1..3
        }
        assert_eq!(s.cur_scale, 1024.0);
        s.update(false); // iter 4: 4 clean iterations since the overflow
        assert_eq!(s.cur_scale, 2048.0);
        // Hysteresis restored: the next overflow does not cut.
        s.update(true);
        assert_eq!(s.cur_scale, 2048.0);
        s.update(true);
        assert_eq!(s.cur_scale, 1024.0);
    }

    #[test]
    fn never_below_min_scale() {
        let mut s = LossScaler::dynamic(2, 1000, 1, 1.0);
        for _ in 0..10 {
            s.update(true);
        }
        assert_eq!(s.cur_scale, 1.0);
        let mut s = LossScaler::dynamic(4, 1000, 1, 2.0);
        for _ in 0..10 {
            s.update(true);
        }
        assert_eq!(s.cur_scale, 2.0);
    }

    #[test]
    fn static_scale_skips_overflows_but_never_moves() {
        let mut s = LossScaler::from_config(&Fp16Config {
            enabled: true,
            loss_scale: Some(4096.0),
            ..Default::default()
        });
        assert!(!s.is_dynamic());
        assert!(s.update(true));
        assert!(!s.update(false));
        assert_eq!(s.cur_scale, 4096.0);
        let d = LossScaler::from_config(&Fp16Config {
            enabled: true,
            loss_scale: Some(0.0),
            initial_scale_power: Some(12),
            ..Default::default()
        });
        assert!(d.is_dynamic());
        assert_eq!(d.cur_scale, 4096.0);
    }

    #[test]
    fn overflow_detection() {
        assert!(!has_overflow(&[1.0, -2.0, 65504.0]));
        assert!(has_overflow(&[1.0, f32::INFINITY]));
        assert!(has_overflow(&[f32::NAN]));
    }
}
