//! `GPT2ModelPipe` (the 3D snapshot's pipeline model): only the layers of one pipeline stage are
//! built — and read from a checkpoint or HF folder — with the word embedding tied between the
//! first stage (input) and the last (logits).
use super::model::{Block, FinalHead, Gpt2Embedding};
use super::Config;
use candle_core::{Result, Tensor};
use candle_deepscale::module::Layer;
use candle_deepscale::nn::LayerNorm;
use candle_deepscale::parameter::ParamBuilder;
use candle_deepscale::pipe::{
    partition::partition_balanced, partition::partition_uniform, PartitionMethod,
};
use candle_deepscale::tensor_parallel::cross_entropy::vocab_parallel_token_losses;
use candle_deepscale::tensor_parallel::TensorParallel;
use std::ops::Range;

/// Layer `i` of the list [embedding, block 0 .. block N-1, head].
pub struct Gpt2Pipe {
    pub config: Config,
    /// The layers this stage holds, as indices of the full list.
    pub range: Range<usize>,
    embedding: Option<Gpt2Embedding>,
    blocks: Vec<Block>,
    head: Option<FinalHead>,
    tp: Option<TensorParallel>,
}

impl Gpt2Pipe {
    /// Layers in the full list: embedding, the blocks, the head.
    pub fn num_layers(config: &Config) -> usize {
        config.num_layers + 2
    }

    /// Stage boundaries for `stages` stages, from the model's shape alone (nothing is built):
    /// `type:REGEX` matches `EmbeddingPipe`, `ParallelTransformerLayerPipe`, `FinalHeadPipe`;
    /// `parameters` counts each layer's parameters (the tied embedding on both ends).
    pub fn partition(
        config: &Config,
        stages: usize,
        method: &PartitionMethod,
    ) -> Result<Vec<usize>> {
        let n = Self::num_layers(config);
        if n < stages {
            candle_core::bail!("{n} layers cannot fill {stages} pipeline stages")
        }
        let (h, v, f) = (
            config.hidden_size as u64,
            config.padded_vocab_size(1) as u64,
            config.ffn_hidden_size as u64,
        );
        let p = config.max_position_embeddings as u64;
        let names = |i: usize| match i {
            0 => "EmbeddingPipe",
            _ if i + 1 == n => "FinalHeadPipe",
            _ => "ParallelTransformerLayerPipe",
        };
        Ok(match method {
            PartitionMethod::Uniform => partition_uniform(n, stages),
            PartitionMethod::Parameters => {
                let block = 3 * h * h + 3 * h + h * h + h + 4 * h + h * f + f + f * h + h;
                let w: Vec<u64> = (0..n)
                    .map(|i| match i {
                        0 => v * h + p * h,
                        _ if i + 1 == n => v * h + 2 * h,
                        _ => block,
                    })
                    .collect();
                partition_balanced(&w, stages)
            }
            PartitionMethod::Type(re) => {
                let w: Vec<u64> = (0..n).map(|i| u64::from(re.is_match(names(i)))).collect();
                if w.iter().sum::<u64>() < stages as u64 {
                    candle_core::bail!(
                        "partition method type:{re}: fewer matching layers than {stages} stages"
                    )
                }
                partition_balanced(&w, stages)
            }
        })
    }

    /// Builds layers `range` of the full list (and the tied word embedding on the last stage).
    pub fn new(config: &Config, pb: &ParamBuilder, range: Range<usize>) -> Result<Self> {
        config.validate()?;
        let n = Self::num_layers(config);
        if range.start >= range.end || range.end > n {
            candle_core::bail!("stage layers {range:?} outside 0..{n}")
        }
        let has_head = range.end == n;
        // The head's logits use the word embedding: the last stage holds its own tied copy.
        let embedding = if range.start == 0 || has_head {
            Some(Gpt2Embedding::new(config, &pb.pp("embedding"))?)
        } else {
            None
        };
        let blocks = (range.start.max(1)..range.end.min(n - 1))
            .map(|i| Block::new(config, i - 1, &pb.pp(format!("layers.{}", i - 1))))
            .collect::<Result<Vec<_>>>()?;
        let head = if has_head {
            Some(FinalHead::new(
                LayerNorm::new(
                    &pb.pp("final_layernorm"),
                    config.hidden_size,
                    config.layernorm_epsilon,
                )?,
                embedding
                    .as_ref()
                    .expect("built above")
                    .word_embeddings
                    .weight
                    .clone(),
                pb.tp().cloned(),
            ))
        } else {
            None
        };
        Ok(Self {
            config: config.clone(),
            embedding: embedding.filter(|_| range.start == 0),
            blocks,
            head,
            tp: pb.tp().cloned(),
            range,
        })
    }

    /// This stage's layers, in order.
    pub fn layers(&self) -> Vec<&dyn Layer> {
        let mut v: Vec<&dyn Layer> = Vec::new();
        if let Some(e) = &self.embedding {
            v.push(e);
        }
        v.extend(self.blocks.iter().map(|b| b as &dyn Layer));
        if let Some(h) = &self.head {
            v.push(h);
        }
        v
    }

    /// Mean next-token loss of (vocabulary-parallel) logits; on the last stage.
    pub fn loss(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        vocab_parallel_token_losses(logits, labels, self.config.vocab_size, self.tp.as_ref())?
            .mean_all()
    }
}
