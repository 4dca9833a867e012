//! `deepscale bench dp`: what data parallelism costs on the cores one rank would have used — the
//! training step at dp N (ZeRO stage S, the global batch split over the ranks, each its own
//! tokens) against one rank stepping the whole batch, alternating in one run. Under
//! `mpirun -np N` the ranks are the MPI processes and only dp N is measured (pair it with
//! `bench dp --data-parallel 1` run on its own). With `--overlap-comm` each round also times
//! dp N with DeepSpeed's `overlap_comm` (bucket reductions in flight during backward).
use crate::args::Layout;
use crate::launch::{launch, mpi_world_size};
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use candle_deepscale::layers::init::RandomInit;
use candle_deepscale::layers::module::Activations;
use candle_deepscale::layers::parameter::ParamBuilder;
use candle_deepscale::runtime::engine::{Engine, EngineConfig};
use candle_deepscale::runtime::meters::WallClock;
use clap::Args;
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;
use zoo::gpt2::Gpt2;

#[derive(Args, Debug)]
pub struct DpArgs {
    /// GPT-2 preset, or `small` (4 layers, hidden 256, 4 heads, vocab 50257).
    #[arg(long, default_value = "small")]
    pub model: String,
    /// Data-parallel ranks (1: only the one-rank step). Under mpirun: the job's size.
    #[arg(long, default_value_t = 2)]
    pub data_parallel: usize,
    /// ZeRO stage of the data-parallel run (0, 1 or 2).
    #[arg(long, default_value_t = 2)]
    pub zero_stage: u8,
    /// Global batch (split over the ranks).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 128)]
    pub seq_length: usize,
    /// Timed steps per measurement (after one warm-up step); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Alternations of one rank and dp N.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Elements per gradient bucket (DeepSpeed's `reduce_bucket_size`; its default 5e8 makes
    /// one bucket of a small model: nothing to overlap).
    #[arg(long, default_value_t = 500_000_000)]
    pub reduce_bucket_size: usize,
    /// Also time dp N with `overlap_comm` in each round (after the run without it).
    #[arg(long)]
    pub overlap_comm: bool,
    #[arg(long)]
    pub json: bool,
}

/// Rank 0's median step and its engine's split of it.
struct Step {
    ms: f64,
    split: WallClock,
    /// The threads each rank computes on.
    threads: usize,
}

/// The training step on `dp` ranks, the global batch split over them: for each round of
/// `plan`, one measurement per `overlap_comm` setting in it, all in one launch (MPI is
/// initialised once per process).
fn measure(a: &DpArgs, dp: usize, plan: &[&[bool]]) -> Result<Option<Vec<Vec<Step>>>> {
    let cfg = crate::bench::bench_model(&a.model, a.seq_length)?;
    let (b, s) = (a.batch_size / dp, a.seq_length);
    let layout = Layout::in_process(dp, 1, 1);
    let engine = EngineConfig {
        train_micro_batch_size_per_gpu: b,
        zero_stage: a.zero_stage,
        reduce_bucket_size: a.reduce_bucket_size.max(1),
        ..Default::default()
    };
    crate::memory_preflight::check_bench(
        &format!(
            "bench dp --model {} --batch-size {} --seq-length {s} at dp {dp}",
            a.model, a.batch_size
        ),
        &crate::memory_preflight::Shape::gpt2(&cfg, s, 1)?,
        &layout,
        &engine,
        1,
    )?;
    launch(&layout, |ctx| {
        plan.iter()
            .map(|round| {
                round
                    .iter()
                    .map(|&o| step_on(a, &cfg, &ctx, (b, s), o))
                    .collect()
            })
            .collect()
    })
}

/// The `overlap_comm` settings dp N is timed with in round `round` (with both, which goes first
/// alternates).
fn settings(overlap_comm: bool, round: usize) -> &'static [bool] {
    match (overlap_comm, round % 2) {
        (false, _) => &[false],
        (true, 0) => &[false, true],
        (true, _) => &[true, false],
    }
}

/// Rank `ctx`'s median step on its micro-batch `(b, s)`.
fn step_on(
    a: &DpArgs,
    cfg: &zoo::gpt2::Config,
    ctx: &crate::launch::RankCtx,
    (b, s): (usize, usize),
    overlap_comm: bool,
) -> Result<Step> {
    {
        let src = RandomInit { seed: 1 };
        let model = Arc::new(Gpt2::new(
            cfg,
            &ParamBuilder::new(&src, &Device::Cpu, DType::F32),
        )?);
        let mut engine = Engine::new(
            model.clone(),
            EngineConfig {
                train_micro_batch_size_per_gpu: b,
                zero_stage: a.zero_stage,
                reduce_bucket_size: a.reduce_bucket_size.max(1),
                overlap_comm,
                ..Default::default()
            },
            ctx.dp()?,
            None,
        )?;
        // Rank r's rows of one global batch.
        let rank = ctx.dp()?.map_or(0, |g| g.rank);
        let (x, y) = crate::bench::token_batch((b, s), rank * b, 50257, &Device::Cpu)?;
        let mut times = Vec::new();
        for i in 0..a.iters.max(1) + 1 {
            if i == 1 {
                engine.take_wall_clock();
            }
            let t0 = Instant::now();
            engine.train_batch(vec![(Activations::new(x.clone()), |o: &Activations| {
                model.loss(&o.hidden, &y)
            })])?;
            if i > 0 {
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(Step {
            ms: times[times.len() / 2],
            split: engine.take_wall_clock(),
            threads: rayon::current_num_threads(),
        })
    }
}

pub fn run(a: DpArgs) -> Result<()> {
    let mpi = mpi_world_size();
    let n = mpi.unwrap_or(a.data_parallel);
    if n == 0 || !a.batch_size.is_multiple_of(n) {
        bail!(
            "bench dp: the global batch ({}) must split evenly over {n} data-parallel ranks",
            a.batch_size
        );
    }
    if a.zero_stage > 2 {
        bail!("bench dp: --zero-stage {} (0, 1 or 2)", a.zero_stage);
    }
    let tokens = a.batch_size as f64 * a.seq_length as f64;
    let line = |what: &str, s: &Step| {
        eprintln!(
            "{what}: {:.1} ms/step, {:.1} tokens/s (forward {:.1} | backward {:.1} | optimizer_step {:.1} ms)",
            s.ms,
            tokens / (s.ms / 1e3),
            s.split.forward_ms,
            s.split.backward_ms,
            s.split.step_ms
        )
    };
    let plan: Vec<&[bool]> = (0..a.rounds.max(1))
        .map(|r| settings(a.overlap_comm, r))
        .collect();
    // Under MPI every round runs in one launch; in-process ones alternate with one rank.
    let mut under_mpi = match mpi {
        Some(_) => match measure(&a, n, &plan)? {
            Some(all) => Some(all.into_iter()),
            // Another MPI process: rank 0 reports.
            None => return Ok(()),
        },
        None => None,
    };
    let mut rounds = Vec::new();
    for settings in plan {
        let one = if mpi.is_none() && n > 1 {
            measure(&a, 1, &[&[false]])?.and_then(|mut v| v.pop()?.pop())
        } else {
            None
        };
        let steps = match under_mpi.as_mut() {
            Some(all) => all.next(),
            None => measure(&a, n, &[settings])?.and_then(|mut v| v.pop()),
        };
        let Some(steps) = steps else {
            bail!("bench dp: no measurement")
        };
        let (mut many, mut overlapped) = (None, None);
        for (&o, step) in settings.iter().zip(steps) {
            *(if o { &mut overlapped } else { &mut many }) = Some(step);
        }
        let Some(many) = many else {
            bail!("bench dp: no measurement")
        };
        if let Some(one) = &one {
            line("1 rank", one);
        }
        line(&format!("dp {n}"), &many);
        if let Some(o) = &overlapped {
            line(&format!("dp {n} overlap_comm"), o);
        }
        let ratio = one.as_ref().map(|o| o.ms / many.ms);
        if let Some(r) = ratio {
            eprintln!("dp {n} / 1 rank: {r:.2}x the tokens/s");
        }
        let overlap_ratio = one
            .as_ref()
            .zip(overlapped.as_ref())
            .map(|(o, v)| o.ms / v.ms);
        if let Some(r) = overlap_ratio {
            eprintln!("dp {n} overlap_comm / 1 rank: {r:.2}x the tokens/s");
        }
        rounds.push(
            json!({"one_rank_ms": one.as_ref().map(|o| o.ms), "dp_ms": many.ms,
            "threads_per_rank": {"one_rank": one.as_ref().map(|o| o.threads), "dp": many.threads},
            "dp_split_ms": {"forward": many.split.forward_ms, "backward": many.split.backward_ms,
                "optimizer_step": many.split.step_ms},
            "one_rank_split_ms": one.as_ref().map(|o| json!({"forward": o.split.forward_ms,
                "backward": o.split.backward_ms, "optimizer_step": o.split.step_ms})),
            "ratio": ratio, "overlap_ms": overlapped.as_ref().map(|o| o.ms),
            "overlap_ratio": overlap_ratio}),
        );
    }
    // Single rounds move 10-30% on a busy machine: the goal is read off all of them.
    let summary = |key: &str| {
        let r: Vec<f64> = rounds.iter().filter_map(|v| v[key].as_f64()).collect();
        spread(&r)
    };
    let (ratio, overlap_ratio) = (summary("ratio"), summary("overlap_ratio"));
    for (what, s) in [("", &ratio), (" overlap_comm", &overlap_ratio)] {
        if let Some(s) = s.as_ref().filter(|_| rounds.len() > 1) {
            eprintln!(
                "dp {n}{what} / 1 rank over {} rounds: geometric mean {:.3}x, median {:.3}x, {:.2}x-{:.2}x",
                rounds.len(),
                s.geomean,
                s.median,
                s.min,
                s.max
            );
        }
    }
    if a.json {
        println!(
            "{}",
            json!({"bench": "dp", "model": a.model, "data_parallel": n, "mpi": mpi.is_some(),
                "zero_stage": a.zero_stage, "batch": a.batch_size, "seq": a.seq_length,
                "reduce_bucket_size": a.reduce_bucket_size, "overlap_comm": a.overlap_comm,
                "rounds": rounds, "ratio_summary": ratio, "overlap_ratio_summary": overlap_ratio})
        );
    }
    Ok(())
}

/// Ratios over the rounds.
#[derive(Debug, serde::Serialize, PartialEq)]
struct Spread {
    geomean: f64,
    median: f64,
    min: f64,
    max: f64,
}

fn spread(r: &[f64]) -> Option<Spread> {
    if r.is_empty() {
        return None;
    }
    let mut sorted = r.to_vec();
    sorted.sort_by(f64::total_cmp);
    let k = sorted.len();
    let median = match k % 2 {
        1 => sorted[k / 2],
        _ => (sorted[k / 2 - 1] + sorted[k / 2]) / 2.0,
    };
    Some(Spread {
        geomean: (r.iter().map(|x| x.ln()).sum::<f64>() / k as f64).exp(),
        median,
        min: sorted[0],
        max: sorted[k - 1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_of_ratios() {
        assert_eq!(spread(&[]), None);
        let s = spread(&[0.5, 2.0, 1.0, 4.0]).expect("four ratios");
        assert!((s.geomean - 2f64.sqrt()).abs() < 1e-12, "{s:?}");
        assert_eq!((s.median, s.min, s.max), (1.5, 0.5, 4.0));
        assert_eq!(spread(&[0.9, 1.1, 1.0]).map(|s| s.median), Some(1.0));
    }
}
