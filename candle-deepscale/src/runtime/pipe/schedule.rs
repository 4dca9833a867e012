//! Pipeline schedules as data (DeepSpeed's `runtime/pipe/schedule.py`): each stage gets a list of
//! clock steps, each a list of instructions; an executor runs them. The training schedule is 1F1B
//! over `2 (m + p - 1)` steps: even and odd stages alternate forward and backward steps so that
//! every send meets its receive in the same step (blocking point-to-point never deadlocks), and a
//! stage holds at most `max(2, min(p - stage, m))` micro-batches in flight.

/// One pipeline instruction. `micro_batch` is the micro-batch it concerns, `buffer` the slot that
/// holds that micro-batch's activations on this stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Instruction {
    LoadMicroBatch {
        micro_batch: usize,
        buffer: usize,
    },
    ForwardPass {
        micro_batch: usize,
        buffer: usize,
    },
    BackwardPass {
        micro_batch: usize,
        buffer: usize,
    },
    SendActivation {
        micro_batch: usize,
        buffer: usize,
    },
    RecvActivation {
        micro_batch: usize,
        buffer: usize,
    },
    SendGrad {
        micro_batch: usize,
        buffer: usize,
    },
    RecvGrad {
        micro_batch: usize,
        buffer: usize,
    },
    /// All-reduce the gradients of weights tied across stages (the word embedding).
    ReduceTiedGrads,
    /// Data-parallel gradient reduction.
    ReduceGrads,
    OptimizerStep,
}

/// DeepSpeed's `TrainSchedule`: 1F1B for `micro_batches` over `stages`, seen from `stage_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainSchedule {
    pub micro_batches: usize,
    pub stages: usize,
    pub stage_id: usize,
}

impl TrainSchedule {
    pub fn new(micro_batches: usize, stages: usize, stage_id: usize) -> Self {
        assert!(stages > 0 && stage_id < stages && micro_batches > 0);
        Self {
            micro_batches,
            stages,
            stage_id,
        }
    }

    /// Activation buffers this stage needs: micro-batches in flight, at least 2.
    pub fn num_pipe_buffers(&self) -> usize {
        (self.stages - self.stage_id).min(self.micro_batches).max(2)
    }

    pub fn total_steps(&self) -> usize {
        2 * (self.micro_batches + self.stages - 1)
    }

    fn valid(&self, mb: i64) -> Option<usize> {
        (0..self.micro_batches as i64)
            .contains(&mb)
            .then_some(mb as usize)
    }

    /// The micro-batch of clock step `step` and whether it is a forward step.
    fn step_to_micro_batch(&self, step: usize) -> (i64, bool) {
        let (s, st, p) = (step as i64, self.stage_id as i64, self.stages as i64);
        match (s % 2 == 0, st % 2 == 0) {
            (true, true) => (s / 2 - st / 2, true),
            (false, false) => ((s - 1) / 2 - st / 2, true),
            (true, false) => (s / 2 - p + (st + 1) / 2, false),
            (false, true) => ((s - 1) / 2 - p + 1 + st / 2, false),
        }
    }

    /// The instructions of every clock step.
    pub fn steps(&self) -> Vec<Vec<Instruction>> {
        use Instruction::*;
        let buffers = self.num_pipe_buffers();
        let first = self.stage_id == 0;
        let last = self.stage_id + 1 == self.stages;
        let total = self.total_steps();
        let mut prev: i64 = -1;
        let mut out = Vec::with_capacity(total);
        for step in 0..total {
            let (mb, forward) = self.step_to_micro_batch(step);
            let cur = self.valid(mb).map(|m| (m, m % buffers));
            let before = self.valid(prev).map(|m| (m, m % buffers));
            let mut cmds = Vec::new();
            if forward {
                if let (Some((m, b)), false) = (before, first) {
                    cmds.push(SendGrad {
                        micro_batch: m,
                        buffer: b,
                    });
                }
                if let (Some((m, b)), false) = (cur, first) {
                    cmds.push(RecvActivation {
                        micro_batch: m,
                        buffer: b,
                    });
                }
            } else {
                if let (Some((m, b)), false) = (cur, last) {
                    cmds.push(RecvGrad {
                        micro_batch: m,
                        buffer: b,
                    });
                }
                if let (Some((m, b)), false) = (before, last) {
                    cmds.push(SendActivation {
                        micro_batch: m,
                        buffer: b,
                    });
                }
            }
            if let (Some((m, b)), true, true) = (cur, forward, first || last) {
                cmds.push(LoadMicroBatch {
                    micro_batch: m,
                    buffer: b,
                });
            }
            if let Some((m, b)) = cur {
                cmds.push(if forward {
                    ForwardPass {
                        micro_batch: m,
                        buffer: b,
                    }
                } else {
                    BackwardPass {
                        micro_batch: m,
                        buffer: b,
                    }
                });
            }
            if step + 1 == total {
                cmds.extend([ReduceTiedGrads, ReduceGrads, OptimizerStep]);
            }
            prev = mb;
            out.push(cmds);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Instruction::*;
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn compute_order(s: &TrainSchedule) -> Vec<(bool, usize)> {
        s.steps()
            .into_iter()
            .flatten()
            .filter_map(|i| match i {
                ForwardPass { micro_batch, .. } => Some((true, micro_batch)),
                BackwardPass { micro_batch, .. } => Some((false, micro_batch)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn one_f_one_b_with_warm_up_and_cool_down() {
        let (p, m) = (4, 8);
        for stage in 0..p {
            let order = compute_order(&TrainSchedule::new(m, p, stage));
            let warm = (p - stage - 1).min(m);
            // Warm-up: forwards only; then strictly alternating; then backwards only.
            assert!(
                order[..warm].iter().all(|(f, _)| *f),
                "stage {stage}: {order:?}"
            );
            let steady = &order[warm..warm + 2 * (m - warm)];
            for (k, (f, _)) in steady.iter().enumerate() {
                assert_eq!(*f, k % 2 == 0, "stage {stage}: steady 1F1B {order:?}");
            }
            assert!(order[warm + 2 * (m - warm)..].iter().all(|(f, _)| !*f));
            // Forwards and backwards each in micro-batch order, each exactly once.
            let fw: Vec<usize> = order.iter().filter(|(f, _)| *f).map(|(_, m)| *m).collect();
            let bw: Vec<usize> = order.iter().filter(|(f, _)| !*f).map(|(_, m)| *m).collect();
            assert_eq!(fw, (0..m).collect::<Vec<_>>());
            assert_eq!(bw, (0..m).collect::<Vec<_>>());
        }
    }

    /// With rendezvous point-to-point (a send completes only when its receive is posted, as NCCL's
    /// send/recv on one stream), the stages' instruction streams, run in order, never deadlock
    /// and pair every send with the matching receive: p up to 8, m from 1.
    #[test]
    fn rendezvous_send_recv_never_deadlocks() {
        // (peer, is_send, activation?, micro-batch) in program order, per stage.
        for p in 1..=8 {
            for m in 1..=12 {
                let mut ops: Vec<std::collections::VecDeque<(usize, bool, bool, usize)>> = (0..p)
                    .map(|s| {
                        TrainSchedule::new(m, p, s)
                            .steps()
                            .into_iter()
                            .flatten()
                            .filter_map(|i| match i {
                                SendActivation { micro_batch, .. } => {
                                    Some((s + 1, true, true, micro_batch))
                                }
                                RecvActivation { micro_batch, .. } => {
                                    Some((s - 1, false, true, micro_batch))
                                }
                                SendGrad { micro_batch, .. } => {
                                    Some((s - 1, true, false, micro_batch))
                                }
                                RecvGrad { micro_batch, .. } => {
                                    Some((s + 1, false, false, micro_batch))
                                }
                                _ => None,
                            })
                            .collect()
                    })
                    .collect();
                loop {
                    let mut progressed = false;
                    for a in 0..p {
                        let Some(&(b, send, act, mb)) = ops[a].front() else {
                            continue;
                        };
                        if !send {
                            continue;
                        }
                        if ops[b].front() == Some(&(a, false, act, mb)) {
                            ops[a].pop_front();
                            ops[b].pop_front();
                            progressed = true;
                        }
                    }
                    if !progressed {
                        break;
                    }
                }
                assert!(
                    ops.iter().all(|o| o.is_empty()),
                    "p{p} m{m}: deadlock with heads {:?}",
                    ops.iter().map(|o| o.front()).collect::<Vec<_>>()
                );
            }
        }
    }

    /// Every send meets its receive in the same clock step (so blocking point-to-point cannot
    /// deadlock), buffers stay within the bound and are never shared by live micro-batches, and
    /// the data dependencies hold: p up to 8, m from 1.
    #[test]
    #[allow(clippy::needless_range_loop)] // indices are stage and step numbers
    fn sends_meet_receives_in_the_same_step_for_every_shape() {
        for p in 1..=8 {
            for m in 1..=12 {
                let scheds: Vec<TrainSchedule> =
                    (0..p).map(|s| TrainSchedule::new(m, p, s)).collect();
                let steps: Vec<Vec<Vec<Instruction>>> = scheds.iter().map(|s| s.steps()).collect();
                let total = scheds[0].total_steps();
                let mut forwarded: HashSet<(usize, usize)> = HashSet::new();
                let mut backwarded: HashSet<(usize, usize)> = HashSet::new();
                for t in 0..total {
                    let mut sends: HashMap<(usize, usize, bool, usize), usize> = HashMap::new();
                    let mut recvs: HashMap<(usize, usize, bool, usize), usize> = HashMap::new();
                    for s in 0..p {
                        for i in &steps[s][t] {
                            match *i {
                                SendActivation { micro_batch, .. } => {
                                    assert!(
                                        forwarded.contains(&(s, micro_batch)),
                                        "p{p} m{m}: send before forward"
                                    );
                                    *sends.entry((s, s + 1, true, micro_batch)).or_default() += 1
                                }
                                RecvActivation { micro_batch, .. } => {
                                    *recvs.entry((s - 1, s, true, micro_batch)).or_default() += 1
                                }
                                SendGrad { micro_batch, .. } => {
                                    assert!(backwarded.contains(&(s, micro_batch)));
                                    *sends.entry((s, s - 1, false, micro_batch)).or_default() += 1
                                }
                                RecvGrad { micro_batch, .. } => {
                                    *recvs.entry((s + 1, s, false, micro_batch)).or_default() += 1
                                }
                                ForwardPass { micro_batch, .. } => {
                                    if s > 0 {
                                        assert!(
                                            forwarded.contains(&(s - 1, micro_batch)),
                                            "p{p} m{m}: stage {s} forward before its input"
                                        );
                                    }
                                    forwarded.insert((s, micro_batch));
                                }
                                BackwardPass { micro_batch, .. } => {
                                    assert!(forwarded.contains(&(s, micro_batch)));
                                    if s + 1 < p {
                                        assert!(
                                            backwarded.contains(&(s + 1, micro_batch)),
                                            "p{p} m{m}: stage {s} backward before its gradient"
                                        );
                                    }
                                    backwarded.insert((s, micro_batch));
                                }
                                _ => {}
                            }
                        }
                    }
                    assert_eq!(sends, recvs, "p{p} m{m} step {t}");
                }
                assert_eq!(forwarded.len(), p * m);
                assert_eq!(backwarded.len(), p * m);
                for (s, sched) in scheds.iter().enumerate() {
                    // Live micro-batches: forwarded, not yet backwarded.
                    let bound = sched.num_pipe_buffers();
                    assert_eq!(bound, (p - s).min(m).max(2));
                    let mut live: HashMap<usize, usize> = HashMap::new();
                    for i in steps[s].iter().flatten() {
                        match *i {
                            ForwardPass {
                                micro_batch,
                                buffer,
                            } => {
                                assert!(
                                    live.values().all(|&b| b != buffer),
                                    "buffer {buffer} reused while live"
                                );
                                live.insert(micro_batch, buffer);
                                assert!(
                                    live.len() <= bound,
                                    "p{p} m{m} stage {s}: {} live",
                                    live.len()
                                );
                            }
                            BackwardPass { micro_batch, .. } => {
                                live.remove(&micro_batch);
                            }
                            _ => {}
                        }
                    }
                    let last = steps[s].last().unwrap();
                    assert_eq!(
                        &last[last.len() - 3..],
                        &[ReduceTiedGrads, ReduceGrads, OptimizerStep]
                    );
                }
            }
        }
    }
}
