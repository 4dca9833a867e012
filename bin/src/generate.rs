use crate::args::{print_json, LayoutArgs, ModelArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use zoo::generation::{generate_on, SamplingConfig};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub layout: LayoutArgs,
    /// Text to continue (without it and without --sample-input-file: unconditional, from end-of-document).
    #[arg(long)]
    pub prompt: Option<String>,
    /// One prompt per line.
    #[arg(long)]
    pub sample_input_file: Option<PathBuf>,
    /// Where to write the samples of --sample-input-file (JSON lines; default: stdout).
    #[arg(long)]
    pub sample_output_file: Option<PathBuf>,
    /// Always pick the most likely token.
    #[arg(long)]
    pub greedy: bool,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long = "top_k", alias = "top-k", default_value_t = 0)]
    pub top_k: usize,
    #[arg(long = "top_p", alias = "top-p", default_value_t = 0.0)]
    pub top_p: f64,
    /// Number of tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub out_seq_length: usize,
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Recompute the whole sequence at each step instead of using the KV cache.
    #[arg(long)]
    pub no_kv_cache: bool,
    /// bf16: on the CPU, PyTorch's `torch.autocast(dtype=torch.bfloat16)` (bf16 products with
    /// fp32 accumulation, the weights fp32); on GPUs, bf16 parameters (`model.to(torch.bfloat16)`).
    #[arg(long)]
    pub bf16: bool,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let dtype = crate::args::apply_inference_bf16(a.bf16, a.layout.device);
    let layout = a.layout.layout()?;
    if a.prompt.is_some() && a.sample_input_file.is_some() {
        bail!("give either --prompt or --sample-input-file, not both")
    }
    let prompts: Vec<String> = match &a.sample_input_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --sample-input-file {}", path.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(String::from)
            .collect(),
        None => vec![a.prompt.clone().unwrap_or_default()],
    };
    // The sampling flags, checked before any model loads (the stop token is the tokenizer's).
    SamplingConfig {
        greedy: a.greedy,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        max_new_tokens: a.out_seq_length,
        seed: a.seed,
        stop_token: None,
        use_cache: !a.no_kv_cache,
    }
    .validate()?;
    let dir = crate::models::gpt2_dir(&a.model)?;
    let method = a.layout.partition_method(None)?;
    // Every rank runs the same sampling on the same (gathered) logits, so all agree; rank 0 reports.
    let Some(results) = crate::launch::launch(&layout, |ctx| {
        let rank = crate::models::RankGpt2::for_rank(&dir, &ctx, &method, dtype)?;
        let (model, tok) = (rank.model.as_ref(), &rank.tok);
        let stage = rank.stage();
        let cfg = SamplingConfig {
            greedy: a.greedy,
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            max_new_tokens: a.out_seq_length,
            seed: a.seed,
            stop_token: tok.eod_id,
            use_cache: !a.no_kv_cache,
        };
        cfg.validate()?;
        prompts
            .iter()
            .enumerate()
            .map(|(i, prompt)| {
                if ctx.is_root() && prompts.len() > 1 {
                    eprintln!("generate: sample {}", i + 1);
                }
                let mut ids = tok.encode(prompt, false)?;
                if ids.is_empty() {
                    let Some(eod) = tok.eod_id else {
                        bail!("empty prompt and the tokenizer has no end-of-document token to start from")
                    };
                    ids.push(eod);
                }
                let out = generate_on(model, stage.as_ref(), &ids, &cfg)?;
                let text = tok.decode(&out)?;
                Ok(json!({"prompt": prompt, "prompt_ids": ids, "text": text, "token_ids": out}))
            })
            .collect::<Result<Vec<_>>>()
    })?
    else {
        return Ok(());
    };
    if a.sample_input_file.is_some() {
        let lines: Vec<String> = results.iter().map(|r| r.to_string()).collect();
        match &a.sample_output_file {
            Some(out) => {
                let mut f = std::fs::File::create(out).with_context(|| {
                    format!("cannot create --sample-output-file {}", out.display())
                })?;
                for l in &lines {
                    writeln!(f, "{l}").with_context(|| format!("writing {}", out.display()))?;
                }
            }
            None => lines.iter().for_each(|l| println!("{l}")),
        }
        if a.json {
            let out = a
                .sample_output_file
                .as_ref()
                .map(|p| p.display().to_string());
            print_json(json!({"samples": lines.len(), "output": out}), &layout);
        }
        return Ok(());
    }
    let result = results.into_iter().next().unwrap_or_default();
    if a.json {
        print_json(result, &layout);
    } else {
        println!(
            "{}{}",
            a.prompt.as_deref().unwrap_or(""),
            result["text"].as_str().unwrap_or("")
        );
    }
    Ok(())
}
