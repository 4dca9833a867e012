//! AdamW with Megatron's parameter groups (no weight decay for biases and LayerNorm weights), one
//! tensor at a time. It is the reference the fused flat-buffer optimizer is checked against.
use crate::layers::module::GradLookup;
use crate::layers::parameter::Param;
use candle_core::{Result, Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Decoupled weight decay (AdamW). False gives Adam with L2 added to the gradient, as
    /// DeepSpeed's `adam_w_mode: false`.
    pub adam_w_mode: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            adam_w_mode: true,
        }
    }
}

struct State {
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    pub config: AdamWConfig,
    states: Vec<State>,
    step: u64,
}

impl AdamW {
    pub fn new(params: &[&Param], config: AdamWConfig) -> Result<Self> {
        let states = params
            .iter()
            .map(|p| {
                Ok(State {
                    var: p.var.clone(),
                    decay: p.meta.weight_decay,
                    m: p.tensor().zeros_like()?,
                    v: p.tensor().zeros_like()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            states,
            step: 0,
        })
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update from `grads`, each gradient first multiplied by `grad_scale` (clipping, loss-scale
    /// removal). Parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &impl GradLookup, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for s in &mut self.states {
            let Some(g) = grads.grad(s.var.as_tensor()) else {
                continue;
            };
            let mut g = (g * grad_scale)?;
            let wd = if s.decay { c.weight_decay } else { 0.0 };
            if !c.adam_w_mode && wd != 0.0 {
                g = (g + (s.var.as_tensor() * wd)?)?;
            }
            s.m = ((&s.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            s.v = ((&s.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&s.v / bc2)?.sqrt()? + c.eps)?;
            let update = ((&s.m / bc1)? / denom)?;
            let p = s.var.as_tensor();
            let p_new = if c.adam_w_mode && wd != 0.0 {
                ((p * (1.0 - c.lr * wd))? - (update * c.lr)?)?
            } else {
                (p - (update * c.lr)?)?
            };
            s.var.set(&p_new)?;
        }
        Ok(())
    }
}

/// Global L2 norm of the gradients of `params` (each distinct tensor once).
pub fn grad_norm(params: &[&Param], grads: &impl GradLookup) -> Result<f64> {
    let mut sq = 0f64;
    for p in params {
        if let Some(g) = grads.grad(p.tensor()) {
            sq += g
                .to_dtype(candle_core::DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
    }
    Ok(sq.sqrt())
}
