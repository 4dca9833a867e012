//! `deepscale pretrain-bert`: Megatron's pretrain_bert.py on the engine — masked LM plus the binary
//! (sentence-order) head, any tensor x data layout with ZeRO 0/1/2, the same flags as pretrain-gpt2.
use crate::args::{print_json, LayoutArgs};
use crate::launch::{launch, RankCtx};
use crate::metrics::MetricsWriter;
use crate::preprocess_data::split_sentences;
use crate::pretrain_gpt2::assets_dir;
use crate::training::{
    engine_config, flops_per_token, gemm_peak, train_loop, LoopSpec, TrainingArgs,
};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_deepscale::cross_entropy::lm_cross_entropy;
use candle_deepscale::engine::{Engine, EngineConfig};
use candle_deepscale::module::Activations;
use candle_deepscale::parameter::{ParamBuilder, RandomInit};
use clap::Args;
use serde_json::json;
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
    #[arg(long, default_value_t = 2)]
    pub num_layers: usize,
    #[arg(long, default_value_t = 128)]
    pub hidden_size: usize,
    #[arg(long, default_value_t = 4)]
    pub num_attention_heads: usize,
    /// Sequence length of every sample ([CLS] A [SEP] B [SEP], padded).
    #[arg(long, default_value_t = 128)]
    pub seq_length: usize,
    #[arg(long, default_value_t = 512)]
    pub max_position_embeddings: usize,
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

struct Shared {
    train: BertDataset,
    valid: Option<BertDataset>,
    cfg: bert::Config,
    engine: EngineConfig,
    micro: usize,
    gas: usize,
    global: usize,
    gemm_peak: f64,
    dtype: DType,
    tok: Tokenizer,
    ckpt: Option<candle_deepscale::checkpoint::Checkpoint>,
    partition: candle_deepscale::pipe::PartitionMethod,
}

pub fn run(a: PretrainBertArgs) -> Result<()> {
    let layout = a.layout.layout()?;
    let t = &a.train;
    t.ds.refuse_unsupported()?;
    let ds = t.ds.config()?;
    let (engine, batch) = engine_config(t, ds.as_ref(), layout.dp)?;
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
            candle_deepscale::checkpoint::Checkpoint::open(d)
                .with_context(|| format!("--load {}", d.display()))?,
        ),
        None => None,
    };
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
        t.train_iters as usize * gb,
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
            let mut cfg: bert::Config = serde_json::from_value(c.manifest.model["config"].clone())
                .with_context(|| format!("--load {}: model config", c.dir.display()))?;
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
    let sh = Shared {
        train,
        valid,
        cfg,
        engine,
        micro: batch.micro_batch,
        gas: batch.accumulation,
        global: gb,
        gemm_peak: gemm_peak(&Device::Cpu)?,
        dtype,
        partition: a.layout.partition_method(ds.as_ref())?,
        tok,
        ckpt,
    };
    let Some(s) = launch(&layout, |ctx| train_rank(&a, &sh, &ctx))? else {
        return Ok(());
    };
    if t.json {
        print_json(
            json!({"iterations": t.train_iters, "initial_loss": s.0, "final_loss": s.1, "valid_loss": s.2,
                   "zero_stage": sh.engine.zero_stage, "train_batch_size": gb, "model_state_bytes": s.3}),
            &layout,
        );
    }
    Ok(())
}

/// Micro-batch `start..start + b` of `data`: the engine's input and the tensors of the loss.
fn batch(
    data: &BertDataset,
    start: usize,
    b: usize,
    dev: &Device,
) -> Result<(Activations, Tensor, Tensor, Tensor)> {
    let mut cols: [Vec<u32>; 4] = Default::default();
    let (mut loss_mask, mut nsp): (Vec<f32>, Vec<u32>) = (Vec::new(), Vec::new());
    let mut seq = 0;
    for k in 0..b {
        let s = data.sample(start + k)?;
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

/// Masked-LM loss over the masked positions plus the binary head's loss.
fn loss(
    model: &BertPipe,
    out: &Activations,
    labels: &Tensor,
    loss_mask: &Tensor,
    nsp: &Tensor,
) -> candle_core::Result<Tensor> {
    let per_token = model.lm_token_losses(&out.hidden, labels)?;
    let m = loss_mask.flatten_all()?;
    let lm = (per_token.mul(&m)?.sum_all()? / m.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64)?;
    match out.aux.first() {
        Some(binary) => lm + lm_cross_entropy(binary, nsp, 2, None)?,
        None => Ok(lm),
    }
}

fn train_rank(
    a: &PretrainBertArgs,
    sh: &Shared,
    ctx: &RankCtx,
) -> Result<(Option<f64>, f64, Option<f64>, u64)> {
    let t = &a.train;
    let device = ctx.device.clone();
    let root = ctx.is_root();
    let (tp, dp) = (ctx.tp()?, ctx.dp()?);
    let (dp_size, dp_rank) = dp.as_ref().map_or((1, 0), |g| (g.size(), g.rank));
    let init = RandomInit { seed: t.seed };
    let src: &dyn candle_deepscale::parameter::ParamSource = match &sh.ckpt {
        Some(c) => c,
        None => &init,
    };
    // A pipeline stage builds (and reads from --load) only its layers.
    let pipe = ctx.pipe()?;
    let (stage, stages) = pipe
        .as_ref()
        .map_or((0, 1), |p| (p.stages.rank, p.stages.size()));
    let bounds = BertPipe::partition(&sh.cfg, stages, &sh.partition)?;
    if root && stages > 1 {
        eprintln!("pipeline: {stages} stages, layer boundaries {bounds:?}");
    }
    let model = BertPipe::new(
        &sh.cfg,
        &ParamBuilder::new(src, &device, sh.dtype)
            .with_tp(tp.clone())
            .with_zero3(crate::training::zero3_construction(&sh.engine, dp.as_ref())),
        bounds[stage]..bounds[stage + 1],
    )?;
    let mut engine = Engine::new(model.layers(), sh.engine.clone(), dp.clone(), tp.clone())?;
    if let Some(p) = pipe {
        engine = engine.with_pipeline(p)?;
    }
    if let Some(c) = &sh.ckpt {
        c.restore(&mut engine, !t.ds.no_load_optim)?;
    }
    let max_state = engine.max_state_bytes()?;
    let (micro, gas) = (sh.micro, sh.gas);
    if root {
        let n: usize = candle_deepscale::module::unique_parameters(&model.layers())
            .iter()
            .map(|p| p.meta.numel())
            .sum();
        let n = if stages > 1 {
            format!("{n} (stage 0)")
        } else {
            n.to_string()
        };
        eprintln!(
            "model: BERT {} layers, hidden {}, heads {}, vocab {}, {} parameters; layout tp {} x dp {dp_size}; batch {} = micro {micro} x accumulation {gas} x dp {dp_size}",
            sh.cfg.num_hidden_layers, sh.cfg.hidden_size, sh.cfg.num_attention_heads, sh.cfg.vocab_size, n, ctx.topo.tp, sh.global
        );
        eprintln!("{}", engine.describe_memory());
        if device.is_cpu() {
            eprintln!("f32 products on {}", candle_deepscale::blas::describe());
        }
        if let Some(line) = crate::training::describe_offload(&sh.engine) {
            eprintln!("{line}");
        }
    }
    let metrics = match (&t.metrics_file, root) {
        (Some(p), true) => Some(MetricsWriter::create(p)?),
        _ => None,
    };
    let spec = LoopSpec {
        start_iter: engine.iteration(),
        train_iters: t.train_iters,
        log_interval: t.log_interval,
        eval_interval: t.eval_interval,
        tokens_per_iter: (sh.global * a.seq_length) as f64,
        flops_per_token: flops_per_token(
            sh.cfg.num_hidden_layers,
            sh.cfg.hidden_size,
            sh.cfg.intermediate_size,
            sh.cfg.vocab_size,
            a.seq_length,
        ),
        gemm_peak: if device.is_cpu() {
            sh.gemm_peak
        } else {
            gemm_peak(&device)?
        },
        metrics_file: t.metrics_file.as_deref(),
        root,
        base: json!({"world_size": ctx.topo.world_size(), "tp": ctx.topo.tp, "pp": ctx.topo.pp, "dp": dp_size,
                     "zero_stage": sh.engine.zero_stage, "model_state_bytes": max_state}),
        title: format!(
            "BERT {}L/{}H, tp {} x dp {dp_size}, ZeRO-{}",
            sh.cfg.num_hidden_layers, sh.cfg.hidden_size, ctx.topo.tp, sh.engine.zero_stage
        ),
        fp16: sh.engine.fp16.is_some(),
    };
    let model = &model;
    let micro_batches = |iter: u64| -> Result<Vec<_>> {
        let start = (iter as usize - 1) * sh.global + dp_rank * micro * gas;
        (0..gas)
            .map(|m| {
                let (x, labels, mask, nsp) = batch(&sh.train, start + m * micro, micro, &device)?;
                Ok((x, move |o: &Activations| {
                    loss(model, o, &labels, &mask, &nsp)
                }))
            })
            .collect()
    };
    let eval = |engine: &Engine| -> Result<Option<f64>> {
        let Some(v) = &sh.valid else { return Ok(None) };
        let n = t.eval_iters.max(1) as usize;
        let mut sum = 0.0;
        for i in 0..n {
            let (x, labels, mask, nsp) = batch(v, (i * dp_size + dp_rank) * micro, micro, &device)?;
            sum += engine.eval_batch(x, |o| loss(model, o, &labels, &mask, &nsp))? as f64;
        }
        Ok(Some(engine.dp_mean(sum / n as f64)?))
    };
    let saver = crate::training::Saver {
        args: t,
        model: json!({"type": "bert", "config": sh.cfg}),
        tokenizer: Some(sh.tok.to_json()?.into_bytes()),
        global_batch: sh.global,
        root,
        first_layer: model.range.start,
    };
    let r = train_loop(&spec, &mut engine, metrics, micro_batches, eval, |e, i| {
        saver.after(e, i)
    })?;
    Ok((r.first_loss, r.last_loss, r.last_valid, max_state))
}
