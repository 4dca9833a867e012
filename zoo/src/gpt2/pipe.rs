//! `GPT2ModelPipe` (the 3D snapshot's pipeline model) as a list of layer specs: the tied word
//! embedding, the transformer layers, the final LayerNorm, and the logits through the tied
//! embedding. A stage builds — and reads from a checkpoint or HF folder — only its own layers.
use super::model::{Block, Gpt2Embedding};
use super::Config;
use candle_core::{Result, Tensor};
use candle_deepscale::layers::module::{Activations, ForwardCtx, Layer};
use candle_deepscale::layers::norm::LayerNorm;
use candle_deepscale::layers::parameter::{Param, ParamBuilder};
use candle_deepscale::layers::tensor_parallel::cross_entropy::vocab_parallel_token_losses;
use candle_deepscale::layers::tensor_parallel::mappings::copy_to_tp;
use candle_deepscale::layers::tensor_parallel::TensorParallel;
use candle_deepscale::runtime::pipe::module::partition_specs;
use candle_deepscale::runtime::pipe::{
    LayerSpec, PartitionMethod, PipeSpec, PipelineModule, SharedLayer, TiedLayerSpec,
};
use std::ops::Range;

/// The key (and parameter `tie_group`) of the word embedding shared by the first and last stage.
pub const TIED_KEY: &str = "word_embeddings";

/// The final LayerNorm as a layer of its own (`LayerSpec(LayerNorm, ...)` in GPT2ModelPipe).
struct FinalLayerNorm(LayerNorm);

impl Layer for FinalLayerNorm {
    fn name(&self) -> String {
        "final_layernorm".into()
    }
    fn type_name(&self) -> String {
        "LayerNorm".into()
    }
    fn parameters(&self) -> Vec<&Param> {
        self.0.parameters()
    }
    fn forward(&self, x: &Activations, _: &ForwardCtx) -> Result<Activations> {
        Ok(Activations::new(self.0.forward(&x.hidden)?))
    }
}

/// The logits through the tied word embedding (GPT2ModelPipe's `_logits_helper`): this rank's
/// block of the padded vocabulary.
struct TiedLogits {
    word_embeddings: Param,
    tp: Option<TensorParallel>,
}

impl Layer for TiedLogits {
    fn name(&self) -> String {
        "logits".into()
    }
    fn type_name(&self) -> String {
        "EmbeddingPipe".into()
    }
    fn parameters(&self) -> Vec<&Param> {
        vec![&self.word_embeddings]
    }
    fn forward(&self, x: &Activations, _: &ForwardCtx) -> Result<Activations> {
        let h = copy_to_tp(&x.hidden, self.tp.as_ref())?;
        Ok(Activations::new(candle_deepscale::layers::linear::linear(
            &h,
            self.word_embeddings.tensor(),
            None,
        )?))
    }
}

/// Layer `i` of the list [embedding, block 0 .. block N-1, final LayerNorm, logits].
pub struct Gpt2Pipe {
    pub config: Config,
    /// The layers this stage holds, as indices of the full list.
    pub range: Range<usize>,
    module: PipelineModule,
    tp: Option<TensorParallel>,
}

impl Gpt2Pipe {
    /// Layers in the full list: embedding, the blocks, the final LayerNorm, the logits.
    pub fn num_layers(config: &Config) -> usize {
        config.num_layers + 3
    }

    /// The layer specs, as the 3D snapshot's GPT2ModelPipe lists them: `EmbeddingPipe` (tied),
    /// `ParallelTransformerLayerPipe` x N, `LayerNorm`, and `EmbeddingPipe` again (tied: the
    /// logits through the word embedding). Parameter counts are the unpartitioned ones, for
    /// `parameters` partitioning.
    pub fn specs(config: &Config) -> Vec<PipeSpec<'_>> {
        let (h, v, f) = (
            config.hidden_size as u64,
            config.padded_vocab_size(1) as u64,
            config.ffn_hidden_size as u64,
        );
        let p = config.max_position_embeddings as u64;
        let block = 3 * h * h + 3 * h + h * h + h + 4 * h + h * f + f + f * h + h;
        let embedding =
            |pb: &ParamBuilder| Gpt2Embedding::new(config, &pb.push_prefix("embedding"));
        let mut specs: Vec<PipeSpec> = vec![TiedLayerSpec::new(
            TIED_KEY,
            "EmbeddingPipe",
            v * h + p * h,
            embedding,
            |e, _| Ok(SharedLayer(e)),
        )
        .into()];
        for i in 0..config.num_layers {
            specs.push(
                LayerSpec::new("ParallelTransformerLayerPipe", block, move |pb| {
                    Block::new(config, i, &pb.push_prefix(format!("layers.{i}")))
                })
                .into(),
            );
        }
        specs.push(
            LayerSpec::new("LayerNorm", 2 * h, |pb| {
                Ok(FinalLayerNorm(LayerNorm::new(
                    &pb.push_prefix("final_layernorm"),
                    config.hidden_size,
                    config.layernorm_epsilon,
                )?))
            })
            .into(),
        );
        specs.push(
            TiedLayerSpec::new(
                TIED_KEY,
                "EmbeddingPipe",
                v * h,
                embedding,
                |e: std::sync::Arc<Gpt2Embedding>, pb| {
                    Ok(TiedLogits {
                        word_embeddings: e.word_embeddings.weight.clone(),
                        tp: pb.tp().cloned(),
                    })
                },
            )
            .into(),
        );
        specs
    }

    /// Stage boundaries for `stages` stages, from the model's shape alone (nothing is built):
    /// `type:REGEX` matches `EmbeddingPipe`, `ParallelTransformerLayerPipe`, `LayerNorm`;
    /// `parameters` counts each layer's parameters (the tied embedding on both ends).
    pub fn partition(
        config: &Config,
        stages: usize,
        method: &PartitionMethod,
    ) -> Result<Vec<usize>> {
        partition_specs(&Self::specs(config), stages, method)
    }

    /// Builds layers `range` of the full list (and the tied word embedding on the last stage).
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

    /// This stage's layers, in order.
    pub fn layers(&self) -> Vec<&dyn Layer> {
        self.module.layers()
    }

    /// The tensor-parallel group the stage runs in.
    pub fn tp(&self) -> Option<&TensorParallel> {
        self.tp.as_ref()
    }

    /// Mean next-token loss of (vocabulary-parallel) logits; on the last stage.
    pub fn loss(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        vocab_parallel_token_losses(logits, labels, self.config.vocab_size, self.tp.as_ref())?
            .mean_all()
    }
}

impl candle_deepscale::Sequential for Gpt2Pipe {
    fn layers(&self) -> Vec<&dyn Layer> {
        Gpt2Pipe::layers(self)
    }
}
