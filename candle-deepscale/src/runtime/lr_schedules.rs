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
    /// Warmup iterations: Megatron's `--warmup` fraction times the decay iterations, which need
    /// not be whole (v1.1.5 keeps the product as a float).
    pub warmup_iters: f64,
    pub decay_iters: u64,
    pub style: DecayStyle,
}

impl AnnealingLr {
    /// The rate of the optimizer step that follows `updates` applied updates, as the seed
    /// snapshots' Megatron `AnnealingLR` (`megatron/learning_rates.py`, v1.1.5) sets it: the
    /// scheduler is created at `num_iters = 0` (the first step's rate: 0 with a warmup) and
    /// stepped after every applied update, so the step after `updates` updates runs at
    /// `num_iters = updates`. Warmup ramps `max_lr * n / warmup` while `n <= warmup` (not clamped
    /// to `min_lr`); then, with `n' = min(n, decay - warmup) - warmup`, linear decay is
    /// `max_lr (decay - n') / decay`, cosine `max_lr / 2 (cos(pi n' / decay) + 1)`, each at least
    /// `min_lr`.
    pub fn lr(&self, updates: u64) -> f64 {
        let n = updates as f64;
        let (warmup, end) = (self.warmup_iters, self.decay_iters as f64);
        let capped = n.min(end - warmup);
        if warmup > 0.0 && n <= warmup {
            return self.max_lr * capped / warmup;
        }
        let done = capped - warmup;
        let lr = match self.style {
            DecayStyle::Constant => self.max_lr,
            DecayStyle::Linear => self.max_lr * (end - done) / end,
            DecayStyle::Cosine => {
                self.max_lr / 2.0 * ((std::f64::consts::PI * done / end).cos() + 1.0)
            }
        };
        lr.max(self.min_lr)
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
    /// The rate of the optimizer step that follows `updates` applied updates, as DeepSpeed runs
    /// WarmupLR / WarmupDecayLR: the scheduler starts at `last_batch_iteration = -1` with the
    /// rate `min_lr` (the first step's) and the engine steps it after every applied update, so
    /// the step after `updates` updates runs at `last_batch_iteration = updates - 1`.
    pub fn lr(&self, updates: u64) -> f64 {
        let Some(it) = updates.checked_sub(1) else {
            return self.min_lr;
        };
        // DeepSpeed raises warmup_num_steps to at least 2 (ln(1) would divide by zero).
        let w = self.warmup_num_steps.max(2);
        let gamma = if it < w {
            match self.warmup_type {
                WarmupType::Log => ((it + 1) as f64).ln() / (w as f64).ln(),
                WarmupType::Linear => it as f64 / w as f64,
            }
        } else {
            match self.total_num_steps {
                None => 1.0,
                Some(t) => {
                    ((t as f64 - it as f64) / (t.saturating_sub(w) as f64).max(1.0)).max(0.0)
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
    /// The rate of the optimizer step that follows `updates` applied updates (skipped fp16
    /// steps do not step a schedule, in DeepSpeed or Megatron), so a resumed run continues
    /// exactly where it stopped.
    pub fn lr(&self, updates: u64) -> f64 {
        match self {
            LrSchedule::Constant(lr) => *lr,
            LrSchedule::Annealing(a) => a.lr(updates),
            LrSchedule::Warmup(w) => w.lr(updates),
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

    fn close(got: f64, want: f64, what: &str) {
        assert!((got - want).abs() < 1e-12, "{what}: {got} vs {want}");
    }

    /// Each optimizer step's rate, step by step, as DeepSpeed 0.19.8 runs WarmupLR and
    /// WarmupDecayLR (`runtime/lr_schedules.py`: `last_batch_iteration` starts at -1 with the
    /// rate `warmup_min_lr`; the engine calls `step()` after each applied update; gamma is
    /// `ln(lbi + 1) / ln(warmup)` (log) or `lbi / warmup` (linear) while `lbi < warmup`, then 1,
    /// or `(total - lbi) / (total - warmup)` floored at 0 for WarmupDecayLR). The values below are
    /// worked out by hand from those rules.
    #[test]
    fn deepspeed_schedules_step_by_step() {
        let log = WarmupLr {
            min_lr: 0.0,
            max_lr: 0.01,
            warmup_num_steps: 4,
            total_num_steps: None,
            warmup_type: WarmupType::Log,
        };
        // Optimizer steps 1, 2, ...: lbi = -1, 0, 1, 2, 3, 4, 5.
        let want = [
            0.0,
            0.0,
            0.01 * 2f64.ln() / 4f64.ln(),
            0.01 * 3f64.ln() / 4f64.ln(),
            0.01,
            0.01,
            0.01,
        ];
        for (u, w) in want.iter().enumerate() {
            close(
                log.lr(u as u64),
                *w,
                &format!("WarmupLR log, step {}", u + 1),
            );
        }
        let decay = WarmupLr {
            min_lr: 0.1,
            max_lr: 1.1,
            warmup_num_steps: 4,
            total_num_steps: Some(10),
            warmup_type: WarmupType::Linear,
        };
        // lbi = -1, 0, 1, 2, 3 | 4 .. 11: gamma 0, 0, .25, .5, .75 | 6/6, 5/6, ..., 0, 0 (floored).
        let gammas = [
            0.0,
            0.0,
            0.25,
            0.5,
            0.75,
            1.0,
            5.0 / 6.0,
            4.0 / 6.0,
            3.0 / 6.0,
            2.0 / 6.0,
            1.0 / 6.0,
            0.0,
            0.0,
        ];
        for (u, g) in gammas.iter().enumerate() {
            close(
                decay.lr(u as u64),
                0.1 + g,
                &format!("WarmupDecayLR, step {}", u + 1),
            );
        }
    }

    /// Each optimizer step's rate as the seed snapshots' Megatron AnnealingLR gives it
    /// (`megatron/learning_rates.py`, v1.1.5: created with `last_iter = 0`, stepped after each
    /// applied update), worked out by hand: warmup 2, decay 10, max 1.0, min 0.1.
    #[test]
    fn megatron_annealing_step_by_step() {
        let s = AnnealingLr {
            max_lr: 1.0,
            min_lr: 0.1,
            warmup_iters: 2.0,
            decay_iters: 10,
            style: DecayStyle::Linear,
        };
        // num_iters = 0, 1, 2 (warmup, unclamped), then n' = min(n, 8) - 2: 1, 2, .., 6, 6, 6.
        let want = [0.0, 0.5, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.4, 0.4, 0.4];
        for (u, w) in want.iter().enumerate() {
            close(s.lr(u as u64), *w, &format!("linear, step {}", u + 1));
        }
        let c = AnnealingLr {
            style: DecayStyle::Cosine,
            ..s
        };
        for u in 3..12u64 {
            let n = (u as f64).min(8.0) - 2.0;
            let want = (0.5 * ((std::f64::consts::PI * n / 10.0).cos() + 1.0)).max(0.1);
            close(c.lr(u), want, &format!("cosine, step {}", u + 1));
        }
        // A fractional warmup (--warmup 0.05 of 30 iterations = 1.5) is kept as Megatron keeps it.
        let f = AnnealingLr {
            warmup_iters: 1.5,
            decay_iters: 30,
            ..s
        };
        close(f.lr(1), 1.0 / 1.5, "fractional warmup, step 2");
        close(f.lr(2), (30.0 - 0.5) / 30.0, "fractional warmup, step 3");
        let k = AnnealingLr {
            style: DecayStyle::Constant,
            ..s
        };
        close(k.lr(1), 0.5, "constant after warmup, step 2");
        close(k.lr(7), 1.0, "constant after warmup, step 8");
    }
}
