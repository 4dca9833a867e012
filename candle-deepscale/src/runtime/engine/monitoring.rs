//! What the engine reports as it trains, as DeepSpeed's engine does: monitor events
//! (`Train/Samples/*`), the `steps_per_print` line and the flops profiler's step.
use super::{Engine, StepReport};
use crate::runtime::flops_profiler::{self, ForwardProfile, StepFacts};
use crate::runtime::meters::WallClock;
use crate::runtime::monitor::{Event, MonitorMaster};
use candle_core::Result;

impl Engine {
    /// The wall clock accumulated since the last [`Engine::take_wall_clock`] (totals, not reset).
    pub fn wall_clock(&self) -> WallClock {
        self.clock
    }

    /// Milliseconds per iteration in forward, backward and the optimizer step since the last
    /// call (DeepSpeed's `wall_clock_breakdown`), and resets them. Pipeline stages count their
    /// own forward and backward passes (not the waits between them).
    pub fn take_wall_clock(&mut self) -> WallClock {
        let c = std::mem::take(&mut self.clock);
        let n = c.iterations.max(1) as f64;
        WallClock {
            forward_ms: c.forward_ms / n,
            backward_ms: c.backward_ms / n,
            step_ms: c.step_ms / n,
            iterations: c.iterations,
        }
    }

    /// The last pipelined `train_batch`: (seconds computing forward/backward, seconds in total);
    /// the difference is this stage's bubble and communication.
    pub fn pipeline_timing(&self) -> Option<(f64, f64)> {
        self.pipe_timing
    }

    /// Megatron's `average_losses_across_data_parallel_group` for values logged beside the loss
    /// (BERT's `lm loss` and `sop loss`): every rank of the grid calls it after the same batch;
    /// only the pipeline's last stage computed them (the others pass zeros), so they are summed
    /// over the stages, then averaged over the data-parallel group.
    pub fn reduce_reported(&self, values: &mut [f64]) -> Result<()> {
        if let Some(p) = &self.pipe {
            p.stages.all_reduce(values, crate::comm::ReduceOp::Sum)?;
        }
        if let Some(dp) = &self.dp {
            dp.all_reduce(values, crate::comm::ReduceOp::Avg)?;
        }
        Ok(())
    }

    /// The flops profiler: at its profile step (on global rank 0), count MACs and, with a layer
    /// list (`layers`), time each layer's forward.
    pub(super) fn start_profile(&mut self, layers: bool) {
        let Some(p) = &self.config.flops_profiler else {
            return;
        };
        if self.iteration != p.profile_step || !self.is_global_rank_0() {
            return;
        }
        if self.pipe.is_some() {
            eprintln!("flops_profiler: not available with pipeline parallelism (as in DeepSpeed's pipeline engine); nothing profiled");
            return;
        }
        let list = if layers {
            // A tied parameter counts in the first layer that holds it (one module owns it).
            let mut seen = std::collections::HashSet::new();
            self.model
                .layers()
                .iter()
                .map(|l| {
                    let n: usize = l
                        .parameters()
                        .iter()
                        .filter(|p| seen.insert(p.meta.name.clone()))
                        .map(|p| p.meta.numel())
                        .sum();
                    (l.name(), n as u64)
                })
                .collect()
        } else {
            Vec::new()
        };
        self.profile = Some(ForwardProfile::new(list));
        crate::ops::flops::start();
    }

    /// After the profiled step: DeepSpeed's report, to stderr or `output_file`.
    fn finish_profile(&mut self, before: WallClock) -> Result<()> {
        let (Some(profile), Some(s)) = (self.profile.take(), self.config.flops_profiler.clone())
        else {
            return Ok(());
        };
        let total_macs = crate::ops::flops::stop();
        let c = self.clock;
        let params: usize = self.zero.params().iter().map(|p| p.meta.numel()).sum();
        let facts = StepFacts {
            step: s.profile_step,
            world_size: self.dp_size() * self.tp.as_ref().map_or(1, |g| g.size()),
            dp: self.dp_size(),
            mp: self.tp.as_ref().map_or(1, |g| g.size()),
            batch_per_rank: self.config.train_micro_batch_size_per_gpu
                * self.config.gradient_accumulation_steps,
            model_name: "Model".into(),
            params: params as u64,
            total_macs,
            fwd_ms: c.forward_ms - before.forward_ms,
            bwd_ms: c.backward_ms - before.backward_ms,
            step_ms: c.step_ms - before.step_ms,
        };
        let text = flops_profiler::report(&s, &facts, &profile.layers);
        match &s.output_file {
            Some(path) => crate::fs::write_atomic(path, text.as_bytes())?,
            None => eprintln!("{text}"),
        }
        Ok(())
    }

    /// Whether this is global rank 0 (rank 0 of every group it belongs to).
    pub fn is_global_rank_0(&self) -> bool {
        self.groups().all(|g| g.rank == 0)
    }

    /// Writes `events` to the config's monitors (DeepSpeed's `monitor.write_events`): on global
    /// rank 0 only; elsewhere, and without monitors, nothing.
    pub fn write_monitor_events(&mut self, events: &[Event]) -> Result<()> {
        if !self.config.monitor.enabled() || !self.is_global_rank_0() {
            return Ok(());
        }
        if self.monitor.is_none() {
            self.monitor = Some(MonitorMaster::new(&self.config.monitor, true)?);
        }
        match self.monitor.as_mut() {
            Some(m) => m.write_events(events),
            None => Ok(()),
        }
    }

    /// DeepSpeed's events after a step (`Train/Samples/train_loss` before the step's samples are
    /// counted, `lr` and `loss_scale` after; a pipeline's train_loss after, as its engine writes
    /// them; the wall-clock split with `wall_clock_breakdown`) and its `steps_per_print` line.
    /// `before` is the wall clock as the iteration started.
    pub(super) fn after_train_batch(&mut self, r: &StepReport, before: WallClock) -> Result<()> {
        self.finish_profile(before)?;
        if self.config.monitor.enabled() && self.is_global_rank_0() {
            let after = self.global_samples();
            let batch = after / self.iteration.max(1);
            let loss_step = if self.pipe.is_some() {
                after
            } else {
                after - batch
            };
            let mut events = vec![
                Event::new("Train/Samples/train_loss", r.loss, loss_step),
                Event::new("Train/Samples/lr", r.lr, after),
            ];
            if self.config.fp16.is_some() {
                events.push(Event::new("Train/Samples/loss_scale", r.loss_scale, after));
            }
            if self.config.wall_clock_breakdown {
                let c = self.clock;
                for (what, ms) in [
                    ("forward", c.forward_ms - before.forward_ms),
                    ("backward", c.backward_ms - before.backward_ms),
                    ("step", c.step_ms - before.step_ms),
                ] {
                    events.push(Event::new(
                        format!("Train/Samples/elapsed_time_ms_{what}"),
                        ms,
                        after,
                    ));
                }
            }
            self.write_monitor_events(&events)?;
        }
        if let Some(n) = self.config.steps_per_print {
            if self.iteration.is_multiple_of(n) && self.is_global_rank_0() {
                let o = &self.config.optimizer;
                eprintln!(
                    "[Rank 0] step={}, skipped={}, lr=[{}], mom=[({}, {})]",
                    self.iteration, self.skipped, r.lr, o.beta1, o.beta2
                );
            }
        }
        Ok(())
    }
}
