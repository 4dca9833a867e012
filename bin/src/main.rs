//! `deepscale`: the Megatron/DeepSpeed example scripts as one binary.
mod args;
mod bench;
mod bench_dp;
mod bench_suite;
mod bench_whole;
mod checkpoint;
mod convert;
mod deepspeed_args;
mod estimate_memory;
mod evaluate;
mod generate;
mod help_groups;
mod inspect_data;
mod launch;
mod launcher;
mod memory_preflight;
mod metrics;
mod models;
mod plot;
mod preprocess_data;
mod pretrain;
mod pretrain_bert;
mod pretrain_gpt2;
mod training;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "deepscale",
    version,
    about = "DeepSpeed-class parallel training for Megatron GPT-2 and BERT, on candle"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Keep backtraces on errors (with RUST_BACKTRACE=1): input errors otherwise print their
    /// message and causes only; panics keep theirs either way.
    #[arg(long, global = true)]
    debug: bool,
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
    /// Start a job on the hosts of a DeepSpeed hostfile through mpirun (DeepSpeed's launcher:
    /// --hostfile, --num_nodes, --num_gpus, --include, --exclude), e.g.
    /// `deepscale launch --hostfile hosts pretrain-gpt2 --deepspeed ...`.
    Launch(launcher::LaunchArgs),
    /// Native checkpoints: `checkpoint verify DIR` checks sizes, checksums and each file's save
    /// metadata as --load does, without loading.
    Checkpoint(checkpoint::CheckpointArgs),
    /// Benchmarks: with no subcommand the training benchmark (tokens/s, MFU, peak RSS per config,
    /// `--compare-torch`); `bench comm|tp|adam|train|pipe|offload` for the others.
    Bench(bench::BenchArgs),
}

/// Keeps freed tensor buffers in the heap for reuse: glibc otherwise serves every large tensor
/// with a fresh mmap and returns it on free, and the page faults cost about 3x a training step.
/// One arena: rank threads would otherwise each grow (and fault in) their own heaps, which made
/// tp=2 on in-process ranks 2x slower than with a shared one. No mmap and no trimming ever: a
/// training step frees and re-allocates gigabytes, and every page handed back to the kernel is
/// faulted in and zeroed again on the next step (with the former 2 GiB trim threshold, about a
/// million page faults per GPT-2 124M step; mallopt takes an int, and -1 is glibc's SIZE_MAX).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

fn main() {
    tune_allocator();
    // Several MPI ranks on one node share its cores instead of each taking all of them.
    candle_deepscale::ops::threads::share_cores_with_local_ranks();
    // A write past `ulimit -f` then fails with "File too large", naming the file, instead of the
    // process dying silently on SIGXFSZ mid-save (the disk-full path is the same error path).
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to ignore, before any thread starts.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    // DEEPSCALE_FUSED=0 runs candle's composed ops instead of the fused CPU kernels (to compare,
    // or to rule the kernels out when debugging).
    if std::env::var("DEEPSCALE_FUSED").as_deref() == Ok("0") {
        candle_deepscale::set_cpu_kernels(false);
    }
    // As with argparse: `--lr -1` reaches the value check instead of "unexpected argument", and
    // the last of a repeated flag wins (launch scripts append overrides).
    let matches = help_groups::group(Cli::command())
        .mut_subcommands(|c| c.allow_negative_numbers(true).args_override_self(true))
        .get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    args::remember_command_line(&matches);
    if !cli.debug && std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // candle captures a backtrace into every error when RUST_BACKTRACE is set, and prints it
        // with the message: an input error ("no such file") is not a crash. RUST_LIB_BACKTRACE
        // governs errors only, so panics still print theirs. Set before any thread starts.
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    // A DEEPSCALE_BLAS that names a library which does not load stops here, not silently later.
    if let Err(e) = candle_deepscale::ops::blas::backend() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
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
        Command::Checkpoint(a) => checkpoint::run(a),
        Command::Launch(a) => launcher::run(a),
    };
    if let Err(e) = result {
        // A run stopped by a signal: its own status (128 + the signal), not a failure's 1.
        if let Some(x) = e.downcast_ref::<pretrain::ExitStatus>() {
            eprintln!("{x}");
            std::process::exit(x.code);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
