//! Learning-rate schedules: Megatron's AnnealingLR (warmup, then linear or cosine decay to min-lr).
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecayStyle {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AnnealingLr {
    pub max_lr: f64,
    pub min_lr: f64,
    pub warmup_iters: u64,
    pub decay_iters: u64,
    pub style: DecayStyle,
}

impl AnnealingLr {
    /// The rate for optimizer step `iter` (0-based).
    pub fn lr(&self, iter: u64) -> f64 {
        if self.warmup_iters > 0 && iter < self.warmup_iters {
            return self.max_lr * (iter + 1) as f64 / self.warmup_iters as f64;
        }
        let span = self.decay_iters.saturating_sub(self.warmup_iters).max(1) as f64;
        let done = ((iter - self.warmup_iters.min(iter)) as f64 / span).min(1.0);
        let frac = match self.style {
            DecayStyle::Constant => return self.max_lr,
            DecayStyle::Linear => 1.0 - done,
            DecayStyle::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * done).cos()),
        };
        self.min_lr + (self.max_lr - self.min_lr) * frac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = AnnealingLr {
            max_lr: 1.0,
            min_lr: 0.1,
            warmup_iters: 10,
            decay_iters: 110,
            style: DecayStyle::Cosine,
        };
        assert!((s.lr(0) - 0.1).abs() < 1e-12);
        assert!((s.lr(9) - 1.0).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(60) - 0.55).abs() < 1e-12);
        assert!((s.lr(110) - 0.1).abs() < 1e-12);
        assert!((s.lr(500) - 0.1).abs() < 1e-12);
        let l = AnnealingLr {
            style: DecayStyle::Linear,
            ..s
        };
        assert!((l.lr(60) - 0.55).abs() < 1e-12);
    }
}
