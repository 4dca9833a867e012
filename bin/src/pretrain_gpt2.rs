//! `deepscale pretrain-gpt2`: Megatron's pretrain_gpt2.py flags on the DeepScale engine (data
//! parallel with ZeRO 0/1/2 over in-process or MPI ranks, tensor parallel inside the layers).
use crate::args::{print_json, LayoutArgs, ModelArgs};
use crate::deepspeed_args::DeepSpeedArgs;
use crate::launch::{launch, RankCtx};
use crate::metrics::MetricsWriter;
use crate::training::{train_loop, LoopSpec};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_deepscale::adamw::AdamWConfig;
use candle_deepscale::config::{BatchSizes, DeepSpeedConfig, Fp16Config};
use candle_deepscale::engine::{Engine, EngineConfig};
use candle_deepscale::lr_schedules::{AnnealingLr, DecayStyle, LrSchedule};
use candle_deepscale::module::Activations;
use candle_deepscale::parameter::{ParamBuilder, RandomInit};
use clap::Args;
use serde_json::json;
use std::path::{Path, PathBuf};
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
    /// Micro-batch size per data-parallel rank (default: the DeepSpeed config's, else 4).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Gradient accumulation steps (default: the DeepSpeed config's, else 1).
    #[arg(long)]
    pub gas: Option<usize>,
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
    /// Global gradient-norm clip, 0 = off (default: the config's gradient_clipping, else 1.0).
    #[arg(long)]
    pub clip_grad: Option<f64>,
    #[arg(long, default_value_t = 0.1)]
    pub hidden_dropout: f64,
    #[arg(long, default_value_t = 0.1)]
    pub attention_dropout: f64,
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Keep only each transformer layer's input in forward and recompute it in backward.
    #[arg(long)]
    pub checkpoint_activations: bool,
    /// Layers per activation checkpoint (Megatron's --checkpoint-num-layers).
    #[arg(long, default_value_t = 1)]
    pub checkpoint_num_layers: usize,
    /// A .txt (blank-line separated documents) or .jsonl file tokenized on the fly, a Megatron
    /// dataset prefix (PREFIX.bin/.idx from preprocess-data), or `W1 PREFIX1 W2 PREFIX2 ...` to
    /// blend. Default: the shipped sample.
    #[arg(long, alias = "train-data", num_args = 1..)]
    pub data_path: Vec<String>,
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
    /// Train with fp16 parameters, fp32 master weights and dynamic loss scaling.
    #[arg(long)]
    pub fp16: bool,
    #[command(flatten)]
    pub ds: DeepSpeedArgs,
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

/// Training or validation samples of seq + 1 tokens.
enum Samples {
    /// A text file tokenized on the fly, visited in a seeded order.
    Text {
        samples: TokenSamples,
        order: Vec<usize>,
    },
    /// Megatron's GPT-2 dataset over mmap indexed data (shuffled by its own index).
    Indexed(zoo::gpt2_dataset::BlendedDataset),
}

impl Samples {
    /// Sample `i` (wrapping around).
    fn get(&self, i: usize) -> Result<Vec<u32>> {
        Ok(match self {
            Samples::Text { samples, order } => samples.sample(order[i % order.len()]).to_vec(),
            Samples::Indexed(d) => d.sample(i % d.len())?,
        })
    }
}

fn batch(samples: &Samples, start: usize, b: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let mut x = Vec::new();
    let mut y = Vec::new();
    let mut seq = 0;
    for k in 0..b {
        let s = samples.get(start + k)?;
        seq = s.len() - 1;
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

/// The engine settings from the flags and the DeepSpeed config (flags that disagree with the
/// config are errors; the config's optimizer and scheduler win where it has them, as in
/// Megatron + DeepSpeed).
fn engine_config(
    a: &PretrainGpt2Args,
    ds: Option<&DeepSpeedConfig>,
    dp: usize,
) -> Result<(EngineConfig, BatchSizes)> {
    let batch = match ds {
        Some(d) => d.batch(dp, a.batch_size, a.gas)?,
        None => BatchSizes::resolve(None, Some(a.batch_size.unwrap_or(4)), a.gas, dp)?,
    };
    let mut c =
        match ds {
            Some(d) => {
                let mut d = d.clone();
                // The batch (flags included) is resolved above.
                d.train_batch_size = Some(batch.train_batch_size);
                d.train_micro_batch_size_per_gpu = Some(batch.micro_batch);
                d.gradient_accumulation_steps = Some(batch.accumulation);
                // Stages beyond 2 and offload are refused below with the flag-aware message.
                let stage = d.zero_stage();
                if let Some(z) = d.zero_optimization.as_mut() {
                    z.stage = z.stage.min(2);
                }
                let c = EngineConfig::from_deepspeed(&d, dp)?;
                if stage > 2 {
                    bail!(
                    "not supported: zero_optimization.stage {stage} in {}, because this engine \
                     implements ZeRO stages 0, 1 and 2",
                    a.ds.deepscale_config.as_deref().unwrap_or(Path::new("?")).display()
                )
                }
                c
            }
            None => EngineConfig::default(),
        };
    c.train_micro_batch_size_per_gpu = batch.micro_batch;
    c.gradient_accumulation_steps = batch.accumulation;
    if ds.and_then(|d| d.optimizer.as_ref()).is_none() {
        c.optimizer = AdamWConfig {
            lr: a.lr,
            beta1: a.adam_beta1,
            beta2: a.adam_beta2,
            eps: a.adam_eps,
            weight_decay: a.weight_decay,
            adam_w_mode: true,
        };
    }
    if ds.and_then(|d| d.scheduler.as_ref()).is_none() {
        let decay_iters = a.lr_decay_iters.unwrap_or(a.train_iters);
        c.lr_schedule = LrSchedule::Annealing(AnnealingLr {
            max_lr: a.lr,
            min_lr: a.min_lr,
            warmup_iters: (a.warmup * decay_iters as f64) as u64,
            decay_iters,
            style: match a.lr_decay_style {
                DecayStyleArg::Constant => DecayStyle::Constant,
                DecayStyleArg::Linear => DecayStyle::Linear,
                DecayStyleArg::Cosine => DecayStyle::Cosine,
            },
        });
    }
    c.gradient_clipping = match (a.clip_grad, ds.and_then(|d| d.gradient_clipping)) {
        (Some(f), Some(g)) if f != g => {
            bail!("--clip-grad {f} disagrees with the DeepSpeed config's gradient_clipping {g}")
        }
        (f, g) => f.or(g).unwrap_or(1.0),
    };
    if a.fp16 && c.fp16.is_none() {
        if ds.and_then(|d| d.fp16.as_ref()).is_some() {
            bail!("--fp16 disagrees with the DeepSpeed config's fp16.enabled false")
        }
        c.fp16 = Some(Fp16Config {
            enabled: true,
            ..Default::default()
        });
    }
    if a.checkpoint_activations {
        if a.checkpoint_num_layers == 0 {
            bail!("--checkpoint-num-layers must be at least 1")
        }
        c.checkpoint_num_layers = a.checkpoint_num_layers;
    } else if c.partition_activations || c.cpu_checkpointing {
        // DeepSpeed reads these only when Megatron checkpoints activations.
        c.partition_activations = false;
        c.cpu_checkpointing = false;
    }
    a.ds.apply(ds, &mut c)?;
    c.seed = a.seed;
    Ok((c, batch))
}

/// What every rank reads: data, tokenizer, model shape.
struct Shared {
    tok: Tokenizer,
    train: Samples,
    valid: Option<Samples>,
    cfg: gpt2::Config,
    hf_dir: Option<PathBuf>,
    engine: EngineConfig,
    batch: BatchSizes,
    dtype: DType,
    /// This machine's f32 GEMM rate, measured once before the ranks start (MFU denominator).
    gemm_peak: f64,
}

struct Summary {
    first_loss: Option<f64>,
    last_loss: f64,
    last_valid: Option<f64>,
    n_params: usize,
    tokens_per_s: f64,
    model_state_bytes: u64,
    sample: Option<String>,
    skipped: u64,
}

pub fn run(a: PretrainGpt2Args) -> Result<()> {
    let layout = a.layout.layout()?;
    a.ds.refuse_unsupported()?;
    let ds = a.ds.config()?;
    let (engine_cfg, batch) = engine_config(&a, ds.as_ref(), layout.dp)?;
    if a.save_hf.is_some() && layout.tp > 1 {
        bail!(
            "not supported: --save-hf with --model-parallel-size {}, because consolidating \
             tensor-parallel shards into one HF folder is not implemented yet (train with tp 1)",
            layout.tp
        )
    }
    if a.seq_length == 0 || a.train_iters == 0 {
        bail!("--seq-length and --train-iters must be positive")
    }
    for n in a.ds.notes() {
        eprintln!("note: {n}");
    }
    if a.ds.data_impl.is_some() {
        eprintln!("note: --data-impl: the data file's kind is read from what is on disk");
    }
    let dtype = if engine_cfg.fp16.is_some() {
        DType::F16
    } else {
        if engine_cfg.bf16 {
            eprintln!(
                "note: bf16: candle's CPU backend has no bf16 matmul, so the model computes in fp32 \
                 (bf16 parameters need a GPU)"
            );
        }
        DType::F32
    };
    let assets = assets_dir();
    let vocab = a
        .vocab_file
        .clone()
        .unwrap_or_else(|| assets.join("gpt2/gpt2-vocab.json"));
    let merges = a
        .merge_file
        .clone()
        .unwrap_or_else(|| assets.join("gpt2/gpt2-merges.txt"));
    let hf_dir = match (&a.model.hf_dir, &a.model.hf_repo) {
        (None, None) => None,
        (d, r) => Some(zoo::hub::resolve(d.as_deref(), r.as_deref())?),
    };
    if hf_dir.is_some() && dtype != DType::F32 {
        bail!("not supported: --fp16 with --hf-dir, because HF weights are loaded in fp32 (drop --fp16)")
    }
    let tok = match &hf_dir {
        Some(d) => Tokenizer::from_dir(d)?,
        None => Tokenizer::gpt2_bpe(&vocab, &merges)
            .context("loading the GPT-2 tokenizer (--vocab-file, --merge-file)")?,
    };

    let (train, valid) = load_data(&a, &tok, &assets, &batch)?;
    let cfg = match &hf_dir {
        Some(d) => {
            let mut c = gpt2::Config::from_hf_json(&d.join("config.json"))?;
            c.hidden_dropout = a.hidden_dropout;
            c.attention_dropout = a.attention_dropout;
            c
        }
        None => gpt2::Config {
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
        },
    };
    cfg.validate()?;
    if a.seq_length > cfg.max_position_embeddings {
        bail!(
            "--seq-length {} exceeds max_position_embeddings {}",
            a.seq_length,
            cfg.max_position_embeddings
        )
    }
    let shared = Shared {
        tok,
        train,
        valid,
        cfg,
        hf_dir,
        engine: engine_cfg,
        batch,
        dtype,
        gemm_peak: gemm_peak(&Device::Cpu)?,
    };
    let summary = launch(&layout, |ctx| train_rank(&a, &shared, &ctx))?;
    let Some(s) = summary else { return Ok(()) };
    if a.json {
        print_json(
            json!({
                "iterations": a.train_iters,
                "initial_loss": s.first_loss,
                "final_loss": s.last_loss,
                "valid_loss": s.last_valid,
                "parameters": s.n_params,
                "tokens_per_s": s.tokens_per_s,
                "model_state_bytes": s.model_state_bytes,
                "zero_stage": shared.engine.zero_stage,
                "train_batch_size": shared.batch.train_batch_size,
                "skipped_steps": s.skipped,
                "sample": s.sample,
            }),
            &layout,
        );
    }
    Ok(())
}

fn train_rank(a: &PretrainGpt2Args, sh: &Shared, ctx: &RankCtx) -> Result<Summary> {
    let device = Device::Cpu;
    let root = ctx.is_root();
    let tp = ctx.tp()?;
    let dp = ctx.dp()?;
    let (dp_size, dp_rank) = dp.as_ref().map_or((1, 0), |g| (g.size(), g.rank));
    let model = match &sh.hf_dir {
        Some(d) => {
            zoo::hub::load_gpt2_tp(d, &device, tp.clone(), |c| {
                c.hidden_dropout = a.hidden_dropout;
                c.attention_dropout = a.attention_dropout;
            })?
            .0
        }
        None => {
            let src = RandomInit { seed: a.seed };
            Gpt2::new(
                &sh.cfg,
                &ParamBuilder::new(&src, &device, sh.dtype).with_tp(tp.clone()),
            )?
        }
    };
    let cfg = &model.config;
    let n_params: usize = model.parameters().iter().map(|p| p.meta.numel()).sum();
    let mut engine = Engine::new(model.layers(), sh.engine.clone(), dp.clone(), tp.clone())?;
    let max_state = engine.max_state_bytes()?;
    let (micro, gas) = (sh.batch.micro_batch, sh.batch.accumulation);
    if root {
        eprintln!(
            "model: GPT-2 {} layers, hidden {}, heads {}, vocab {} (padded {}), {} parameters, {:?}",
            cfg.num_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.vocab_size,
            cfg.padded_vocab_size(ctx.topo.tp),
            n_params,
            sh.dtype
        );
        eprintln!(
            "layout: world {} = tp {} x dp {}; batch {} = micro {micro} x accumulation {gas} x dp {dp_size}; ZeRO-{}",
            ctx.topo.world_size(),
            ctx.topo.tp,
            dp_size,
            sh.batch.train_batch_size,
            sh.engine.zero_stage
        );
        eprintln!("{}", engine.describe_memory());
    }
    let metrics = match (&a.metrics_file, root) {
        (Some(p), true) => Some(MetricsWriter::create(p)?),
        _ => None,
    };
    let peak = sh.gemm_peak;
    let fpt = flops_per_token(cfg, a.seq_length);
    let tokens_per_iter = (sh.batch.train_batch_size * a.seq_length) as f64;
    let base = json!({
        "world_size": ctx.topo.world_size(), "tp": ctx.topo.tp, "pp": ctx.topo.pp, "dp": dp_size,
        "zero_stage": sh.engine.zero_stage, "model_state_bytes": max_state,
    });
    let evaluate = |engine: &Engine, valid: &Samples| -> Result<f64> {
        let n = a.eval_iters.max(1) as usize;
        let mut sum = 0.0;
        for i in 0..n {
            let (x, y) = batch(valid, (i * dp_size + dp_rank) * micro, micro, &device)?;
            sum += engine.eval_batch(Activations::new(x), |o| model.loss(&o.hidden, &y))? as f64;
        }
        Ok(engine.dp_mean(sum / n as f64)?)
    };

    let spec = LoopSpec {
        train_iters: a.train_iters,
        log_interval: a.log_interval,
        eval_interval: a.eval_interval,
        tokens_per_iter,
        flops_per_token: fpt,
        gemm_peak: peak,
        metrics_file: a.metrics_file.as_deref(),
        root,
        base,
        title: format!(
            "GPT-2 {}L/{}H, tp {} x dp {}, ZeRO-{}",
            cfg.num_layers, cfg.hidden_size, ctx.topo.tp, dp_size, sh.engine.zero_stage
        ),
        fp16: sh.engine.fp16.is_some(),
    };
    let micro_batches = |iter: u64| -> Result<Vec<_>> {
        // This rank's slice of the global batch: the 1-rank order cut among the dp ranks.
        let start = ((iter - 1) as usize) * sh.batch.train_batch_size + dp_rank * micro * gas;
        (0..gas)
            .map(|m| {
                let (x, y) = batch(&sh.train, start + m * micro, micro, &device)?;
                let model = &model;
                Ok((Activations::new(x), move |o: &Activations| {
                    model.loss(&o.hidden, &y)
                }))
            })
            .collect()
    };
    let eval = |engine: &Engine| -> Result<Option<f64>> {
        sh.valid.as_ref().map(|v| evaluate(engine, v)).transpose()
    };
    let r = train_loop(&spec, &mut engine, metrics, micro_batches, eval)?;
    if root {
        if let Some(dir) = &a.save_hf {
            zoo::gpt2::hf::save_hf_dir(&model, &sh.tok, dir)?;
            eprintln!(
                "saved a Hugging Face GPT-2 folder to {} (use: deepscale generate --hf-dir {})",
                dir.display(),
                dir.display()
            );
        }
    }
    // Every rank generates (tensor-parallel layers need their whole group); rank 0 reports.
    let mut sample = None;
    if !a.sample_prompt.is_empty() && a.sample_length > 0 {
        let ids = sh.tok.encode(&a.sample_prompt, false)?;
        let out = generate(
            &model,
            &ids,
            &SamplingConfig {
                greedy: true,
                max_new_tokens: a.sample_length,
                stop_token: sh.tok.eod_id,
                ..Default::default()
            },
        )?;
        let text = format!("{}{}", a.sample_prompt, sh.tok.decode(&out)?);
        if root {
            eprintln!("sample (greedy): {text}");
        }
        sample = Some(text);
    }
    Ok(Summary {
        first_loss: r.first_loss,
        last_loss: r.last_loss,
        last_valid: r.last_valid,
        n_params,
        tokens_per_s: tokens_per_iter * a.train_iters as f64 / r.elapsed,
        model_state_bytes: max_state,
        sample,
        skipped: engine.skipped_steps(),
    })
}

/// `--data-path`: a text file tokenized here, or Megatron datasets with as many samples as the run
/// needs (train: iterations x global batch; valid: evaluations x eval-iters x global batch).
fn load_data(
    a: &PretrainGpt2Args,
    tok: &Tokenizer,
    assets: &Path,
    batch: &BatchSizes,
) -> Result<(Samples, Option<Samples>)> {
    let values = if a.data_path.is_empty() {
        vec![assets.join("data/sample.jsonl").display().to_string()]
    } else {
        a.data_path.clone()
    };
    if let [one] = values.as_slice() {
        let path = PathBuf::from(one);
        if path.is_file() {
            let docs = read_documents(&path, &a.text_key)?;
            let n_docs = docs.len();
            let [train_docs, valid_docs, _] = split_documents(docs, &a.split)?;
            let train = TokenSamples::new(tokenize_documents(&train_docs, tok)?, a.seq_length)
                .with_context(|| format!("training split of {}", path.display()))?;
            let valid = if valid_docs.is_empty() {
                None
            } else {
                TokenSamples::new(tokenize_documents(&valid_docs, tok)?, a.seq_length).ok()
            };
            eprintln!(
                "data: {n_docs} documents from {} -> {} training samples ({} tokens), {} validation samples",
                path.display(),
                train.len(),
                train.num_tokens(),
                valid.as_ref().map_or(0, |v| v.len())
            );
            let order = shuffled(train.len(), a.seed);
            let valid = valid.map(|v| Samples::Text {
                order: (0..v.len()).collect(),
                samples: v,
            });
            return Ok((
                Samples::Text {
                    samples: train,
                    order,
                },
                valid,
            ));
        }
    }
    let prefixes = zoo::gpt2_dataset::parse_data_path(&values)?;
    for (_, p) in &prefixes {
        if !zoo::indexed_dataset::exists(p) {
            bail!(
                "--data-path {}: no such file, and no Megatron dataset {}.bin/.idx",
                p.display(),
                p.display()
            )
        }
    }
    let gb = batch.train_batch_size;
    let evals = a
        .train_iters
        .checked_div(a.eval_interval)
        .map_or(1, |n| n + 1);
    let samples = [
        a.train_iters as usize * gb,
        evals as usize * a.eval_iters.max(1) as usize * gb,
        a.eval_iters.max(1) as usize * gb,
    ];
    let [train, valid, _] = zoo::gpt2_dataset::build_train_valid_test(
        &prefixes,
        &a.split,
        samples,
        a.seq_length,
        a.seed,
    )?;
    let train =
        train.with_context(|| format!("--split {}: the training split is empty", a.split))?;
    eprintln!(
        "data: {} Megatron dataset(s) -> {} training samples, {} validation samples",
        prefixes.len(),
        train.len(),
        valid.as_ref().map_or(0, |v| v.len())
    );
    Ok((Samples::Indexed(train), valid.map(Samples::Indexed)))
}
