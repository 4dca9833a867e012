//! `deepscale pretrain-gpt2`: Megatron's pretrain_gpt2.py flags on the DeepScale engine (data
//! parallel with ZeRO 0/1/2 over in-process or MPI ranks, tensor parallel inside the layers).
use crate::args::{print_json, LayoutArgs, ModelArgs};
use crate::launch::{launch, RankCtx};
use crate::metrics::MetricsWriter;
use crate::training::{engine_config, gemm_peak, train_loop, LoopSpec, TrainingArgs};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_deepscale::config::BatchSizes;
use candle_deepscale::engine::{Engine, EngineConfig};
use candle_deepscale::module::Activations;
use candle_deepscale::parameter::{ParamBuilder, RandomInit};
use clap::Args;
use serde_json::json;
use std::path::{Path, PathBuf};
use zoo::generation::SamplingConfig;
use zoo::gpt2::{self, Gpt2, Gpt2Pipe};
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
    /// GPT-2 vocab.json. Default: assets/gpt2/gpt2-vocab.json.
    #[arg(long)]
    pub vocab_file: Option<PathBuf>,
    /// GPT-2 merges.txt. Default: assets/gpt2/gpt2-merges.txt.
    #[arg(long)]
    pub merge_file: Option<PathBuf>,
    /// After training, write the model as a Hugging Face GPT-2 folder (config, safetensors, tokenizer).
    #[arg(long)]
    pub save_hf: Option<PathBuf>,
    /// Prompt of the greedy sample printed after training (empty = none).
    #[arg(long, default_value = "This License")]
    pub sample_prompt: String,
    #[arg(long, default_value_t = 24)]
    pub sample_length: usize,
    #[command(flatten)]
    pub train: TrainingArgs,
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

/// What every rank reads: data, tokenizer, model shape.
struct Shared {
    tok: Tokenizer,
    train: Samples,
    valid: Option<Samples>,
    cfg: gpt2::Config,
    hf_dir: Option<PathBuf>,
    /// `--load`: parameters, optimizer and counters come from here.
    ckpt: Option<candle_deepscale::checkpoint::Checkpoint>,
    engine: EngineConfig,
    batch: BatchSizes,
    dtype: DType,
    /// How layers are cut into pipeline stages.
    partition: candle_deepscale::pipe::PartitionMethod,
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
    a.train.ds.refuse_unsupported()?;
    if let Some(t) = &a.train.ds.tokenizer_type {
        if t != "GPT2BPETokenizer" {
            bail!(
                "not supported: --tokenizer-type {t}, because pretrain-gpt2 uses GPT2BPETokenizer"
            )
        }
    }
    let ds = a.train.ds.config()?;
    let (engine_cfg, batch) = engine_config(&a.train, ds.as_ref(), layout.dp)?;
    if a.save_hf.is_some() && layout.pp > 1 {
        bail!(
            "not supported: --save-hf with --pipe-parallel-size {}, because one rank would need \
             every stage's layers (save with --save, then: deepscale convert --load DIR --to hf)",
            layout.pp
        )
    }
    if a.save_hf.is_some() && layout.tp > 1 {
        bail!(
            "not supported: --save-hf with --model-parallel-size {}, because consolidating \
             tensor-parallel shards into one HF folder is not implemented yet (train with tp 1)",
            layout.tp
        )
    }
    if a.seq_length == 0 || a.train.train_iters == 0 {
        bail!("--seq-length and --train-iters must be positive")
    }
    if a.train.ds.no_load_optim && a.model.load.is_none() {
        eprintln!("note: --no-load-optim: nothing is loaded without --load");
    }
    for n in a.train.ds.notes() {
        eprintln!("note: {n}");
    }
    if a.train.ds.data_impl.is_some() {
        eprintln!("note: --data-impl: the data file's kind is read from what is on disk");
    }
    let dtype = crate::training::param_dtype(&engine_cfg, layout.device);
    let assets = assets_dir();
    let vocab = a
        .vocab_file
        .clone()
        .unwrap_or_else(|| assets.join("gpt2/gpt2-vocab.json"));
    let merges = a
        .merge_file
        .clone()
        .unwrap_or_else(|| assets.join("gpt2/gpt2-merges.txt"));
    let ckpt = match &a.model.load {
        Some(dir) if a.model.hf_dir.is_some() || a.model.hf_repo.is_some() => {
            bail!(
                "give --load {} or --hf-dir/--hf-repo, not both",
                dir.display()
            )
        }
        Some(dir) => Some(
            candle_deepscale::checkpoint::Checkpoint::open(dir)
                .with_context(|| format!("--load {}", dir.display()))?,
        ),
        None => None,
    };
    let hf_dir = match (&a.model.hf_dir, &a.model.hf_repo) {
        (None, None) => None,
        (d, r) => Some(zoo::hub::resolve(d.as_deref(), r.as_deref())?),
    };
    if hf_dir.is_some() && dtype != DType::F32 {
        bail!("not supported: --fp16 with --hf-dir, because HF weights are loaded in fp32 (drop --fp16)")
    }
    let tok = match (&hf_dir, &ckpt) {
        (Some(d), _) => Tokenizer::from_dir(d)?,
        (_, Some(c)) => Tokenizer::from_json(&c.dir.join("tokenizer.json"))?,
        (None, None) => Tokenizer::gpt2_bpe(&vocab, &merges)
            .context("loading the GPT-2 tokenizer (--vocab-file, --merge-file)")?,
    };

    let (train, valid) = load_data(&a, &tok, &assets, &batch)?;
    let cfg = match (&hf_dir, &ckpt) {
        (_, Some(c)) => {
            let m = &c.manifest.model;
            if m["type"] != "gpt2" {
                bail!(
                    "--load {}: a {} checkpoint, not GPT-2",
                    c.dir.display(),
                    m["type"]
                )
            }
            let mut cfg: gpt2::Config = serde_json::from_value(m["config"].clone())
                .with_context(|| format!("--load {}: model config", c.dir.display()))?;
            cfg.hidden_dropout = a.train.hidden_dropout;
            cfg.attention_dropout = a.train.attention_dropout;
            cfg
        }
        (Some(d), None) => {
            let mut c = gpt2::Config::from_hf_json(&d.join("config.json"))?;
            c.hidden_dropout = a.train.hidden_dropout;
            c.attention_dropout = a.train.attention_dropout;
            c
        }
        (None, None) => gpt2::Config {
            num_layers: a.num_layers,
            hidden_size: a.hidden_size,
            num_attention_heads: a.num_attention_heads,
            ffn_hidden_size: 4 * a.hidden_size,
            seq_length: a.seq_length,
            max_position_embeddings: a.max_position_embeddings.unwrap_or(a.seq_length),
            vocab_size: tok.vocab_size(),
            make_vocab_size_divisible_by: a.make_vocab_size_divisible_by,
            layernorm_epsilon: 1e-5,
            hidden_dropout: a.train.hidden_dropout,
            attention_dropout: a.train.attention_dropout,
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
        ckpt,
        engine: engine_cfg,
        batch,
        dtype,
        gemm_peak: gemm_peak(&Device::Cpu)?,
        partition: a.layout.partition_method(ds.as_ref())?,
    };
    let summary = launch(&layout, |ctx| train_rank(&a, &shared, &ctx))?;
    let Some(s) = summary else { return Ok(()) };
    if a.train.json {
        print_json(
            json!({
                "iterations": a.train.train_iters,
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
    let device = ctx.device.clone();
    let root = ctx.is_root();
    let tp = ctx.tp()?;
    let dp = ctx.dp()?;
    let (dp_size, dp_rank) = dp.as_ref().map_or((1, 0), |g| (g.size(), g.rank));
    let pipe = ctx.pipe()?;
    let init = RandomInit { seed: a.train.seed };
    let hf_source = match &sh.hf_dir {
        Some(d) => Some(zoo::gpt2::hf::HfSource::new(
            zoo::weights::SafetensorsFiles::open_dir(d)?,
            &sh.cfg,
        )?),
        None => None,
    };
    let src: &dyn candle_deepscale::parameter::ParamSource = match (&hf_source, &sh.ckpt) {
        (Some(h), _) => h,
        (None, Some(c)) => c,
        (None, None) => &init,
    };
    let pb = ParamBuilder::new(src, &device, sh.dtype)
        .with_tp(tp.clone())
        .with_zero3(crate::training::zero3_construction(&sh.engine, dp.as_ref()));
    // A pipeline stage builds (and reads) only its own layers: GPT2ModelPipe.
    let net = match &pipe {
        Some(p) => {
            let bounds = Gpt2Pipe::partition(&sh.cfg, p.stages.size(), &sh.partition)?;
            if root {
                eprintln!(
                    "pipeline: {} stages, layer boundaries {bounds:?}",
                    p.stages.size()
                );
            }
            Net::Stage(Box::new(Gpt2Pipe::new(
                &sh.cfg,
                &pb,
                bounds[p.stages.rank]..bounds[p.stages.rank + 1],
            )?))
        }
        None => Net::Whole(Box::new(Gpt2::new(&sh.cfg, &pb)?)),
    };
    let cfg = &sh.cfg;
    let layers = net.layers();
    let n_params: usize = candle_deepscale::module::unique_parameters(&layers)
        .iter()
        .map(|p| p.meta.numel())
        .sum();
    let mut engine = Engine::new(layers, sh.engine.clone(), dp.clone(), tp.clone())?;
    if let Some(p) = pipe {
        engine = engine.with_pipeline(p)?;
    }
    if let Some(c) = &sh.ckpt {
        c.restore(&mut engine, !a.train.ds.no_load_optim)?;
        if root {
            eprintln!(
                "loaded {} (iteration {}, saved at tp {} x dp {}, ZeRO-{}){}",
                c.dir.display(),
                c.manifest.iteration,
                c.manifest.tp,
                c.manifest.dp,
                c.manifest.zero_stage,
                if a.train.ds.no_load_optim {
                    "; optimizer state not loaded"
                } else {
                    ""
                }
            );
        }
    }
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
            "layout: world {} = pp {} x tp {} x dp {}; batch {} = micro {micro} x accumulation {gas} x dp {dp_size}; ZeRO-{}",
            ctx.topo.world_size(),
            ctx.topo.pp,
            ctx.topo.tp,
            dp_size,
            sh.batch.train_batch_size,
            sh.engine.zero_stage
        );
        eprintln!("{}", engine.describe_memory());
        if device.is_cpu() {
            eprintln!("f32 products on {}", candle_deepscale::blas::describe());
        }
        if let Some(line) = crate::training::describe_offload(&sh.engine) {
            eprintln!("{line}");
        }
    }
    let metrics = match (&a.train.metrics_file, root) {
        (Some(p), true) => Some(MetricsWriter::create(p)?),
        _ => None,
    };
    // MFU against the GEMM peak of the device the rank trains on.
    let peak = if device.is_cpu() {
        sh.gemm_peak
    } else {
        gemm_peak(&device)?
    };
    let fpt = crate::training::flops_per_token(
        cfg.num_layers,
        cfg.hidden_size,
        cfg.ffn_hidden_size,
        cfg.padded_vocab_size(1),
        a.seq_length,
    );
    let tokens_per_iter = (sh.batch.train_batch_size * a.seq_length) as f64;
    let base = json!({
        "world_size": ctx.topo.world_size(), "tp": ctx.topo.tp, "pp": ctx.topo.pp, "dp": dp_size,
        "zero_stage": sh.engine.zero_stage, "model_state_bytes": max_state,
    });
    let evaluate = |engine: &Engine, valid: &Samples| -> Result<f64> {
        let n = a.train.eval_iters.max(1) as usize;
        let mut sum = 0.0;
        for i in 0..n {
            let (x, y) = batch(valid, (i * dp_size + dp_rank) * micro, micro, &device)?;
            sum += engine.eval_batch(Activations::new(x), |o| net.loss(&o.hidden, &y))? as f64;
        }
        Ok(engine.dp_mean(sum / n as f64)?)
    };

    let spec = LoopSpec {
        start_iter: engine.iteration(),
        train_iters: a.train.train_iters,
        log_interval: a.train.log_interval,
        eval_interval: a.train.eval_interval,
        tokens_per_iter,
        flops_per_token: fpt,
        gemm_peak: peak,
        metrics_file: a.train.metrics_file.as_deref(),
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
                let net = &net;
                Ok((Activations::new(x), move |o: &Activations| {
                    net.loss(&o.hidden, &y)
                }))
            })
            .collect()
    };
    let eval = |engine: &Engine| -> Result<Option<f64>> {
        sh.valid.as_ref().map(|v| evaluate(engine, v)).transpose()
    };
    let saver = crate::training::Saver {
        args: &a.train,
        model: json!({"type": "gpt2", "config": cfg}),
        tokenizer: Some(sh.tok.to_json()?.into_bytes()),
        global_batch: sh.batch.train_batch_size,
        root,
        first_layer: net.first_layer(),
    };
    let r = train_loop(&spec, &mut engine, metrics, micro_batches, eval, |e, i| {
        saver.after(e, i)
    })?;
    if let Some(dir) = &a.save_hf {
        // Under ZeRO-3 every rank takes part in gathering the parameters; rank 0 writes.
        engine.gathered(|| {
            if let (Net::Whole(model), true) = (&net, root) {
                zoo::gpt2::hf::save_hf_dir(model, &sh.tok, dir)?;
                eprintln!(
                    "saved a Hugging Face GPT-2 folder to {} (use: deepscale generate --hf-dir {})",
                    dir.display(),
                    dir.display()
                );
            }
            Ok(())
        })?;
    }
    // Every rank generates (tensor-parallel layers need their whole group); rank 0 reports.
    let mut sample = None;
    if !a.sample_prompt.is_empty() && a.sample_length > 0 {
        // At pp > 1 the prompt runs through the stages and the last stage samples.
        let pipe = ctx.pipe()?;
        let (model, stage): (&dyn zoo::gpt2::Gpt2Lm, _) = match (&net, pipe.as_ref()) {
            (Net::Stage(s), Some(p)) => (
                &**s,
                Some(candle_deepscale::pipe::Stage {
                    layers: s.layers(),
                    pipe: p,
                }),
            ),
            (Net::Whole(m), _) => (&**m, None),
            (Net::Stage(s), None) => (&**s, None),
        };
        let ids = sh.tok.encode(&a.sample_prompt, false)?;
        let out = engine.gathered(|| {
            zoo::generation::generate_on(
                model,
                stage.as_ref(),
                &ids,
                &SamplingConfig {
                    greedy: true,
                    max_new_tokens: a.sample_length,
                    stop_token: sh.tok.eod_id,
                    ..Default::default()
                },
            )
        })?;
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
        tokens_per_s: tokens_per_iter * a.train.train_iters as f64 / r.elapsed,
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
    let values = if a.train.data_path.is_empty() {
        vec![assets.join("data/sample.jsonl").display().to_string()]
    } else {
        a.train.data_path.clone()
    };
    if let [one] = values.as_slice() {
        let path = PathBuf::from(one);
        if path.is_file() {
            let docs = read_documents(&path, &a.train.text_key)?;
            let n_docs = docs.len();
            let [train_docs, valid_docs, _] = split_documents(docs, &a.train.split)?;
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
            let order = shuffled(train.len(), a.train.seed);
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
        .train
        .train_iters
        .checked_div(a.train.eval_interval)
        .map_or(1, |n| n + 1);
    let samples = [
        a.train.train_iters as usize * gb,
        evals as usize * a.train.eval_iters.max(1) as usize * gb,
        a.train.eval_iters.max(1) as usize * gb,
    ];
    let [train, valid, _] = zoo::gpt2_dataset::build_train_valid_test(
        &prefixes,
        &a.train.split,
        samples,
        a.seq_length,
        a.train.seed,
    )?;
    let train =
        train.with_context(|| format!("--split {}: the training split is empty", a.train.split))?;
    eprintln!(
        "data: {} Megatron dataset(s) -> {} training samples, {} validation samples",
        prefixes.len(),
        train.len(),
        valid.as_ref().map_or(0, |v| v.len())
    );
    Ok((Samples::Indexed(train), valid.map(Samples::Indexed)))
}

/// The model a rank trains: the whole GPT-2, or its pipeline stage.
enum Net {
    Whole(Box<Gpt2>),
    Stage(Box<Gpt2Pipe>),
}

impl Net {
    fn first_layer(&self) -> usize {
        match self {
            Net::Whole(_) => 0,
            Net::Stage(s) => s.range.start,
        }
    }

    fn layers(&self) -> Vec<&dyn candle_deepscale::module::Layer> {
        match self {
            Net::Whole(m) => m.layers(),
            Net::Stage(s) => s.layers(),
        }
    }

    fn loss(&self, logits: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Net::Whole(m) => m.loss(logits, labels),
            Net::Stage(s) => s.loss(logits, labels),
        }
    }
}
