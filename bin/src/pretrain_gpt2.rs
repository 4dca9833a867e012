//! `deepscale pretrain-gpt2`: Megatron's pretrain_gpt2.py flags on the DeepScale engine (data
//! parallel with ZeRO 0/1/2 over in-process or MPI ranks, tensor parallel inside the layers).
use crate::args::{print_json, LayoutArgs, ModelArgs};
use crate::launch::RankCtx;
use crate::pretrain::{pretrain, DataProvider, ModelProvider, Setup};
use crate::training::{prepare, TrainingArgs};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_deepscale::layers::module::{Activations, Layer, Sequential};
use candle_deepscale::layers::parameter::{ParamBuilder, ParamSource};
use candle_deepscale::runtime::config::BatchSizes;
use candle_deepscale::runtime::engine::Engine;
use candle_deepscale::runtime::meters::flops_per_token;
use candle_deepscale::runtime::pipe::PartitionMethod;
use clap::Args;
use serde_json::json;
use std::ops::Range;
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
    /// Transformer layers.
    #[arg(long, default_value_t = 4)]
    pub num_layers: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 128)]
    pub hidden_size: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    pub num_attention_heads: usize,
    /// Tokens per training sample.
    #[arg(long, default_value_t = 128)]
    pub seq_length: usize,
    /// Defaults to --seq-length.
    #[arg(long)]
    pub max_position_embeddings: Option<usize>,
    /// Pad the vocabulary to a multiple of this times the tensor-parallel size.
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
    /// Prompt of the sample printed after training (top-k 40, temperature 0.8, seeded by --seed;
    /// empty = none). Greedy decoding of a barely trained model repeats whitespace.
    #[arg(long, default_value = "This License")]
    pub sample_prompt: String,
    /// Tokens of the sample printed after training (0: none).
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

fn batch(
    samples: &Samples,
    start: usize,
    b: usize,
    dev: &Device,
    vocab: (usize, &str),
) -> Result<(Tensor, Tensor)> {
    let mut x = Vec::new();
    let mut y = Vec::new();
    let mut seq = 0;
    for k in 0..b {
        let s = samples.get(start + k)?;
        crate::pretrain::check_token_ids(&s, vocab.0, vocab.1, start + k)?;
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

pub fn run(mut a: PretrainGpt2Args) -> Result<()> {
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
    let (engine_cfg, batch) = prepare(&mut a.train, ds.as_ref(), layout.dp)?;
    if let Some(m) = &a.train.metrics_file {
        crate::metrics::check_target(
            m,
            a.train.overwrite,
            a.model.load.is_some() && !a.train.finetune,
        )?;
    }
    if a.train.finetune && a.model.load.is_none() {
        bail!("--finetune starts from a checkpoint's weights: give --load DIR")
    }
    for n in a.train.megatron_notes() {
        eprintln!("note: {n}");
    }
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
            candle_deepscale::runtime::checkpoint::Checkpoint::open(dir)
                .with_context(|| format!("--load {}", dir.display()))?,
        ),
        None => None,
    };
    if let Some(c) = &ckpt {
        if c.manifest.model["type"] != "gpt2" {
            bail!(
                "--load {}: a {} checkpoint, not GPT-2 (load it with pretrain-{})",
                c.dir.display(),
                c.manifest.model["type"],
                c.manifest.model["type"].as_str().unwrap_or("bert")
            )
        }
    }
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
            let mut cfg: gpt2::Config = candle_deepscale::json::from_value(m["config"].clone())
                .with_context(|| {
                    format!("--load {}: manifest.json's model.config", c.dir.display())
                })?;
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
            ffn_hidden_size: a.hidden_size.saturating_mul(4),
            seq_length: a.seq_length,
            max_position_embeddings: a.max_position_embeddings.unwrap_or(a.seq_length),
            vocab_size: tok.vocab_size(),
            make_vocab_size_divisible_by: a.make_vocab_size_divisible_by,
            layernorm_epsilon: 1e-5,
            hidden_dropout: a.train.hidden_dropout,
            attention_dropout: a.train.attention_dropout,
            init_method_std: a.train.init_method_std,
        },
    };
    if let Some(what) = match (&ckpt, &hf_dir) {
        (Some(c), _) => Some(format!("--load {}", c.dir.display())),
        (None, Some(d)) => Some(format!("--hf-dir {}", d.display())),
        (None, None) => None,
    } {
        crate::args::check_shape_flags(
            &what,
            &[
                ("num_layers", a.num_layers, cfg.num_layers),
                ("hidden_size", a.hidden_size, cfg.hidden_size),
                (
                    "num_attention_heads",
                    a.num_attention_heads,
                    cfg.num_attention_heads,
                ),
                (
                    "max_position_embeddings",
                    a.max_position_embeddings.unwrap_or(0),
                    cfg.max_position_embeddings,
                ),
                (
                    "make_vocab_size_divisible_by",
                    a.make_vocab_size_divisible_by,
                    // The padding of HF weights is this run's choice.
                    if ckpt.is_some() {
                        cfg.make_vocab_size_divisible_by
                    } else {
                        a.make_vocab_size_divisible_by
                    },
                ),
            ],
        )?;
    }
    cfg.validate()?;
    if a.seq_length > cfg.max_position_embeddings {
        bail!(
            "--seq-length {} exceeds max_position_embeddings {}",
            a.seq_length,
            cfg.max_position_embeddings
        )
    }
    if layout.device == crate::args::DeviceKind::Cpu {
        crate::memory_preflight::check(
            &crate::memory_preflight::Shape::gpt2(&cfg, a.seq_length, layout.tp)?,
            &layout,
            &engine_cfg,
            dtype.size_in_bytes() as u64,
            a.train.checkpoint_activations,
        )?;
    }
    let setup = Setup {
        args: &a.train,
        layout: &layout,
        engine: engine_cfg,
        batch,
        dtype,
        ckpt,
        partition: a.layout.partition_method(ds.as_ref())?,
        tokenizer_json: tok.to_json()?.into_bytes(),
    };
    let provider = Gpt2Provider {
        a: &a,
        cfg,
        hf_dir,
        tok: &tok,
    };
    let data = Gpt2Data {
        train,
        valid,
        seq: a.seq_length,
        vocab: provider.cfg.vocab_size,
        source: if a.train.data_path.is_empty() {
            "the shipped sample data".into()
        } else {
            format!("--data-path {}", a.train.data_path.join(" "))
        },
    };
    let Some(s) = pretrain(&setup, &provider, &data, |net: &Net, o, y| {
        Ok((net.loss(&o.hidden, y)?, Vec::new()))
    })?
    else {
        return Ok(());
    };
    if a.train.json {
        print_json(
            json!({
                "iterations": s.iterations,
                "stopped": s.stopped.map(|x| x.to_string()),
                "initial_loss": s.first_loss,
                "final_loss": s.last_loss,
                "valid_loss": s.last_valid,
                "parameters": s.n_params,
                "tokens_per_s": s.tokens_per_s,
                "model_state_bytes": s.model_state_bytes,
                "zero_stage": setup.engine.zero_stage,
                "train_batch_size": setup.batch.train_batch_size,
                "skipped_steps": s.skipped,
                "sample": s.after,
            }),
            &layout,
        );
    }
    s.exit_status(&a.train)
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
    fn loss(&self, logits: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Net::Whole(m) => m.loss(logits, labels),
            Net::Stage(s) => s.loss(logits, labels),
        }
    }
}

impl Sequential for Net {
    fn layers(&self) -> Vec<&dyn Layer> {
        match self {
            Net::Whole(m) => m.layers(),
            Net::Stage(s) => s.layers(),
        }
    }
}

/// GPT-2 for the pretraining driver: the whole model (or a pipeline stage), its HF weights,
/// and after training the HF export and the greedy sample.
struct Gpt2Provider<'a> {
    a: &'a PretrainGpt2Args,
    cfg: gpt2::Config,
    hf_dir: Option<PathBuf>,
    tok: &'a Tokenizer,
}

impl ModelProvider for Gpt2Provider<'_> {
    type Model = Net;

    fn manifest(&self) -> serde_json::Value {
        json!({"type": "gpt2", "config": self.cfg})
    }

    fn partition(&self, stages: usize, method: &PartitionMethod) -> Result<Vec<usize>> {
        Ok(Gpt2Pipe::partition(&self.cfg, stages, method)?)
    }

    fn build(&self, pb: &ParamBuilder, range: Range<usize>, pipelined: bool) -> Result<Net> {
        // A pipeline stage builds (and reads) only its own layers: GPT2ModelPipe.
        Ok(if pipelined {
            Net::Stage(Box::new(Gpt2Pipe::new(&self.cfg, pb, range)?))
        } else {
            Net::Whole(Box::new(Gpt2::new(&self.cfg, pb)?))
        })
    }

    fn weights(&self) -> Result<Option<Box<dyn ParamSource>>> {
        let Some(d) = &self.hf_dir else {
            return Ok(None);
        };
        let files = zoo::weights::SafetensorsFiles::open_dir(d)?;
        Ok(Some(Box::new(zoo::gpt2::hf::HfSource::new(
            files, &self.cfg,
        )?)))
    }

    fn describe(&self, _n_params: usize, tp: usize) -> String {
        let c = &self.cfg;
        format!(
            "GPT-2 {} layers, hidden {}, heads {}, vocab {} (padded {})",
            c.num_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.vocab_size,
            c.padded_vocab_size(tp)
        )
    }

    fn title(&self) -> String {
        format!("GPT-2 {}L/{}H", self.cfg.num_layers, self.cfg.hidden_size)
    }

    fn flops_per_token(&self) -> f64 {
        let c = &self.cfg;
        flops_per_token(
            c.num_layers,
            c.hidden_size,
            c.ffn_hidden_size,
            c.padded_vocab_size(1),
            self.a.seq_length,
        )
    }

    /// `--save-hf`, then the greedy sample of `--sample-prompt`.
    fn after_training(&self, net: &Net, engine: &Engine, ctx: &RankCtx) -> Result<Option<String>> {
        let (a, root) = (self.a, ctx.is_root());
        if let Some(dir) = &a.save_hf {
            // Under ZeRO-3 every rank takes part in gathering the parameters; rank 0 writes.
            engine.gathered(|| {
                if let (Net::Whole(model), true) = (net, root) {
                    zoo::gpt2::hf::save_hf_dir(model, self.tok, dir)?;
                    eprintln!(
                        "saved a Hugging Face GPT-2 folder to {} (use: deepscale generate --hf-dir {})",
                        dir.display(),
                        dir.display()
                    );
                }
                Ok(())
            })?;
        }
        if a.sample_prompt.is_empty() || a.sample_length == 0 {
            return Ok(None);
        }
        // Every rank generates (tensor-parallel layers need their whole group); rank 0 reports.
        // At pp > 1 the prompt runs through the stages and the last stage samples.
        let (model, stage): (&dyn zoo::gpt2::Gpt2Lm, _) = match (net, engine.pipe()) {
            (Net::Stage(s), Some(p)) => (
                &**s,
                Some(candle_deepscale::runtime::pipe::Stage {
                    layers: s.layers(),
                    pipe: p,
                }),
            ),
            (Net::Whole(m), _) => (&**m, None),
            (Net::Stage(s), None) => (&**s, None),
        };
        let ids = self.tok.encode(&a.sample_prompt, false)?;
        let out = engine.gathered(|| {
            zoo::generation::generate_on(
                model,
                stage.as_ref(),
                &ids,
                &SamplingConfig {
                    top_k: 40,
                    temperature: 0.8,
                    seed: a.train.seed,
                    max_new_tokens: a.sample_length,
                    stop_token: self.tok.eod_id,
                    ..Default::default()
                },
            )
        })?;
        let continuation = self.tok.decode(&out)?;
        let text = format!("{}{continuation}", a.sample_prompt);
        if root {
            // Quoted, so a continuation of spaces or newlines (a barely trained model's) shows.
            eprintln!(
                "sample (top-k 40, temperature 0.8, {} tokens): {:?} + {:?}",
                out.len(),
                a.sample_prompt,
                continuation
            );
        }
        Ok(Some(text))
    }
}

/// GPT-2's samples of seq + 1 tokens: input and shifted labels.
struct Gpt2Data {
    train: Samples,
    valid: Option<Samples>,
    seq: usize,
    /// The model's (unpadded) vocabulary size.
    vocab: usize,
    /// Where the samples come from, for errors.
    source: String,
}

impl DataProvider for Gpt2Data {
    type Targets = Tensor;

    fn batch(
        &self,
        valid: bool,
        start: usize,
        b: usize,
        dev: &Device,
    ) -> Result<(Activations, Tensor)> {
        let samples = match (valid, &self.valid) {
            (false, _) => &self.train,
            (true, Some(v)) => v,
            (true, None) => bail!("no validation split"),
        };
        let (x, y) = batch(samples, start, b, dev, (self.vocab, &self.source))?;
        Ok((Activations::new(x), y))
    }

    fn has_valid(&self) -> bool {
        self.valid.is_some()
    }

    fn seq_length(&self) -> usize {
        self.seq
    }
}
