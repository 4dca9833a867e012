use super::Config;
use candle_core::{DType, Result, Tensor, D};
use candle_deepscale::layers::attention::{self_attention, AttentionDropout, Mask};
use candle_deepscale::layers::dropout::dropout;
use candle_deepscale::layers::embedding::Embedding;
use candle_deepscale::layers::linear::Linear;
use candle_deepscale::layers::module::{Activations, ForwardCtx, Layer};
use candle_deepscale::layers::norm::LayerNorm;
use candle_deepscale::layers::parameter::Partition;
use candle_deepscale::layers::parameter::{Init, Param, ParamBuilder, ParamOpts};
use candle_deepscale::layers::tensor_parallel::layers::{
    ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
};
use candle_deepscale::layers::tensor_parallel::mappings::copy_to_tp;
use candle_deepscale::layers::tensor_parallel::{size_rank, TensorParallel};

fn activation(x: &Tensor, act: &str) -> Result<Tensor> {
    match act {
        "gelu" => x.gelu_erf(),
        "relu" => x.relu(),
        _ => x.gelu(),
    }
}

/// Word, position and token-type embeddings (+ LayerNorm in the post-LN arrangement).
///
/// Input: `hidden` = token ids `[b, s]`, `aux` = `[token_type_ids [b, s], attention_mask [b, s]]`
/// (both optional; mask 1 = attend). Output: hidden `[b, s, h]`, `aux[0]` = additive attention bias
/// `[b, 1, 1, s]`.
#[derive(Clone, Debug)]
pub struct BertEmbedding {
    pub word_embeddings: VocabParallelEmbedding,
    position_embeddings: Embedding,
    tokentype_embeddings: Option<Embedding>,
    layernorm: Option<LayerNorm>,
    dropout: f64,
}

impl BertEmbedding {
    pub fn new(cfg: &Config, pb: &ParamBuilder) -> Result<Self> {
        let (h, std) = (cfg.hidden_size, cfg.initializer_range);
        let word_embeddings = VocabParallelEmbedding::new(
            &pb.push_prefix("word_embeddings"),
            cfg.padded_vocab_size(size_rank(pb.tp()).0),
            h,
            std,
            ParamOpts {
                tie_group: Some("word_embeddings".into()),
                real_rows: Some(cfg.vocab_size),
                ..Default::default()
            },
        )?;
        let position_embeddings = Embedding::new(
            &pb.push_prefix("position_embeddings"),
            cfg.max_position_embeddings,
            h,
            std,
            ParamOpts::default(),
        )?;
        let tokentype_embeddings = if cfg.type_vocab_size > 0 {
            Some(Embedding::new(
                &pb.push_prefix("tokentype_embeddings"),
                cfg.type_vocab_size,
                h,
                std,
                ParamOpts::default(),
            )?)
        } else {
            None
        };
        let layernorm = if cfg.pre_layer_norm {
            None
        } else {
            Some(LayerNorm::new(
                &pb.push_prefix("layernorm"),
                h,
                cfg.layer_norm_eps,
            )?)
        };
        Ok(Self {
            word_embeddings,
            position_embeddings,
            tokentype_embeddings,
            layernorm,
            dropout: cfg.hidden_dropout_prob,
        })
    }
}

impl Layer for BertEmbedding {
    fn type_name(&self) -> String {
        "BertEmbeddingPipe".into()
    }

    fn name(&self) -> String {
        "embedding".into()
    }

    fn parameters(&self) -> Vec<&Param> {
        let mut v = vec![
            &self.word_embeddings.weight,
            &self.position_embeddings.weight,
        ];
        v.extend(self.tokentype_embeddings.as_ref().map(|e| &e.weight));
        if let Some(ln) = &self.layernorm {
            v.extend(ln.parameters());
        }
        v
    }

    fn forward(&self, x: &Activations, ctx: &ForwardCtx) -> Result<Activations> {
        let ids = &x.hidden;
        let (b, s) = ids.dims2()?;
        let max_pos = self.position_embeddings.weight.meta.shape[0];
        if s > max_pos {
            candle_core::bail!("sequence of {s} tokens exceeds max_position_embeddings {max_pos}")
        }
        let pos = Tensor::arange(0u32, s as u32, ids.device())?;
        let h = self.position_embeddings.weight.meta.shape[1];
        // Positions added as a bias over each sequence's flattened [s * h] row.
        let mut e = candle_deepscale::layers::linear::add_bias(
            &self.word_embeddings.forward(ids)?.reshape((b, s * h))?,
            &self.position_embeddings.forward(&pos)?.flatten_all()?,
        )?
        .reshape((b, s, h))?;
        if let Some(tt) = &self.tokentype_embeddings {
            let types = match x.aux.first() {
                Some(t) => t.clone(),
                None => Tensor::zeros((b, s), DType::U32, ids.device())?,
            };
            e = (e + tt.forward(&types)?)?;
        }
        if let Some(ln) = &self.layernorm {
            e = ln.forward(&e)?;
        }
        let e = dropout(&e, self.dropout, ctx, ctx.site_key("embedding"))?;
        let mask = match x.aux.get(1) {
            Some(m) => m.to_dtype(DType::F32)?,
            None => Tensor::ones((b, s), DType::F32, ids.device())?,
        };
        // (1 - mask) * most-negative, as HF does: masked keys get zero attention weight.
        let bias = ((mask.affine(-1.0, 1.0)? * f32::MIN as f64)?).reshape((b, 1, 1, s))?;
        let bias = bias.to_dtype(e.dtype())?;
        Ok(Activations::with_aux(e, vec![bias]))
    }
}

/// One transformer block, post- or pre-LayerNorm.
#[derive(Clone, Debug)]
pub struct BertLayer {
    index: usize,
    pre_layer_norm: bool,
    /// Pre-LN only: before attention.
    input_layernorm: Option<LayerNorm>,
    query_key_value: ColumnParallelLinear,
    dense: RowParallelLinear,
    /// Post-LN: after the attention residual; pre-LN: before the MLP.
    post_attention_layernorm: LayerNorm,
    dense_h_to_4h: ColumnParallelLinear,
    dense_4h_to_h: RowParallelLinear,
    tp_rank: usize,
    /// Post-LN only: after the MLP residual.
    output_layernorm: Option<LayerNorm>,
    heads: usize,
    head_dim: usize,
    act: String,
    hidden_dropout: f64,
    attention_dropout: f64,
}

impl BertLayer {
    pub fn new(cfg: &Config, index: usize, pb: &ParamBuilder) -> Result<Self> {
        let (h, std, eps) = (cfg.hidden_size, cfg.initializer_range, cfg.layer_norm_eps);
        let out_std = if cfg.pre_layer_norm {
            std / (2.0 * cfg.num_hidden_layers as f64).sqrt()
        } else {
            std
        };
        let att = pb.push_prefix("attention");
        let mlp = pb.push_prefix("mlp");
        let pre = cfg.pre_layer_norm;
        let (tp, tp_rank) = size_rank(pb.tp());
        let f = cfg.intermediate_size;
        if !cfg.num_attention_heads.is_multiple_of(tp) || !f.is_multiple_of(tp) {
            candle_core::bail!(
                "tensor-parallel size {tp} must divide num_attention_heads {} and intermediate_size {f}",
                cfg.num_attention_heads
            )
        }
        Ok(Self {
            index,
            tp_rank,
            pre_layer_norm: pre,
            input_layernorm: if pre {
                Some(LayerNorm::new(&pb.push_prefix("input_layernorm"), h, eps)?)
            } else {
                None
            },
            query_key_value: ColumnParallelLinear::new(
                &att.push_prefix("query_key_value"),
                h,
                3 * h,
                true,
                std,
                false,
            )?,
            dense: RowParallelLinear::new(&att.push_prefix("dense"), h, h, true, out_std, true)?,
            post_attention_layernorm: LayerNorm::new(
                &pb.push_prefix("post_attention_layernorm"),
                h,
                eps,
            )?,
            dense_h_to_4h: ColumnParallelLinear::new(
                &mlp.push_prefix("dense_h_to_4h"),
                h,
                f,
                true,
                std,
                false,
            )?,
            dense_4h_to_h: RowParallelLinear::new(
                &mlp.push_prefix("dense_4h_to_h"),
                f,
                h,
                true,
                out_std,
                true,
            )?,
            output_layernorm: if pre {
                None
            } else {
                Some(LayerNorm::new(&pb.push_prefix("output_layernorm"), h, eps)?)
            },
            heads: cfg.num_attention_heads / tp,
            head_dim: cfg.head_dim(),
            act: cfg.hidden_act.clone(),
            hidden_dropout: cfg.hidden_dropout_prob,
            attention_dropout: cfg.attention_probs_dropout_prob,
        })
    }

    fn site(&self, what: &str) -> String {
        format!("layers.{}.{what}", self.index)
    }

    fn attention(&self, x: &Tensor, bias: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let dropout = AttentionDropout {
            p: self.attention_dropout,
            key: ctx.tp_site_key(&self.site("attention"), self.tp_rank),
        };
        let qkv = self.query_key_value.forward(x)?;
        let (y, _) = self_attention(
            &qkv,
            self.heads,
            self.head_dim,
            None,
            Mask::Bias(bias),
            dropout,
            ctx,
        )?;
        self.dense.forward(&y)
    }

    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        self.dense_4h_to_h
            .forward(&activation(&self.dense_h_to_4h.forward(x)?, &self.act)?)
    }

    fn parameters_list(&self) -> Vec<&Param> {
        let mut v = Vec::new();
        if let Some(ln) = &self.input_layernorm {
            v.extend(ln.parameters());
        }
        v.extend(self.query_key_value.parameters());
        v.extend(self.dense.parameters());
        v.extend(self.post_attention_layernorm.parameters());
        v.extend(self.dense_h_to_4h.parameters());
        v.extend(self.dense_4h_to_h.parameters());
        if let Some(ln) = &self.output_layernorm {
            v.extend(ln.parameters());
        }
        v
    }
}

impl Layer for BertLayer {
    fn type_name(&self) -> String {
        "ParallelTransformerLayerPipe".into()
    }

    fn name(&self) -> String {
        format!("layers.{}", self.index)
    }

    fn parameters(&self) -> Vec<&Param> {
        self.parameters_list()
    }

    fn forward(&self, x: &Activations, ctx: &ForwardCtx) -> Result<Activations> {
        let bias = x.aux.first().ok_or_else(|| {
            candle_core::Error::Msg("BERT layer input lacks the attention bias".into())
        })?;
        let h = &x.hidden;
        let drop = |t: &Tensor, what: &str| {
            dropout(t, self.hidden_dropout, ctx, ctx.site_key(&self.site(what)))
        };
        let out = if self.pre_layer_norm {
            let ln_in = self
                .input_layernorm
                .as_ref()
                .expect("pre-LN layer has input_layernorm");
            let h = (h + drop(&self.attention(&ln_in.forward(h)?, bias, ctx)?, "attn_out")?)?;
            let m = self.mlp(&self.post_attention_layernorm.forward(&h)?)?;
            (h + drop(&m, "mlp_out")?)?
        } else {
            let ln_out = self
                .output_layernorm
                .as_ref()
                .expect("post-LN layer has output_layernorm");
            let a = drop(&self.attention(h, bias, ctx)?, "attn_out")?;
            let h = self.post_attention_layernorm.forward(&(h + a)?)?;
            let m = drop(&self.mlp(&h)?, "mlp_out")?;
            ln_out.forward(&(h + m)?)?
        };
        Ok(Activations::with_aux(out, x.aux.clone()))
    }
}

/// What the head produces: the (final-normed) sequence output, the pooled [CLS] vector, masked-LM
/// logits over the padded vocabulary and next-sentence logits, as configured.
#[derive(Debug, Clone)]
pub struct BertOutput {
    pub sequence_output: Tensor,
    pub pooled_output: Option<Tensor>,
    /// Masked-LM logits over this rank's block of the padded vocabulary.
    pub lm_logits: Option<Tensor>,
    pub binary_logits: Option<Tensor>,
}

#[derive(Clone, Debug)]
struct LmHead {
    dense: Linear,
    layernorm: LayerNorm,
    bias: Param,
    /// Tied with the embedding's word embeddings.
    word_embeddings: Param,
}

/// Final LayerNorm (pre-LN), pooler, masked-LM head and binary head.
#[derive(Clone, Debug)]
pub struct BertHead {
    final_layernorm: Option<LayerNorm>,
    pooler: Option<Linear>,
    lm_head: Option<LmHead>,
    binary_head: Option<Linear>,
    act: String,
    tp: Option<TensorParallel>,
}

impl BertHead {
    /// The final LayerNorm (pre-LN), pooler, masked-LM and binary heads the config asks for; the
    /// LM head's logits go through `word_embeddings` (tied with the embedding's).
    /// `word_embeddings` is required when the config has an LM head.
    pub fn new(config: &Config, pb: &ParamBuilder, word_embeddings: Option<Param>) -> Result<Self> {
        let (h, std, eps) = (
            config.hidden_size,
            config.initializer_range,
            config.layer_norm_eps,
        );
        let final_layernorm = if config.pre_layer_norm {
            Some(LayerNorm::new(&pb.push_prefix("final_layernorm"), h, eps)?)
        } else {
            None
        };
        let pooler = if config.add_pooler {
            Some(Linear::new(
                &pb.push_prefix("pooler.dense"),
                h,
                h,
                true,
                std,
            )?)
        } else {
            None
        };
        let lm_head = if config.add_lm_head {
            let lp = pb.push_prefix("lm_head");
            let Some(word_embeddings) = word_embeddings else {
                candle_core::bail!("BERT's LM head needs the (tied) word embeddings")
            };
            Some(LmHead {
                word_embeddings,
                dense: Linear::new(&lp.push_prefix("dense"), h, h, true, std)?,
                layernorm: LayerNorm::new(&lp.push_prefix("layernorm"), h, eps)?,
                bias: lp.get(
                    &[config.padded_vocab_size(size_rank(pb.tp()).0)],
                    "bias",
                    Init::Zeros,
                    ParamOpts {
                        partition: Some(Partition::Split { dim: 0, stride: 1 }),
                        no_weight_decay: true,
                        real_rows: Some(config.vocab_size),
                        ..Default::default()
                    },
                )?,
            })
        } else {
            None
        };
        let binary_head = if config.add_binary_head {
            Some(Linear::new(
                &pb.push_prefix("binary_head"),
                h,
                2,
                true,
                std,
            )?)
        } else {
            None
        };
        Ok(Self {
            final_layernorm,
            pooler,
            lm_head,
            binary_head,
            act: config.hidden_act.clone(),
            tp: pb.tp().cloned(),
        })
    }

    pub fn outputs(&self, x: &Tensor) -> Result<BertOutput> {
        self.outputs_for(x, false)
    }

    /// [`BertHead::outputs`]; in a training forward the masked-LM logits are the cross
    /// entropy's fused LM head (`lm_head_logits_with_bias`): the gradients of the decoder's
    /// input, tied weight and bias are computed a block of vocabulary columns at a time and the
    /// logits' gradient is never whole.
    pub fn outputs_for(&self, x: &Tensor, training: bool) -> Result<BertOutput> {
        let seq = match &self.final_layernorm {
            Some(ln) => ln.forward(x)?,
            None => x.clone(),
        };
        let pooled = match &self.pooler {
            Some(p) => Some(p.forward(&seq.narrow(1, 0, 1)?.squeeze(1)?)?.tanh()?),
            None => None,
        };
        let lm_logits = match &self.lm_head {
            Some(h) => {
                let t = activation(&h.dense.forward(&seq)?, &self.act)?;
                let t = h.layernorm.forward(&t)?;
                let t = copy_to_tp(&t, self.tp.as_ref())?;
                Some(candle_deepscale::layers::loss::lm_head_logits_with_bias(
                    &t,
                    h.word_embeddings.tensor(),
                    Some(h.bias.tensor()),
                    training,
                )?)
            }
            None => None,
        };
        let binary_logits = match (&self.binary_head, &pooled) {
            (Some(b), Some(p)) => Some(b.forward(p)?),
            _ => None,
        };
        Ok(BertOutput {
            sequence_output: seq,
            pooled_output: pooled,
            lm_logits,
            binary_logits,
        })
    }
}

impl Layer for BertHead {
    fn type_name(&self) -> String {
        "BertHeadPipe".into()
    }

    fn name(&self) -> String {
        "head".into()
    }

    fn parameters(&self) -> Vec<&Param> {
        let mut v = Vec::new();
        if let Some(ln) = &self.final_layernorm {
            v.extend(ln.parameters());
        }
        if let Some(p) = &self.pooler {
            v.extend(p.parameters());
        }
        if let Some(h) = &self.lm_head {
            v.extend(h.dense.parameters());
            v.extend(h.layernorm.parameters());
            v.push(&h.bias);
            v.push(&h.word_embeddings);
        }
        if let Some(b) = &self.binary_head {
            v.extend(b.parameters());
        }
        v
    }

    /// Output: `hidden` = masked-LM logits (or the sequence output without an LM head),
    /// `aux[0]` = next-sentence logits when the binary head exists.
    fn forward(&self, x: &Activations, ctx: &ForwardCtx) -> Result<Activations> {
        let o = self.outputs_for(&x.hidden, ctx.train)?;
        let hidden = o.lm_logits.unwrap_or(o.sequence_output);
        Ok(Activations::with_aux(
            hidden,
            o.binary_logits.into_iter().collect(),
        ))
    }
}

/// Megatron BERT as an ordered list of layers: embedding, blocks, head.
#[derive(Clone, Debug)]
pub struct Bert {
    pub config: Config,
    pub embedding: BertEmbedding,
    pub layers: Vec<BertLayer>,
    pub head: BertHead,
}

impl Bert {
    pub fn new(config: &Config, pb: &ParamBuilder) -> Result<Self> {
        config.validate()?;
        let embedding = BertEmbedding::new(config, &pb.push_prefix("embedding"))?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| BertLayer::new(config, i, &pb.push_prefix(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let head = BertHead::new(config, pb, Some(embedding.word_embeddings.weight.clone()))?;
        Ok(Self {
            config: config.clone(),
            embedding,
            layers,
            head,
        })
    }

    /// The tensor-parallel group the model runs in.
    pub fn tp(&self) -> Option<&TensorParallel> {
        self.head.tp.as_ref()
    }

    /// Per-token masked-LM losses of (vocabulary-parallel) `lm_logits` against `labels`.
    pub fn lm_token_losses(&self, lm_logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        candle_deepscale::layers::tensor_parallel::cross_entropy::vocab_parallel_token_losses(
            lm_logits,
            labels,
            self.config.vocab_size,
            self.tp(),
        )
    }

    pub fn layers(&self) -> Vec<&dyn Layer> {
        let mut v: Vec<&dyn Layer> = vec![&self.embedding];
        v.extend(self.layers.iter().map(|b| b as &dyn Layer));
        v.push(&self.head);
        v
    }

    pub fn parameters(&self) -> Vec<&Param> {
        candle_deepscale::layers::module::unique_parameters(&self.layers())
    }

    /// Runs the encoder and every configured head on `ids [b, s]`.
    pub fn forward(
        &self,
        ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        ctx: &ForwardCtx,
    ) -> Result<BertOutput> {
        let (b, s) = ids.dims2()?;
        let types = match token_type_ids {
            Some(t) => t.clone(),
            None => Tensor::zeros((b, s), DType::U32, ids.device())?,
        };
        let mask = match attention_mask {
            Some(m) => m.clone(),
            None => Tensor::ones((b, s), DType::U32, ids.device())?,
        };
        let mut x = self
            .embedding
            .forward(&Activations::with_aux(ids.clone(), vec![types, mask]), ctx)?;
        for l in &self.layers {
            x = l.forward(&x, ctx)?;
        }
        self.head.outputs_for(&x.hidden, ctx.train)
    }
}

/// Mean of `hidden [b, s, h]` over positions where `mask [b, s]` is 1 (sentence-transformers pooling).
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?;
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    sum.broadcast_div(&m.sum(1)?.clamp(1e-9, f64::MAX)?)
}

impl candle_deepscale::Sequential for Bert {
    fn layers(&self) -> Vec<&dyn Layer> {
        Bert::layers(self)
    }
}
