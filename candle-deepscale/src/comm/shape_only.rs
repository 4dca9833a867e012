//! A communicator for building one rank's share of a layout without the other ranks: the
//! ZeRO-3 partition of rank r of N (memory estimates, checks of the partitioning) is constructed
//! with no collective; any collective is an error naming the rank.
use super::{Communicator, ElemKind, ReduceOp};
use candle_core::{bail, Result};

#[derive(Debug, Clone, Copy)]
pub struct ShapeOnly {
    pub rank: usize,
    pub world_size: usize,
}

impl ShapeOnly {
    fn refuse(&self, what: &str) -> Result<()> {
        bail!(
            "rank {} of {} is shape-only (built without its peers): it cannot {what}",
            self.rank,
            self.world_size
        )
    }
}

impl Communicator for ShapeOnly {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn backend(&self) -> &'static str {
        "shape-only"
    }
    fn all_reduce_bytes(&self, _: &[usize], _: &mut [u8], _: ElemKind, _: ReduceOp) -> Result<()> {
        self.refuse("all-reduce")
    }
    fn all_gather_bytes(&self, _: &[usize], _: &[u8], _: &mut [u8]) -> Result<()> {
        self.refuse("all-gather")
    }
    fn reduce_scatter_bytes(
        &self,
        _: &[usize],
        _: &[u8],
        _: &mut [u8],
        _: ElemKind,
        _: ReduceOp,
    ) -> Result<()> {
        self.refuse("reduce-scatter")
    }
    fn broadcast_bytes(&self, _: &[usize], _: &mut [u8], _: usize) -> Result<()> {
        self.refuse("broadcast")
    }
    fn send_bytes(&self, _: usize, _: u64, _: &[u8]) -> Result<()> {
        self.refuse("send")
    }
    fn recv_bytes(&self, _: usize, _: u64, _: &mut [u8]) -> Result<()> {
        self.refuse("receive")
    }
    fn barrier(&self, _: &[usize]) -> Result<()> {
        self.refuse("wait at a barrier")
    }
}
