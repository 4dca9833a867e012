//! Megatron BERT: embeddings, post-LayerNorm (HF BERT, the old snapshot) or pre-LayerNorm with a
//! final LayerNorm (Megatron v1.1.5) blocks, pooler, masked-LM head tied to the word embedding and
//! the binary (next-sentence) head.
mod config;
pub mod hf;
mod model;
pub mod pipe;

pub use config::Config;
pub use model::{mean_pool, Bert, BertEmbedding, BertHead, BertLayer, BertOutput};
pub use pipe::BertPipe;
