use crate::args::{print_json, LayoutArgs, ModelArgs};
use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::{Args, ValueEnum};
use serde_json::json;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Task {
    /// Mean next-token cross entropy over --text or --text-file.
    Loss,
    /// LAMBADA last-word accuracy over --valid-data (jsonl with "text").
    Lambada,
    /// WikiText-103 perplexity over --valid-data with --overlapping-eval windows.
    Wikitext103,
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
    /// LAMBADA (jsonl, one {"text": ...} per line) or WikiText-103 (raw text) file.
    #[arg(long)]
    pub valid_data: Option<PathBuf>,
    /// LAMBADA: the target is the whole last word, tokenized on its own (Megatron's --strict-lambada);
    /// otherwise the last token of the tokenized text.
    #[arg(long)]
    pub strict_lambada: bool,
    /// WikiText-103: new tokens scored per window (Megatron's --overlapping-eval; default: the sequence length).
    #[arg(long)]
    pub overlapping_eval: Option<usize>,
    /// Window length (default: the model's max positions).
    #[arg(long)]
    pub seq_length: Option<usize>,
    /// bf16: on the CPU, PyTorch's `torch.autocast(dtype=torch.bfloat16)` (bf16 products with
    /// fp32 accumulation, the weights fp32); on GPUs, bf16 parameters (`model.to(torch.bfloat16)`).
    #[arg(long)]
    pub bf16: bool,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: EvaluateArgs) -> Result<()> {
    let dtype = crate::args::apply_inference_bf16(a.bf16, a.layout.device);
    for (flag, v) in [
        ("seq-length", a.seq_length),
        ("overlapping-eval", a.overlapping_eval),
    ] {
        match v {
            Some(0) => bail!("--{flag} 0: expected at least 1 token"),
            Some(_) if !matches!(a.task, Task::Wikitext103) => {
                bail!("--{flag} applies to --task wikitext103 only")
            }
            _ => {}
        }
    }
    if let (Some(s), Some(o)) = (a.seq_length, a.overlapping_eval) {
        if o > s {
            bail!("--overlapping-eval {o} exceeds --seq-length {s}: each window scores at most its own tokens")
        }
    }
    match a.task {
        Task::Loss => loss(a, dtype),
        Task::Lambada | Task::Wikitext103 => zero_shot(a, dtype),
    }
}

/// Megatron's LAMBADA examples: (context, target) token lists.
fn lambada_examples(
    text: &str,
    path: &std::path::Path,
    tok: &zoo::tokenizer::Tokenizer,
    strict: bool,
) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        let t = v["text"].as_str().with_context(|| {
            format!("{} line {}: no string field `text`", path.display(), i + 1)
        })?;
        if strict {
            let last = t.split_whitespace().last().unwrap_or("");
            let start = t.rfind(last).unwrap_or(t.len());
            out.push((
                tok.encode(t[..start].trim(), false)?,
                tok.encode(&format!(" {last}"), false)?,
            ));
        } else {
            let mut ids = tok.encode(t, false)?;
            let Some(last) = ids.pop() else {
                bail!("{} line {}: empty text", path.display(), i + 1)
            };
            out.push((ids, vec![last]));
        }
    }
    if out.is_empty() {
        bail!("{}: no examples", path.display())
    }
    Ok(out)
}

fn zero_shot(a: EvaluateArgs, dtype: DType) -> Result<()> {
    let layout = a.layout.layout()?;
    let Some(path) = &a.valid_data else {
        bail!("--task {:?} needs --valid-data FILE", a.task)
    };
    let raw = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --valid-data {}", path.display()))?;
    let dir = crate::models::gpt2_dir(&a.model)?;
    let method = a.layout.partition_method(None)?;
    let task = a.task;
    let Some(v) = crate::launch::launch(&layout, |ctx| {
        let rank = crate::models::RankGpt2::for_rank(&dir, &ctx, &method, dtype)?;
        let (model, tok) = (rank.model.as_ref(), &rank.tok);
        let dp = ctx.dp()?;
        let stage = rank.stage();
        let stage = stage.as_ref();
        Ok(match task {
            Task::Lambada => {
                let ex = lambada_examples(&raw, path, tok, a.strict_lambada)?;
                let r = zoo::evaluation::lambada_accuracy(model, &ex, dp.as_ref(), stage)?;
                eprintln!(
                    "lambada: accuracy {:.4} ({} / {})",
                    r.accuracy, r.correct, r.total
                );
                serde_json::to_value(&r)?
            }
            _ => {
                let text = zoo::evaluation::wikitext_detokenize(&raw);
                let ids = tok.encode(&text, false)?;
                let seq = a
                    .seq_length
                    .unwrap_or(model.config().max_position_embeddings);
                if seq > model.config().max_position_embeddings {
                    bail!(
                        "--seq-length {seq} exceeds the model's max_position_embeddings {}",
                        model.config().max_position_embeddings
                    )
                }
                let overlap = a.overlapping_eval.unwrap_or(seq);
                if overlap > seq {
                    bail!("--overlapping-eval {overlap} exceeds the window of {seq} tokens")
                }
                let r = zoo::evaluation::wikitext_perplexity(
                    model,
                    &text,
                    &ids,
                    seq,
                    overlap,
                    dp.as_ref(),
                    stage,
                )?;
                eprintln!(
                    "wikitext103: loss {:.6}, perplexity {:.4}, adjusted perplexity {:.4} (token ratio {:.4})",
                    r.loss, r.perplexity, r.adjusted_perplexity, r.token_ratio
                );
                serde_json::to_value(&r)?
            }
        })
    })?
    else {
        return Ok(());
    };
    let mut v = v;
    v["task"] = json!(match task {
        Task::Lambada => "lambada",
        _ => "wikitext103",
    });
    if a.json {
        print_json(v, &layout);
    } else {
        // A plain line (the JSON object is --json's).
        match task {
            Task::Lambada => println!(
                "lambada accuracy {:.4} ({} / {})",
                v["accuracy"].as_f64().unwrap_or(f64::NAN),
                v["correct"],
                v["total"]
            ),
            _ => println!(
                "wikitext103 loss {:.6} perplexity {:.4} adjusted perplexity {:.4}",
                v["loss"].as_f64().unwrap_or(f64::NAN),
                v["perplexity"].as_f64().unwrap_or(f64::NAN),
                v["adjusted_perplexity"].as_f64().unwrap_or(f64::NAN)
            ),
        }
    }
    Ok(())
}

fn loss(a: EvaluateArgs, dtype: DType) -> Result<()> {
    let layout = a.layout.layout()?;
    let text = match (&a.text, &a.text_file) {
        (Some(t), None) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read --text-file {}", f.display()))?,
        (Some(_), Some(_)) => bail!("give either --text or --text-file, not both"),
        (None, None) => bail!("--task loss needs --text or --text-file"),
    };
    let dir = crate::models::gpt2_dir(&a.model)?;
    let method = a.layout.partition_method(None)?;
    let Some(r) = crate::launch::launch(&layout, |ctx| {
        let rank = crate::models::RankGpt2::for_rank(&dir, &ctx, &method, dtype)?;
        let (model, tok) = (rank.model.as_ref(), &rank.tok);
        let ids = tok.encode(&text, false)?;
        let stage = rank.stage();
        Ok(zoo::evaluation::lm_loss_dp(
            model,
            &ids,
            ctx.dp()?.as_ref(),
            stage.as_ref(),
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
    Ok(())
}
