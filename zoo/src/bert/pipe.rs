//! BERT as a pipeline model: specs for the tied embedding, the transformer layers and the heads
//! (whose masked-LM logits go through the tied word embedding); a stage builds only its layers.
use super::model::{BertEmbedding, BertHead, BertLayer};
use super::Config;
use candle_core::{Result, Tensor};
use candle_deepscale::layers::module::Layer;
use candle_deepscale::layers::parameter::ParamBuilder;
use candle_deepscale::layers::tensor_parallel::cross_entropy::vocab_parallel_token_losses;
use candle_deepscale::layers::tensor_parallel::TensorParallel;
use candle_deepscale::runtime::pipe::module::partition_specs;
use candle_deepscale::runtime::pipe::{
    LayerSpec, PartitionMethod, PipeSpec, PipelineModule, SharedLayer, TiedLayerSpec,
};
use std::ops::Range;
use std::sync::Arc;

use crate::gpt2::pipe::TIED_KEY;

/// Layer `i` of the list [embedding, layer 0 .. layer N-1, heads].
pub struct BertPipe {
    pub config: Config,
    pub range: Range<usize>,
    module: PipelineModule,
    tp: Option<TensorParallel>,
}

impl BertPipe {
    pub fn num_layers(config: &Config) -> usize {
        config.num_hidden_layers + 2
    }

    /// `BertEmbeddingPipe` (tied), `BertTransformerLayerPipe` x N, `BertHeadPipe` (tied).
    pub fn specs(config: &Config) -> Vec<PipeSpec<'_>> {
        let c = config;
        let (h, v, f) = (
            c.hidden_size as u64,
            c.padded_vocab_size(1) as u64,
            c.intermediate_size as u64,
        );
        let ln = 2 * h;
        let emb = v * h
            + c.max_position_embeddings as u64 * h
            + c.type_vocab_size as u64 * h
            + if c.pre_layer_norm { 0 } else { ln };
        let block = 4 * h * h + 4 * h + 2 * ln + 2 * h * f + f + h;
        let head = u64::from(c.pre_layer_norm) * ln
            + u64::from(c.add_pooler) * (h * h + h)
            + u64::from(c.add_lm_head) * (h * h + h + ln + v + v * h)
            + u64::from(c.add_binary_head) * (2 * h + 2);
        let embedding = |pb: &ParamBuilder| BertEmbedding::new(c, &pb.push_prefix("embedding"));
        let mut specs: Vec<PipeSpec> =
            vec![
                TiedLayerSpec::new(TIED_KEY, "BertEmbeddingPipe", emb, embedding, |e, _| {
                    Ok(SharedLayer(e))
                })
                .into(),
            ];
        for i in 0..c.num_hidden_layers {
            specs.push(
                LayerSpec::new("BertTransformerLayerPipe", block, move |pb| {
                    BertLayer::new(c, i, &pb.push_prefix(format!("layers.{i}")))
                })
                .into(),
            );
        }
        specs.push(if c.add_lm_head {
            TiedLayerSpec::new(
                TIED_KEY,
                "BertHeadPipe",
                head,
                embedding,
                |e: Arc<BertEmbedding>, pb| {
                    BertHead::new(c, pb, Some(e.word_embeddings.weight.clone()))
                },
            )
            .into()
        } else {
            LayerSpec::new("BertHeadPipe", head, move |pb| BertHead::new(c, pb, None)).into()
        });
        specs
    }

    pub fn partition(
        config: &Config,
        stages: usize,
        method: &PartitionMethod,
    ) -> Result<Vec<usize>> {
        partition_specs(&Self::specs(config), stages, method)
    }

    /// Builds layers `range` of the full list.
    pub fn new(config: &Config, pb: &ParamBuilder, range: Range<usize>) -> Result<Self> {
        config.validate()?;
        let module = PipelineModule::build(&Self::specs(config), range.clone(), pb)?;
        Ok(Self {
            config: config.clone(),
            range,
            module,
            tp: pb.tp().cloned(),
        })
    }

    pub fn layers(&self) -> Vec<&dyn Layer> {
        self.module.layers()
    }

    /// Per-token masked-LM losses of (vocabulary-parallel) `lm_logits`; on the last stage.
    pub fn lm_token_losses(&self, lm_logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        vocab_parallel_token_losses(lm_logits, labels, self.config.vocab_size, self.tp.as_ref())
    }
}

impl candle_deepscale::Sequential for BertPipe {
    fn layers(&self) -> Vec<&dyn Layer> {
        BertPipe::layers(self)
    }
}
