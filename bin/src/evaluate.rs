use crate::args::{print_json, LayoutArgs, ModelArgs};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, ValueEnum};
use serde_json::json;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Task {
    /// Mean next-token cross entropy over --text or --text-file.
    Loss,
}

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    #[arg(long, value_enum)]
    pub task: Task,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub layout: LayoutArgs,
    /// The text to score.
    #[arg(long)]
    pub text: Option<String>,
    /// A file whose whole content is scored.
    #[arg(long)]
    pub text_file: Option<PathBuf>,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: EvaluateArgs) -> Result<()> {
    let layout = a.layout.layout()?;
    let text = match (&a.text, &a.text_file) {
        (Some(t), None) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read --text-file {}", f.display()))?,
        (Some(_), Some(_)) => bail!("give either --text or --text-file, not both"),
        (None, None) => bail!("--task loss needs --text or --text-file"),
    };
    match a.task {
        Task::Loss => {
            let dir = crate::models::gpt2_dir(&a.model)?;
            let Some(r) = crate::launch::launch(&layout, |ctx| {
                let (model, tok) = crate::models::load_gpt2(&dir, &Device::Cpu, ctx.tp()?)?;
                let ids = tok.encode(&text, false)?;
                Ok(zoo::evaluation::lm_loss_dp(
                    &model,
                    &ids,
                    ctx.dp()?.as_ref(),
                )?)
            })?
            else {
                return Ok(());
            };
            eprintln!(
                "evaluate: loss {:.6} (ppl {:.3}) over {} tokens",
                r.loss, r.perplexity, r.tokens
            );
            if a.json {
                let mut v = serde_json::to_value(&r)?;
                v["task"] = json!("loss");
                print_json(v, &layout);
            } else {
                println!(
                    "loss {:.6} perplexity {:.4} tokens {}",
                    r.loss, r.perplexity, r.tokens
                );
            }
        }
    }
    Ok(())
}
