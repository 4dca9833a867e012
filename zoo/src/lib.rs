//! The DeepScale model zoo: Megatron GPT-2 and BERT, their HF loaders, tokenizers, generation and
//! evaluation.
pub mod bert;
pub mod bert_dataset;
pub mod evaluation;
pub mod generation;
pub mod gpt2;
pub mod gpt2_dataset;
pub mod hub;
pub mod indexed_dataset;
pub mod text_data;
pub mod tokenizer;
pub mod torch_pickle;
pub mod weights;
