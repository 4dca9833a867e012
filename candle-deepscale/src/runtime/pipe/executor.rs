//! DeepSpeed's `PipelineEngine._exec_schedule`: one stage runs its 1F1B instruction stream
//! ([`TrainSchedule`]), one short method per instruction as DeepSpeed's `_INSTRUCTION_MAP` maps
//! them. The schedule is data; this is all that executes it. Gradients go into the ZeRO buffers
//! through the layer loop's hooks; the optimizer step itself is the engine's, after the stream.
use super::{p2p, Instruction, PipeContext, TrainSchedule};
use crate::comm::ReduceOp;
use crate::layers::module::{Activations, ForwardCtx, Layer};
use crate::runtime::activation_checkpointing::CheckpointPolicy;
use crate::runtime::layer_loop::{self, PassState, ZeroHooks};
use crate::runtime::meters::{MemoryMeter, WallClock};
use crate::runtime::zero::ZeroOptimizer;
use candle_core::{bail, Device, Result, Tensor};
use std::collections::HashMap;
use std::time::Instant;

/// What a stage needs from its engine to run one batch.
pub struct StageResources<'a> {
    pub layers: &'a [&'a dyn Layer],
    pub pipe: &'a PipeContext,
    pub zero: &'a mut ZeroOptimizer,
    pub policy: &'a CheckpointPolicy,
    pub meter: &'a mut MemoryMeter,
    pub clock: &'a mut WallClock,
    /// The loss scale of this iteration's backward (fp16).
    pub loss_scale: f64,
    /// The forward context (dropout streams) of micro-batch `m`.
    pub forward_ctx: &'a dyn Fn(usize) -> ForwardCtx,
}

/// What one batch through the stage gave.
#[derive(Debug, Clone, Copy)]
pub struct StageOutcome {
    /// The mean loss of the micro-batches (the last stage; 0 elsewhere).
    pub loss: f64,
    /// Seconds computing forward and backward passes.
    pub busy: f64,
    /// Seconds in the whole stream (the rest is this stage's bubble and communication).
    pub total: f64,
}

/// Message tags of micro-batch `m`'s activation and gradient.
fn act_tag(m: usize) -> u64 {
    1000 + 2 * m as u64
}

fn grad_tag(m: usize) -> u64 {
    1001 + 2 * m as u64
}

fn missing(what: String) -> candle_core::Error {
    candle_core::Error::Msg(what)
}

/// One stage's run of a batch: the resources, the micro-batches, and the buffers the
/// instructions pass between each other.
pub struct StageExecutor<'a, F> {
    r: StageResources<'a>,
    stage: usize,
    stages: usize,
    /// Where received activations land: where this stage's parameters live.
    device: Device,
    inputs: Vec<Option<Activations>>,
    loss_fns: Vec<Option<F>>,
    stage_in: HashMap<usize, Activations>,
    states: HashMap<usize, PassState>,
    outputs: HashMap<usize, Activations>,
    /// What was sent downstream (the shapes the gradients come back in).
    sent: HashMap<usize, Vec<Tensor>>,
    grads_out: HashMap<usize, Vec<Option<Tensor>>>,
    /// A forward's input tensors and, after backward, their gradients (sent upstream).
    grads_in: HashMap<usize, (Vec<Tensor>, Vec<Option<Tensor>>)>,
    loss_sum: f64,
    backwards: usize,
}

impl<'a, F> StageExecutor<'a, F>
where
    F: FnOnce(&Activations) -> Result<Tensor>,
{
    /// A stage's run of `micro_batches` (input, loss function): the first stage reads the
    /// inputs, the last the loss functions.
    pub fn new(r: StageResources<'a>, micro_batches: Vec<(Activations, F)>) -> Self {
        let (stage, stages) = (r.pipe.stages.rank, r.pipe.stages.size());
        let device = r
            .zero
            .params()
            .first()
            .map(|p| p.tensor().device().clone())
            .unwrap_or(Device::Cpu);
        let (inputs, loss_fns) = micro_batches
            .into_iter()
            .map(|(x, f)| (Some(x), Some(f)))
            .unzip();
        Self {
            r,
            stage,
            stages,
            device,
            inputs,
            loss_fns,
            stage_in: HashMap::new(),
            states: HashMap::new(),
            outputs: HashMap::new(),
            sent: HashMap::new(),
            grads_out: HashMap::new(),
            grads_in: HashMap::new(),
            loss_sum: 0.0,
            backwards: 0,
        }
    }

    /// Runs the stage's whole instruction stream.
    pub fn run(mut self) -> Result<StageOutcome> {
        let gas = self.inputs.len();
        let schedule = TrainSchedule::new(gas, self.stages, self.stage);
        let started = Instant::now();
        let mut busy = 0.0;
        for instruction in schedule.steps().into_iter().flatten() {
            let t0 = Instant::now();
            self.exec(instruction)?;
            let forward = matches!(instruction, Instruction::ForwardPass { .. });
            if forward || matches!(instruction, Instruction::BackwardPass { .. }) {
                let dt = t0.elapsed().as_secs_f64();
                busy += dt;
                self.r.clock.add_pass(forward, dt);
            }
        }
        let last = self.stage + 1 == self.stages;
        Ok(StageOutcome {
            loss: if last {
                self.loss_sum / gas as f64
            } else {
                0.0
            },
            busy,
            total: started.elapsed().as_secs_f64(),
        })
    }

    /// DeepSpeed's `_INSTRUCTION_MAP`.
    fn exec(&mut self, instruction: Instruction) -> Result<()> {
        use Instruction::*;
        match instruction {
            LoadMicroBatch { micro_batch, .. } => self.load_micro_batch(micro_batch),
            RecvActivation { micro_batch, .. } => self.recv_activation(micro_batch),
            ForwardPass { micro_batch, .. } => self.forward_pass(micro_batch),
            SendActivation { micro_batch, .. } => self.send_activation(micro_batch),
            RecvGrad { micro_batch, .. } => self.recv_grad(micro_batch),
            BackwardPass { micro_batch, .. } => self.backward_pass(micro_batch),
            SendGrad { micro_batch, .. } => self.send_grad(micro_batch),
            ReduceTiedGrads => self.reduce_tied_grads(),
            // The data-parallel reduction ran bucket by bucket during the last backward; the
            // optimizer step is the engine's, after the stream.
            ReduceGrads | OptimizerStep => Ok(()),
        }
    }

    fn prev(&self) -> Result<usize> {
        match self.stage.checked_sub(1) {
            Some(s) => Ok(self.r.pipe.stages.group[s]),
            None => bail!("pipeline stage 0 has no previous stage"),
        }
    }

    fn next(&self) -> Result<usize> {
        match self.r.pipe.stages.group.get(self.stage + 1) {
            Some(&r) => Ok(r),
            None => bail!("the last pipeline stage has no next stage"),
        }
    }

    fn load_micro_batch(&mut self, m: usize) -> Result<()> {
        if self.stage == 0 {
            let x = self.inputs[m]
                .take()
                .ok_or_else(|| missing(format!("micro-batch {m} loaded twice")))?;
            self.stage_in.insert(m, x);
        }
        Ok(())
    }

    fn recv_activation(&mut self, m: usize) -> Result<()> {
        let src = self.prev()?;
        let comm = self.r.pipe.stages.comm.as_ref();
        let x = p2p::recv_activations(comm, src, act_tag(m), &self.device)?;
        self.stage_in.insert(m, x);
        Ok(())
    }

    fn forward_pass(&mut self, m: usize) -> Result<()> {
        let stage = self.stage;
        let x = self
            .stage_in
            .remove(&m)
            .ok_or_else(|| missing(format!("stage {stage}: no input for micro-batch {m}")))?;
        let keep_in: Vec<Tensor> = std::iter::once(&x.hidden).chain(&x.aux).cloned().collect();
        let ctx = (self.r.forward_ctx)(m);
        let loss = if stage + 1 == self.stages {
            let f = self.loss_fns[m]
                .take()
                .ok_or_else(|| missing(format!("micro-batch {m}: no loss")))?;
            Some((self.r.loss_scale, f))
        } else {
            None
        };
        let (state, out, value) = layer_loop::forward(
            self.r.layers,
            x,
            &ctx,
            self.r.policy,
            loss,
            &mut ZeroHooks {
                zero: &mut *self.r.zero,
                last: false,
                meter: &mut *self.r.meter,
                profile: None,
            },
        )?;
        if let Some(v) = value {
            self.loss_sum += v as f64;
        }
        if let Some(out) = out {
            self.outputs.insert(m, out);
        }
        self.states.insert(m, state);
        self.grads_in.insert(m, (keep_in, Vec::new()));
        Ok(())
    }

    fn send_activation(&mut self, m: usize) -> Result<()> {
        let stage = self.stage;
        let out = self
            .outputs
            .remove(&m)
            .ok_or_else(|| missing(format!("stage {stage}: no output of micro-batch {m}")))?;
        let comm = self.r.pipe.stages.comm.as_ref();
        p2p::send_activations(comm, self.next()?, act_tag(m), &out)?;
        self.sent
            .insert(m, std::iter::once(out.hidden).chain(out.aux).collect());
        Ok(())
    }

    fn recv_grad(&mut self, m: usize) -> Result<()> {
        let stage = self.stage;
        let shapes = self
            .sent
            .remove(&m)
            .ok_or_else(|| missing(format!("stage {stage}: micro-batch {m} was not sent")))?;
        let comm = self.r.pipe.stages.comm.as_ref();
        let g = p2p::recv_grads(comm, self.next()?, grad_tag(m), &shapes)?;
        self.grads_out.insert(m, g);
        Ok(())
    }

    fn backward_pass(&mut self, m: usize) -> Result<()> {
        let stage = self.stage;
        let state = self
            .states
            .remove(&m)
            .ok_or_else(|| missing(format!("stage {stage}: micro-batch {m} not forwarded")))?;
        let go = self.grads_out.remove(&m).unwrap_or_default();
        self.backwards += 1;
        // The accumulation boundary: stages 0 and 1 all-reduce their buckets in this backward.
        let boundary = self.backwards == self.inputs.len();
        let g = layer_loop::backward(
            self.r.layers,
            state,
            go,
            self.r.policy,
            &mut ZeroHooks {
                zero: &mut *self.r.zero,
                last: boundary,
                meter: &mut *self.r.meter,
                profile: None,
            },
        )?;
        if let Some(e) = self.grads_in.get_mut(&m) {
            e.1 = g;
        }
        Ok(())
    }

    fn send_grad(&mut self, m: usize) -> Result<()> {
        let (input, g) = self.grads_in.remove(&m).unwrap_or_default();
        let comm = self.r.pipe.stages.comm.as_ref();
        p2p::send_grads(comm, self.prev()?, grad_tag(m), &input, &g)
    }

    /// Sums the gradients of weights tied across stages (the word embedding) between the first
    /// and the last stage.
    fn reduce_tied_grads(&mut self) -> Result<()> {
        let Some(tied) = self.r.pipe.tied.as_ref().filter(|g| g.size() > 1) else {
            return Ok(());
        };
        let zero = &mut *self.r.zero;
        let idx: Vec<usize> = (0..zero.params().len())
            .filter(|&i| zero.params()[i].meta.tie_group.is_some())
            .collect();
        for i in idx {
            zero.all_reduce_param_grad(i, tied)?;
        }
        Ok(())
    }
}

/// Shares the last stage's loss along the pipeline (every stage returns it).
pub fn share_loss(pipe: &PipeContext, loss: f64) -> Result<f64> {
    let mut l = [loss];
    pipe.stages.all_reduce(&mut l, ReduceOp::Sum)?;
    Ok(l[0])
}
