//! Megatron GPT-2: pre-LayerNorm blocks, learned positions, tanh-GeLU, final LayerNorm and logits
//! tied to the word embedding.
mod config;
pub mod hf;
mod lm;
pub mod megatron;
mod model;
pub mod pipe;

pub use config::Config;
pub use lm::Gpt2Lm;
pub use model::{Block, FinalHead, Gpt2, Gpt2Embedding, KvCache};
pub use pipe::Gpt2Pipe;
