//! `deepscale`: the Megatron/DeepSpeed example scripts as one binary.
mod args;
mod bench;
mod bench_suite;
mod convert;
mod deepspeed_args;
mod estimate_memory;
mod evaluate;
mod generate;
mod inspect_data;
mod launch;
mod metrics;
mod models;
mod plot;
mod preprocess_data;
mod pretrain_bert;
mod pretrain_gpt2;
mod training;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "deepscale",
    version,
    about = "DeepSpeed-class parallel training for Megatron GPT-2 and BERT, on candle"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text with GPT-2 (Megatron's generate_samples_gpt2).
    Generate(generate::GenerateArgs),
    /// Evaluate a model (`--task loss`: mean next-token loss over a text).
    Evaluate(evaluate::EvaluateArgs),
    /// Pretrain GPT-2 (Megatron's pretrain_gpt2.py); with no flags, a small model on the shipped sample data.
    #[command(name = "pretrain-gpt2")]
    PretrainGpt2(Box<pretrain_gpt2::PretrainGpt2Args>),
    /// Pretrain BERT (Megatron's pretrain_bert.py): masked LM and the binary head.
    #[command(name = "pretrain-bert")]
    PretrainBert(Box<pretrain_bert::PretrainBertArgs>),
    /// Convert checkpoints: native -> one safetensors model or an HF folder; HF -> native at any tp.
    Convert(convert::ConvertArgs),
    /// Tokenize loose JSON into Megatron mmap indexed datasets (tools/preprocess_data.py).
    #[command(name = "preprocess-data")]
    PreprocessData(preprocess_data::PreprocessDataArgs),
    /// Show what a Megatron mmap dataset holds.
    #[command(name = "inspect-data")]
    InspectData(inspect_data::InspectDataArgs),
    /// Model-state memory per GPU/CPU as DeepSpeed estimates it, and this engine's per-rank bytes.
    #[command(name = "estimate-memory")]
    EstimateMemory(estimate_memory::EstimateMemoryArgs),
    /// Benchmarks: with no subcommand the training benchmark (tokens/s, MFU, peak RSS per config,
    /// `--compare-torch`); `bench comm|tp|adam|train|pipe|offload` for the others.
    Bench(bench::BenchArgs),
}

/// Keeps freed tensor buffers in the heap for reuse: glibc otherwise serves every large tensor
/// with a fresh mmap and returns it on free, and the page faults cost about 3x a training step.
/// jemalloc keeps what training frees for the next step: no purging (`dirty_decay_ms:-1`), no
/// separate eagerly-purged arena for large tensors (`oversize_threshold:0`), and `thp:always` so
/// that calloc zeroes recycled memory with memset instead of `MADV_DONTNEED` (which re-faults every
/// page; candle's matmul output is calloc'd) and large tensors sit on huge pages. glibc's malloc
/// trimmed its heap and re-faulted about a million pages per GPT-2 124M step; with this, none.
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] =
    b"oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1,thp:always\0";

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Evaluate(a) => evaluate::run(a),
        Command::PretrainGpt2(a) => pretrain_gpt2::run(*a),
        Command::PretrainBert(a) => pretrain_bert::run(*a),
        Command::Convert(a) => convert::run(a),
        Command::EstimateMemory(a) => estimate_memory::run(a),
        Command::PreprocessData(a) => preprocess_data::run(a),
        Command::InspectData(a) => inspect_data::run(a),
        Command::Bench(a) => bench::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
