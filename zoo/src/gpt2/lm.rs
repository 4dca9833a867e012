//! What evaluation and generation need of a GPT-2 on one rank: the whole model, or one pipeline
//! stage of it (which yields logits on the last stage only).
use super::{Config, Gpt2, Gpt2Pipe};
use candle_core::{Device, Result, Tensor};
use candle_deepscale::layers::module::Layer;
use candle_deepscale::layers::tensor_parallel::cross_entropy::vocab_parallel_token_losses;
use candle_deepscale::layers::tensor_parallel::mappings::gather_from_tp;
use candle_deepscale::layers::tensor_parallel::TensorParallel;

pub trait Gpt2Lm {
    fn config(&self) -> &Config;
    fn tp(&self) -> Option<&TensorParallel>;
    /// The device the rank's parameters live on.
    fn device(&self) -> Device;
    /// The rank's layers, in order.
    fn layers(&self) -> Vec<&dyn Layer>;
    /// The whole model, for KV-cached decoding (None for a pipeline stage).
    fn whole(&self) -> Option<&Gpt2> {
        None
    }

    /// Per-token losses `[b * t]` of (vocabulary-parallel) `logits` against `labels`.
    fn token_losses(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        vocab_parallel_token_losses(logits, labels, self.config().vocab_size, self.tp())
    }

    /// Whole real-vocabulary logits from this rank's block (gathered under tensor parallelism).
    fn full_logits(&self, logits: &Tensor) -> Result<Tensor> {
        gather_from_tp(logits, self.tp())?.narrow(
            candle_core::D::Minus1,
            0,
            self.config().vocab_size,
        )
    }
}

impl Gpt2Lm for Gpt2 {
    fn config(&self) -> &Config {
        &self.config
    }
    fn tp(&self) -> Option<&TensorParallel> {
        Gpt2::tp(self)
    }
    fn device(&self) -> Device {
        Gpt2::device(self)
    }
    fn layers(&self) -> Vec<&dyn Layer> {
        Gpt2::layers(self)
    }
    fn whole(&self) -> Option<&Gpt2> {
        Some(self)
    }
}

impl Gpt2Lm for Gpt2Pipe {
    fn config(&self) -> &Config {
        &self.config
    }
    fn tp(&self) -> Option<&TensorParallel> {
        Gpt2Pipe::tp(self)
    }
    fn device(&self) -> Device {
        Gpt2Pipe::layers(self)
            .first()
            .and_then(|l| l.parameters().first().map(|p| p.tensor().device().clone()))
            .unwrap_or(Device::Cpu)
    }
    fn layers(&self) -> Vec<&dyn Layer> {
        Gpt2Pipe::layers(self)
    }
}
