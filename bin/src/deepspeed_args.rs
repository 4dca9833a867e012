//! The DeepSpeed flags of Megatron's launch scripts (`--deepspeed`, `--deepspeed_config`, the ZeRO
//! and activation-checkpointing switches, the seed scripts' data flags): each maps onto the
//! DeepSpeed config or engine, or is refused with the reason. None is ignored.
use anyhow::{bail, Context, Result};
use candle_deepscale::runtime::config::DeepSpeedConfig;
use candle_deepscale::runtime::engine::EngineConfig;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug, Clone, Default)]
pub struct DeepSpeedArgs {
    /// Use the DeepSpeed config (DeepSpeed's --deepspeed).
    #[arg(long, alias = "deepspeed")]
    pub deepscale: bool,
    /// DeepSpeed JSON config.
    #[arg(
        long = "deepscale-config",
        visible_alias = "deepspeed_config",
        alias = "deepspeed-config",
        alias = "deepscale_config"
    )]
    pub deepscale_config: Option<PathBuf>,
    /// ZeRO stage (must agree with the config's zero_optimization.stage).
    #[arg(long)]
    pub zero_stage: Option<u8>,
    /// Elements per gradient bucket (zero_optimization.reduce_bucket_size).
    #[arg(long)]
    pub zero_reduce_bucket_size: Option<u64>,
    /// zero_optimization.allgather_bucket_size: elements per all-gather of the updated parameters
    /// (stages 1 and 2; all ranks' together).
    #[arg(long)]
    pub zero_allgather_bucket_size: Option<u64>,
    /// zero_optimization.contiguous_gradients (the engine's gradient buffers are always flat).
    #[arg(long, alias = "zero-contiguous-gradients")]
    pub zero_contigious_gradients: bool,
    /// zero_optimization.reduce_scatter (stage 2 always reduce-scatters its buckets).
    #[arg(long)]
    pub zero_reduce_scatter: bool,
    /// Megatron: use DeepSpeed's activation checkpointing (the engine's own; enable it with
    /// --checkpoint-activations).
    #[arg(long, alias = "deepscale-activation-checkpointing")]
    pub deepspeed_activation_checkpointing: bool,
    /// Split saved layer inputs across the tensor-parallel group.
    #[arg(long)]
    pub partition_activations: bool,
    /// Keep saved layer inputs in host memory.
    #[arg(long)]
    pub checkpoint_in_cpu: bool,
    /// activation_checkpointing.contiguous_memory_optimization (saved inputs are separate buffers
    /// already; the option only fights GPU fragmentation).
    #[arg(long, alias = "contiguous-checkpointing")]
    pub contigious_checkpointing: bool,
    /// activation_checkpointing.synchronize_checkpoint_boundary (CPU work is synchronous).
    #[arg(long)]
    pub synchronize_each_layer: bool,
    /// DeepSpeedCPUAdam: the engine's fused optimizer runs on the CPU already.
    #[arg(long)]
    pub cpu_optimizer: bool,
    /// Megatron dataset implementation: mmap, lazy, cached or infer.
    #[arg(long)]
    pub data_impl: Option<String>,
    /// Megatron tokenizer: GPT2BPETokenizer.
    #[arg(long)]
    pub tokenizer_type: Option<String>,
    /// nccl, gloo or mpi (ranks are in-process threads, or MPI processes under mpirun).
    #[arg(long)]
    pub distributed_backend: Option<String>,
    /// With --load: start Adam's state afresh (parameters, counters and scaler are still loaded).
    #[arg(long)]
    pub no_load_optim: bool,
    /// Megatron's lazy loader for loose JSON (the data file is streamed and tokenized once).
    #[arg(long)]
    pub lazy_loader: bool,
    /// Loose (one object per line) JSON data: how .jsonl is read.
    #[arg(long)]
    pub loose_json: bool,
    /// Megatron/DeepSpeed ZeRO-3 example flag: embeddings built partitioned (what ZeRO-3 does here for every parameter).
    #[arg(long)]
    pub scattered_embeddings: bool,
    /// Megatron/DeepSpeed ZeRO-3 example flag: gather parameters layer by layer (what ZeRO-3 does here).
    #[arg(long)]
    pub split_transformers: bool,
    /// DeepSpeed TiledLinear (refused: pays off only with ZeRO-3 parameter offload to GPU memory).
    #[arg(long)]
    pub memory_centric_tiled_linear: bool,
    /// TiledLinear tiles (refused with --memory-centric-tiled-linear).
    #[arg(long)]
    pub tile_factor: Option<usize>,
    /// Save native checkpoints here.
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// Save every this many iterations (and at the end).
    #[arg(long)]
    pub save_interval: Option<u64>,
    /// Keep only the newest N checkpoints under --save.
    #[arg(long)]
    pub keep_last: Option<usize>,
}

fn agree<T: PartialEq + std::fmt::Display + Copy>(
    flag: Option<T>,
    config: Option<T>,
    flag_name: &str,
    key: &str,
) -> Result<Option<T>> {
    match (flag, config) {
        (Some(f), Some(c)) if f != c => {
            bail!("{flag_name} {f} disagrees with the DeepSpeed config's {key} {c}")
        }
        (f, c) => Ok(f.or(c)),
    }
}

impl DeepSpeedArgs {
    /// Refuses the flags this build cannot honour, with the reason.
    pub fn refuse_unsupported(&self) -> Result<()> {
        let refuse = |on: bool, flag: &str, why: &str| -> Result<()> {
            if on {
                bail!("not supported: {flag}, because {why}")
            }
            Ok(())
        };
        if self.save_interval.is_some() && self.save.is_none() {
            bail!("--save-interval needs --save DIR")
        }
        refuse(
            self.memory_centric_tiled_linear || self.tile_factor.is_some(),
            "--memory-centric-tiled-linear/--tile-factor",
            "tiled linear layers only pay off with ZeRO-3 parameter offload, which this engine does not have yet",
        )?;
        if let Some(d) = &self.data_impl {
            if !matches!(d.as_str(), "mmap" | "lazy" | "cached" | "infer") {
                bail!("--data-impl must be mmap, lazy, cached or infer, got `{d}`")
            }
        }
        if let Some(b) = &self.distributed_backend {
            if !matches!(b.as_str(), "nccl" | "gloo" | "mpi") {
                bail!("--distributed-backend must be nccl, gloo or mpi, got `{b}`")
            }
        }
        Ok(())
    }

    /// The DeepSpeed config named by --deepscale-config (checked against --deepscale).
    pub fn config(&self) -> Result<Option<DeepSpeedConfig>> {
        match (&self.deepscale_config, self.deepscale) {
            (Some(p), _) => Ok(Some(
                DeepSpeedConfig::from_file(p).with_context(|| "--deepscale-config".to_string())?,
            )),
            (None, true) => {
                bail!("--deepscale needs --deepscale-config FILE (alias --deepspeed_config)")
            }
            (None, false) => Ok(None),
        }
    }

    /// Applies the ZeRO and checkpointing flags to `c`, checking them against the config `ds`.
    pub fn apply(&self, ds: Option<&DeepSpeedConfig>, c: &mut EngineConfig) -> Result<()> {
        let z = ds.and_then(|d| d.zero_optimization.as_ref());
        if let Some(s) = agree(
            self.zero_stage,
            z.map(|z| z.stage),
            "--zero-stage",
            "zero_optimization.stage",
        )? {
            if s > 3 {
                bail!("--zero-stage {s}: ZeRO stages are 0, 1, 2 and 3")
            }
            c.zero_stage = s;
        }
        if let Some(b) = agree(
            self.zero_reduce_bucket_size,
            z.and_then(|z| z.reduce_bucket_size),
            "--zero-reduce-bucket-size",
            "zero_optimization.reduce_bucket_size",
        )? {
            c.reduce_bucket_size = b.max(1) as usize;
        }
        if let Some(b) = agree(
            self.zero_allgather_bucket_size,
            z.and_then(|z| z.allgather_bucket_size),
            "--zero-allgather-bucket-size",
            "zero_optimization.allgather_bucket_size",
        )? {
            c.allgather_bucket_size = b.max(1) as usize;
        }
        let a = ds.and_then(|d| d.activation_checkpointing.as_ref());
        c.partition_activations |= self.partition_activations;
        c.cpu_checkpointing |= self.checkpoint_in_cpu;
        if (self.partition_activations || self.checkpoint_in_cpu || self.contigious_checkpointing)
            && a.is_none()
            && c.checkpoint_num_layers == 0
        {
            bail!("--partition-activations, --checkpoint-in-cpu and --contigious-checkpointing need --checkpoint-activations")
        }
        Ok(())
    }

    /// One line per accepted flag whose effect is built in, so the user sees it was read.
    pub fn notes(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut note = |on: bool, s: &'static str| {
            if on {
                v.push(s)
            }
        };
        note(
            self.zero_contigious_gradients,
            "--zero-contigious-gradients: gradient buffers are flat and contiguous",
        );
        note(
            self.zero_reduce_scatter,
            "--zero-reduce-scatter: ZeRO-2 reduce-scatters each bucket",
        );
        note(
            self.deepspeed_activation_checkpointing,
            "--deepspeed-activation-checkpointing: the engine's checkpointing is DeepSpeed's",
        );
        note(self.contigious_checkpointing, "--contigious-checkpointing: saved inputs are separate host buffers (no GPU fragmentation to avoid)");
        note(
            self.synchronize_each_layer,
            "--synchronize-each-layer: CPU work is synchronous at every layer",
        );
        note(
            self.cpu_optimizer,
            "--cpu-optimizer: the fused AdamW is DeepSpeedCPUAdam's kernel",
        );
        note(
            self.lazy_loader || self.loose_json,
            "--lazy-loader/--loose-json: .jsonl is read one object per line",
        );
        note(
            self.scattered_embeddings,
            "--scattered-embeddings: under ZeRO-3 every parameter, the embeddings included, is built partitioned over the data-parallel ranks",
        );
        note(
            self.split_transformers,
            "--split-transformers: ZeRO-3 gathers parameters layer by layer, with prefetch and a live-parameter cap",
        );
        note(
            self.distributed_backend.is_some(),
            "--distributed-backend: CPU ranks talk through in-process threads or MPI (under mpirun), GPU ranks (--device cuda) over NCCL",
        );
        v
    }
}
