//! Argument groups shared by the subcommands (DESIGN.md, "Interfaces every command keeps").
use anyhow::{bail, Result};
use candle_core::DType;
use clap::Args;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The flags the user typed (as clap ids: `num_layers`), as opposed to defaults.
static GIVEN: OnceLock<Vec<String>> = OnceLock::new();

/// Records which flags of the subcommand came from the command line.
pub fn remember_command_line(m: &clap::ArgMatches) {
    let sub = m.subcommand().map(|(_, s)| s).unwrap_or(m);
    let given = sub
        .ids()
        .filter(|id| sub.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine))
        .map(|id| id.as_str().to_string())
        .collect();
    let _ = GIVEN.set(given);
}

/// Whether `--flag` (its clap id, `num_layers`) was on the command line rather than a default.
pub fn given(id: &str) -> bool {
    GIVEN.get().is_some_and(|g| g.iter().any(|x| x == id))
}

/// Megatron's `check_checkpoint_args`: model-shape flags the user gave must equal the loaded
/// model's (`what` names the source: "--load DIR").
pub fn check_shape_flags(what: &str, flags: &[(&str, usize, usize)]) -> Result<()> {
    for (id, flag, model) in flags {
        if given(id) && flag != model {
            bail!(
                "--{} {flag} disagrees with {what}, whose model has {id} {model} (drop the flag, \
                 or start a new model without {})",
                id.replace('_', "-"),
                what.split_whitespace().next().unwrap_or(what)
            )
        }
    }
    Ok(())
}

/// Where the model comes from.
#[derive(Args, Debug, Clone, Default)]
pub struct ModelArgs {
    /// Local Hugging Face model folder (config.json, *.safetensors, tokenizer files).
    #[arg(long)]
    pub hf_dir: Option<PathBuf>,
    /// Hugging Face Hub repository NAME[@REVISION] (cached by hf-hub; HF_HUB_OFFLINE=1 reads the cache only).
    #[arg(long)]
    pub hf_repo: Option<String>,
    /// A native DeepScale checkpoint (a --save directory or one of its tags); it carries the model
    /// config and tokenizer and loads at any layout.
    #[arg(long)]
    pub load: Option<PathBuf>,
}

/// The process grid: in-process ranks, tensor and pipeline parallel sizes.
#[derive(Args, Debug, Clone)]
pub struct LayoutArgs {
    /// Number of in-process ranks.
    #[arg(long, default_value_t = 1)]
    pub world_size: usize,
    /// Tensor ("model") parallel size.
    #[arg(long, alias = "tensor-model-parallel-size", default_value_t = 1)]
    pub model_parallel_size: usize,
    /// Pipeline parallel size (Megatron-LM's --pipeline-model-parallel-size).
    #[arg(long, alias = "pipeline-model-parallel-size", default_value_t = 1)]
    pub pipe_parallel_size: usize,
    /// The local rank the `deepspeed` launcher appends for every process; LOCAL_RANK (or Open
    /// MPI's local rank) must agree.
    #[arg(long = "local_rank", alias = "local-rank")]
    pub local_rank: Option<usize>,
    /// How layers are cut into pipeline stages: uniform, parameters or type:REGEX (default: the
    /// DeepSpeed config's pipeline.partition, else type:transformer as GPT2ModelPipe does).
    #[arg(long)]
    pub partition_method: Option<String>,
    /// Seconds any collective may wait for its peers before failing (default: $DEEPSCALE_COMM_TIMEOUT or 300).
    #[arg(long)]
    pub comm_timeout: Option<f64>,
    /// Where tensors live: cpu, or cuda (one GPU per rank, the local rank's; a build with
    /// `--features nccl` (or `cuda` for one rank)). Ranks on GPUs talk over NCCL.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceKind,
    /// NCCL bootstrap through a file instead of TCP, for processes started by a launcher other
    /// than mpirun (RANK and WORLD_SIZE in the environment, as torchrun sets them): a path every
    /// rank can read, where rank 0 writes the NCCL id. Without it such processes exchange the id
    /// over TCP at MASTER_ADDR, port MASTER_PORT+1 (or $DEEPSCALE_RENDEZVOUS_PORT).
    #[arg(long)]
    pub comm_file: Option<PathBuf>,
}

/// `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DeviceKind {
    #[default]
    Cpu,
    Cuda,
}

/// A validated layout.
#[derive(Debug, Clone)]
pub struct Layout {
    pub world_size: usize,
    pub tp: usize,
    pub pp: usize,
    pub dp: usize,
    /// Deadline of every collective.
    pub timeout: std::time::Duration,
    pub device: DeviceKind,
    /// This process is one rank of a torchrun-style NCCL world: its rank and how the NCCL id
    /// reaches it.
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub bootstrap: Option<(usize, Bootstrap)>,
}

/// How the NCCL id of a torchrun-style world (RANK, WORLD_SIZE, no MPI) reaches every rank.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
pub enum Bootstrap {
    /// `--comm-file`: rank 0 writes it, the others read it.
    File(PathBuf),
    /// The TCP rendezvous (host, port): MASTER_ADDR and MASTER_PORT + 1.
    Tcp(String, u16),
}

impl Layout {
    /// A CPU layout of in-process ranks (benchmarks, tools).
    pub fn in_process(world_size: usize, tp: usize, pp: usize) -> Self {
        Self {
            world_size,
            tp,
            pp,
            dp: world_size / (tp * pp).max(1),
            timeout: candle_deepscale::comm::default_timeout(),
            device: DeviceKind::Cpu,
            bootstrap: None,
        }
    }
}

fn env_usize(name: &str) -> Result<Option<usize>> {
    match std::env::var(name) {
        Ok(v) => match v.parse() {
            Ok(n) => Ok(Some(n)),
            Err(_) => bail!("environment variable {name}={v} is not a number"),
        },
        Err(_) => Ok(None),
    }
}

impl LayoutArgs {
    pub fn layout(&self) -> Result<Layout> {
        let (mut w, tp, pp) = (
            self.world_size,
            self.model_parallel_size,
            self.pipe_parallel_size,
        );
        if let Some(n) = crate::launch::mpi_world_size() {
            // Under mpirun the processes are the ranks.
            if w != 1 && w != n {
                bail!("--world-size {w} disagrees with the {n} processes mpirun started")
            }
            w = n;
        }
        if let Some(l) = self.local_rank {
            let env = env_usize("LOCAL_RANK")?.or(env_usize("OMPI_COMM_WORLD_LOCAL_RANK")?);
            if let Some(e) = env.filter(|e| *e != l) {
                bail!("--local_rank {l} disagrees with the environment's local rank {e}")
            }
        }
        // A torchrun / deepspeed-launcher environment without MPI: GPU ranks bootstrap NCCL
        // themselves; CPU ranks would otherwise each train a world of their own.
        let torchrun = match crate::launch::mpi_world_size() {
            Some(_) => None,
            None => match (env_usize("RANK")?, env_usize("WORLD_SIZE")?) {
                (Some(rank), Some(n)) if n > 1 || self.comm_file.is_some() => Some((rank, n)),
                _ => None,
            },
        };
        if self.comm_file.is_some() && self.device != DeviceKind::Cuda {
            bail!("--comm-file bootstraps NCCL: it needs --device cuda")
        }
        let bootstrap = match torchrun {
            None if self.comm_file.is_some() => bail!(
                "--comm-file {}: each process needs RANK and WORLD_SIZE in its environment",
                self.comm_file.as_deref().unwrap_or(Path::new("")).display()
            ),
            None => None,
            Some((rank, n)) if self.device != DeviceKind::Cuda => bail!(
                "RANK={rank} WORLD_SIZE={n} come from a torchrun-style launcher, but this \
                 process would train alone: on CPUs DeepScale's ranks are in-process threads \
                 (--world-size {n}) or MPI processes (mpirun -np {n} deepscale ..., or \
                 `deepscale launch`, or the DeepSpeed launcher with --launcher openmpi \
                 --no_python --no_local_rank); on GPUs add --device cuda (the NCCL id then \
                 travels over TCP at MASTER_ADDR, port MASTER_PORT+1)"
            ),
            Some((rank, n)) => {
                if w != 1 && w != n {
                    bail!("--world-size {w} disagrees with WORLD_SIZE={n}")
                }
                if rank >= n {
                    bail!("RANK={rank} is not below WORLD_SIZE={n}")
                }
                w = n;
                let how = match &self.comm_file {
                    Some(path) => Bootstrap::File(path.clone()),
                    None => {
                        let (host, port) =
                            candle_deepscale::comm::tcp_rendezvous::address_from_env()?;
                        Bootstrap::Tcp(host, port)
                    }
                };
                Some((rank, how))
            }
        };
        if w == 0 || tp == 0 || pp == 0 {
            bail!("--world-size, --model-parallel-size and --pipe-parallel-size must be positive")
        }
        if w % (tp * pp) != 0 {
            bail!("--world-size {w} is not divisible by model-parallel size {tp} x pipe-parallel size {pp}")
        }
        let timeout = match self.comm_timeout {
            Some(t) if t > 0.0 && t.is_finite() && t < 1e9 => std::time::Duration::from_secs_f64(t),
            Some(t) => bail!("--comm-timeout must be a positive number of seconds, got {t}"),
            None => candle_deepscale::comm::timeout_from_env()?
                .unwrap_or(std::time::Duration::from_secs(300)),
        };
        Ok(Layout {
            world_size: w,
            tp,
            pp,
            dp: w / (tp * pp),
            timeout,
            device: self.device,
            bootstrap,
        })
    }
}

impl LayoutArgs {
    /// `--partition-method` against the DeepSpeed config's `pipeline` section (which must agree
    /// with the flags).
    pub fn partition_method(
        &self,
        ds: Option<&candle_deepscale::runtime::config::DeepSpeedConfig>,
    ) -> Result<candle_deepscale::runtime::pipe::PartitionMethod> {
        let section = ds.and_then(|d| d.pipeline.as_ref());
        if let Some(stages) = section
            .and_then(|p| p.stages.as_ref())
            .and_then(|v| v.as_u64())
        {
            let pp = self.pipe_parallel_size;
            if stages as usize != pp {
                bail!("the DeepSpeed config's pipeline.stages {stages} disagrees with --pipe-parallel-size {pp}")
            }
        }
        let method = match (
            &self.partition_method,
            section.and_then(|p| p.partition.clone()),
        ) {
            (Some(f), Some(c)) if !f.eq_ignore_ascii_case(&c) => {
                bail!("--partition-method {f} disagrees with the DeepSpeed config's pipeline.partition {c}")
            }
            (f, c) => f.clone().or(c).unwrap_or_else(|| "type:transformer".into()),
        };
        Ok(method.parse()?)
    }
}

impl Layout {
    /// The layout fields every result echoes.
    pub fn json(&self) -> Value {
        json!({"world_size": self.world_size, "tp": self.tp, "pp": self.pp, "dp": self.dp})
    }
}

/// Prints `value` merged with the layout as the one JSON line that ends stdout.
pub fn print_json(mut value: Value, layout: &Layout) {
    if let (Some(obj), Value::Object(l)) = (value.as_object_mut(), layout.json()) {
        obj.extend(l);
    }
    println!("{value}");
}

/// Applies `--bf16` of `evaluate` and `generate` and returns the parameters' dtype. On the CPU:
/// PyTorch's CPU autocast, every matrix product with bf16 operands and fp32 accumulation (the
/// fused kernels' precision switch), weights and the rest fp32. On GPUs: bf16 parameters and
/// activations (`model.to(torch.bfloat16)`, as `--bf16` trains there), cuBLAS's bf16 products
/// accumulating in fp32; losses and sampling read the logits in fp32.
pub fn apply_inference_bf16(bf16: bool, device: DeviceKind) -> DType {
    match (bf16, device) {
        (false, _) => DType::F32,
        (true, DeviceKind::Cuda) => DType::BF16,
        (true, DeviceKind::Cpu) => {
            use candle_deepscale::ops::matmul::{set_float32_matmul_precision, Precision};
            set_float32_matmul_precision(Precision::Bf16);
            DType::F32
        }
    }
}
