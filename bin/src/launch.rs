//! Starting the ranks of a layout: in-process threads (`--world-size N`) or a single rank.
use crate::args::Layout;
use anyhow::{anyhow, Result};
use candle_deepscale::comm::{default_timeout, Communicator, InProcessWorld, ProcessGroup};
use candle_deepscale::tensor_parallel::TensorParallel;
use candle_deepscale::topology::Topology;
use std::sync::Arc;

/// One rank's place in the run.
pub struct RankCtx {
    pub rank: usize,
    pub topo: Topology,
    pub comm: Option<Arc<dyn Communicator>>,
}

impl RankCtx {
    fn group(&self, ranks: Vec<usize>) -> Result<Option<ProcessGroup>> {
        match &self.comm {
            Some(c) if ranks.len() > 1 => Ok(Some(ProcessGroup::new(c.clone(), ranks)?)),
            _ => Ok(None),
        }
    }

    /// The tensor-parallel group (None at tp = 1).
    pub fn tp(&self) -> Result<Option<TensorParallel>> {
        self.group(self.topo.model_group(self.rank))
    }

    /// The data-parallel group (None at dp = 1).
    pub fn dp(&self) -> Result<Option<ProcessGroup>> {
        self.group(self.topo.data_group(self.rank))
    }

    /// Rank 0 prints and writes files.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }
}

/// Runs `f` on every rank of `layout` and returns rank 0's result. When ranks fail, the error
/// returned is the root cause (a rank's own failure), not a peer's "rank X is gone".
pub fn launch<T: Send>(
    layout: &Layout,
    f: impl Fn(RankCtx) -> Result<T> + Send + Sync,
) -> Result<T> {
    let topo = Topology::new(layout.pp, layout.dp, layout.tp)?;
    if layout.world_size == 1 {
        return f(RankCtx {
            rank: 0,
            topo,
            comm: None,
        });
    }
    let results = InProcessWorld::run(layout.world_size, default_timeout(), |comm| {
        let rank = comm.rank();
        let comm: Arc<dyn Communicator> = comm;
        f(RankCtx {
            rank,
            topo,
            comm: Some(comm),
        })
        .map_err(|e| candle_core::Error::Msg(format!("rank {rank}: {e:#}")))
    });
    let mut errors = Vec::new();
    let mut root = None;
    for (r, res) in results.into_iter().enumerate() {
        match res {
            Ok(v) if r == 0 => root = Some(v),
            Ok(_) => {}
            Err(e) => errors.push(e.to_string()),
        }
    }
    if let Some(cause) = errors
        .iter()
        .find(|e| !e.contains("is gone"))
        .or(errors.first())
    {
        return Err(anyhow!("{cause}"));
    }
    root.ok_or_else(|| anyhow!("rank 0 produced no result"))
}
