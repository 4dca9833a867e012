//! `deepscale bench`: measurements behind BENCHMARKS.md.
//!
//! - `bench` (no subcommand): the training benchmark, see `bench_suite.rs`.
//! - `bench comm`: bandwidth of each collective over 1-64 MiB messages, in-process ranks or under
//!   mpirun (nccl-tests' algbw/busbw convention).
//! - `bench pipe`: pipeline bubble per stage and pp=2 against pp=1.
//! - `bench gemm`: GPT-2 124M's products on the system BLAS against the gemm crate.
//! - `bench train`: one rank's training step: engine vs stock candle vs the previous loop.
//! - `bench tp`: training-step time (forward, backward, AdamW) of one GPT-2 at several tensor-parallel
//!   sizes on in-process ranks, as ratios to tp=1.
use crate::args::Layout;
use crate::launch::launch;
use crate::memory_preflight::{check_bench, check_bytes, Shape};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_deepscale::comm::{Communicator, ReduceOp};
use candle_deepscale::layers::init::RandomInit;
use candle_deepscale::layers::module::ForwardCtx;
use candle_deepscale::layers::parameter::ParamBuilder;
use candle_deepscale::runtime::adamw::{AdamW, AdamWConfig};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::time::Instant;
use zoo::gpt2::{self, Gpt2};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: Option<BenchWhat>,
    #[command(flatten)]
    pub suite: crate::bench_suite::SuiteArgs,
}

#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// Collective bandwidth.
    Comm(CommArgs),
    /// The f32 products of a GPT-2 step (forward and backward shapes; 124M's by default) on the
    /// system BLAS against the gemm crate, alternating in one process.
    Gemm(GemmArgs),
    /// Training-step cost at several tensor-parallel sizes.
    Tp(TpArgs),
    /// The fused causal attention's forward + backward (GPT-2 124M's heads) per sequence length:
    /// in its tiles (online softmax over key tiles), in row blocks of whole rows and as the whole
    /// masked `t x t` square, alternating in one process.
    Attention(AttentionArgs),
    /// Data parallelism on the same cores: the training step at dp N (ZeRO stage S, the global
    /// batch split over the ranks; in-process, or the ranks of `mpirun -np N`) against one rank
    /// with the whole batch, alternating.
    Dp(crate::bench_dp::DpArgs),
    /// One AdamW step over a model's worth of parameters: the fused flat kernel against
    /// candle_nn::AdamW, and its bytes/s against the machine's measured memory bandwidth.
    Adam(AdamArgs),
    /// One rank's training step three ways in one run: the engine (per-layer backward, fused
    /// AdamW on flat buffers), stock candle (whole-graph backward, candle_nn::AdamW) and the
    /// previous version's loop (whole-graph backward, per-tensor AdamW).
    Train(TpArgs),
    /// Pipeline bubble: each stage's idle fraction against (p-1)/(m+p-1), and pp=2 step cost
    /// against pp=1.
    Pipe(PipeArgs),
    /// ZeRO-3 with NVMe offload against in memory on a model whose states exceed a RAM budget:
    /// step throughput ratio, the swapper's bytes/s against the disk's sequential bandwidth, and
    /// the estimator against the measured bytes.
    Offload(OffloadArgs),
    /// The whole-model engine (any candle model through `initialize`) against the stock candle
    /// loop (VarMap + candle_nn::AdamW) on one candle-nn model at one rank: step and optimizer.
    Whole(crate::bench_whole::WholeArgs),
}

#[derive(Args, Debug)]
pub struct OffloadArgs {
    #[arg(long, default_value_t = 6)]
    pub num_layers: usize,
    #[arg(long, default_value_t = 512)]
    pub hidden_size: usize,
    #[arg(long, default_value_t = 8)]
    pub num_attention_heads: usize,
    #[arg(long, default_value_t = 64)]
    pub seq_length: usize,
    #[arg(long, default_value_t = 2)]
    pub batch_size: usize,
    /// In-process data-parallel ranks.
    #[arg(long, default_value_t = 2)]
    pub world_size: usize,
    /// The RAM budget for model states per rank (MiB) the offloaded run must stay under.
    #[arg(long, default_value_t = 128)]
    pub ram_budget_mib: u64,
    /// Folder for the swap files (the "NVMe").
    #[arg(long, default_value = "/tmp/deepscale-nvme-bench")]
    pub nvme_path: std::path::PathBuf,
    #[arg(long, default_value_t = 1_000_000)]
    pub sub_group_size: usize,
    /// `offload_optimizer.buffer_count`: swap buffers (`sub_group_size` elements each) per
    /// rank; those beyond the working set read the next step's tiles early. Default: as many
    /// as the RAM budget holds, less 1/64 of it for the parameters kept whole.
    #[arg(long)]
    pub buffer_count: Option<usize>,
    /// `gradient_clipping` (0: none, so the NVMe step runs during backward; Megatron's
    /// `--clip-grad 1.0` makes it wait for the global norm, after backward).
    #[arg(long, default_value_t = 0.0)]
    pub gradient_clipping: f64,
    /// `stage3_prefetch_bucket_size` (elements; DeepSpeed's default 5e7 gathers this model whole
    /// at its first layer).
    #[arg(long, default_value_t = 50_000_000)]
    pub prefetch_bucket_size: usize,
    /// `stage3_max_live_parameters` (elements).
    #[arg(long, default_value_t = 1_000_000_000)]
    pub max_live_parameters: usize,
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PipeArgs {
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = [2usize, 4])]
    pub stages: Vec<usize>,
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = [1usize, 2, 4, 8, 16])]
    pub micro_batches: Vec<usize>,
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GemmArgs {
    /// Rounds; each times every shape on both backends (best of `--reps`), and the report takes
    /// the median of the per-round ratios.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Tokens per step (batch x sequence): 1024 for both bench configs.
    #[arg(long, default_value_t = 1024)]
    pub tokens: usize,
    /// Hidden size (768: GPT-2 124M; 256: the small GPT); the MLP is 4x, the vocabulary 50304.
    #[arg(long, default_value_t = 768)]
    pub hidden_size: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct AttentionArgs {
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = [256usize, 1024])]
    pub seq_lengths: Vec<usize>,
    /// Tokens per call (batch x sequence).
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
    #[arg(long, default_value_t = 12)]
    pub num_attention_heads: usize,
    #[arg(long, default_value_t = 64)]
    pub head_dim: usize,
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Keys per tile of the tiled kernel (default: the kernel's own).
    #[arg(long)]
    pub key_block: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct AdamArgs {
    /// GPT-2 preset whose parameters are updated.
    #[arg(long, default_value = "gpt2-125m")]
    pub model: String,
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CommArgs {
    /// In-process ranks (ignored under mpirun, where the processes are the ranks).
    #[arg(long, default_value_t = 2)]
    pub world_size: usize,
    /// Message sizes in MiB.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = [1usize, 4, 16, 64])]
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
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = [1usize, 2, 4])]
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
    let Some(what) = a.what else {
        return crate::bench_suite::run(a.suite);
    };
    match what {
        BenchWhat::Train(t) => train(t),
        BenchWhat::Pipe(p) => pipe(p),
        BenchWhat::Offload(o) => offload(o),
        BenchWhat::Whole(w) => crate::bench_whole::run(w),
        BenchWhat::Comm(c) => comm(c),
        BenchWhat::Tp(t) => tp(t),
        BenchWhat::Adam(a) => adam(a),
        BenchWhat::Gemm(g) => gemm(g),
        BenchWhat::Attention(a) => attention(a),
        BenchWhat::Dp(d) => crate::bench_dp::run(d),
    }
}

/// Forward + backward of one attention call in the kernel's tiles (online softmax over key
/// tiles), in row blocks of whole rows (the kernel before key tiles) and as the whole square.
fn attention(a: AttentionArgs) -> Result<()> {
    use candle_deepscale::ops::attention::{causal_attention_in_tiles, Tile, TILE};
    let (heads, d) = (a.num_attention_heads, a.head_dim);
    if a.key_block == Some(0) {
        bail!("bench attention: --key-block must be at least 1");
    }
    for (flag, v) in [
        ("--num-attention-heads", heads),
        ("--head-dim", d),
        ("--tokens", a.tokens),
        (
            "--seq-lengths",
            a.seq_lengths.iter().copied().min().unwrap_or(0),
        ),
    ] {
        if v == 0 {
            bail!("bench attention: {flag} must be at least 1");
        }
    }
    for &t in &a.seq_lengths {
        // Q, K, V, the output, the weights and their gradients (about twelve of the output's
        // size), and the square variant's t x t scores per thread.
        let elems = [(a.tokens / t).max(1), t, heads, d]
            .iter()
            .fold(1u64, |p, &x| p.saturating_mul(x as u64));
        let threads = rayon::current_num_threads() as u64;
        let square = (t as u64).saturating_pow(2).saturating_mul(2 * threads);
        let bytes = elems
            .saturating_mul(12)
            .saturating_add(square)
            .saturating_mul(4);
        check_bytes(
            &format!(
                "bench attention at --seq-lengths {t} --tokens {} --num-attention-heads {heads} --head-dim {d}",
                a.tokens
            ),
            bytes,
        )?;
    }
    let tiled = Tile {
        keys: a.key_block.unwrap_or(TILE.keys),
        ..TILE
    }
    .normalized();
    let mut rows = Vec::new();
    for &t in &a.seq_lengths {
        let b = (a.tokens / t.max(1)).max(1);
        let qkv = candle_core::Var::randn(0f32, 1.0, (b, t, heads * 3 * d), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1.0, (b, t, heads * d), &Device::Cpu)?;
        let time = |tile: Tile| -> Result<f64> {
            let mut best = f64::MAX;
            for _ in 0..3 {
                let t0 = Instant::now();
                let y = causal_attention_in_tiles(&qkv, heads, d, None, tile)?
                    .ok_or_else(|| anyhow::anyhow!("bench attention: the fused kernel is off"))?;
                drop((y * &w)?.sum_all()?.backward()?);
                best = best.min(t0.elapsed().as_secs_f64());
            }
            Ok(best * 1e3)
        };
        let whole_rows = Tile { keys: t, ..TILE };
        let square = Tile { rows: t, keys: t };
        let (mut tiled_ms, mut rows_ms, mut square_ms) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..a.rounds.max(1) {
            square_ms.push(time(square)?);
            rows_ms.push(time(whole_rows)?);
            tiled_ms.push(time(tiled)?);
        }
        // Per-thread score scratch, f32.
        let kib = |tile: Tile| (tile.scratch_len(t) * 4) as f64 / 1024.0;
        eprintln!(
            "t {t} (batch {b}, {heads} heads of {d}), ms (best of 3, medians) and per-thread score scratch: tiles of {}x{} {:.1} ms ({:.0} KiB), row blocks of whole rows {:.1} ms ({:.0} KiB), whole square {:.1} ms ({:.0} KiB)",
            tiled.rows,
            tiled.keys,
            median(tiled_ms.clone()),
            kib(tiled),
            median(rows_ms.clone()),
            kib(whole_rows),
            median(square_ms.clone()),
            kib(square)
        );
        rows.push(json!({"seq_length": t, "batch": b, "heads": heads, "head_dim": d,
            "row_block": tiled.rows, "key_block": tiled.keys, "tiled_ms": tiled_ms,
            "whole_rows_ms": rows_ms, "square_ms": square_ms,
            "scratch_kib": {"tiled": kib(tiled), "whole_rows": kib(whole_rows), "square": kib(square)}}));
    }
    if a.json {
        println!("{}", json!({"bench": "attention", "results": rows}));
    }
    Ok(())
}

/// The products of a GPT-2 step (124M's by default: 1024 tokens, hidden 768): `x w^T` forward,
/// `G w` for the input's gradient, `G^T x` for the weight's.
fn gemm(a: GemmArgs) -> Result<()> {
    use candle_deepscale::ops::{blas, matmul};
    let Some(lib) = blas::backend()? else {
        bail!(
            "bench gemm: no system BLAS loaded (install libblis4-serial, or name one with DEEPSCALE_BLAS)"
        )
    };
    let (t, h) = (a.tokens, a.hidden_size);
    if t == 0 || h == 0 {
        bail!("bench gemm: --tokens and --hidden-size must be at least 1 (got {t} and {h})");
    }
    // The largest product (the logits'): its operands and result on both backends.
    let (t64, h64) = (t as u64, h as u64);
    let elems = t64
        .saturating_mul(h64)
        .saturating_add(h64.saturating_mul(50304))
        .saturating_add(t64.saturating_mul(50304));
    check_bytes(
        &format!("bench gemm --tokens {t} --hidden-size {h}"),
        elems.saturating_mul(2 * 4),
    )?;
    // (what, rows of x, inputs k, outputs n, which product)
    let shapes: [(&str, usize, usize, usize, u8); 9] = [
        ("QKV x w^T", t, h, 3 * h, 0),
        ("attention out x w^T", t, h, h, 0),
        ("h->4h x w^T", t, h, 4 * h, 0),
        ("4h->h x w^T", t, 4 * h, h, 0),
        ("logits x w^T", t, h, 50304, 0),
        ("h->4h input grad G w", t, h, 4 * h, 1),
        ("logits input grad G w", t, h, 50304, 1),
        ("h->4h weight grad G^T x", t, h, 4 * h, 2),
        ("logits weight grad G^T x", t, h, 50304, 2),
    ];
    let mut rows = Vec::new();
    for (what, m, k, n, kind) in shapes {
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let g = Tensor::randn(0f32, 1.0, (m, n), &Device::Cpu)?;
        let run = || -> candle_core::Result<Tensor> {
            match kind {
                0 => matmul::linear(&x, &w, None),
                1 => matmul::matmul(&g, &w),
                _ => matmul::matmul(&g.t()?, &x),
            }
        };
        let reps = if n > 10_000 { a.reps.min(2) } else { a.reps }.max(1);
        let best = |on: bool| -> Result<f64> {
            blas::set_enabled(on);
            // A pause between backends: neither inherits the other's warm caches or spinning threads.
            std::thread::sleep(std::time::Duration::from_millis(100));
            let mut best = f64::MAX;
            for _ in 0..reps + 1 {
                let t0 = Instant::now();
                drop(run()?);
                best = best.min(t0.elapsed().as_secs_f64());
            }
            Ok(2.0 * (m * n * k) as f64 / best / 1e9)
        };
        let (mut ratios, mut ours, mut crate_) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..a.rounds.max(1) {
            let off = best(false)?;
            let on = best(true)?;
            ratios.push(on / off);
            ours.push(on);
            crate_.push(off);
        }
        blas::set_enabled(true);
        let ratio = median(ratios);
        eprintln!(
            "{what:>26} ({m} x {k} x {n}): BLAS {:.0} GFLOP/s, gemm crate {:.0} GFLOP/s (medians): {ratio:.2}x",
            median(ours.clone()),
            median(crate_.clone())
        );
        rows.push(
            json!({"what": what, "m": m, "k": k, "n": n, "blas_gflops": ours,
                         "gemm_crate_gflops": crate_, "ratio_median": ratio}),
        );
    }
    eprintln!("BLAS: {}", lib.name);
    if a.json {
        println!(
            "{}",
            json!({"bench": "gemm", "blas": lib.name, "results": rows})
        );
    }
    Ok(())
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
    if a.sizes_mib.contains(&0) {
        bail!("bench comm: --sizes-mib 0: every message size is at least 1 MiB")
    }
    // Each rank holds a message, its gathered copy and two chunks of it; in-process ranks
    // share this process.
    let largest = a.sizes_mib.iter().copied().max().unwrap_or(1) as u64;
    let layout = Layout {
        timeout: candle_deepscale::comm::default_timeout(),
        ..crate::args::Layout::in_process(world, 1, 1)
    };
    let ranks_here = crate::memory_preflight::ranks_here(&layout);
    check_bytes(
        &format!("bench comm --sizes-mib {largest} ({ranks_here} rank(s) in this process)"),
        (largest.saturating_mul(1 << 20) / world as u64)
            .saturating_mul(2 * world as u64 + 2)
            .saturating_mul(ranks_here),
    )?;
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
                for i in 0..=iters {
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

fn bench_config(a: &TpArgs) -> Result<gpt2::Config> {
    bench_model(&a.model, a.seq_length)
}

/// The benchmarks' synthetic batch: `b` rows of `s + 1` token ids below `vocab`, rows
/// `[row0, row0 + b)` of one fixed sequence (a data-parallel rank takes its own rows), as the
/// inputs and their next-token labels.
pub(crate) fn token_batch(
    (b, s): (usize, usize),
    row0: usize,
    vocab: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let first = row0 * (s + 1);
    let ids: Vec<u32> = (first..first + b * (s + 1))
        .map(|i| (i * 7919 % vocab) as u32)
        .collect();
    let t = Tensor::from_vec(ids, (b, s + 1), device)?;
    Ok((t.narrow(1, 0, s)?, t.narrow(1, 1, s)?))
}

/// A GPT-2 preset, or `small` (4 layers, hidden 256, 4 heads, vocab 50257), without dropout.
pub(crate) fn bench_model(model: &str, seq_length: usize) -> Result<gpt2::Config> {
    if seq_length == 0 {
        bail!("bench: --seq-length must be at least 1");
    }
    let cfg = match model {
        "small" => gpt2::Config {
            seq_length,
            max_position_embeddings: seq_length.max(128),
            hidden_dropout: 0.0,
            attention_dropout: 0.0,
            ..gpt2::Config::new(4, 256, 4, 50257)
        },
        p => gpt2::Config {
            seq_length,
            hidden_dropout: 0.0,
            attention_dropout: 0.0,
            ..gpt2::Config::preset(p)?
        },
    };
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("bench --model {model} --seq-length {seq_length}: {e}"))?;
    Ok(cfg)
}

fn tp(a: TpArgs) -> Result<()> {
    let cfg = bench_config(&a)?;
    let mut results: Vec<Value> = Vec::new();
    let mut base = None;
    for &tp in &a.tp {
        let layout = Layout::in_process(tp, tp, 1);
        let (b, s, iters) = (a.batch_size, a.seq_length, a.iters.max(1));
        let engine = candle_deepscale::runtime::engine::EngineConfig {
            train_micro_batch_size_per_gpu: b,
            ..Default::default()
        };
        check_bench(
            &format!(
                "bench tp --model {} --batch-size {b} --seq-length {s} at tp {tp}",
                a.model
            ),
            &Shape::gpt2(&cfg, s, tp)?,
            &layout,
            &engine,
            1,
        )?;
        let cfg = cfg.clone();
        let Some(ms) = launch(&layout, |ctx| {
            let src = RandomInit { seed: 1 };
            let pb = ParamBuilder::new(&src, &Device::Cpu, DType::F32).with_tp(ctx.tp()?);
            let model = Gpt2::new(&cfg, &pb)?;
            let params = model.parameters();
            let mut opt = AdamW::new(&params, AdamWConfig::default())?;
            let (x, y) = token_batch((b, s), 0, 50257, &Device::Cpu)?;
            let mut times = Vec::new();
            for i in 0..=iters {
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

/// Memory bandwidth for AdamW's access pattern, measured on the optimizer's own buffers: the same
/// four streams read and three written (28 bytes per element) with trivial arithmetic, split over
/// the cores like the fused kernel, best of 5 passes.
fn memory_bandwidth(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) -> f64 {
    use rayon::prelude::*;
    let c = 1 << 14;
    let mut best = f64::MAX;
    for k in 0..5 {
        let s = 1.0 - 1e-3 * k as f32;
        let t = Instant::now();
        p.par_chunks_mut(c)
            .zip(g.par_chunks(c))
            .zip(m.par_chunks_mut(c))
            .zip(v.par_chunks_mut(c))
            .for_each(|(((p, g), m), v)| {
                for (((p, g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = *m * s + g;
                    *v = *v * s + g;
                    *p = *p * s - *m + *v;
                }
            });
        best = best.min(t.elapsed().as_secs_f64());
    }
    (28 * p.len() as u64) as f64 / best
}

fn adam(a: AdamArgs) -> Result<()> {
    use candle_core::Var;
    use candle_deepscale::ops::adam::{adam_step, AdamStep};
    use candle_nn::Optimizer;
    let cfg = gpt2::Config::preset(&a.model)?;
    // The model, the flat parameters, gradients and moments, then candle_nn's moments and
    // gradients: about six copies of the parameters at the peak.
    let psi = cfg.parameter_total().unwrap_or(usize::MAX) as u64;
    check_bytes(
        &format!("bench adam --model {}", a.model),
        psi.saturating_mul(6 * 4),
    )?;
    let src = RandomInit { seed: 1 };
    let model = Gpt2::new(&cfg, &ParamBuilder::new(&src, &Device::Cpu, DType::F32))?;
    let params = model.parameters();
    let n: usize = params.iter().map(|p| p.meta.numel()).sum();
    let iters = a.iters.max(1);

    // Fused flat kernel.
    let mut p: Vec<f32> = Vec::with_capacity(n);
    for q in &params {
        p.extend(q.tensor().flatten_all()?.to_vec1::<f32>()?);
    }
    let g: Vec<f32> = (0..n).map(|i| ((i % 997) as f32 - 498.0) * 1e-4).collect();
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    let mut fused = Vec::new();
    for step in 1..=iters as u64 + 1 {
        let s = AdamStep {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            adam_w_mode: true,
            step,
            grad_scale: 1.0,
        };
        let t = Instant::now();
        adam_step(&mut p, &g, &mut m, &mut v, &s);
        if step > 1 {
            fused.push(t.elapsed().as_secs_f64());
        }
    }
    let bw = memory_bandwidth(&mut p, &g, &mut m, &mut v);
    drop((p, m, v));

    // candle_nn::AdamW on the model's own tensors (what a stock candle training loop does).
    let vars: Vec<Var> = params.iter().map(|q| q.var.clone()).collect();
    let mut opt = candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr: 1e-4,
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    // Gradients equal to `g`: the backward of sum(param * g).
    let mut off = 0;
    let mut total = Tensor::zeros((), DType::F32, &Device::Cpu)?;
    for q in &params {
        let k = q.meta.numel();
        let gq = Tensor::from_slice(&g[off..off + k], q.tensor().shape(), &Device::Cpu)?;
        total = (total + q.tensor().mul(&gq)?.sum_all()?)?;
        off += k;
    }
    let grads = total.backward()?;
    let mut stock = Vec::new();
    for i in 0..=iters {
        let t = Instant::now();
        opt.step(&grads)?;
        if i > 0 {
            stock.push(t.elapsed().as_secs_f64());
        }
    }
    let (f, c) = (median(fused), median(stock));
    let bytes = 28.0 * n as f64;
    eprintln!(
        "AdamW over {n} parameters: fused {:.1} ms, candle_nn::AdamW {:.1} ms ({:.1}x); fused moves {:.1} GB/s = {:.0}% of the {:.1} GB/s this machine moves for the same 4-read/3-write pattern",
        f * 1e3,
        c * 1e3,
        c / f,
        bytes / f / 1e9,
        100.0 * bytes / f / bw,
        bw / 1e9
    );
    if a.json {
        println!(
            "{}",
            json!({"bench": "adam", "params": n, "fused_ms": f * 1e3, "candle_nn_adamw_ms": c * 1e3,
                   "speedup_vs_candle": c / f, "fused_gbps": bytes / f / 1e9, "memory_bandwidth_gbps": bw / 1e9,
                   "fraction_of_bandwidth": bytes / f / bw})
        );
    }
    Ok(())
}

fn train(a: TpArgs) -> Result<()> {
    use candle_deepscale::layers::module::Activations;
    use candle_deepscale::runtime::engine::{Engine, EngineConfig};
    use candle_nn::Optimizer;
    let cfg = bench_config(&a)?;
    let (b, s, iters) = (a.batch_size, a.seq_length, a.iters.max(1));
    // Four models with their optimizers, as four ranks would hold them.
    check_bench(
        &format!(
            "bench train --model {} --batch-size {b} --seq-length {s}",
            a.model
        ),
        &Shape::gpt2(&cfg, s, 1)?,
        &Layout::in_process(1, 1, 1),
        &EngineConfig {
            train_micro_batch_size_per_gpu: b,
            ..Default::default()
        },
        4,
    )?;
    let (x, y) = token_batch((b, s), 0, 50257, &Device::Cpu)?;
    let src = RandomInit { seed: 1 };
    let build = || Gpt2::new(&cfg, &ParamBuilder::new(&src, &Device::Cpu, DType::F32));
    let opt = AdamWConfig::default();
    let (m_engine, m_stock, m_prev) = (std::sync::Arc::new(build()?), build()?, build()?);
    let mut engine = Engine::new(
        m_engine.clone(),
        EngineConfig {
            train_micro_batch_size_per_gpu: b,
            optimizer: opt,
            ..Default::default()
        },
        None,
        None,
    )?;
    let mut nn_opt = candle_nn::AdamW::new(
        m_stock.parameters().iter().map(|p| p.var.clone()).collect(),
        candle_nn::ParamsAdamW {
            lr: opt.lr,
            beta1: opt.beta1,
            beta2: opt.beta2,
            eps: opt.eps,
            weight_decay: opt.weight_decay,
        },
    )?;
    let prev_params = m_prev.parameters();
    let mut ref_opt = AdamW::new(&prev_params, opt)?;
    let m_unfused = std::sync::Arc::new(build()?);
    let mut engine_unfused = Engine::new(
        m_unfused.clone(),
        EngineConfig {
            train_micro_batch_size_per_gpu: b,
            optimizer: opt,
            ..Default::default()
        },
        None,
        None,
    )?;
    // Interleaved rounds (engine, engine with the composed ops, stock, previous) so all
    // see the same machine state. Stock candle and the previous loop use the composed ops.
    // DEEPSCALE_BENCH_COMPOSED_ONLY=1 runs both engines with the composed ops (an A/A check of
    // the first two slots).
    // The CPU kernels (LayerNorm, bias + GeLU, causal softmax, cross entropy, matmul) on or off
    // together.
    let fused = candle_deepscale::set_cpu_kernels;
    let mut times = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    let all_composed = std::env::var_os("DEEPSCALE_BENCH_COMPOSED_ONLY").is_some();
    for round in 0..=iters {
        fused(!all_composed);
        let t0 = Instant::now();
        engine.train_batch(vec![(Activations::new(x.clone()), |o: &Activations| {
            m_engine.loss(&o.hidden, &y)
        })])?;
        fused(false);
        let ta = Instant::now();
        engine_unfused.train_batch(vec![(Activations::new(x.clone()), |o: &Activations| {
            m_unfused.loss(&o.hidden, &y)
        })])?;
        let t1 = Instant::now();
        let loss = m_stock.loss(&m_stock.forward(&x, &ForwardCtx::eval())?, &y)?;
        nn_opt.backward_step(&loss)?;
        let t2 = Instant::now();
        let loss = m_prev.loss(&m_prev.forward(&x, &ForwardCtx::eval())?, &y)?;
        ref_opt.step(&loss.backward()?, 1.0)?;
        let t3 = Instant::now();
        if round > 0 {
            for (v, d) in times.iter_mut().zip([ta - t0, t2 - t1, t3 - t2, t1 - ta]) {
                v.push(d.as_secs_f64() * 1e3);
            }
        }
    }
    fused(true);
    let [engine_ms, stock_ms, previous_ms, unfused_ms] = times.map(median);
    let tps = |ms: f64| (b * s) as f64 / (ms / 1e3);
    eprintln!(
        "{} b{b} x s{s}: engine {engine_ms:.1} ms ({:.1} tokens/s), stock candle {stock_ms:.1} ms ({:.1}), previous loop {previous_ms:.1} ms ({:.1}), engine with composed ops {unfused_ms:.1} ms ({:.1}); engine {:.2}x stock, {:.2}x previous, {:.2}x composed ops",
        a.model,
        tps(engine_ms),
        tps(stock_ms),
        tps(previous_ms),
        tps(unfused_ms),
        stock_ms / engine_ms,
        previous_ms / engine_ms,
        unfused_ms / engine_ms
    );
    if a.json {
        println!(
            "{}",
            json!({"bench": "train", "model": a.model, "batch": b, "seq": s,
                "engine_tokens_per_s": tps(engine_ms), "stock_candle_tokens_per_s": tps(stock_ms),
                "previous_tokens_per_s": tps(previous_ms),
                "engine_composed_ops_tokens_per_s": tps(unfused_ms),
                "engine_ms": engine_ms, "stock_candle_ms": stock_ms, "previous_ms": previous_ms})
        );
    }
    Ok(())
}

/// One configuration of `bench pipe`: per-stage (busy, wall) medians over `iters` steps.
fn pipe_run(stages: usize, m: usize, iters: usize) -> Result<(Vec<(f64, f64)>, f64)> {
    use candle_deepscale::layers::module::Activations;
    use candle_deepscale::runtime::engine::{Engine, EngineConfig};
    // Eight equal blocks and a small vocabulary, so stages are balanced and the bubble shows.
    let cfg = gpt2::Config {
        seq_length: 64,
        max_position_embeddings: 64,
        hidden_dropout: 0.0,
        attention_dropout: 0.0,
        ..gpt2::Config::new(8, 128, 4, 1000)
    };
    let layout = Layout {
        timeout: candle_deepscale::comm::default_timeout(),
        ..crate::args::Layout::in_process(stages, 1, stages)
    };
    let (b, s) = (2usize, 64usize);
    let engine = EngineConfig {
        train_micro_batch_size_per_gpu: b,
        gradient_accumulation_steps: m,
        ..Default::default()
    };
    // Every micro-batch's tokens and labels (and their tensors) are made up front.
    check_bytes(
        &format!("bench pipe --micro-batches {m} (each micro-batch's inputs)"),
        (m as u64).saturating_mul((b * s * 8 + 1024) as u64),
    )?;
    check_bench(
        &format!("bench pipe at {stages} stage(s), {m} micro-batches"),
        &Shape::gpt2(&cfg, s, 1)?,
        &layout,
        &engine,
        1,
    )?;
    let res = launch(&layout, |ctx| {
        let src = RandomInit { seed: 1 };
        let model = std::sync::Arc::new(Gpt2::new(
            &cfg,
            &ParamBuilder::new(&src, &Device::Cpu, DType::F32),
        )?);
        let pipe = ctx.pipe()?;
        let stage: std::sync::Arc<dyn candle_deepscale::Sequential> = match &pipe {
            Some(p) => {
                let bounds = candle_deepscale::runtime::pipe::partition_layers(
                    &model.layers(),
                    stages,
                    &candle_deepscale::runtime::pipe::PartitionMethod::Parameters,
                )?;
                std::sync::Arc::new(candle_deepscale::layers::module::LayerSlice {
                    model: model.clone(),
                    range: bounds[p.stages.rank]..bounds[p.stages.rank + 1],
                })
            }
            None => model.clone(),
        };
        let mut engine = Engine::new(stage, engine.clone(), None, None)?;
        if let Some(p) = pipe.clone() {
            engine = engine.with_pipeline(p)?;
        }
        let (x, y) = token_batch((b, s), 0, 1000, &Device::Cpu)?;
        let (mut busy, mut wall) = (Vec::new(), Vec::new());
        for i in 0..=iters {
            let t0 = Instant::now();
            let mbs = (0..m)
                .map(|_| {
                    let (m_, y) = (&model, y.clone());
                    (Activations::new(x.clone()), move |o: &Activations| {
                        m_.loss(&o.hidden, &y)
                    })
                })
                .collect();
            engine.train_batch(mbs)?;
            let total = t0.elapsed().as_secs_f64();
            if i > 0 {
                let (bz, w) = engine.pipeline_timing().unwrap_or((total, total));
                busy.push(bz);
                wall.push(w);
            }
        }
        // Every stage's figures, gathered to rank 0.
        let mine = [median(busy), median(wall)];
        let mut all = vec![0f64; 2 * stages];
        match (&pipe, &ctx.comm) {
            (Some(p), Some(c)) => c.all_gather(&p.stages.group, &mine, &mut all)?,
            _ => all.copy_from_slice(&mine),
        }
        Ok(all)
    })?;
    let all = res.unwrap_or_default();
    let per: Vec<(f64, f64)> = all.chunks(2).map(|c| (c[0], c[1])).collect();
    let wall = per.iter().map(|p| p.1).fold(0.0, f64::max);
    Ok((per, wall))
}

fn pipe(a: PipeArgs) -> Result<()> {
    let mut rows = Vec::new();
    for &p in &a.stages {
        for &m in &a.micro_batches {
            let (per, wall) = pipe_run(p, m, a.iters)?;
            let expected = (p - 1) as f64 / (m + p - 1) as f64;
            let idle: Vec<f64> = per.iter().map(|(b, w)| 1.0 - b / w.max(1e-12)).collect();
            eprintln!(
                "pp={p} m={m:>2}: idle per stage {:?} (expected {expected:.3}), {:.1} ms/step",
                idle.iter()
                    .map(|x| (x * 1000.0).round() / 1000.0)
                    .collect::<Vec<_>>(),
                wall * 1e3
            );
            rows.push(json!({"pp": p, "micro_batches": m, "idle": idle, "expected_idle": expected, "ms_per_step": wall * 1e3}));
        }
    }
    // Step cost of pp=2 against pp=1 on the same model and batch (m = 8).
    let (_, one) = pipe_run(1, 8, a.iters)?;
    let (_, two) = pipe_run(2, 8, a.iters)?;
    eprintln!(
        "m=8: pp=1 {:.1} ms/step, pp=2 {:.1} ms/step ({:.2}x)",
        one * 1e3,
        two * 1e3,
        two / one
    );
    if a.json {
        println!(
            "{}",
            json!({"bench": "pipe", "rows": rows, "pp1_ms": one * 1e3, "pp2_ms": two * 1e3})
        );
    }
    Ok(())
}

/// The most swap buffers of `sub_group_size` elements a RAM budget of `budget` bytes holds,
/// 1/64 of it left to the parameters that stay whole (persistent) and the step's kept pieces.
fn budget_buffer_count(budget: u64, sub_group_size: usize) -> usize {
    use candle_deepscale::runtime::zero::offload_config::MAX_SWAP_BLOCK;
    let slot = candle_deepscale::runtime::zero::swap_tensor::slot_bytes(
        sub_group_size.clamp(1, MAX_SWAP_BLOCK),
    ) as u64;
    ((budget - budget / 64) / slot) as usize
}

fn offload(a: OffloadArgs) -> Result<()> {
    if !(a.gradient_clipping.is_finite() && a.gradient_clipping >= 0.0) {
        bail!(
            "bench offload: --gradient-clipping {} (a norm of 0 or more; 0: none)",
            a.gradient_clipping
        );
    }
    use candle_deepscale::comm::ProcessGroup;
    use candle_deepscale::layers::module::Activations;
    use candle_deepscale::runtime::engine::{Engine, EngineConfig};
    let cfg = gpt2::Config {
        seq_length: a.seq_length,
        max_position_embeddings: a.seq_length,
        hidden_dropout: 0.0,
        attention_dropout: 0.0,
        ..gpt2::Config::new(a.num_layers, a.hidden_size, a.num_attention_heads, 50257)
    };
    if a.ram_budget_mib == 0 {
        bail!("bench offload: --ram-budget-mib must be at least 1");
    }
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("bench offload: {e}"))?;
    let psi: u64 = cfg.parameter_counts().iter().map(|c| c.1 as u64).sum();
    let n = a.world_size.max(1);
    // The in-memory run (ZeRO-3 without offload) must fit in this process's memory.
    check_bench(
        &format!(
            "bench offload's in-memory run (--num-layers {} --hidden-size {} --batch-size {} --seq-length {})",
            a.num_layers, a.hidden_size, a.batch_size, a.seq_length
        ),
        &Shape::gpt2(&cfg, a.seq_length, 1)?,
        &Layout::in_process(n, 1, 1),
        &EngineConfig {
            zero_stage: 3,
            train_micro_batch_size_per_gpu: a.batch_size,
            ..EngineConfig::default()
        },
        1,
    )?;
    let (disk_write, disk_read, disk_direct) =
        candle_deepscale::runtime::zero::swap_tensor::sequential_bandwidth(
            &a.nvme_path,
            256 << 20,
        )?;
    let layout = Layout {
        timeout: std::time::Duration::from_secs(600),
        ..crate::args::Layout::in_process(n, 1, 1)
    };
    let buffer_count = a
        .buffer_count
        .unwrap_or_else(|| budget_buffer_count(a.ram_budget_mib << 20, a.sub_group_size));
    let mut rows = Vec::new();
    for nvme in [false, true] {
        let mut ec = EngineConfig {
            zero_stage: 3,
            train_micro_batch_size_per_gpu: a.batch_size,
            gradient_clipping: a.gradient_clipping,
            ..EngineConfig::default()
        };
        ec.stage3.prefetch_bucket_size = a.prefetch_bucket_size;
        ec.stage3.max_live_parameters = a.max_live_parameters;
        if nvme {
            ec.stage3.offload = Some(candle_deepscale::runtime::zero::OffloadSettings {
                optimizer_nvme: Some(a.nvme_path.clone()),
                param_nvme: Some(a.nvme_path.clone()),
                sub_group_size: a.sub_group_size,
                buffer_count,
                aio_thread_count: 2,
                ..Default::default()
            });
        }
        let (cfg, ec) = (&cfg, &ec);
        let r = launch(&layout, |ctx| {
            let dp: Option<ProcessGroup> = ctx.dp()?;
            let src = RandomInit { seed: 1 };
            let pb = ParamBuilder::new(&src, &Device::Cpu, DType::F32)
                .with_zero3(crate::training::zero3_construction(ec, dp.as_ref()));
            let model = std::sync::Arc::new(Gpt2::new(cfg, &pb)?);
            let mut engine = Engine::new(model.clone(), ec.clone(), dp, None)?;
            let state = engine.state_bytes();
            let (x, y) = token_batch((a.batch_size, a.seq_length), 0, 50257, &Device::Cpu)?;
            let mut times = Vec::new();
            let io0 = engine.optimizer().offload_io_bytes().unwrap_or((0, 0));
            let by0 = engine.optimizer().offload_io_by_buffer();
            for i in 0..=a.iters {
                if i == 1 {
                    engine.take_wall_clock();
                }
                let t = Instant::now();
                let m = &model;
                let y = y.clone();
                engine.train_batch(vec![(
                    Activations::new(x.clone()),
                    move |o: &Activations| m.loss(&o.hidden, &y),
                )])?;
                if i > 0 {
                    times.push(t.elapsed().as_secs_f64());
                }
                let _ = io0;
            }
            let io1 = engine.optimizer().offload_io_bytes().unwrap_or((0, 0));
            // Where the I/O goes (bytes per step, all steps including the warm-up).
            let by_buffer: serde_json::Map<String, serde_json::Value> = engine
                .optimizer()
                .offload_io_by_buffer()
                .into_iter()
                .zip(&by0)
                .map(|((name, r, w), (_, r0, w0))| {
                    let per = |b: u64| b as f64 / (a.iters as f64 + 1.0);
                    (name, json!({"read": per(r - r0), "written": per(w - w0)}))
                })
                .collect();
            // Per-step means of the timed steps.
            let split = engine.take_wall_clock();
            let step = median(times);
            Ok(json!({"nvme": nvme, "ms_per_step": step * 1e3,
                      "model_state_bytes": state.total(),
                      "formula_bytes": engine.formula_bytes().total(),
                      "swap_bytes_per_step": (io1.0 + io1.1 - io0.0 - io0.1) as f64 / (a.iters as f64 + 1.0),
                      "swap_read_bytes_per_step": (io1.0 - io0.0) as f64 / (a.iters as f64 + 1.0),
                      "swap_written_bytes_per_step": (io1.1 - io0.1) as f64 / (a.iters as f64 + 1.0),
                      "swap_bytes_per_step_by_buffer": by_buffer,
                      "direct_io": engine.optimizer().offload_direct(),
                      "blocks_read_ahead": engine.optimizer().offload_reads_ahead(),
                      "blocks_read_early": engine.optimizer().offload_reads_early(),
                      "elements_stepped_in_backward_per_step":
                          engine.optimizer().offload_stepped_in_backward() as f64 / (a.iters as f64 + 1.0),
                      "split_ms": {"forward": split.forward_ms, "backward": split.backward_ms,
                                   "optimizer_step": split.step_ms}}))
        })?;
        if let Some(v) = r {
            rows.push(v);
        }
    }
    let budget = a.ram_budget_mib << 20;
    let (ram, off) = (&rows[0], &rows[1]);
    let step_ratio =
        ram["ms_per_step"].as_f64().unwrap_or(0.0) / off["ms_per_step"].as_f64().unwrap_or(1.0);
    let swap_rate = off["swap_bytes_per_step"].as_f64().unwrap_or(0.0)
        / (off["ms_per_step"].as_f64().unwrap_or(1.0) / 1e3);
    let est =
        candle_deepscale::runtime::zero::estimate::engine_bytes(3, psi, n as u64, 4, 0, 0).total();
    let v = json!({
        "model": {"num_layers": a.num_layers, "hidden_size": a.hidden_size, "parameters": psi},
        "buffer_count": buffer_count,
        "world_size": n,
        "gradient_clipping": a.gradient_clipping,
        "ram_budget_bytes": budget,
        "in_memory": ram, "nvme": off,
        "in_memory_exceeds_budget": ram["model_state_bytes"].as_u64().unwrap_or(0) > budget,
        "nvme_within_budget": off["model_state_bytes"].as_u64().unwrap_or(u64::MAX) <= budget,
        "throughput_ratio_nvme_to_ram": step_ratio,
        "swapper_bytes_per_s": swap_rate,
        "disk_seq_write_bytes_per_s": disk_write,
        "disk_seq_read_bytes_per_s": disk_read,
        "disk_probe_direct_io": disk_direct,
        "swapper_fraction_of_disk": swap_rate / ((disk_write + disk_read) / 2.0),
        "estimate_engine_zero3_bytes": est,
        "estimate_vs_measured_in_memory": ram["model_state_bytes"].as_f64().unwrap_or(0.0) / est as f64,
    });
    let mib = |b: f64| b / (1u64 << 20) as f64;
    eprintln!(
        "offload: {} parameters, {n} ranks; model state per rank in memory {:.1} MiB vs NVMe {:.1} MiB (budget {} MiB)",
        psi,
        mib(ram["model_state_bytes"].as_f64().unwrap_or(0.0)),
        mib(off["model_state_bytes"].as_f64().unwrap_or(0.0)),
        a.ram_budget_mib
    );
    eprintln!(
        "  step {:.0} ms in memory, {:.0} ms with NVMe offload (throughput ratio {:.2}); swapper {:.0} MiB/s vs disk {:.0} MiB/s write, {:.0} MiB/s read; estimate/measured {:.3}",
        ram["ms_per_step"].as_f64().unwrap_or(0.0),
        off["ms_per_step"].as_f64().unwrap_or(0.0),
        step_ratio,
        mib(swap_rate),
        mib(disk_write),
        mib(disk_read),
        ram["model_state_bytes"].as_f64().unwrap_or(0.0) / est as f64
    );
    for (what, row) in [("in memory", ram), ("NVMe", off)] {
        let s = &row["split_ms"];
        eprintln!(
            "  {what}: forward {:.0} | backward {:.0} | optimizer_step {:.0} ms per step",
            s["forward"].as_f64().unwrap_or(0.0),
            s["backward"].as_f64().unwrap_or(0.0),
            s["optimizer_step"].as_f64().unwrap_or(0.0)
        );
    }
    if a.json {
        println!("{v}");
    }
    Ok(())
}
