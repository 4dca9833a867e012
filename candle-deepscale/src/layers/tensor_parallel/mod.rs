//! Megatron tensor parallelism: the four autograd mappings, column/row-parallel linear layers,
//! the vocabulary-parallel embedding and cross entropy.
pub mod cross_entropy;
pub mod layers;
pub mod mappings;

/// A rank's tensor-parallel group (Megatron's model-parallel group).
pub type TensorParallel = crate::comm::ProcessGroup;

/// Tensor-parallel size and rank of an optional group (1 and 0 without one).
pub fn size_rank(tp: Option<&TensorParallel>) -> (usize, usize) {
    tp.map_or((1, 0), |t| (t.size(), t.rank))
}
