//! `deepscale estimate-memory`: model-state memory per GPU and per CPU as DeepSpeed 0.19.8's
//! `estimate_zero2_model_states_mem_needs_all_cold` / `estimate_zero3_..._all_cold` compute them
//! for the model's parameter counts, and the bytes this engine's own CPU layout holds per rank
//! (what `pretrain-gpt2` measures and reports as `model_state_bytes`).
use crate::args::print_json;
use anyhow::{bail, Context, Result};
use candle_deepscale::runtime::zero::estimate::{deepspeed_zero2, deepspeed_zero3, engine_bytes};
use clap::Args;
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct EstimateMemoryArgs {
    /// A GPT-2 preset: gpt2-tiny, gpt2-125m, gpt2-345m, gpt2-1.3b, gpt2-10b, gpt2-40b.
    #[arg(long)]
    pub model: Option<String>,
    /// An HF GPT-2 folder (its config.json).
    #[arg(long)]
    pub hf_dir: Option<PathBuf>,
    /// Or Megatron's shape flags.
    #[arg(long)]
    pub num_layers: Option<usize>,
    #[arg(long)]
    pub hidden_size: Option<usize>,
    #[arg(long)]
    pub num_attention_heads: Option<usize>,
    #[arg(long, default_value_t = 1024)]
    pub max_position_embeddings: usize,
    /// GPUs (ranks) per node, DeepSpeed's `num_gpus_per_node`.
    #[arg(long, default_value_t = 1)]
    pub num_gpus: u64,
    #[arg(long, default_value_t = 1)]
    pub num_nodes: u64,
    #[arg(long, default_value_t = 1.5)]
    pub additional_buffer_factor: f64,
    /// ZeRO-3: parameters below this many elements stay whole on every rank.
    #[arg(long, default_value_t = 100_000)]
    pub param_persistence_threshold: usize,
    #[arg(long)]
    pub json: bool,
}

fn config(a: &EstimateMemoryArgs) -> Result<zoo::gpt2::Config> {
    match (&a.model, &a.hf_dir, a.num_layers, a.hidden_size, a.num_attention_heads) {
        (Some(m), None, None, None, None) => Ok(zoo::gpt2::Config::preset(m)?),
        (None, Some(d), None, None, None) => match zoo::hub::detect_arch(d)? {
            zoo::hub::Arch::Gpt2 => Ok(zoo::gpt2::Config::from_hf_json(&d.join("config.json"))
                .with_context(|| format!("--hf-dir {}", d.display()))?),
            zoo::hub::Arch::Bert => bail!(
                "--hf-dir {}: a BERT model; estimate-memory reads GPT-2 configs",
                d.display()
            ),
        },
        (None, None, Some(l), Some(h), Some(n)) => {
            let mut c = zoo::gpt2::Config::new(l, h, n, 50257);
            c.max_position_embeddings = a.max_position_embeddings;
            c.seq_length = a.max_position_embeddings;
            c.validate()?;
            Ok(c)
        }
        _ => bail!(
            "give one of --model PRESET, --hf-dir DIR, or --num-layers/--hidden-size/--num-attention-heads"
        ),
    }
}

pub fn run(a: EstimateMemoryArgs) -> Result<()> {
    if a.num_gpus == 0 || a.num_nodes == 0 {
        bail!("--num-gpus and --num-nodes must be positive")
    }
    let cfg = config(&a)?;
    let counts = cfg.parameter_counts();
    let total: u64 = counts.iter().map(|c| c.1 as u64).sum();
    let largest = cfg.largest_module_params() as u64;
    let persistent: u64 = counts
        .iter()
        .filter(|c| c.1 < a.param_persistence_threshold)
        .map(|c| c.1 as u64)
        .sum();
    let (g, m, b) = (a.num_gpus, a.num_nodes, a.additional_buffer_factor);
    let gib = |x: u64| x as f64 / (1u64 << 30) as f64;
    let mut zero2 = Vec::new();
    for off in [true, false] {
        let (cpu, gpu) = deepspeed_zero2(total, g, m, off, b);
        zero2.push(
            json!({"offload_optimizer": if off { "cpu" } else { "none" },
                          "per_cpu_bytes": cpu, "per_gpu_bytes": gpu}),
        );
    }
    let mut zero3 = Vec::new();
    for co in [true, false] {
        for cp in [true, false] {
            if !co && cp {
                continue;
            }
            for zi in [true, false] {
                let (cpu, gpu, _) = deepspeed_zero3(total, largest, g, m, co, cp, zi, b);
                zero3.push(json!({"offload_param": if cp { "cpu" } else { "none" },
                                  "offload_optimizer": if co { "cpu" } else { "none" },
                                  "zero_init": zi, "per_cpu_bytes": cpu, "per_gpu_bytes": gpu}));
            }
        }
    }
    // This engine: one rank per GPU slot, model states in host memory.
    let n = g.saturating_mul(m);
    let mut engine = Vec::new();
    for (dtype, pb) in [("fp32", 4u64), ("fp16", 2)] {
        for stage in 0..=3u8 {
            let s = engine_bytes(stage, total, n, pb, persistent, 0);
            let peak = engine_bytes(
                stage,
                total,
                n,
                pb,
                persistent,
                if stage == 3 { largest } else { 0 },
            );
            engine.push(json!({"zero_stage": stage, "params": dtype,
                               "model_state_bytes": s.total(), "parameters": s.parameters,
                               "gradients": s.gradients, "optimizer": s.optimizer,
                               "peak_model_state_bytes": peak.total()}));
        }
    }
    let v: Value = json!({
        "total_params": total,
        "largest_layer_params": largest,
        "num_gpus_per_node": g,
        "num_nodes": m,
        "deepspeed": {"zero2": zero2, "zero3": zero3},
        "engine": engine,
    });
    let nodes = if m > 1 { "nodes" } else { "node" };
    let gpus = if g > 1 { "GPUs" } else { "GPU" };
    eprintln!(
        "Estimated memory needed for params, optim states and gradients for a:\n\
         HW: Setup with {m} {nodes}, {g} {gpus} per node.\n\
         SW: Model with {}M total params, {}M largest layer params.",
        total / 1_000_000,
        largest / 1_000_000
    );
    eprintln!("DeepSpeed 0.19.8, ZeRO-2:\n  per CPU  |  per GPU |   Options");
    for z in v["deepspeed"]["zero2"].as_array().into_iter().flatten() {
        eprintln!(
            " {:7.2}GB | {:6.2}GB | offload_optimizer={}",
            gib(z["per_cpu_bytes"].as_u64().unwrap_or(0)),
            gib(z["per_gpu_bytes"].as_u64().unwrap_or(0)),
            z["offload_optimizer"].as_str().unwrap_or("")
        );
    }
    eprintln!("DeepSpeed 0.19.8, ZeRO-3:\n  per CPU  |  per GPU |   Options");
    for z in v["deepspeed"]["zero3"].as_array().into_iter().flatten() {
        eprintln!(
            " {:7.2}GB | {:6.2}GB | offload_param={}, offload_optimizer={}, zero_init={}",
            gib(z["per_cpu_bytes"].as_u64().unwrap_or(0)),
            gib(z["per_gpu_bytes"].as_u64().unwrap_or(0)),
            z["offload_param"].as_str().unwrap_or(""),
            z["offload_optimizer"].as_str().unwrap_or(""),
            u8::from(z["zero_init"].as_bool().unwrap_or(false))
        );
    }
    eprintln!("This engine, per rank ({n} ranks, model states in host memory):");
    for e in v["engine"].as_array().into_iter().flatten() {
        eprintln!(
            "  ZeRO-{} {} parameters: {:8.2}GB (peak with the largest layer gathered {:.2}GB)",
            e["zero_stage"],
            e["params"].as_str().unwrap_or(""),
            gib(e["model_state_bytes"].as_u64().unwrap_or(0)),
            gib(e["peak_model_state_bytes"].as_u64().unwrap_or(0))
        );
    }
    if a.json {
        print_json(
            v,
            &crate::args::Layout {
                timeout: std::time::Duration::from_secs(1),
                ..crate::args::Layout::in_process(n as usize, 1, 1)
            },
        );
    }
    Ok(())
}
