use super::Config;
use candle_core::{Result, Tensor};
use candle_deepscale::layers::attention::{
    causal_self_attention, self_attention, AttentionDropout, Mask,
};
use candle_deepscale::layers::dropout::dropout;
use candle_deepscale::layers::embedding::Embedding;
use candle_deepscale::layers::module::{Activations, ForwardCtx, Layer};
use candle_deepscale::layers::norm::LayerNorm;
use candle_deepscale::layers::parameter::{Param, ParamBuilder, ParamOpts};
use candle_deepscale::layers::tensor_parallel::cross_entropy::vocab_parallel_token_losses;
use candle_deepscale::layers::tensor_parallel::layers::{
    ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
};
use candle_deepscale::layers::tensor_parallel::mappings::{copy_to_tp, gather_from_tp};
use candle_deepscale::layers::tensor_parallel::{size_rank, TensorParallel};

/// Word + position embeddings and embedding dropout. Input: token ids `[b, s]` (u32).
#[derive(Clone, Debug)]
pub struct Gpt2Embedding {
    pub word_embeddings: VocabParallelEmbedding,
    pub position_embeddings: Embedding,
    dropout: f64,
}

impl Gpt2Embedding {
    pub fn new(cfg: &Config, pb: &ParamBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let (tp, _) = size_rank(pb.tp());
        let word_embeddings = VocabParallelEmbedding::new(
            &pb.push_prefix("word_embeddings"),
            cfg.padded_vocab_size(tp),
            h,
            cfg.init_method_std,
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
            cfg.init_method_std,
            ParamOpts::default(),
        )?;
        Ok(Self {
            word_embeddings,
            position_embeddings,
            dropout: cfg.hidden_dropout,
        })
    }

    /// Embeds `ids [b, t]` at positions `offset..offset + t`.
    pub fn embed(&self, ids: &Tensor, offset: usize, ctx: &ForwardCtx) -> Result<Tensor> {
        let (_b, t) = ids.dims2()?;
        let max_pos = self.position_embeddings.weight.meta.shape[0];
        if offset + t > max_pos {
            candle_core::bail!(
                "sequence of {} tokens exceeds max_position_embeddings {max_pos}",
                offset + t
            )
        }
        let pos = Tensor::arange(offset as u32, (offset + t) as u32, ids.device())?;
        let (b, h) = (ids.dim(0)?, self.position_embeddings.weight.meta.shape[1]);
        // Positions added as a bias over each sequence's flattened [t * h] row.
        let x = candle_deepscale::layers::linear::add_bias(
            &self.word_embeddings.forward(ids)?.reshape((b, t * h))?,
            &self.position_embeddings.forward(&pos)?.flatten_all()?,
        )?
        .reshape((b, t, h))?;
        dropout(&x, self.dropout, ctx, ctx.site_key("embedding"))
    }
}

impl Layer for Gpt2Embedding {
    fn type_name(&self) -> String {
        "EmbeddingPipe".into()
    }

    fn name(&self) -> String {
        "embedding".into()
    }

    fn parameters(&self) -> Vec<&Param> {
        vec![
            &self.word_embeddings.weight,
            &self.position_embeddings.weight,
        ]
    }

    fn forward(&self, x: &Activations, ctx: &ForwardCtx) -> Result<Activations> {
        Ok(Activations::new(self.embed(&x.hidden, 0, ctx)?))
    }
}

/// Keys and values of every block for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Number of positions already cached.
    pub offset: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            offset: 0,
        }
    }
}

/// One pre-LayerNorm transformer block.
#[derive(Clone, Debug)]
pub struct Block {
    index: usize,
    input_layernorm: LayerNorm,
    query_key_value: ColumnParallelLinear,
    dense: RowParallelLinear,
    post_attention_layernorm: LayerNorm,
    dense_h_to_4h: ColumnParallelLinear,
    dense_4h_to_h: RowParallelLinear,
    /// Attention heads on this tensor-parallel rank.
    heads: usize,
    tp_rank: usize,
    head_dim: usize,
    hidden_dropout: f64,
    attention_dropout: f64,
}

impl Block {
    pub fn new(cfg: &Config, index: usize, pb: &ParamBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let std = cfg.init_method_std;
        let out_std = std / (2.0 * cfg.num_layers as f64).sqrt();
        let eps = cfg.layernorm_epsilon;
        let att = pb.push_prefix("attention");
        let mlp = pb.push_prefix("mlp");
        let (tp, tp_rank) = size_rank(pb.tp());
        let f = cfg.ffn_hidden_size;
        if !cfg.num_attention_heads.is_multiple_of(tp) || !f.is_multiple_of(tp) {
            candle_core::bail!(
                "tensor-parallel size {tp} must divide num_attention_heads {} and ffn_hidden_size {f}",
                cfg.num_attention_heads
            )
        }
        Ok(Self {
            index,
            tp_rank,
            input_layernorm: LayerNorm::new(&pb.push_prefix("input_layernorm"), h, eps)?,
            // Output rows laid out per head as [heads, 3, head_dim] (Megatron checkpoint version 2.0),
            // so a contiguous row split is head-aligned.
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
            heads: cfg.num_attention_heads / tp,
            head_dim: cfg.head_dim(),
            hidden_dropout: cfg.hidden_dropout,
            attention_dropout: cfg.attention_dropout,
        })
    }

    fn site(&self, what: &str) -> String {
        format!("layers.{}.{what}", self.index)
    }

    /// Causal self-attention over `x [b, t, h]`, continuing `past` keys/values when given.
    fn attention(
        &self,
        x: &Tensor,
        past: Option<&(Tensor, Tensor)>,
        need_kv: bool,
        ctx: &ForwardCtx,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let dropout = AttentionDropout {
            p: self.attention_dropout,
            key: ctx.tp_site_key(&self.site("attention"), self.tp_rank),
        };
        let qkv = self.query_key_value.forward(x)?;
        if past.is_none() && !need_kv {
            let y = causal_self_attention(&qkv, self.heads, self.head_dim, dropout, ctx)?;
            return Ok((self.dense.forward(&y)?, None));
        }
        let (y, kv) = self_attention(
            &qkv,
            self.heads,
            self.head_dim,
            past,
            Mask::Causal,
            dropout,
            ctx,
        )?;
        Ok((self.dense.forward(&y)?, Some(kv)))
    }

    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        self.dense_4h_to_h
            .forward(&self.dense_h_to_4h.forward_gelu(x)?)
    }

    /// The block on `x [b, t, h]`; with `cache`, attends to and extends the cached keys/values.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let past = cache.as_ref().and_then(|c| c.as_ref());
        let need_kv = cache.is_some();
        let (a, kv) = self.attention(&self.input_layernorm.forward(x)?, past, need_kv, ctx)?;
        if let Some(c) = cache {
            *c = kv;
        }
        let x = (x + dropout(
            &a,
            self.hidden_dropout,
            ctx,
            ctx.site_key(&self.site("attn_out")),
        )?)?;
        let m = self.mlp(&self.post_attention_layernorm.forward(&x)?)?;
        x + dropout(
            &m,
            self.hidden_dropout,
            ctx,
            ctx.site_key(&self.site("mlp_out")),
        )?
    }
}

impl Layer for Block {
    fn type_name(&self) -> String {
        "ParallelTransformerLayerPipe".into()
    }

    fn name(&self) -> String {
        format!("layers.{}", self.index)
    }

    fn parameters(&self) -> Vec<&Param> {
        let mut v = self.input_layernorm.parameters();
        v.extend(self.query_key_value.parameters());
        v.extend(self.dense.parameters());
        v.extend(self.post_attention_layernorm.parameters());
        v.extend(self.dense_h_to_4h.parameters());
        v.extend(self.dense_4h_to_h.parameters());
        v
    }

    fn forward(&self, x: &Activations, ctx: &ForwardCtx) -> Result<Activations> {
        Ok(Activations::new(self.forward_cached(&x.hidden, None, ctx)?))
    }
}

/// Final LayerNorm and the logits through the (tied) word embedding: `[b, t, padded_vocab]`.
#[derive(Clone, Debug)]
pub struct FinalHead {
    final_layernorm: LayerNorm,
    word_embeddings: Param,
    tp: Option<TensorParallel>,
}

impl FinalHead {
    /// The final LayerNorm and logits through the (tied) word embedding `word_embeddings`.
    pub fn new(
        final_layernorm: LayerNorm,
        word_embeddings: candle_deepscale::layers::parameter::Param,
        tp: Option<TensorParallel>,
    ) -> Self {
        Self {
            final_layernorm,
            word_embeddings,
            tp,
        }
    }

    /// This rank's block of the padded-vocabulary logits `[b, t, padded_vocab / tp]`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.logits_for(x, false)
    }

    /// In a training forward the logits are the cross entropy's fused LM head
    /// (`cross_entropy::lm_head_logits`; with tensor parallelism this rank's vocabulary block
    /// and its gradient into `x`, which `copy_to_tp` all-reduces): their gradient is never
    /// materialised.
    fn logits_for(&self, x: &Tensor, training: bool) -> Result<Tensor> {
        let x = copy_to_tp(&self.final_layernorm.forward(x)?, self.tp.as_ref())?;
        candle_deepscale::layers::loss::lm_head_logits(&x, self.word_embeddings.tensor(), training)
    }
}

impl Layer for FinalHead {
    fn type_name(&self) -> String {
        "FinalHeadPipe".into()
    }

    fn name(&self) -> String {
        "final".into()
    }

    fn parameters(&self) -> Vec<&Param> {
        let mut v = self.final_layernorm.parameters();
        v.push(&self.word_embeddings);
        v
    }

    fn forward(&self, x: &Activations, ctx: &ForwardCtx) -> Result<Activations> {
        Ok(Activations::new(self.logits_for(&x.hidden, ctx.train)?))
    }
}

/// Megatron GPT-2 as an ordered list of layers: embedding, `num_layers` blocks, final norm + head.
#[derive(Clone, Debug)]
pub struct Gpt2 {
    pub config: Config,
    pub embedding: Gpt2Embedding,
    pub blocks: Vec<Block>,
    pub head: FinalHead,
}

impl Gpt2 {
    pub fn new(config: &Config, pb: &ParamBuilder) -> Result<Self> {
        config.validate()?;
        let embedding = Gpt2Embedding::new(config, &pb.push_prefix("embedding"))?;
        let blocks = (0..config.num_layers)
            .map(|i| Block::new(config, i, &pb.push_prefix(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let head = FinalHead {
            final_layernorm: LayerNorm::new(
                &pb.push_prefix("final_layernorm"),
                config.hidden_size,
                config.layernorm_epsilon,
            )?,
            word_embeddings: embedding.word_embeddings.weight.clone(),
            tp: pb.tp().cloned(),
        };
        Ok(Self {
            config: config.clone(),
            embedding,
            blocks,
            head,
        })
    }

    /// The device the model's parameters live on.
    pub fn device(&self) -> candle_core::Device {
        self.embedding
            .word_embeddings
            .weight
            .tensor()
            .device()
            .clone()
    }

    /// The layer-sequential view the engine drives.
    pub fn layers(&self) -> Vec<&dyn Layer> {
        let mut v: Vec<&dyn Layer> = vec![&self.embedding];
        v.extend(self.blocks.iter().map(|b| b as &dyn Layer));
        v.push(&self.head);
        v
    }

    /// Distinct parameters (the tied word embedding once).
    pub fn parameters(&self) -> Vec<&Param> {
        candle_deepscale::layers::module::unique_parameters(&self.layers())
    }

    /// The tensor-parallel group the model runs in.
    pub fn tp(&self) -> Option<&TensorParallel> {
        self.head.tp.as_ref()
    }

    /// Per-token losses `[b * t]` of (vocabulary-parallel) `logits` against `labels`.
    pub fn token_losses(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        vocab_parallel_token_losses(logits, labels, self.config.vocab_size, self.tp())
    }

    /// Mean LM loss of `logits` against `labels`.
    pub fn loss(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        self.token_losses(logits, labels)?.mean_all()
    }

    /// Whole real-vocabulary logits `[.., vocab_size]` from this rank's block (all-gathered under
    /// tensor parallelism, padding dropped).
    pub fn full_logits(&self, logits: &Tensor) -> Result<Tensor> {
        gather_from_tp(logits, self.tp())?.narrow(candle_core::D::Minus1, 0, self.config.vocab_size)
    }

    /// This rank's block of the padded-vocabulary logits `[b, t, padded_vocab / tp]` for `ids [b, t]`.
    pub fn forward(&self, ids: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let x = candle_deepscale::layers::module::forward_layers(
            &self.layers(),
            Activations::new(ids.clone()),
            ctx,
        )?;
        Ok(x.hidden)
    }

    /// Incremental decoding: this rank's logits block for `ids [b, t]` following the `cache.offset`
    /// cached positions.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let ctx = ForwardCtx::eval();
        if cache.layers.len() != self.blocks.len() {
            *cache = KvCache::new(self.blocks.len());
        }
        let mut x = self.embedding.embed(ids, cache.offset, &ctx)?;
        for (b, c) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            x = b.forward_cached(&x, Some(c), &ctx)?;
        }
        cache.offset += ids.dim(1)?;
        self.head.logits(&x)
    }
}

impl candle_deepscale::Sequential for Gpt2 {
    fn layers(&self) -> Vec<&dyn Layer> {
        Gpt2::layers(self)
    }
}
