//! Activation checkpointing (DeepSpeed's `activation_checkpointing/checkpointing.py`): which layer
//! inputs the engine keeps for the recomputing backward, and where.
//!
//! `partition_activations` keeps 1/tp of each saved input on each tensor-parallel rank (the input is
//! replicated across the group) and all-gathers it before recompute; `cpu_checkpointing` moves the
//! saved inputs to host memory (a no-op on the CPU backend, where they already are).
use crate::comm::ProcessGroup;
use crate::layers::module::Activations;
use candle_core::{DType, Device, Result, Shape, Tensor};

/// How the engine keeps activations for backward.
#[derive(Debug, Clone, Default)]
pub struct CheckpointPolicy {
    /// Layers per checkpoint (Megatron's `--checkpoint-num-layers`); 0 keeps every layer's graph.
    pub num_layers: usize,
    /// Split saved inputs over this tensor-parallel group (`partition_activations`).
    pub partition: Option<ProcessGroup>,
    /// Keep saved inputs in host memory (`cpu_checkpointing`).
    pub cpu: bool,
}

impl CheckpointPolicy {
    /// Every `num_layers` layers (0 = off), inputs kept whole where they are.
    pub fn every(num_layers: usize) -> Self {
        Self {
            num_layers,
            ..Self::default()
        }
    }

    pub fn enabled(&self) -> bool {
        self.num_layers > 0
    }

    /// Stores a checkpointed input as this policy says.
    pub fn save(&self, a: &Activations) -> Result<Saved> {
        let hidden = a.hidden.detach();
        let (device, shape, dtype) = (
            hidden.device().clone(),
            hidden.shape().clone(),
            hidden.dtype(),
        );
        let mut kept = match self.partition.as_ref().filter(|g| g.size() > 1) {
            Some(g) => {
                let flat = hidden.flatten_all()?;
                let n = flat.dim(0)?;
                let chunk = n.div_ceil(g.size());
                let start = (g.rank * chunk).min(n);
                let len = chunk.min(n - start);
                let mut part = flat.narrow(0, start, len)?;
                if len < chunk {
                    part = part.pad_with_zeros(0, 0, chunk - len)?;
                }
                part.contiguous()?
            }
            None => hidden,
        };
        if self.cpu {
            kept = kept.to_device(&Device::Cpu)?;
        }
        Ok(Saved {
            kept,
            aux: a.aux.iter().map(|t| t.detach()).collect(),
            device,
            shape,
            dtype,
        })
    }

    /// The input `save` stored, whole and on its device again.
    pub fn restore(&self, s: &Saved) -> Result<Activations> {
        let hidden = match self.partition.as_ref().filter(|g| g.size() > 1) {
            Some(g) => g
                .comm
                .all_gather_tensor(&g.group, &s.kept.to_device(&s.device)?)?
                .flatten_all()?
                .narrow(0, 0, s.shape.elem_count())?
                .reshape(&s.shape)?
                .to_dtype(s.dtype)?,
            None => s.kept.clone(),
        };
        Ok(Activations::with_aux(
            hidden.to_device(&s.device)?,
            s.aux.clone(),
        ))
    }
}

/// A saved layer input (whole or this rank's part, possibly in host memory).
#[derive(Debug, Clone)]
pub struct Saved {
    kept: Tensor,
    aux: Vec<Tensor>,
    device: Device,
    shape: Shape,
    dtype: DType,
}

impl Saved {
    /// Bytes of the hidden state this rank keeps.
    pub fn bytes(&self) -> usize {
        self.kept.elem_count() * self.kept.dtype().size_in_bytes()
    }
}
