//! Pipeline parallelism (DeepSpeed's `runtime/pipe/`): the 1F1B schedule as data
//! ([`schedule`]), its executor ([`executor`]), the partitioning of a layer list into stages
//! ([`partition`]), `PipelineModule` with layer specs ([`module`]) and the point-to-point
//! transfers between stages ([`p2p`]).
pub mod executor;
pub mod module;
pub mod p2p;
pub mod partition;
pub mod schedule;

pub use module::{LayerSpec, PipeSpec, PipelineModule, SharedLayer, TiedLayerSpec};
pub use partition::{partition_layers, PartitionMethod};
pub use schedule::{Instruction, TrainSchedule};

use crate::comm::ProcessGroup;
use crate::layers::module::{Activations, ForwardCtx, Layer};
use candle_core::Result;

/// This rank's place in a pipeline: its stage group (the stages of its data/tensor coordinate,
/// in order) and, on the first and last stage, the group that shares tied weights.
#[derive(Debug, Clone)]
pub struct PipeContext {
    pub stages: ProcessGroup,
    /// First and last stage (for the word embedding used as input and as logits).
    pub tied: Option<ProcessGroup>,
}

/// Inference through a pipeline: the first stage runs `input` through its `layers` and sends the
/// result on; each later stage receives, runs its layers and sends on; the last stage returns its
/// output (every other stage returns None). Without a pipeline, a plain forward.
pub fn pipeline_forward(
    layers: &[&dyn Layer],
    pipe: Option<&PipeContext>,
    input: Activations,
    ctx: &ForwardCtx,
) -> Result<Option<Activations>> {
    let detach = |a: Activations| Activations::with_aux(a.hidden.detach(), a.aux);
    let Some(p) = pipe.filter(|p| p.stages.size() > 1) else {
        let mut x = input;
        for l in layers {
            x = detach(l.forward(&x, ctx)?);
        }
        return Ok(Some(x));
    };
    let (stage, stages) = (p.stages.rank, p.stages.size());
    let comm = p.stages.comm.as_ref();
    const TAG: u64 = 999;
    let mut x = if stage == 0 {
        input
    } else {
        p2p::recv_activations(comm, p.stages.group[stage - 1], TAG, input.hidden.device())?
    };
    for l in layers {
        x = detach(l.forward(&x, ctx)?);
    }
    if stage + 1 < stages {
        p2p::send_activations(comm, p.stages.group[stage + 1], TAG, &x)?;
        Ok(None)
    } else {
        Ok(Some(x))
    }
}

/// One pipeline stage of a model for inference: its layers and its place in the pipeline.
pub struct Stage<'a> {
    pub layers: Vec<&'a dyn Layer>,
    pub pipe: &'a PipeContext,
}

impl Stage<'_> {
    pub fn is_last(&self) -> bool {
        self.pipe.stages.rank + 1 == self.pipe.stages.size()
    }

    /// Sums `v` over the stages (values computed on the last stage reach every stage).
    pub fn share(&self, v: &mut [f64]) -> Result<()> {
        self.pipe.stages.all_reduce(v, crate::comm::ReduceOp::Sum)
    }
}
