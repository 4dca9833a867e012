//! Megatron tensor parallelism: the four autograd mappings, column/row-parallel linear layers,
//! the vocabulary-parallel embedding and cross entropy.
pub mod cross_entropy;
pub mod layers;
pub mod mappings;

use crate::comm::Communicator;
use std::sync::Arc;

/// A rank's tensor-parallel group: the communicator, the group's global ranks, and this rank's
/// index in it.
#[derive(Clone)]
pub struct TensorParallel {
    pub comm: Arc<dyn Communicator>,
    pub group: Vec<usize>,
    pub rank: usize,
}

impl std::fmt::Debug for TensorParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorParallel(rank {} of {:?})", self.rank, self.group)
    }
}

impl TensorParallel {
    pub fn new(comm: Arc<dyn Communicator>, group: Vec<usize>) -> candle_core::Result<Self> {
        let rank = crate::comm::group_index(&group, comm.rank(), "tensor-parallel group")?;
        Ok(Self { comm, group, rank })
    }

    pub fn size(&self) -> usize {
        self.group.len()
    }
}

/// Tensor-parallel size and rank of an optional group (1 and 0 without one).
pub fn size_rank(tp: Option<&TensorParallel>) -> (usize, usize) {
    tp.map_or((1, 0), |t| (t.size(), t.rank))
}
