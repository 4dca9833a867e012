//! Learning-rate schedules: Megatron's AnnealingLR (warmup, then linear or cosine decay to min-lr)
//! and DeepSpeed's WarmupLR / WarmupDecayLR (`runtime/lr_schedules.py`).
use crate::runtime::config::SchedulerConfig;
use candle_core::{bail, Result};
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

/// DeepSpeed's warmup shape: `log` (gamma = ln(step + 1) / ln(warmup)) or `linear`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmupType {
    Log,
    Linear,
}

/// DeepSpeed's WarmupLR (`total_num_steps: None`: hold `max_lr` after warmup) and WarmupDecayLR
/// (then decay linearly to 0 at `total_num_steps`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WarmupLr {
    pub min_lr: f64,
    pub max_lr: f64,
    pub warmup_num_steps: u64,
    pub total_num_steps: Option<u64>,
    pub warmup_type: WarmupType,
}

impl WarmupLr {
    /// The rate for optimizer step `step` (0-based; DeepSpeed's `last_batch_iteration`).
    pub fn lr(&self, step: u64) -> f64 {
        // DeepSpeed raises warmup_num_steps to at least 2 (ln(1) would divide by zero).
        let w = self.warmup_num_steps.max(2);
        let gamma = if step < w {
            match self.warmup_type {
                WarmupType::Log => ((step + 1) as f64).ln() / (w as f64).ln(),
                WarmupType::Linear => step as f64 / w as f64,
            }
        } else {
            match self.total_num_steps {
                None => 1.0,
                Some(t) => {
                    (t.saturating_sub(step) as f64 / (t.saturating_sub(w)).max(1) as f64).max(0.0)
                }
            }
        };
        self.min_lr + (self.max_lr - self.min_lr) * gamma
    }
}

/// The schedule an engine follows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum LrSchedule {
    Constant(f64),
    Annealing(AnnealingLr),
    Warmup(WarmupLr),
}

impl LrSchedule {
    /// The rate for optimizer step `step` (0-based, skipped fp16 steps not counted).
    pub fn lr(&self, step: u64) -> f64 {
        match self {
            LrSchedule::Constant(lr) => *lr,
            LrSchedule::Annealing(a) => a.lr(step),
            LrSchedule::Warmup(w) => w.lr(step),
        }
    }

    /// The DeepSpeed config's `scheduler` section (WarmupLR, WarmupDecayLR) with DeepSpeed's
    /// defaults (min 0, max 0.001, 1000 warmup steps, log warmup).
    pub fn from_config(c: &SchedulerConfig) -> Result<Self> {
        let p = &c.params;
        let warmup_type = match p.warmup_type.as_deref().unwrap_or("log") {
            "log" => WarmupType::Log,
            "linear" => WarmupType::Linear,
            other => bail!("scheduler.params.warmup_type must be `log` or `linear`, got `{other}`"),
        };
        let total_num_steps = match c.kind.as_str() {
            "WarmupLR" => None,
            "WarmupDecayLR" => Some(p.total_num_steps.ok_or_else(|| {
                candle_core::Error::Msg(
                    "scheduler WarmupDecayLR needs params.total_num_steps".into(),
                )
            })?),
            other => bail!(
                "scheduler type `{other}` is not supported (WarmupLR, WarmupDecayLR; Megatron's \
                 AnnealingLR comes from --lr-decay-style without a scheduler section)"
            ),
        };
        Ok(LrSchedule::Warmup(WarmupLr {
            min_lr: p.warmup_min_lr.unwrap_or(0.0),
            max_lr: p.warmup_max_lr.unwrap_or(0.001),
            warmup_num_steps: p.warmup_num_steps.unwrap_or(1000),
            total_num_steps,
            warmup_type,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deepspeed_warmup_and_warmup_decay() {
        let w = WarmupLr {
            min_lr: 0.0,
            max_lr: 1.0,
            warmup_num_steps: 10,
            total_num_steps: None,
            warmup_type: WarmupType::Linear,
        };
        assert_eq!(w.lr(0), 0.0);
        assert!((w.lr(5) - 0.5).abs() < 1e-12);
        assert_eq!(w.lr(10), 1.0);
        assert_eq!(w.lr(1000), 1.0);
        let log = WarmupLr {
            warmup_type: WarmupType::Log,
            ..w
        };
        assert!((log.lr(4) - 5f64.ln() / 10f64.ln()).abs() < 1e-12);
        let d = WarmupLr {
            total_num_steps: Some(20),
            ..w
        };
        assert!((d.lr(15) - 0.5).abs() < 1e-12);
        assert_eq!(d.lr(20), 0.0);
        assert_eq!(d.lr(30), 0.0);
    }

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
