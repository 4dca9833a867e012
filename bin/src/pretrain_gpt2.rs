//! `deepscale pretrain-gpt2`: Megatron's pretrain_gpt2.py flags on the candle engine.
use crate::args::{print_json, LayoutArgs, ModelArgs};
use crate::metrics::{peak_rss_bytes, MetricsWriter};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_deepscale::adamw::{grad_norm, AdamW, AdamWConfig};
use candle_deepscale::cross_entropy::lm_cross_entropy;
use candle_deepscale::engine::forward_backward;
use candle_deepscale::lr_schedules::{AnnealingLr, DecayStyle};
use candle_deepscale::module::{Activations, ForwardCtx};
use candle_deepscale::parameter::{ParamBuilder, RandomInit};
use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;
use zoo::generation::{generate, SamplingConfig};
use zoo::gpt2::{self, Gpt2};
use zoo::text_data::{read_documents, split_documents, tokenize_documents, TokenSamples};
use zoo::tokenizer::Tokenizer;

#[derive(Args, Debug)]
pub struct PretrainGpt2Args {
    #[command(flatten)]
    pub layout: LayoutArgs,
    /// Start from these HF weights (and their config) instead of a random init.
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 4)]
    pub num_layers: usize,
    #[arg(long, default_value_t = 128)]
    pub hidden_size: usize,
    #[arg(long, default_value_t = 4)]
    pub num_attention_heads: usize,
    #[arg(long, default_value_t = 128)]
    pub seq_length: usize,
    /// Defaults to --seq-length.
    #[arg(long)]
    pub max_position_embeddings: Option<usize>,
    #[arg(long, default_value_t = 128)]
    pub make_vocab_size_divisible_by: usize,
    /// Micro-batch size per data-parallel rank.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 200)]
    pub train_iters: u64,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 1e-5)]
    pub min_lr: f64,
    #[arg(long, value_enum, default_value = "cosine")]
    pub lr_decay_style: DecayStyleArg,
    /// Defaults to --train-iters.
    #[arg(long)]
    pub lr_decay_iters: Option<u64>,
    /// Warmup as a fraction of the decay iterations (Megatron's --warmup).
    #[arg(long, default_value_t = 0.05)]
    pub warmup: f64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub adam_eps: f64,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub clip_grad: f64,
    #[arg(long, default_value_t = 0.1)]
    pub hidden_dropout: f64,
    #[arg(long, default_value_t = 0.1)]
    pub attention_dropout: f64,
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Keep only each transformer layer's input in forward and recompute it in backward.
    #[arg(long)]
    pub checkpoint_activations: bool,
    /// Layers per checkpoint (Megatron's --checkpoint-num-layers); every layer is its own checkpoint.
    #[arg(long, default_value_t = 1)]
    pub checkpoint_num_layers: usize,
    /// Training text: .txt (blank-line separated documents) or .jsonl. Default: the shipped sample.
    #[arg(long, alias = "train-data")]
    pub data_path: Option<PathBuf>,
    /// JSON field holding the text in .jsonl data.
    #[arg(long, default_value = "text")]
    pub text_key: String,
    /// train,valid,test weights over documents.
    #[arg(long, default_value = "949,50,1")]
    pub split: String,
    /// GPT-2 vocab.json. Default: assets/gpt2/gpt2-vocab.json.
    #[arg(long)]
    pub vocab_file: Option<PathBuf>,
    /// GPT-2 merges.txt. Default: assets/gpt2/gpt2-merges.txt.
    #[arg(long)]
    pub merge_file: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    pub log_interval: u64,
    #[arg(long, default_value_t = 100)]
    pub eval_interval: u64,
    #[arg(long, default_value_t = 4)]
    pub eval_iters: u64,
    /// JSON lines of training metrics (rank 0).
    #[arg(long)]
    pub metrics_file: Option<PathBuf>,
    /// After training, write the model as a Hugging Face GPT-2 folder (config, safetensors, tokenizer).
    #[arg(long)]
    pub save_hf: Option<PathBuf>,
    /// Prompt of the greedy sample printed after training (empty = none).
    #[arg(long, default_value = "This License")]
    pub sample_prompt: String,
    #[arg(long, default_value_t = 24)]
    pub sample_length: usize,
    /// Print one JSON summary as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum DecayStyleArg {
    Constant,
    Linear,
    Cosine,
}

/// The folder of the shipped assets: $DEEPSCALE_ASSETS, ./assets, or the source tree's.
pub fn assets_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DEEPSCALE_ASSETS") {
        return PathBuf::from(d);
    }
    let local = PathBuf::from("assets");
    if local.join("gpt2").is_dir() {
        return local;
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../assets"))
}

/// FLOPs per token, forward + backward: 6N + 12 L T C (N = matmul parameters, LM head included).
fn flops_per_token(cfg: &gpt2::Config, seq: usize) -> f64 {
    let (h, l, f) = (
        cfg.hidden_size as f64,
        cfg.num_layers as f64,
        cfg.ffn_hidden_size as f64,
    );
    let n = l * (4.0 * h * h + 2.0 * h * f) + cfg.padded_vocab_size(1) as f64 * h;
    6.0 * n + 12.0 * l * seq as f64 * h
}

/// Measured f32 GEMM throughput of this machine (FLOP/s), the MFU denominator.
fn gemm_peak(device: &Device) -> Result<f64> {
    let n = 1024;
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?;
    a.matmul(&b)?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        c.sum_all()?.to_scalar::<f32>()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best)
}

fn batch(
    samples: &TokenSamples,
    order: &[usize],
    start: usize,
    b: usize,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let seq = samples.sample(0).len() - 1;
    let mut x = Vec::with_capacity(b * seq);
    let mut y = Vec::with_capacity(b * seq);
    for k in 0..b {
        let s = samples.sample(order[(start + k) % order.len()]);
        x.extend_from_slice(&s[..seq]);
        y.extend_from_slice(&s[1..]);
    }
    Ok((
        Tensor::from_vec(x, (b, seq), dev)?,
        Tensor::from_vec(y, (b, seq), dev)?,
    ))
}

fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    v
}

pub fn run(a: PretrainGpt2Args) -> Result<()> {
    let layout = a.layout.layout()?;
    if a.checkpoint_num_layers != 1 {
        bail!(
            "not supported: --checkpoint-num-layers {}, because the engine checkpoints every layer \
             on its own (use 1)",
            a.checkpoint_num_layers
        )
    }
    if layout.world_size > 1 {
        bail!(
            "not supported: --world-size {} for pretrain-gpt2 yet, because distributed training \
             arrives with the training engine (generate and evaluate run on several ranks already)",
            layout.world_size
        )
    }
    let device = Device::Cpu;
    let assets = assets_dir();
    let vocab = a
        .vocab_file
        .clone()
        .unwrap_or_else(|| assets.join("gpt2/gpt2-vocab.json"));
    let merges = a
        .merge_file
        .clone()
        .unwrap_or_else(|| assets.join("gpt2/gpt2-merges.txt"));
    let data = a
        .data_path
        .clone()
        .unwrap_or_else(|| assets.join("data/sample.jsonl"));
    if a.batch_size == 0 || a.seq_length == 0 || a.train_iters == 0 {
        bail!("--batch-size, --seq-length and --train-iters must be positive")
    }

    let hf_dir = match (&a.model.hf_dir, &a.model.hf_repo) {
        (None, None) => None,
        (d, r) => Some(zoo::hub::resolve(d.as_deref(), r.as_deref())?),
    };
    let tok = match &hf_dir {
        Some(d) => Tokenizer::from_dir(d)?,
        None => Tokenizer::gpt2_bpe(&vocab, &merges)
            .context("loading the GPT-2 tokenizer (--vocab-file, --merge-file)")?,
    };

    // Data.
    let docs = read_documents(&data, &a.text_key)?;
    let n_docs = docs.len();
    let [train_docs, valid_docs, _] = split_documents(docs, &a.split)?;
    let train = TokenSamples::new(tokenize_documents(&train_docs, &tok)?, a.seq_length)
        .with_context(|| format!("training split of {}", data.display()))?;
    let valid = if valid_docs.is_empty() {
        None
    } else {
        TokenSamples::new(tokenize_documents(&valid_docs, &tok)?, a.seq_length).ok()
    };
    eprintln!(
        "data: {} documents from {} -> {} training samples ({} tokens), {} validation samples",
        n_docs,
        data.display(),
        train.len(),
        train.num_tokens(),
        valid.as_ref().map_or(0, |v| v.len())
    );

    // Model.
    let (model, cfg) = match &hf_dir {
        Some(d) => {
            let (m, _) = zoo::hub::load_gpt2_tp(d, &device, None, |c| {
                c.hidden_dropout = a.hidden_dropout;
                c.attention_dropout = a.attention_dropout;
            })?;
            let cfg = m.config.clone();
            (m, cfg)
        }
        None => {
            let cfg = gpt2::Config {
                num_layers: a.num_layers,
                hidden_size: a.hidden_size,
                num_attention_heads: a.num_attention_heads,
                ffn_hidden_size: 4 * a.hidden_size,
                seq_length: a.seq_length,
                max_position_embeddings: a.max_position_embeddings.unwrap_or(a.seq_length),
                vocab_size: tok.vocab_size(),
                make_vocab_size_divisible_by: a.make_vocab_size_divisible_by,
                layernorm_epsilon: 1e-5,
                hidden_dropout: a.hidden_dropout,
                attention_dropout: a.attention_dropout,
                init_method_std: 0.02,
            };
            cfg.validate()?;
            let src = RandomInit { seed: a.seed };
            (
                Gpt2::new(&cfg, &ParamBuilder::new(&src, &device, DType::F32))?,
                cfg,
            )
        }
    };
    if a.seq_length > cfg.max_position_embeddings {
        bail!(
            "--seq-length {} exceeds max_position_embeddings {}",
            a.seq_length,
            cfg.max_position_embeddings
        )
    }
    let params = model.parameters();
    let n_params: usize = params.iter().map(|p| p.meta.numel()).sum();
    // fp32 parameters updated in place: 4 (param) + 4 (grad) + 8 (Adam m, v) bytes each.
    let model_state_bytes = 16 * n_params as u64;
    eprintln!(
        "model: GPT-2 {} layers, hidden {}, heads {}, vocab {} (padded {}), {} parameters; model state {:.1} MiB per rank (16 bytes/param, ZeRO 0)",
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.vocab_size,
        cfg.padded_vocab_size(1),
        n_params,
        model_state_bytes as f64 / (1 << 20) as f64
    );

    let decay_iters = a.lr_decay_iters.unwrap_or(a.train_iters);
    let sched = AnnealingLr {
        max_lr: a.lr,
        min_lr: a.min_lr,
        warmup_iters: (a.warmup * decay_iters as f64) as u64,
        decay_iters,
        style: match a.lr_decay_style {
            DecayStyleArg::Constant => DecayStyle::Constant,
            DecayStyleArg::Linear => DecayStyle::Linear,
            DecayStyleArg::Cosine => DecayStyle::Cosine,
        },
    };
    let mut opt = AdamW::new(
        &params,
        AdamWConfig {
            lr: a.lr,
            beta1: a.adam_beta1,
            beta2: a.adam_beta2,
            eps: a.adam_eps,
            weight_decay: a.weight_decay,
            adam_w_mode: true,
        },
    )?;
    let mut metrics = match &a.metrics_file {
        Some(p) => Some(MetricsWriter::create(p)?),
        None => None,
    };
    let peak = gemm_peak(&device)?;
    let fpt = flops_per_token(&cfg, a.seq_length);
    let tokens_per_iter = (a.batch_size * a.seq_length) as f64;
    let order = shuffled(train.len(), a.seed);
    let base = json!({
        "world_size": layout.world_size, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp,
        "zero_stage": 0, "model_state_bytes": model_state_bytes,
    });

    let evaluate = |valid: &TokenSamples| -> Result<f64> {
        let mut sum = 0.0;
        let n = a.eval_iters.max(1);
        for i in 0..n {
            let (x, y) = batch(
                valid,
                &(0..valid.len()).collect::<Vec<_>>(),
                (i as usize) * a.batch_size,
                a.batch_size,
                &device,
            )?;
            let logits = model.forward(&x, &ForwardCtx::eval())?;
            sum += lm_cross_entropy(&logits, &y, cfg.vocab_size, None)?.to_scalar::<f32>()? as f64;
        }
        Ok(sum / n as f64)
    };

    let mut first_loss = None;
    let mut last_loss = f64::NAN;
    let mut last_valid = None;
    let train_start = Instant::now();
    let mut window_start = Instant::now();
    let mut window_loss = 0.0;
    for iter in 1..=a.train_iters {
        let lr = sched.lr(iter - 1);
        opt.set_lr(lr);
        let (x, y) = batch(
            &train,
            &order,
            ((iter - 1) as usize) * a.batch_size,
            a.batch_size,
            &device,
        )?;
        let ctx = ForwardCtx::train(a.seed, iter, 0);
        // The engine's layer-by-layer loop; with --checkpoint-activations only layer inputs are kept.
        let (loss_v, grads) = forward_backward(
            &model.layers(),
            Activations::new(x),
            &ctx,
            a.checkpoint_activations,
            |out| model.loss(&out.hidden, &y),
        )?;
        let loss_v = loss_v as f64;
        if !loss_v.is_finite() {
            bail!("iteration {iter}: the loss is {loss_v}; lower --lr or check the data")
        }
        let norm = grad_norm(&params, &grads)?;
        let scale = if a.clip_grad > 0.0 && norm > a.clip_grad {
            a.clip_grad / (norm + 1e-6)
        } else {
            1.0
        };
        opt.step(&grads, scale)?;
        first_loss.get_or_insert(loss_v);
        last_loss = loss_v;
        window_loss += loss_v;
        if iter % a.log_interval.max(1) == 0 || iter == a.train_iters {
            let n = if iter % a.log_interval.max(1) == 0 {
                a.log_interval.max(1)
            } else {
                iter % a.log_interval.max(1)
            };
            let ms = window_start.elapsed().as_secs_f64() * 1000.0 / n as f64;
            let tps = tokens_per_iter / (ms / 1000.0);
            let mfu = tps * fpt / peak;
            eprintln!(
                " iteration {iter:>8}/{:>8} | elapsed time per iteration (ms): {ms:.1} | learning rate: {lr:.3E} | lm loss: {:.6E} | loss scale: 1.0 | grad norm: {norm:.3} | tokens/s: {tps:.0} | MFU: {:.1}%",
                a.train_iters,
                window_loss / n as f64,
                mfu * 100.0
            );
            if let Some(m) = metrics.as_mut() {
                let mut line = base.clone();
                let o = line.as_object_mut().expect("object");
                for (k, v) in [
                    ("iteration", json!(iter)),
                    ("loss", json!(loss_v)),
                    ("lr", json!(lr)),
                    ("loss_scale", json!(1.0)),
                    ("grad_norm", json!(norm)),
                    ("ms_per_step", json!(ms)),
                    ("tokens_per_s", json!(tps)),
                    ("mfu", json!(mfu)),
                    ("peak_bytes", json!(peak_rss_bytes())),
                ] {
                    o.insert(k.into(), v);
                }
                m.write(&line)?;
            }
            window_loss = 0.0;
            window_start = Instant::now();
        }
        let eval_now =
            (a.eval_interval > 0 && iter % a.eval_interval == 0) || iter == a.train_iters;
        if let (true, Some(v)) = (eval_now, &valid) {
            let vl = evaluate(v)?;
            eprintln!(
                " validation loss at iteration {iter} | lm loss: {vl:.6E} | lm loss PPL: {:.3E}",
                vl.exp()
            );
            if let Some(m) = metrics.as_mut() {
                let mut line = base.clone();
                line["iteration"] = json!(iter);
                line["valid_loss"] = json!(vl);
                m.write(&line)?;
            }
            last_valid = Some(vl);
        }
    }
    let elapsed = train_start.elapsed().as_secs_f64();
    eprintln!(
        "done: {} iterations in {elapsed:.1} s; loss {:.4} -> {last_loss:.4}",
        a.train_iters,
        first_loss.unwrap_or(f64::NAN)
    );
    if let Some(m) = metrics.as_ref() {
        m.finish()?;
    }

    if let Some(dir) = &a.save_hf {
        zoo::gpt2::hf::save_hf_dir(&model, &tok, dir)?;
        eprintln!(
            "saved a Hugging Face GPT-2 folder to {} (use: deepscale generate --hf-dir {})",
            dir.display(),
            dir.display()
        );
    }
    let mut sample = None;
    if !a.sample_prompt.is_empty() && a.sample_length > 0 {
        let ids = tok.encode(&a.sample_prompt, false)?;
        let out = generate(
            &model,
            &ids,
            &SamplingConfig {
                greedy: true,
                max_new_tokens: a.sample_length,
                stop_token: tok.eod_id,
                ..Default::default()
            },
        )?;
        let text = format!("{}{}", a.sample_prompt, tok.decode(&out)?);
        eprintln!("sample (greedy): {text}");
        sample = Some(text);
    }
    if a.json {
        print_json(
            json!({
                "iterations": a.train_iters,
                "initial_loss": first_loss,
                "final_loss": last_loss,
                "valid_loss": last_valid,
                "parameters": n_params,
                "tokens_per_s": tokens_per_iter * a.train_iters as f64 / elapsed,
                "model_state_bytes": model_state_bytes,
                "sample": sample,
            }),
            &layout,
        );
    }
    Ok(())
}
