//! The pretraining loop the `pretrain-*` commands share: iterations through the engine, Megatron's
//! log line every --log-interval, validation every --eval-interval and at the end, the metrics
//! JSONL, a progress bar and the loss-curve PNG.
use crate::metrics::{peak_rss_bytes, MetricsWriter};
use anyhow::{bail, Result};
use candle_core::Tensor;
use candle_deepscale::engine::Engine;
use candle_deepscale::module::Activations;
use serde_json::json;
use std::path::Path;
use std::time::Instant;

/// How the loop runs.
pub struct LoopSpec<'a> {
    pub train_iters: u64,
    pub log_interval: u64,
    pub eval_interval: u64,
    /// Tokens of one global batch.
    pub tokens_per_iter: f64,
    pub flops_per_token: f64,
    /// The machine's measured f32 GEMM rate (MFU denominator).
    pub gemm_peak: f64,
    pub metrics_file: Option<&'a Path>,
    /// Rank 0: prints, writes metrics and the plot.
    pub root: bool,
    /// Fields every metrics line carries (the layout, ZeRO stage, model-state bytes).
    pub base: serde_json::Value,
    /// Title of the loss curve.
    pub title: String,
    /// fp16: a non-finite loss is an overflow the scaler handles, not an error.
    pub fp16: bool,
}

pub struct LoopResult {
    pub first_loss: Option<f64>,
    pub last_loss: f64,
    pub last_valid: Option<f64>,
    /// Seconds of training (validation included).
    pub elapsed: f64,
}

/// Runs `spec.train_iters` iterations: `micro_batches(iter)` gives this rank's micro-batches of
/// iteration `iter` (1-based), `evaluate` the validation loss (mean over the data-parallel group;
/// None without validation data).
pub fn train_loop<'m, F>(
    spec: &LoopSpec,
    engine: &mut Engine<'m>,
    mut metrics: Option<MetricsWriter>,
    mut micro_batches: impl FnMut(u64) -> Result<Vec<(Activations, F)>>,
    mut evaluate: impl FnMut(&Engine<'m>) -> Result<Option<f64>>,
) -> Result<LoopResult>
where
    F: FnOnce(&Activations) -> Result<Tensor, candle_core::Error>,
{
    let a = spec;
    let bar = if a.root {
        indicatif::ProgressBar::new(a.train_iters)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} iterations, {eta} left, {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let (mut curve, mut valid_curve) = (Vec::new(), Vec::new());
    let mut first_loss = None;
    let mut last_loss = f64::NAN;
    let mut last_valid = None;
    let train_start = Instant::now();
    let mut window_start = Instant::now();
    let (mut window_loss, mut window_n) = (0.0, 0u64);
    let log_every = a.log_interval.max(1);
    for iter in 1..=a.train_iters {
        let r = engine.train_batch(micro_batches(iter)?)?;
        if !r.loss.is_finite() && !spec.fp16 {
            bail!(
                "iteration {iter}: the loss is {}; lower --lr or check the data",
                r.loss
            )
        }
        first_loss.get_or_insert(r.loss);
        last_loss = r.loss;
        window_loss += r.loss;
        window_n += 1;
        curve.push((iter, r.loss));
        bar.inc(1);
        bar.set_message(format!("loss {:.3}", r.loss));
        if iter % log_every == 0 || iter == a.train_iters {
            let ms = window_start.elapsed().as_secs_f64() * 1000.0 / window_n as f64;
            let tps = a.tokens_per_iter / (ms / 1000.0);
            // Per-rank FLOP rate against this machine's measured GEMM peak (ranks share its cores).
            let mfu = tps * a.flops_per_token / a.gemm_peak;
            if a.root {
                bar.suspend(|| {
                    eprintln!(
                        " iteration {iter:>8}/{:>8} | elapsed time per iteration (ms): {ms:.1} | learning rate: {:.3E} | lm loss: {:.6E} | loss scale: {:.1} | grad norm: {:.3} | number of skipped iterations: {:>3} | tokens/s: {tps:.0} | MFU: {:.1}%",
                        a.train_iters,
                        r.lr,
                        window_loss / window_n as f64,
                        r.loss_scale,
                        r.grad_norm,
                        engine.skipped_steps(),
                        mfu * 100.0
                    )
                });
            }
            if let Some(m) = metrics.as_mut() {
                let mut line = a.base.clone();
                let o = line.as_object_mut().expect("object");
                for (k, v) in [
                    ("iteration", json!(iter)),
                    ("loss", json!(r.loss)),
                    ("lr", json!(r.lr)),
                    ("loss_scale", json!(r.loss_scale)),
                    ("grad_norm", json!(r.grad_norm)),
                    ("skipped", json!(r.skipped)),
                    ("ms_per_step", json!(ms)),
                    ("tokens_per_s", json!(tps)),
                    ("mfu", json!(mfu)),
                    ("peak_bytes", json!(peak_rss_bytes())),
                ] {
                    o.insert(k.into(), v);
                }
                m.write(&line)?;
            }
            window_loss = 0.0;
            window_n = 0;
            window_start = Instant::now();
        }
        let eval_now =
            (a.eval_interval > 0 && iter % a.eval_interval == 0) || iter == a.train_iters;
        let valid = if eval_now { evaluate(engine)? } else { None };
        if let Some(vl) = valid {
            if a.root {
                bar.suspend(|| {
                    eprintln!(
                        " validation loss at iteration {iter} | lm loss: {vl:.6E} | lm loss PPL: {:.3E}",
                        vl.exp()
                    )
                });
            }
            if let Some(m) = metrics.as_mut() {
                let mut line = a.base.clone();
                line["iteration"] = json!(iter);
                line["valid_loss"] = json!(vl);
                m.write(&line)?;
            }
            valid_curve.push((iter, vl));
            last_valid = Some(vl);
        }
    }
    bar.finish_and_clear();
    let elapsed = train_start.elapsed().as_secs_f64();
    if a.root {
        eprintln!(
            "done: {} iterations in {elapsed:.1} s; loss {:.4} -> {last_loss:.4}",
            a.train_iters,
            first_loss.unwrap_or(f64::NAN)
        );
    }
    if let (Some(m), Some(path)) = (metrics.as_ref(), a.metrics_file) {
        m.finish()?;
        let png = path.with_extension("png");
        crate::plot::loss_curve(&png, &a.title, &curve, &valid_curve)?;
        eprintln!("loss curve: {}", png.display());
    }
    Ok(LoopResult {
        first_loss,
        last_loss,
        last_valid,
        elapsed,
    })
}
