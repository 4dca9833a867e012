//! `deepscale`: the Megatron/DeepSpeed example scripts as one binary.
mod args;
mod evaluate;
mod generate;
mod models;

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
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Evaluate(a) => evaluate::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
