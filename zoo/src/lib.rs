//! The DeepScale model zoo: Megatron GPT-2 and BERT, their HF loaders, tokenizers, generation and
//! evaluation.
pub mod bert;
pub mod evaluation;
pub mod generation;
pub mod gpt2;
pub mod hub;
pub mod text_data;
pub mod tokenizer;
pub mod weights;
