//! `deepscale bench`: measurements behind BENCHMARKS.md.
//!
//! - `bench comm`: bandwidth of each collective over 1-64 MiB messages, in-process ranks or under
//!   mpirun (nccl-tests' algbw/busbw convention).
//! - `bench tp`: training-step time (forward, backward, AdamW) of one GPT-2 at several tensor-parallel
//!   sizes on in-process ranks, as ratios to tp=1.
use crate::args::Layout;
use crate::launch::launch;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_deepscale::adamw::{AdamW, AdamWConfig};
use candle_deepscale::comm::{Communicator, ReduceOp};
use candle_deepscale::module::ForwardCtx;
use candle_deepscale::parameter::{ParamBuilder, RandomInit};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::time::Instant;
use zoo::gpt2::{self, Gpt2};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// Collective bandwidth.
    Comm(CommArgs),
    /// Training-step cost at several tensor-parallel sizes.
    Tp(TpArgs),
}

#[derive(Args, Debug)]
pub struct CommArgs {
    /// In-process ranks (ignored under mpirun, where the processes are the ranks).
    #[arg(long, default_value_t = 2)]
    pub world_size: usize,
    /// Message sizes in MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16, 64])]
    pub sizes_mib: Vec<usize>,
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TpArgs {
    /// GPT-2 preset, or `small` (4 layers, hidden 256, 4 heads, vocab 50257).
    #[arg(long, default_value = "small")]
    pub model: String,
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2, 4])]
    pub tp: Vec<usize>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 128)]
    pub seq_length: usize,
    #[arg(long, default_value_t = 4)]
    pub iters: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.what {
        BenchWhat::Comm(c) => comm(c),
        BenchWhat::Tp(t) => tp(t),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn comm(a: CommArgs) -> Result<()> {
    let world = crate::launch::mpi_world_size().unwrap_or(a.world_size);
    if world < 2 {
        bail!("bench comm needs at least 2 ranks")
    }
    let layout = Layout {
        world_size: world,
        tp: 1,
        pp: 1,
        dp: world,
        timeout: candle_deepscale::comm::default_timeout(),
    };
    let sizes = a.sizes_mib.clone();
    let iters = a.iters.max(1);
    let rows = launch(&layout, |ctx| {
        let c = ctx.comm.clone().expect("several ranks have a communicator");
        let c: &dyn Communicator = c.as_ref();
        let group: Vec<usize> = (0..world).collect();
        let n = world as f64;
        let mut rows = Vec::new();
        for &mib in &sizes {
            let elems = mib * (1 << 20) / 4;
            let per = elems / world;
            let mut buf = vec![1f32; elems];
            let mut gathered = vec![0f32; per * world];
            let send_part = vec![1f32; per];
            let mut part = vec![0f32; per];
            for op in ["all_reduce", "all_gather", "reduce_scatter", "broadcast"] {
                let mut times = Vec::new();
                for i in 0..iters + 1 {
                    c.barrier(&group)?;
                    let t = Instant::now();
                    match op {
                        "all_reduce" => c.all_reduce(&group, &mut buf, ReduceOp::Sum)?,
                        "all_gather" => c.all_gather(&group, &send_part, &mut gathered)?,
                        "reduce_scatter" => {
                            c.reduce_scatter(&group, &buf, &mut part, ReduceOp::Sum)?
                        }
                        _ => c.broadcast(&group, &mut buf, 0)?,
                    }
                    c.barrier(&group)?;
                    if i > 0 {
                        times.push(t.elapsed().as_secs_f64());
                    }
                }
                let s = median(times);
                let bytes = (elems * 4) as f64;
                let algbw = bytes / s / 1e9;
                let factor = match op {
                    "all_reduce" => 2.0 * (n - 1.0) / n,
                    "broadcast" => 1.0,
                    _ => (n - 1.0) / n,
                };
                rows.push(json!({"op": op, "mib": mib, "ms": s * 1e3, "algbw_gbps": algbw, "busbw_gbps": algbw * factor}));
            }
        }
        Ok((c.backend(), rows))
    })?;
    let Some((backend, rows)) = rows else {
        return Ok(());
    };
    for r in &rows {
        eprintln!(
            "{backend:>10} {:>14} {:>3} MiB  {:>9.2} ms  algbw {:>6.2} GB/s  busbw {:>6.2} GB/s",
            r["op"].as_str().unwrap_or(""),
            r["mib"],
            r["ms"].as_f64().unwrap_or(0.0),
            r["algbw_gbps"].as_f64().unwrap_or(0.0),
            r["busbw_gbps"].as_f64().unwrap_or(0.0)
        );
    }
    if a.json {
        println!(
            "{}",
            json!({"bench": "comm", "backend": backend, "world_size": world, "results": rows})
        );
    }
    Ok(())
}

fn tp(a: TpArgs) -> Result<()> {
    let cfg = match a.model.as_str() {
        "small" => gpt2::Config {
            seq_length: a.seq_length,
            max_position_embeddings: a.seq_length.max(128),
            hidden_dropout: 0.0,
            attention_dropout: 0.0,
            ..gpt2::Config::new(4, 256, 4, 50257)
        },
        p => gpt2::Config {
            seq_length: a.seq_length,
            hidden_dropout: 0.0,
            attention_dropout: 0.0,
            ..gpt2::Config::preset(p)?
        },
    };
    let mut results: Vec<Value> = Vec::new();
    let mut base = None;
    for &tp in &a.tp {
        let layout = Layout {
            world_size: tp,
            tp,
            pp: 1,
            dp: 1,
            timeout: candle_deepscale::comm::default_timeout(),
        };
        let (b, s, iters) = (a.batch_size, a.seq_length, a.iters.max(1));
        let cfg = cfg.clone();
        let Some(ms) = launch(&layout, |ctx| {
            let src = RandomInit { seed: 1 };
            let pb = ParamBuilder::new(&src, &Device::Cpu, DType::F32).with_tp(ctx.tp()?);
            let model = Gpt2::new(&cfg, &pb)?;
            let params = model.parameters();
            let mut opt = AdamW::new(&params, AdamWConfig::default())?;
            let ids: Vec<u32> = (0..b * (s + 1))
                .map(|i| (i * 7919 % 50257) as u32)
                .collect();
            let t = Tensor::from_vec(ids, (b, s + 1), &Device::Cpu)?;
            let (x, y) = (t.narrow(1, 0, s)?, t.narrow(1, 1, s)?);
            let mut times = Vec::new();
            for i in 0..iters + 1 {
                let t0 = Instant::now();
                let logits = model.forward(&x, &ForwardCtx::eval())?;
                let loss = model.loss(&logits, &y)?;
                let grads = loss.backward()?;
                opt.step(&grads, 1.0)?;
                if i > 0 {
                    times.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            Ok(median(times))
        })?
        else {
            continue;
        };
        let base_ms = *base.get_or_insert(ms);
        eprintln!("tp={tp}: {ms:.1} ms/step ({:.2}x tp=1)", ms / base_ms);
        results.push(json!({"tp": tp, "ms_per_step": ms, "ratio_to_tp1": ms / base_ms, "tokens_per_s": (b * s) as f64 / (ms / 1e3)}));
    }
    if a.json {
        println!(
            "{}",
            json!({"bench": "tp", "model": a.model, "batch": a.batch_size, "seq": a.seq_length, "results": results})
        );
    }
    Ok(())
}
