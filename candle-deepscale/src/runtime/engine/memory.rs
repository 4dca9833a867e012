//! What the engine reports of its memory: model states measured against DeepSpeed's formula,
//! activations and communication staging (DeepSpeed's `see_memory_usage` and the ZeRO
//! estimators' per-rank figures).
use super::whole_model::WHOLE_MODEL_MEMORY_NOTE;
use super::Engine;
use crate::comm::ReduceOp;
use crate::runtime::meters::MemoryReport;
use crate::runtime::zero::StateBytes;
use candle_core::Result;

impl Engine {
    /// This rank's memory by category: model states (parameters, gradients, optimizer state,
    /// swap buffers) as held now, the peak of kept activations and of communication staging
    /// since the last call, and what NVMe offload moved so far.
    pub fn memory_report(&mut self) -> MemoryReport {
        let s = self.state_bytes();
        MemoryReport {
            parameters: s.parameters,
            gradients: s.gradients,
            optimizer: s.optimizer,
            swap_buffers: s.buffers,
            activations: self.meter.take_peak(),
            communication: self.zero.take_peak_comm_bytes(),
            offload_bytes: self.zero.offload_io_bytes(),
        }
    }

    /// Measured model-state bytes of this rank (parameters, gradient buffers, optimizer state).
    pub fn state_bytes(&self) -> StateBytes {
        self.zero.state_bytes()
    }

    /// DeepSpeed's formula for this rank's layout.
    pub fn formula_bytes(&self) -> StateBytes {
        self.zero.formula_bytes()
    }

    /// The largest measured model-state bytes over the data, tensor and pipeline groups.
    pub fn max_state_bytes(&self) -> Result<u64> {
        let mut buf = [self.state_bytes().total() as f64];
        for g in self.groups() {
            g.all_reduce(&mut buf, ReduceOp::Max)?;
        }
        Ok(buf[0] as u64)
    }

    /// One line: the layout and its measured model state against the formula.
    pub fn describe_memory(&self) -> String {
        let line = self.zero.describe_memory(self.dp_size());
        match self.graph {
            Some(_) => line + WHOLE_MODEL_MEMORY_NOTE,
            None => line,
        }
    }
}
