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

/// One transformer layer's parameters at hidden size `h` and MLP width `f` (QKV and the
/// attention's output with biases, 4h² + 4h; two LayerNorms, 4h; the MLP, 2hf + f + h), or None
/// where the count overflows: the configs' `validate` refuses such sizes before anything
/// multiplies them.
pub(crate) fn checked_layer_params(h: usize, f: usize) -> Option<usize> {
    h.checked_mul(h)?
        .checked_mul(4)?
        .checked_add(h.checked_mul(f)?.checked_mul(2)?)?
        .checked_add(h.checked_mul(9)?)?
        .checked_add(f)
}
