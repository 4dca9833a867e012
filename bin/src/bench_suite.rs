//! `deepscale bench` with no subcommand: the training benchmark of the CPU-performance work.
//! For each config (the small GPT and GPT-2 124M by default): the engine's fp32 training step
//! (forward, backward, fused AdamW) in tokens/s, forward-only tokens/s, MFU (model FLOP/s over the
//! f32 GEMM peak measured at start through the step's matmul — the definition the training log
//! uses — and, as `mfu_paired`, against the GEMM measured beside each step), the peak RSS while the config
//! ran, and the bf16 mode's step (bf16 matrix products, fp32 master weights) against fp32; with
//! `--compare-torch`, PyTorch's figures from `../shared/peers/torch_bench.py` in the same run, as
//! ratios.
use crate::args::DeviceKind;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_deepscale::layers::init::RandomInit;
use candle_deepscale::layers::module::{Activations, ForwardCtx};
use candle_deepscale::layers::parameter::ParamBuilder;
use candle_deepscale::ops::bf16_gemm;
use candle_deepscale::ops::matmul::{self, Precision};
use candle_deepscale::runtime::engine::{Engine, EngineConfig};
use candle_deepscale::runtime::meters::{
    self, flops_per_token, gemm_peak_flops, gemm_peak_flops_of,
};
use clap::Args;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;
use zoo::gpt2::{self, Gpt2};

#[derive(Args, Debug, Clone)]
pub struct SuiteArgs {
    /// Configs: `small` (4 layers, hidden 256, 4 heads, vocab 50257, b8 x s128), `gpt2-125m`
    /// (b4 x s256), and `gpt2-125m-s1024` / `gpt2-125m-s2048` (b1, Megatron's sequence lengths).
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = ["small".to_string(), "gpt2-125m".to_string()])]
    pub config: Vec<String>,
    /// Timed training steps per config (after one warm-up step); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Also run PyTorch (`torch_bench.py` in the peer venv) on the same configs.
    #[arg(long)]
    pub compare_torch: bool,
    /// The peer venv's python.
    #[arg(long, default_value = "/tmp/torch-venv/bin/python")]
    pub torch_python: PathBuf,
    /// `torch_bench.py` (default: ../shared/peers/torch_bench.py beside the repository).
    #[arg(long)]
    pub torch_bench: Option<PathBuf>,
    /// With `--compare-torch`: alternate this engine and PyTorch this many times per config and
    /// report the median of the per-round ratios (the machine's speed drifts between runs).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Skip the bf16 mode's training step (bf16 matrix products, fp32 master weights; on a GPU,
    /// bf16 parameters).
    #[arg(long)]
    pub no_bf16: bool,
    /// With `--compare-torch`: also pair the bf16 mode with PyTorch's `torch.autocast("cpu",
    /// torch.bfloat16)` step and forward (`torch_bench.py ... prec=bf16`). `auto` does so where
    /// this CPU has AVX512-BF16; elsewhere PyTorch has no bf16 kernel either and its autocast step
    /// takes minutes (about a minute per step for `small` on an AVX2 core pair).
    #[arg(long, value_enum, default_value = "auto")]
    pub torch_bf16: TorchBf16,
    /// Where the benchmark runs: the CPU, or GPU 0 (`cuda`, a build with `--features cuda`).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceKind,
    #[arg(long)]
    pub json: bool,
}

/// When `--compare-torch` also runs PyTorch's bf16 autocast.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TorchBf16 {
    /// Where this CPU has AVX512-BF16.
    Auto,
    On,
    Off,
}

/// (layers, hidden, heads, vocab, batch, seq) of a config name.
fn shape(name: &str) -> Result<(gpt2::Config, usize, usize, &'static str)> {
    Ok(match name {
        "small" => (
            gpt2::Config {
                seq_length: 128,
                max_position_embeddings: 128,
                hidden_dropout: 0.0,
                attention_dropout: 0.0,
                ..gpt2::Config::new(4, 256, 4, 50257)
            },
            8,
            128,
            "small",
        ),
        "gpt2-125m" => (
            gpt2::Config {
                seq_length: 256,
                hidden_dropout: 0.0,
                attention_dropout: 0.0,
                ..gpt2::Config::preset("gpt2-125m")?
            },
            4,
            256,
            "gpt2s",
        ),
        // Megatron's sequence lengths at micro-batch 1 (the long-sequence goal of the perf work).
        "gpt2-125m-s1024" | "gpt2-125m-s2048" => {
            let (seq, torch) = if name.ends_with("1024") {
                (1024, "gpt2s batch=1 seq=1024")
            } else {
                (2048, "gpt2s batch=1 seq=2048")
            };
            (
                gpt2::Config {
                    seq_length: seq,
                    max_position_embeddings: seq,
                    hidden_dropout: 0.0,
                    attention_dropout: 0.0,
                    ..gpt2::Config::preset("gpt2-125m")?
                },
                1,
                seq,
                torch,
            )
        }
        other => bail!(
            "bench: unknown config `{other}` (small, gpt2-125m, gpt2-125m-s1024, gpt2-125m-s2048)"
        ),
    })
}

/// Resets the kernel's peak-RSS mark (VmHWM) so the next reading covers what follows only.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Minor page faults of this process so far (fresh pages the kernel had to zero: allocator churn).
fn minor_faults() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            rest.split(' ').nth(7)?.parse().ok()
        })
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// GFLOP/s of the GEMM peak through the matmul the step uses (`gemm_peak_flops`), at the
/// process's matmul precision; best of `tries`.
fn peak_gflops(tries: usize) -> Result<f64> {
    Ok(gemm_peak_flops(&Device::Cpu, tries)? / 1e9)
}

/// The GEMM peak (GFLOP/s) with every product at `precision` (the bf16 mode's denominator).
pub fn op_gemm_gflops(precision: Precision) -> Result<f64> {
    let prev = matmul::float32_matmul_precision();
    matmul::set_float32_matmul_precision(precision);
    let g = peak_gflops(5);
    matmul::set_float32_matmul_precision(prev);
    g
}

struct Measured {
    tokens_per_s: f64,
    fwd_tokens_per_s: f64,
    flops_per_token: f64,
    params: usize,
    peak_rss: u64,
    step_ms: Vec<f64>,
    /// The GEMM peak measured right before each timed step (this VM's speed drifts by up to 30%
    /// within minutes, so each step is set against the machine it ran on).
    step_peak_gflops: Vec<f64>,
    faults_per_step: u64,
    /// The engine's own split of a timed step (DeepSpeed's `wall_clock_breakdown`), means in ms.
    split: candle_deepscale::runtime::meters::WallClock,
}

impl Measured {
    /// Median over the steps of achieved FLOP/s against the GEMM peak measured next to the step.
    fn paired_mfu(&self, tokens: f64) -> f64 {
        median(
            self.step_ms
                .iter()
                .zip(&self.step_peak_gflops)
                .map(|(ms, g)| tokens * self.flops_per_token / (ms / 1e3) / (g * 1e9))
                .collect(),
        )
    }
}

/// The engine's training step and forward with every matrix product in bf16 (fp32 parameters
/// as master weights, fp32 activations; the forward is what `evaluate --bf16` and `generate
/// --bf16` run): medians of `iters` steps after a warm-up.
fn measure_bf16(cfg: &gpt2::Config, b: usize, s: usize, iters: usize) -> Result<Measured> {
    let prev = matmul::float32_matmul_precision();
    matmul::set_float32_matmul_precision(Precision::Bf16);
    let m = measure(cfg, b, s, iters, true);
    matmul::set_float32_matmul_precision(prev);
    m
}

fn measure(
    cfg: &gpt2::Config,
    b: usize,
    s: usize,
    iters: usize,
    forward: bool,
) -> Result<Measured> {
    measure_on(cfg, b, s, iters, forward, &Device::Cpu, DType::F32)
}

/// [`measure`] on `device` with parameters of `dtype` (on a GPU: bf16 parameters in bf16 mode,
/// no paired GEMM beside each step — the GPU's clock does not drift like this VM's).
fn measure_on(
    cfg: &gpt2::Config,
    b: usize,
    s: usize,
    iters: usize,
    forward: bool,
    device: &Device,
    dtype: DType,
) -> Result<Measured> {
    reset_peak_rss();
    let cpu = device.is_cpu();
    let src = RandomInit { seed: 1 };
    let model = std::sync::Arc::new(Gpt2::new(cfg, &ParamBuilder::new(&src, device, dtype))?);
    let params: usize = model
        .parameters()
        .iter()
        .map(|p| p.tensor().elem_count())
        .sum();
    let mut engine = Engine::new(
        model.clone(),
        EngineConfig {
            train_micro_batch_size_per_gpu: b,
            bf16: dtype == DType::BF16,
            ..Default::default()
        },
        None,
        None,
    )?;
    let (x, y) = crate::bench::token_batch((b, s), 0, 50257, device)?;
    let mut step_ms = Vec::new();
    let mut step_peak_gflops = Vec::new();
    let mut faults = 0;
    let mut gemm_faults = 0;
    for i in 0..=iters {
        if i > 0 && cpu {
            let f = minor_faults();
            step_peak_gflops.push(peak_gflops(2)?);
            gemm_faults += minor_faults() - f;
        }
        if i == 1 {
            faults = minor_faults();
            engine.take_wall_clock();
        }
        let t0 = Instant::now();
        engine.train_batch(vec![(Activations::new(x.clone()), |o: &Activations| {
            model.loss(&o.hidden, &y)
        })])?;
        if i > 0 {
            step_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let split = engine.take_wall_clock();
    let faults_per_step = (minor_faults() - faults).saturating_sub(gemm_faults) / iters as u64;
    let mut fwd = Vec::new();
    for i in 0..if forward { 3 } else { 0 } {
        let t0 = Instant::now();
        let logits = model.full_logits(&model.forward(&x, &ForwardCtx::eval())?)?;
        device.synchronize()?;
        drop(logits);
        if i > 0 {
            fwd.push(t0.elapsed().as_secs_f64());
        }
    }
    let tokens = (b * s) as f64;
    Ok(Measured {
        tokens_per_s: tokens / (median(step_ms.clone()) / 1e3),
        fwd_tokens_per_s: if fwd.is_empty() {
            f64::NAN
        } else {
            tokens / median(fwd)
        },
        flops_per_token: flops_per_token(
            cfg.num_layers,
            cfg.hidden_size,
            cfg.ffn_hidden_size,
            cfg.padded_vocab_size(1),
            s,
        ),
        params,
        peak_rss: crate::metrics::peak_rss_bytes(),
        step_ms,
        step_peak_gflops,
        faults_per_step,
        split,
    })
}

fn torch_bench_path(a: &SuiteArgs) -> Result<PathBuf> {
    if let Some(p) = &a.torch_bench {
        return Ok(p.clone());
    }
    let candidates = [
        PathBuf::from("../shared/peers/torch_bench.py"),
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/peers/torch_bench.py"
        )),
    ];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .context("--compare-torch: torch_bench.py not found (give --torch-bench PATH)")
}

fn torch(a: &SuiteArgs, what: &str) -> Result<Value> {
    let script = torch_bench_path(a)?;
    // A bare name (`python3`) is looked up on PATH when it runs.
    if a.torch_python.components().count() > 1 && !a.torch_python.exists() {
        bail!(
            "--compare-torch: {} is missing; set up the peer venv as ../shared/peers/README.md says",
            a.torch_python.display()
        )
    }
    let out = std::process::Command::new(&a.torch_python)
        .arg(&script)
        .args(what.split_whitespace())
        .output()
        .with_context(|| format!("running {} {}", a.torch_python.display(), script.display()))?;
    if !out.status.success() {
        bail!(
            "torch_bench.py {what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("torch_bench.py {what} printed `{line}`"))
}

/// One process, one rank: everything runs on a rayon worker, as `launch` runs a lone rank.
pub fn run(a: SuiteArgs) -> Result<()> {
    if a.torch_bf16 == TorchBf16::On {
        if !a.compare_torch {
            bail!(
                "--torch-bf16 on pairs the bf16 mode with PyTorch's autocast: add --compare-torch"
            )
        }
        if a.no_bf16 {
            bail!("--torch-bf16 on with --no-bf16: there is no bf16 run to pair; drop one of them")
        }
    }
    if a.device == DeviceKind::Cuda {
        return run_gpu(a);
    }
    candle_deepscale::ops::threads::on_worker_thread(|| run_on_worker(a))
}

/// `bench --device cuda`: the training step and the forward on GPU 0 in fp32 and with bf16
/// parameters, MFU against the GPU's own GEMM peak at each dtype (measured at start).
fn run_gpu(a: SuiteArgs) -> Result<()> {
    for name in &a.config {
        shape(name)?;
    }
    if a.compare_torch {
        bail!("not supported: --compare-torch with --device cuda, because torch_bench.py times the CPU")
    }
    let device = Device::new_cuda(0)
        .map_err(|e| anyhow::anyhow!("--device cuda: {e} (build with --features cuda)"))?;
    let peak = gemm_peak_flops_of(&device, DType::F32, 5)? / 1e9;
    eprintln!("GPU GEMM peak (2048^3, best of 5): fp32 {peak:.0} GFLOP/s");
    let bf16_peak = if a.no_bf16 {
        None
    } else {
        let g = gemm_peak_flops_of(&device, DType::BF16, 5)? / 1e9;
        eprintln!("GPU GEMM peak (2048^3, best of 5): bf16 {g:.0} GFLOP/s");
        Some(g)
    };
    let mut rows = Vec::new();
    for name in &a.config {
        let (cfg, b, s, _) = shape(name)?;
        let m = measure_on(&cfg, b, s, a.iters.max(1), true, &device, DType::F32)?;
        let mfu = meters::mfu(m.tokens_per_s, m.flops_per_token, peak * 1e9);
        let mut row = json!({
            "config": name, "batch": b, "seq": s, "params": m.params,
            "tokens_per_s": m.tokens_per_s, "step_ms": m.step_ms,
            "fwd_tokens_per_s": m.fwd_tokens_per_s, "mfu": mfu,
            "forward_ms": m.split.forward_ms, "backward_ms": m.split.backward_ms,
            "optimizer_step_ms": m.split.step_ms,
        });
        let mut line = format!(
            "{name} b{b} x s{s} on GPU: fp32 train {:.0} tokens/s (MFU {:.0}% of {peak:.0} GFLOP/s), forward {:.0} tokens/s",
            m.tokens_per_s,
            100.0 * mfu,
            m.fwd_tokens_per_s
        );
        if let Some(bf16_peak) = bf16_peak {
            let h = measure_on(&cfg, b, s, a.iters.max(1), true, &device, DType::BF16)?;
            let bf16_mfu = meters::mfu(h.tokens_per_s, h.flops_per_token, bf16_peak * 1e9);
            row["bf16_tokens_per_s"] = json!(h.tokens_per_s);
            row["bf16_fwd_tokens_per_s"] = json!(h.fwd_tokens_per_s);
            row["bf16_vs_fp32"] = json!(h.tokens_per_s / m.tokens_per_s);
            row["bf16_mfu"] = json!(bf16_mfu);
            line += &format!(
                "; bf16 train {:.0} tokens/s ({:.2}x fp32, MFU {:.0}% of {bf16_peak:.0} GFLOP/s), forward {:.0} tokens/s",
                h.tokens_per_s,
                h.tokens_per_s / m.tokens_per_s,
                100.0 * bf16_mfu,
                h.fwd_tokens_per_s
            );
        }
        eprintln!("{line}");
        rows.push(row);
    }
    if a.json {
        println!(
            "{}",
            json!({"bench": "train", "device": "cuda", "gemm_gflops": peak,
                   "bf16_gemm_gflops": bf16_peak, "results": rows})
        );
    }
    Ok(())
}

fn run_on_worker(a: SuiteArgs) -> Result<()> {
    for name in &a.config {
        shape(name)?;
    }
    // The one MFU definition (the training log's too): model FLOP/s over this GEMM peak,
    // measured once at start with the library the step uses.
    let peak = peak_gflops(5)?;
    // PyTorch's GEMM peak is `torch_bench.py matmul`, left out here: its bf16 half runs for
    // minutes on CPUs where torch has no bf16 kernel.
    let backend = candle_deepscale::ops::blas::describe();
    eprintln!("f32 GEMM peak (2048^3, best of 5, the MFU denominator): {peak:.1} GFLOP/s; f32 products on {backend}");
    let bf16_kernel = match (
        candle_deepscale::ops::matmul::bf16_kernel_in_use(),
        bf16_gemm::available(),
    ) {
        (true, _) => "avx512bf16",
        (false, true) => "rounded operands on the AVX-512 f32 BLAS (faster than avx512bf16 here)",
        (false, false) => "emulated (no AVX512-BF16)",
    };
    let bf16_peak = if a.no_bf16 {
        None
    } else {
        let g = op_gemm_gflops(Precision::Bf16)?;
        eprintln!("bf16 GEMM (2048^3, {bf16_kernel}): {g:.1} GFLOP/s");
        Some(g)
    };
    let pairable = a.compare_torch && bf16_peak.is_some();
    let torch_bf16 = pairable
        && match a.torch_bf16 {
            TorchBf16::Auto => bf16_gemm::available(),
            TorchBf16::On => true,
            TorchBf16::Off => false,
        };
    if pairable && !torch_bf16 {
        eprintln!(
            "the bf16 mode is not paired with PyTorch's autocast (--torch-bf16 {:?}; this CPU's bf16 products are {bf16_kernel})",
            a.torch_bf16
        );
    }
    let mut rows = Vec::new();
    for name in &a.config {
        let (cfg, b, s, torch_name) = shape(name)?;
        let m = measure(&cfg, b, s, a.iters.max(1), true)?;
        let mfu = meters::mfu(m.tokens_per_s, m.flops_per_token, peak * 1e9);
        let mfu_paired = m.paired_mfu((b * s) as f64);
        let mut row = json!({
            "config": name,
            "batch": b,
            "seq": s,
            "params": m.params,
            "tokens_per_s": m.tokens_per_s,
            "step_ms": m.step_ms,
            "fwd_tokens_per_s": m.fwd_tokens_per_s,
            "mfu": mfu,
            "mfu_paired": mfu_paired,
            "step_gemm_gflops": m.step_peak_gflops,
            "peak_rss_bytes": m.peak_rss,
            "page_faults_per_step": m.faults_per_step,
            "forward_ms": m.split.forward_ms,
            "backward_ms": m.split.backward_ms,
            "optimizer_step_ms": m.split.step_ms,
        });
        let mut line = format!(
            "{name} b{b} x s{s}: train {:.1} tokens/s (MFU {:.0}% of the {peak:.0} GFLOP/s GEMM peak; {:.0}% against the GEMM measured beside each step), forward {:.1} tokens/s, peak RSS {:.2} GiB, {} page faults per step; step split (ms): forward {:.0} | backward {:.0} | optimizer_step {:.0}",
            m.tokens_per_s,
            100.0 * mfu,
            100.0 * mfu_paired,
            m.fwd_tokens_per_s,
            m.peak_rss as f64 / (1u64 << 30) as f64,
            m.faults_per_step,
            m.split.forward_ms,
            m.split.backward_ms,
            m.split.step_ms
        );
        let mut bf16_rounds = Vec::new();
        if let Some(bf16_peak) = bf16_peak {
            let h = measure_bf16(&cfg, b, s, a.iters.max(1))?;
            let t = h.tokens_per_s;
            // Against the bf16 GEMM's own peak: the products are what this mode speeds up.
            let bf16_mfu = meters::mfu(t, m.flops_per_token, bf16_peak * 1e9);
            row["bf16_tokens_per_s"] = json!(t);
            row["bf16_fwd_tokens_per_s"] = json!(h.fwd_tokens_per_s);
            row["bf16_vs_fp32"] = json!(t / m.tokens_per_s);
            row["bf16_mfu"] = json!(bf16_mfu);
            line += &format!(
                "; bf16 train {t:.1} tokens/s ({:.2}x fp32, MFU {:.0}% of the {bf16_peak:.0} GFLOP/s bf16 GEMM), forward {:.1} tokens/s",
                t / m.tokens_per_s,
                100.0 * bf16_mfu,
                h.fwd_tokens_per_s
            );
            bf16_rounds.push(h);
        }
        if a.compare_torch {
            // Round 1 pairs the measurement above with PyTorch; later rounds measure both again.
            let (mut ours, mut theirs) = (vec![m.tokens_per_s], Vec::new());
            let (mut ours_fwd, mut theirs_fwd) = (vec![m.fwd_tokens_per_s], Vec::new());
            let mut torch_bf16_rounds = Vec::new();
            for round in 0..a.rounds.max(1) {
                if round > 0 {
                    let m = measure(&cfg, b, s, a.iters.max(1), true)?;
                    ours.push(m.tokens_per_s);
                    ours_fwd.push(m.fwd_tokens_per_s);
                }
                let t = torch(&a, torch_name)?;
                theirs.push(t["tokens_per_s"].as_f64().unwrap_or(f64::NAN));
                theirs_fwd.push(t["fwd_tokens_per_s"].as_f64().unwrap_or(f64::NAN));
                if torch_bf16 {
                    if round > 0 {
                        bf16_rounds.push(measure_bf16(&cfg, b, s, a.iters.max(1))?);
                    }
                    torch_bf16_rounds.push(torch(&a, &format!("{torch_name} prec=bf16"))?);
                }
            }
            let ratio =
                |x: &[f64], y: &[f64]| median(x.iter().zip(y).map(|(a, b)| a / b).collect());
            let (train, fwd) = (ratio(&ours, &theirs), ratio(&ours_fwd, &theirs_fwd));
            row["rounds_tokens_per_s"] = json!(ours);
            row["rounds_fwd_tokens_per_s"] = json!(ours_fwd);
            row["torch_tokens_per_s"] = json!(median(theirs.clone()));
            row["torch_fwd_tokens_per_s"] = json!(median(theirs_fwd.clone()));
            row["rounds_torch_tokens_per_s"] = json!(theirs);
            row["rounds_torch_fwd_tokens_per_s"] = json!(theirs_fwd);
            row["vs_torch"] = json!(train);
            row["fwd_vs_torch"] = json!(fwd);
            line += &format!(
                "; PyTorch train {:.1}, forward {:.1} tokens/s: {train:.2}x train, {fwd:.2}x forward (median of {} paired rounds)",
                median(theirs),
                median(theirs_fwd),
                a.rounds.max(1)
            );
            if torch_bf16 {
                let pick = |v: &[Value], k: &str| -> Vec<f64> {
                    v.iter()
                        .map(|t| t[k].as_f64().unwrap_or(f64::NAN))
                        .collect()
                };
                let (theirs, theirs_fwd) = (
                    pick(&torch_bf16_rounds, "tokens_per_s"),
                    pick(&torch_bf16_rounds, "fwd_tokens_per_s"),
                );
                let ours: Vec<f64> = bf16_rounds.iter().map(|h| h.tokens_per_s).collect();
                let ours_fwd: Vec<f64> = bf16_rounds.iter().map(|h| h.fwd_tokens_per_s).collect();
                let (train, fwd) = (ratio(&ours, &theirs), ratio(&ours_fwd, &theirs_fwd));
                row["rounds_bf16_tokens_per_s"] = json!(ours);
                row["rounds_bf16_fwd_tokens_per_s"] = json!(ours_fwd);
                row["rounds_torch_bf16_tokens_per_s"] = json!(theirs);
                row["rounds_torch_bf16_fwd_tokens_per_s"] = json!(theirs_fwd);
                row["bf16_vs_torch_bf16"] = json!(train);
                row["bf16_fwd_vs_torch_bf16"] = json!(fwd);
                line += &format!(
                    "; against PyTorch's bf16 autocast (train {:.1}, forward {:.1} tokens/s): {train:.2}x train, {fwd:.2}x forward",
                    median(theirs),
                    median(theirs_fwd)
                );
            }
        }
        eprintln!("{line}");
        rows.push(row);
    }
    if a.json {
        println!(
            "{}",
            json!({
                "bench": "train",
                "gemm_gflops": peak,
                "gemm_backend": backend,
                "bf16_gemm_gflops": bf16_peak,
                "bf16_kernel": bf16_kernel,
                "results": rows
            })
        );
    }
    Ok(())
}
