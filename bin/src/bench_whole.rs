//! `deepscale bench whole`: the whole-model engine (`candle_deepscale::initialize`, one
//! whole-graph backward, the fused AdamW on ZeRO's flat buffers) against the stock candle loop
//! (`VarMap` + `candle_nn::AdamW`) on the same candle-nn model at one rank, alternating in one
//! process: the step, and the optimizer step alone.
use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_deepscale::runtime::config::DeepSpeedConfig;
use candle_deepscale::runtime::meters::WallClock;
use candle_nn::{Optimizer, VarBuilder};
use clap::Args;
use serde_json::json;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct WholeArgs {
    /// Blocks of linear + LayerNorm + GeLU.
    #[arg(long, default_value_t = 6)]
    pub num_layers: usize,
    #[arg(long, default_value_t = 1024)]
    pub hidden_size: usize,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Timed steps per loop (after one warm-up), alternating.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    #[arg(long)]
    pub json: bool,
}

/// A stack of candle-nn blocks, as any user writes it.
struct Stack {
    blocks: Vec<(candle_nn::Linear, candle_nn::LayerNorm)>,
    head: candle_nn::Linear,
}

impl Stack {
    fn load(vb: VarBuilder, a: &WholeArgs) -> candle_core::Result<Self> {
        let h = a.hidden_size;
        let blocks = (0..a.num_layers)
            .map(|i| {
                let b = vb.pp(format!("blocks.{i}"));
                Ok((
                    candle_nn::linear(h, h, b.pp("fc"))?,
                    candle_nn::layer_norm(h, 1e-5, b.pp("ln"))?,
                ))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            blocks,
            head: candle_nn::linear(h, 1, vb.pp("head"))?,
        })
    }

    fn loss(&self, x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for (fc, ln) in &self.blocks {
            h = (ln.forward(&fc.forward(&h)?)?.gelu()? + h)?;
        }
        (self.head.forward(&h)? - y)?.sqr()?.mean_all()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(a: WholeArgs) -> Result<()> {
    let h = a.hidden_size;
    for (flag, v) in [
        ("--num-layers", a.num_layers),
        ("--hidden-size", h),
        ("--batch-size", a.batch_size),
    ] {
        if v == 0 {
            anyhow::bail!("bench whole: {flag} must be at least 1");
        }
    }
    // Two models (ours and stock candle's), each with gradients and two moments, and their
    // activations (about six per block and row).
    let (l, h64, b) = (a.num_layers as u64, h as u64, a.batch_size as u64);
    let params = h64
        .saturating_mul(h64)
        .saturating_add(h64.saturating_mul(3))
        .saturating_mul(l)
        .saturating_add(h64.saturating_add(1));
    let activations = l.saturating_mul(b).saturating_mul(h64).saturating_mul(6);
    crate::memory_preflight::check_bytes(
        &format!(
            "bench whole --num-layers {l} --hidden-size {h} --batch-size {}",
            a.batch_size
        ),
        params
            .saturating_mul(4)
            .saturating_add(activations)
            .saturating_mul(2 * 4),
    )?;
    let x = Tensor::randn(0f32, 1.0, (a.batch_size, h), &Device::Cpu)?;
    let y = Tensor::randn(0f32, 1.0, (a.batch_size, 1), &Device::Cpu)?;
    let config = DeepSpeedConfig::from_json_str(
        &format!(
            r#"{{"train_batch_size": {}, "optimizer": {{"type": "AdamW",
                "params": {{"lr": 0.0001, "weight_decay": 0.01}}}}}}"#,
            a.batch_size
        ),
        "bench whole",
    )?;
    let (mut engine, vb) = candle_deepscale::initialize(&config, ())?;
    let ours = Stack::load(vb, &a)?;
    let map = candle_nn::VarMap::new();
    let stock = Stack::load(VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu), &a)?;
    let mut opt = candle_nn::AdamW::new(
        map.all_vars(),
        candle_nn::ParamsAdamW {
            lr: 1e-4,
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    let params: usize = map.all_vars().iter().map(|v| v.elem_count()).sum();
    let (mut t_ours, mut t_stock, mut t_opt_stock) = (Vec::new(), Vec::new(), Vec::new());
    let mut split = WallClock::default();
    for round in 0..=a.iters {
        if round == 1 {
            engine.take_wall_clock();
        }
        let t0 = Instant::now();
        engine.train_batch_with(vec![|| ours.loss(&x, &y)])?;
        let t_engine = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let grads = stock.loss(&x, &y)?.backward()?;
        let t2 = Instant::now();
        opt.step(&grads)?;
        let t_opt = t2.elapsed().as_secs_f64();
        let t_all = t1.elapsed().as_secs_f64();
        if round > 0 {
            t_ours.push(t_engine * 1e3);
            t_stock.push(t_all * 1e3);
            t_opt_stock.push(t_opt * 1e3);
        }
        if round == a.iters {
            split = engine.take_wall_clock();
        }
    }
    let (ours_ms, stock_ms) = (median(t_ours.clone()), median(t_stock.clone()));
    let stock_opt_ms = median(t_opt_stock);
    eprintln!(
        "{params} parameters, batch {}: whole-model engine {ours_ms:.1} ms/step (optimizer step {:.1} ms), stock candle loop {stock_ms:.1} ms/step (candle_nn::AdamW {stock_opt_ms:.1} ms): {:.2}x the stock step, optimizer {:.2}x",
        a.batch_size,
        split.step_ms,
        stock_ms / ours_ms,
        stock_opt_ms / split.step_ms.max(1e-9)
    );
    if a.json {
        println!(
            "{}",
            json!({"bench": "whole", "params": params, "batch": a.batch_size,
                   "engine_ms": ours_ms, "stock_ms": stock_ms, "speedup": stock_ms / ours_ms,
                   "engine_optimizer_ms": split.step_ms, "stock_optimizer_ms": stock_opt_ms,
                   "optimizer_speedup": stock_opt_ms / split.step_ms.max(1e-9),
                   "rounds_engine_ms": t_ours, "rounds_stock_ms": t_stock})
        );
    }
    Ok(())
}
