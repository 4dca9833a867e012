//! DeepSpeed's `PipeModelDataParallelTopology`: axes [pipe, data, model], model fastest.
//!
//! `rank = pipe * dp * tp + data * tp + model`. With pp = dp = tp = 2: model groups [0,1], [2,3], ..;
//! data groups [0,2], [1,3], [4,6], [5,7]; pipe groups [0,4], [1,5], [2,6], [3,7].
//!
//! [`Grid`] (DeepSpeed's `PipelineParallelGrid`) builds a rank's process groups on it: the
//! library builds every process group, so no caller assembles rank lists by hand.
use crate::comm::{Communicator, IntoComm, ProcessGroup};
use crate::runtime::pipe::PipeContext;
use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    pub pp: usize,
    pub dp: usize,
    pub tp: usize,
}

/// A rank's position on the grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coord {
    pub pipe: usize,
    pub data: usize,
    pub model: usize,
}

impl Topology {
    pub fn new(pp: usize, dp: usize, tp: usize) -> Result<Self> {
        if pp == 0 || dp == 0 || tp == 0 {
            bail!("topology sizes must be positive, got pp={pp} dp={dp} tp={tp}")
        }
        Ok(Self { pp, dp, tp })
    }

    /// The grid for `world` ranks with the given tensor and pipeline sizes (dp is what is left).
    pub fn from_world(world: usize, tp: usize, pp: usize) -> Result<Self> {
        if tp == 0 || pp == 0 || world == 0 || !world.is_multiple_of(tp * pp) {
            bail!("world size {world} is not divisible by tensor-parallel size {tp} x pipeline size {pp}")
        }
        Self::new(pp, world / (tp * pp), tp)
    }

    pub fn world_size(&self) -> usize {
        self.pp * self.dp * self.tp
    }

    pub fn rank(&self, c: Coord) -> usize {
        c.pipe * self.dp * self.tp + c.data * self.tp + c.model
    }

    pub fn coord(&self, rank: usize) -> Coord {
        Coord {
            pipe: rank / (self.dp * self.tp),
            data: (rank / self.tp) % self.dp,
            model: rank % self.tp,
        }
    }

    /// Ranks sharing `rank`'s pipe and data coordinates (its tensor-parallel group).
    pub fn model_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coord(rank);
        (0..self.tp)
            .map(|m| self.rank(Coord { model: m, ..c }))
            .collect()
    }

    /// Ranks sharing `rank`'s pipe and model coordinates (its data-parallel group).
    pub fn data_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coord(rank);
        (0..self.dp)
            .map(|d| self.rank(Coord { data: d, ..c }))
            .collect()
    }

    /// Ranks sharing `rank`'s data and model coordinates (its pipeline).
    pub fn pipe_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coord(rank);
        (0..self.pp)
            .map(|p| self.rank(Coord { pipe: p, ..c }))
            .collect()
    }

    fn distinct(&self, f: impl Fn(usize) -> Vec<usize>) -> Vec<Vec<usize>> {
        let mut out: Vec<Vec<usize>> = Vec::new();
        for r in 0..self.world_size() {
            let g = f(r);
            if !out.contains(&g) {
                out.push(g);
            }
        }
        out
    }

    pub fn model_groups(&self) -> Vec<Vec<usize>> {
        self.distinct(|r| self.model_group(r))
    }

    pub fn data_groups(&self) -> Vec<Vec<usize>> {
        self.distinct(|r| self.data_group(r))
    }

    pub fn pipe_groups(&self) -> Vec<Vec<usize>> {
        self.distinct(|r| self.pipe_group(r))
    }

    /// The rank of the next pipeline stage, if any.
    pub fn next_stage(&self, rank: usize) -> Option<usize> {
        let c = self.coord(rank);
        (c.pipe + 1 < self.pp).then(|| {
            self.rank(Coord {
                pipe: c.pipe + 1,
                ..c
            })
        })
    }

    /// The rank of the previous pipeline stage, if any.
    pub fn prev_stage(&self, rank: usize) -> Option<usize> {
        let c = self.coord(rank);
        (c.pipe > 0).then(|| {
            self.rank(Coord {
                pipe: c.pipe - 1,
                ..c
            })
        })
    }
}

/// One rank's place on the grid and its process groups (DeepSpeed's `PipelineParallelGrid`).
/// Without a communicator (a world of one) every group is None.
#[derive(Clone)]
pub struct Grid {
    pub rank: usize,
    pub topo: Topology,
    pub comm: Option<Arc<dyn Communicator>>,
}

impl std::fmt::Debug for Grid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Grid(rank {} of {:?})", self.rank, self.topo)
    }
}

impl Grid {
    /// The grid of `comm`'s rank (its world must be the topology's; `()` for a world of one).
    pub fn new(topo: Topology, comm: impl IntoComm) -> Result<Self> {
        let Some(comm) = comm.into_comm() else {
            if topo.world_size() != 1 {
                bail!(
                    "a layout of {} ranks needs a communicator",
                    topo.world_size()
                )
            }
            return Ok(Self::single());
        };
        if comm.world_size() != topo.world_size() {
            bail!(
                "the communicator has {} ranks but the layout pp {} x dp {} x tp {} needs {}",
                comm.world_size(),
                topo.pp,
                topo.dp,
                topo.tp,
                topo.world_size()
            )
        }
        Ok(Self {
            rank: comm.rank(),
            topo,
            comm: Some(comm),
        })
    }

    /// A world of one rank.
    pub fn single() -> Self {
        Self {
            rank: 0,
            topo: Topology {
                pp: 1,
                dp: 1,
                tp: 1,
            },
            comm: None,
        }
    }

    fn group(&self, ranks: Vec<usize>) -> Result<Option<ProcessGroup>> {
        match &self.comm {
            Some(c) if ranks.len() > 1 => Ok(Some(ProcessGroup::new(c.clone(), ranks)?)),
            _ => Ok(None),
        }
    }

    /// The tensor-parallel group (None at tp = 1).
    pub fn tp(&self) -> Result<Option<ProcessGroup>> {
        self.group(self.topo.model_group(self.rank))
    }

    /// The data-parallel group (None at dp = 1).
    pub fn dp(&self) -> Result<Option<ProcessGroup>> {
        self.group(self.topo.data_group(self.rank))
    }

    /// The pipeline: this rank's stages in order (None at pp = 1) and, on the first and last
    /// stage, the group sharing the tied word embedding.
    pub fn pipe(&self) -> Result<Option<PipeContext>> {
        let stages = self.topo.pipe_group(self.rank);
        let Some(group) = self.group(stages.clone())? else {
            return Ok(None);
        };
        let at = group.rank;
        let tied = if at == 0 || at + 1 == stages.len() {
            self.group(vec![stages[0], stages[stages.len() - 1]])?
        } else {
            None
        };
        Ok(Some(PipeContext {
            stages: group,
            tied,
        }))
    }

    /// Rank 0 prints and writes files.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deepspeed_layout_2x2x2() {
        let t = Topology::new(2, 2, 2).unwrap();
        assert_eq!(
            t.model_groups(),
            vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]
        );
        assert_eq!(
            t.data_groups(),
            vec![vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]]
        );
        assert_eq!(
            t.pipe_groups(),
            vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]
        );
        for r in 0..8 {
            assert_eq!(t.rank(t.coord(r)), r);
        }
        assert_eq!(
            t.coord(5),
            Coord {
                pipe: 1,
                data: 0,
                model: 1
            }
        );
        assert_eq!(t.next_stage(1), Some(5));
        assert_eq!(t.prev_stage(5), Some(1));
        assert_eq!(t.next_stage(5), None);
        assert_eq!(t.prev_stage(2), None);
    }

    #[test]
    fn from_world() {
        assert_eq!(
            Topology::from_world(8, 2, 2).unwrap(),
            Topology::new(2, 2, 2).unwrap()
        );
        assert_eq!(Topology::from_world(4, 4, 1).unwrap().dp, 1);
        assert!(Topology::from_world(6, 4, 1).is_err());
    }
}
