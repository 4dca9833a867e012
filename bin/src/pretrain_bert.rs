//! `deepscale pretrain-bert`: Megatron's pretrain_bert.py on the engine — masked LM plus the binary
//! (sentence-order) head, any tensor x data layout with ZeRO 0/1/2, the same flags as pretrain-gpt2.
use crate::args::{print_json, LayoutArgs};
use crate::preprocess_data::split_sentences;
use crate::pretrain::{pretrain, DataProvider, ModelProvider, Setup};
use crate::pretrain_gpt2::assets_dir;
use crate::training::{prepare, TrainingArgs};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_deepscale::layers::loss::lm_cross_entropy;
use candle_deepscale::layers::module::Activations;
use candle_deepscale::layers::parameter::ParamBuilder;
use candle_deepscale::runtime::meters::flops_per_token;
use candle_deepscale::runtime::pipe::PartitionMethod;
use clap::Args;
use serde_json::json;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use zoo::bert::{self, BertPipe};
use zoo::bert_dataset::{BertConfig, BertDataset, Documents, InMemoryDocuments, Special};
use zoo::gpt2_dataset::split_ranges;
use zoo::indexed_dataset::MMapIndexedDataset;
use zoo::text_data::read_documents;
use zoo::tokenizer::Tokenizer;

#[derive(Args, Debug)]
pub struct PretrainBertArgs {
    #[command(flatten)]
    pub layout: LayoutArgs,
    /// Transformer layers.
    #[arg(long, default_value_t = 2)]
    pub num_layers: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 128)]
    pub hidden_size: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    pub num_attention_heads: usize,
    /// Sequence length of every sample ([CLS] A [SEP] B [SEP], padded).
    #[arg(long, default_value_t = 128)]
    pub seq_length: usize,
    /// Position embeddings (default: --seq-length).
    #[arg(long, default_value_t = 512)]
    pub max_position_embeddings: usize,
    /// Pad the vocabulary to a multiple of this times the tensor-parallel size.
    #[arg(long, default_value_t = 128)]
    pub make_vocab_size_divisible_by: usize,
    /// BERT vocab.txt. Default: assets/bert/bert-uncased-vocab.txt.
    #[arg(long)]
    pub vocab_file: Option<PathBuf>,
    /// Share of tokens masked.
    #[arg(long, default_value_t = 0.15)]
    pub mask_prob: f64,
    /// Share of samples cut shorter than the sequence length.
    #[arg(long, default_value_t = 0.1)]
    pub short_seq_prob: f64,
    /// Masked LM only: one segment, no binary head.
    #[arg(long)]
    pub bert_no_binary_head: bool,
    /// Continue from a native checkpoint (model config, tokenizer, parameters, optimizer).
    #[arg(long)]
    pub load: Option<PathBuf>,
    #[command(flatten)]
    pub train: TrainingArgs,
}

/// Sentence-split documents: a Megatron prefix written with --split-sentences, or a text file
/// split and tokenized here.
fn documents(a: &PretrainBertArgs, tok: &Tokenizer) -> Result<Arc<dyn Documents>> {
    let path = match a.train.data_path.as_slice() {
        [] => assets_dir().join("data/sample.jsonl"),
        [one] => PathBuf::from(one),
        _ => bail!("not supported: several --data-path prefixes for BERT, because blending is built for GPT-2 only"),
    };
    if path.is_file() {
        let docs = read_documents(&path, &a.train.text_key)?;
        let tokenized = docs
            .iter()
            .map(|d| {
                split_sentences(d)
                    .into_iter()
                    .map(|s| Ok(tok.encode(s, false)?))
                    .filter(|r: &Result<Vec<u32>>| r.as_ref().map_or(true, |v| !v.is_empty()))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        return Ok(Arc::new(InMemoryDocuments(tokenized)));
    }
    if zoo::indexed_dataset::exists(&path) {
        return Ok(Arc::new(MMapIndexedDataset::open(&path)?));
    }
    bail!(
        "--data-path {}: no such file, and no Megatron dataset {}.bin/.idx",
        path.display(),
        path.display()
    )
}

pub fn run(mut a: PretrainBertArgs) -> Result<()> {
    let layout = a.layout.layout()?;
    a.train.ds.refuse_unsupported()?;
    crate::training::check_flag("mask-prob", a.mask_prob, 0.0, 1.0, false)?;
    crate::training::check_flag("short-seq-prob", a.short_seq_prob, 0.0, 1.0, false)?;
    if a.seq_length < 3 + usize::from(!a.bert_no_binary_head) {
        bail!(
            "--seq-length {}: a BERT sample needs room for [CLS], [SEP]{} and at least one token",
            a.seq_length,
            if a.bert_no_binary_head { "" } else { " twice" }
        )
    }
    let ds = a.train.ds.config()?;
    let (engine, batch) = prepare(&mut a.train, ds.as_ref(), layout.dp)?;
    let t = &a.train;
    if let Some(m) = &t.metrics_file {
        crate::metrics::check_target(m, t.overwrite, a.load.is_some() && !t.finetune)?;
    }
    if t.finetune && a.load.is_none() {
        bail!("--finetune starts from a checkpoint's weights: give --load DIR")
    }
    for n in t.megatron_notes() {
        eprintln!("note: {n}");
    }
    if t.ds.no_load_optim && a.load.is_none() {
        eprintln!("note: --no-load-optim: nothing is loaded without --load");
    }
    for n in t.ds.notes() {
        eprintln!("note: {n}");
    }
    let vocab = a
        .vocab_file
        .clone()
        .unwrap_or_else(|| assets_dir().join("bert/bert-uncased-vocab.txt"));
    let ckpt = match &a.load {
        Some(d) => Some(
            candle_deepscale::runtime::checkpoint::Checkpoint::open(d)
                .with_context(|| format!("--load {}", d.display()))?,
        ),
        None => None,
    };
    if let Some(c) = &ckpt {
        // Before its tokenizer is read: a GPT-2 checkpoint would otherwise fail on "no [CLS]".
        if c.manifest.model["type"] != "bert" {
            bail!(
                "--load {}: a {} checkpoint, not BERT (load it with pretrain-{})",
                c.dir.display(),
                c.manifest.model["type"],
                c.manifest.model["type"].as_str().unwrap_or("gpt2")
            )
        }
    }
    // --tokenizer-type (a seed-script flag, shared with pretrain-gpt2): BERT's WordPiece here.
    let tok = match t.ds.tokenizer_type.as_deref().unwrap_or("BertWordPieceLowerCase") {
        "BertWordPieceLowerCase" => Tokenizer::bert_wordpiece(&vocab, true),
        "BertWordPieceCase" => Tokenizer::bert_wordpiece(&vocab, false),
        other => bail!("--tokenizer-type {other}: pretrain-bert takes BertWordPieceLowerCase or BertWordPieceCase"),
    }
    .with_context(|| format!("loading the BERT vocabulary {}", vocab.display()));
    let tok = match &ckpt {
        Some(c) => Tokenizer::from_json(&c.dir.join("tokenizer.json"))?,
        None => tok?,
    };
    let special = Special::from_tokenizer(&tok)?;
    let docs = documents(&a, &tok)?;
    let [train_r, valid_r, _] = split_ranges(docs.num_documents(), &t.split)?;
    let dcfg = BertConfig {
        max_seq_length: a.seq_length,
        masked_lm_prob: a.mask_prob,
        short_seq_prob: a.short_seq_prob,
        binary_head: !a.bert_no_binary_head,
        seed: t.seed,
    };
    let gb = batch.train_batch_size;
    let evals = t
        .train_iters
        .checked_div(t.eval_interval)
        .map_or(1, |n| n + 1) as usize;
    let train = BertDataset::new(
        docs.clone(),
        train_r,
        (t.train_iters as usize).checked_mul(gb).ok_or_else(|| {
            anyhow::anyhow!(
                "--train-iters {} x the global batch {gb} overflows",
                t.train_iters
            )
        })?,
        dcfg.clone(),
        special,
    )?;
    let valid = if valid_r.is_empty() {
        None
    } else {
        Some(BertDataset::new(
            docs.clone(),
            valid_r,
            evals * t.eval_iters.max(1) as usize * gb,
            dcfg,
            special,
        )?)
    };
    eprintln!(
        "data: {} documents -> {} training samples, {} validation samples",
        docs.num_documents(),
        train.len(),
        valid.as_ref().map_or(0, |v| v.len())
    );
    let cfg = match &ckpt {
        Some(c) => {
            if c.manifest.model["type"] != "bert" {
                bail!(
                    "--load {}: a {} checkpoint, not BERT",
                    c.dir.display(),
                    c.manifest.model["type"]
                )
            }
            let mut cfg: bert::Config =
                candle_deepscale::json::from_value(c.manifest.model["config"].clone())
                    .with_context(|| {
                        format!("--load {}: manifest.json's model.config", c.dir.display())
                    })?;
            crate::args::check_shape_flags(
                &format!("--load {}", c.dir.display()),
                &[
                    ("num_layers", a.num_layers, cfg.num_hidden_layers),
                    ("hidden_size", a.hidden_size, cfg.hidden_size),
                    (
                        "num_attention_heads",
                        a.num_attention_heads,
                        cfg.num_attention_heads,
                    ),
                    (
                        "max_position_embeddings",
                        a.max_position_embeddings,
                        cfg.max_position_embeddings,
                    ),
                    (
                        "make_vocab_size_divisible_by",
                        a.make_vocab_size_divisible_by,
                        cfg.make_vocab_size_divisible_by,
                    ),
                ],
            )?;
            cfg.hidden_dropout_prob = t.hidden_dropout;
            cfg.attention_probs_dropout_prob = t.attention_dropout;
            cfg
        }
        None => bert::Config {
            hidden_dropout_prob: t.hidden_dropout,
            attention_probs_dropout_prob: t.attention_dropout,
            max_position_embeddings: a.max_position_embeddings,
            make_vocab_size_divisible_by: a.make_vocab_size_divisible_by,
            pre_layer_norm: true,
            add_pooler: !a.bert_no_binary_head,
            add_lm_head: true,
            add_binary_head: !a.bert_no_binary_head,
            initializer_range: t.init_method_std,
            ..bert::Config::new(
                a.num_layers,
                a.hidden_size,
                a.num_attention_heads,
                tok.vocab_size(),
            )
        },
    };
    if a.seq_length > cfg.max_position_embeddings {
        bail!(
            "--seq-length {} exceeds --max-position-embeddings {}",
            a.seq_length,
            cfg.max_position_embeddings
        )
    }
    let dtype = crate::training::param_dtype(&engine, layout.device);
    cfg.validate()?;
    if layout.device == crate::args::DeviceKind::Cpu {
        let (h, f, v) = (
            cfg.hidden_size as u64,
            cfg.intermediate_size as u64,
            cfg.padded_vocab_size(layout.tp) as u64,
        );
        // Embeddings, layers (attention, MLP, two LayerNorms) and the LM head's transform.
        // Saturating (validated above, so only sizes at the edge of counting come near it).
        let sum = |xs: &[u64]| xs.iter().fold(0u64, |t, &x| t.saturating_add(x));
        let hh = h.saturating_mul(h);
        let layer = sum(&[
            hh.saturating_mul(4),
            9 * h,
            h.saturating_mul(f).saturating_mul(2),
            f,
        ]);
        let tables = sum(&[
            v,
            cfg.max_position_embeddings as u64,
            cfg.type_vocab_size as u64,
        ]);
        let params = sum(&[
            tables.saturating_mul(h),
            2 * h,
            layer.saturating_mul(cfg.num_hidden_layers as u64),
            hh.saturating_add(h).saturating_mul(2),
            v,
        ]);
        crate::memory_preflight::check(
            &crate::memory_preflight::Shape {
                layers: cfg.num_hidden_layers,
                hidden: cfg.hidden_size,
                heads: cfg.num_attention_heads,
                seq: a.seq_length,
                vocab: v as usize,
                params,
                largest: v
                    .saturating_mul(h)
                    .max(h.saturating_mul(f).saturating_add(f)),
            },
            &layout,
            &engine,
            dtype.size_in_bytes() as u64,
            t.checkpoint_activations,
        )?;
    }
    let setup = Setup {
        args: t,
        layout: &layout,
        engine,
        batch,
        dtype,
        ckpt,
        partition: a.layout.partition_method(ds.as_ref())?,
        tokenizer_json: tok.to_json()?.into_bytes(),
    };
    let provider = BertProvider {
        cfg,
        seq: a.seq_length,
    };
    let data = BertData {
        train,
        valid,
        seq: a.seq_length,
        vocab: provider.cfg.vocab_size,
        source: if t.data_path.is_empty() {
            "the shipped sample data".into()
        } else {
            format!("--data-path {}", t.data_path.join(" "))
        },
    };
    let Some(s) = pretrain(&setup, &provider, &data, loss)? else {
        return Ok(());
    };
    if t.json {
        print_json(
            json!({"iterations": s.iterations, "stopped": s.stopped.map(|x| x.to_string()),
                   "initial_loss": s.first_loss, "final_loss": s.last_loss,
                   "valid_loss": s.last_valid, "zero_stage": setup.engine.zero_stage,
                   "train_batch_size": gb, "model_state_bytes": s.model_state_bytes}),
            &layout,
        );
    }
    s.exit_status(t)
}

/// Micro-batch `start..start + b` of `data`: the engine's input and the tensors of the loss.
fn batch(
    data: &BertDataset,
    start: usize,
    b: usize,
    dev: &Device,
    vocab: (usize, &str),
) -> Result<(Activations, Tensor, Tensor, Tensor)> {
    let mut cols: [Vec<u32>; 4] = Default::default();
    let (mut loss_mask, mut nsp): (Vec<f32>, Vec<u32>) = (Vec::new(), Vec::new());
    let mut seq = 0;
    for k in 0..b {
        let s = data.sample(start + k)?;
        for ids in [&s.tokens, &s.labels] {
            crate::pretrain::check_token_ids(ids, vocab.0, vocab.1, start + k)?;
        }
        seq = s.tokens.len();
        cols[0].extend(&s.tokens);
        cols[1].extend(&s.token_types);
        cols[2].extend(&s.padding_mask);
        cols[3].extend(&s.labels);
        loss_mask.extend(&s.loss_mask);
        nsp.push(u32::from(s.is_random));
    }
    let [ids, types, mask, labels] = cols.map(|c| Tensor::from_vec(c, (b, seq), dev));
    Ok((
        Activations::with_aux(ids?, vec![types?, mask?]),
        labels?,
        Tensor::from_vec(loss_mask, (b, seq), dev)?,
        Tensor::from_vec(nsp, b, dev)?,
    ))
}

/// What BERT's loss needs of a micro-batch: the masked-LM labels and loss mask, and the binary
/// head's labels.
type Targets = (Tensor, Tensor, Tensor);

/// Masked-LM loss over the masked positions plus the binary head's loss; with the binary head,
/// both are reported apart (Megatron's `lm loss` and `sop loss`).
fn loss(
    model: &BertPipe,
    out: &Activations,
    targets: &Targets,
) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
    let (labels, loss_mask, nsp) = targets;
    let per_token = model.lm_token_losses(&out.hidden, labels)?;
    let m = loss_mask.flatten_all()?;
    let lm = (per_token.mul(&m)?.sum_all()? / m.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64)?;
    match out.aux.first() {
        Some(binary) => {
            let sop = lm_cross_entropy(binary, nsp, 2, None)?;
            let parts = vec![lm.detach(), sop.detach()];
            Ok(((lm + sop)?, parts))
        }
        None => Ok((lm, Vec::new())),
    }
}

/// BERT for the pretraining driver: BertPipe (the whole model at pp 1, a stage otherwise).
struct BertProvider {
    cfg: bert::Config,
    seq: usize,
}

impl ModelProvider for BertProvider {
    type Model = BertPipe;

    fn manifest(&self) -> serde_json::Value {
        json!({"type": "bert", "config": self.cfg})
    }

    fn partition(&self, stages: usize, method: &PartitionMethod) -> Result<Vec<usize>> {
        Ok(BertPipe::partition(&self.cfg, stages, method)?)
    }

    fn build(&self, pb: &ParamBuilder, range: Range<usize>, _pipelined: bool) -> Result<BertPipe> {
        Ok(BertPipe::new(&self.cfg, pb, range)?)
    }

    fn describe(&self, _n_params: usize, _tp: usize) -> String {
        let c = &self.cfg;
        format!(
            "BERT {} layers, hidden {}, heads {}, vocab {}",
            c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.vocab_size
        )
    }

    fn reported_losses(&self) -> Vec<String> {
        match self.cfg.add_binary_head {
            true => vec!["lm loss".into(), "sop loss".into()],
            false => Vec::new(),
        }
    }

    fn title(&self) -> String {
        format!(
            "BERT {}L/{}H",
            self.cfg.num_hidden_layers, self.cfg.hidden_size
        )
    }

    fn flops_per_token(&self) -> f64 {
        let c = &self.cfg;
        flops_per_token(
            c.num_hidden_layers,
            c.hidden_size,
            c.intermediate_size,
            c.vocab_size,
            self.seq,
        )
    }
}

/// BERT's samples: masked tokens with segments and padding, and the loss's targets.
struct BertData {
    train: BertDataset,
    valid: Option<BertDataset>,
    seq: usize,
    /// The model's (unpadded) vocabulary size.
    vocab: usize,
    /// Where the samples come from, for errors.
    source: String,
}

impl DataProvider for BertData {
    type Targets = Targets;

    fn batch(
        &self,
        valid: bool,
        start: usize,
        b: usize,
        dev: &Device,
    ) -> Result<(Activations, Targets)> {
        let data = match (valid, &self.valid) {
            (false, _) => &self.train,
            (true, Some(v)) => v,
            (true, None) => bail!("no validation split"),
        };
        let (x, labels, mask, nsp) = batch(data, start, b, dev, (self.vocab, &self.source))?;
        Ok((x, (labels, mask, nsp)))
    }

    fn has_valid(&self) -> bool {
        self.valid.is_some()
    }

    fn seq_length(&self) -> usize {
        self.seq
    }
}
