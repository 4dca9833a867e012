//! ZeRO stage 3 (DeepSpeed's `stage3.py` and `partitioned_param_coordinator.py`): parameters are
//! partitioned too. Each parameter is flattened, padded to a multiple of N and cut into N pieces
//! (one bucket per parameter in the flat layout, so a piece is known at construction, as with
//! `zero.Init`); rank r keeps piece r in fp32 (the optimizer updates it in place). A parameter
//! tensor keeps its shape, but its storage is released: the engine gathers a layer's parameters
//! (one all-gather) just before the layer runs — forward, recompute or backward — and releases
//! them after, unless they are used again within `stage3_max_reuse_distance` elements; upcoming
//! layers are prefetched up to `stage3_prefetch_bucket_size` elements, and no more than
//! `stage3_max_live_parameters` gathered elements stay resident. Parameters smaller than
//! `stage3_param_persistence_threshold` stay whole on every rank. Gradients are reduce-scattered
//! per layer as soon as backward has finished with it: one collective over the pieces of all
//! the parameters it completes (stage 2's path).
//!
//! The [`ParamCoordinator`] decides what is gathered and released; the state backend does the
//! gathering from wherever it keeps the pieces.
use super::flat::with_f32;
use super::partition::FlatLayout;
use crate::layers::parameter::Param;
use crate::layers::storage::{is_released, release_var};
use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

/// Gathers the pieces of the given parameters into their tensors (the state backend's).
pub(crate) type Gather<'a> = dyn Fn(&[usize]) -> Result<()> + 'a;

/// DeepSpeed's stage-3 knobs (element counts), and NVMe offload (ZeRO-Infinity).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage3Config {
    pub prefetch_bucket_size: usize,
    pub max_live_parameters: usize,
    pub max_reuse_distance: usize,
    pub param_persistence_threshold: usize,
    pub offload: Option<super::offload_config::OffloadSettings>,
}

impl Default for Stage3Config {
    /// DeepSpeed's defaults.
    fn default() -> Self {
        Self {
            prefetch_bucket_size: 50_000_000,
            max_live_parameters: 1_000_000_000,
            max_reuse_distance: 1_000_000_000,
            param_persistence_threshold: 100_000,
            offload: None,
        }
    }
}

/// Stage 3's fp32 partition of every parameter in `layout` order: the pieces built by a
/// ZeRO-3 [`crate::layers::parameter::ParamBuilder`] (taken, so they are not held twice), or cut from
/// whole tensors.
pub(crate) fn take_partitions(layout: &FlatLayout, params: &[Param]) -> Result<Vec<f32>> {
    let mut master = vec![0f32; layout.partition_len];
    for r in &layout.runs {
        let b = &layout.buckets[r.bucket];
        let at = b.part_offset + r.piece_offset;
        let p = &params[r.param];
        match &p.piece {
            Some(slot) => slot.with_values(|piece| -> Result<()> {
                let Some(piece) = piece else {
                    bail!(
                        "parameter `{}`: its ZeRO-3 piece was already taken by another engine",
                        p.meta.name
                    )
                };
                if piece.len() != b.piece {
                    bail!(
                        "parameter `{}` was built for another data-parallel size ({} elements per \
                         rank, the engine's layout has {})",
                        p.meta.name,
                        piece.len(),
                        b.piece
                    )
                }
                master[at..at + r.len]
                    .copy_from_slice(&piece[r.piece_offset..r.piece_offset + r.len]);
                Ok(())
            })??,
            None => with_f32(p.tensor(), |v| {
                master[at..at + r.len].copy_from_slice(&v[r.param_offset..r.param_offset + r.len])
            })?,
        }
    }
    for p in params {
        if let Some(slot) = &p.piece {
            slot.release();
        }
    }
    Ok(master)
}

#[derive(Debug, Default)]
struct Live {
    gathered: Vec<bool>,
    in_use: Vec<u32>,
    /// Gathered elements resident now, and the most at any time.
    elems: usize,
    peak: usize,
    /// Elements all-gathered so far.
    gathered_total: u64,
}

/// Which parameters are gathered (stage 3), decided the same way on every rank (DeepSpeed's
/// `PartitionedParameterCoordinator`).
#[derive(Debug)]
pub struct ParamCoordinator {
    pub config: Stage3Config,
    persistent: Vec<bool>,
    numel: Vec<usize>,
    /// Parameters of each layer (indices into the optimizer's parameters).
    layer_params: Vec<Vec<usize>>,
    live: Mutex<Live>,
}

impl ParamCoordinator {
    /// Parameters of at least the persistence threshold are released now (a model built whole is
    /// partitioned when the engine starts).
    pub(crate) fn new(
        config: Stage3Config,
        params: &[Param],
        layer_params: Vec<Vec<usize>>,
    ) -> Result<Self> {
        let numel: Vec<usize> = params.iter().map(|p| p.tensor().elem_count()).collect();
        let persistent: Vec<bool> = numel
            .iter()
            .map(|&n| n < config.param_persistence_threshold.max(1))
            .collect();
        for (p, &keep) in params.iter().zip(&persistent) {
            if keep && is_released(p.tensor()) {
                bail!(
                    "parameter `{}` is below stage3_param_persistence_threshold {} but was built \
                     partitioned (build with the engine's threshold)",
                    p.meta.name,
                    config.param_persistence_threshold
                )
            }
            if !keep && !is_released(p.tensor()) {
                release_var(&p.var)?;
            }
        }
        let n = params.len();
        Ok(Self {
            config,
            persistent,
            numel,
            layer_params,
            live: Mutex::new(Live {
                gathered: vec![false; n],
                in_use: vec![0; n],
                ..Live::default()
            }),
        })
    }

    pub fn is_persistent(&self, p: usize) -> bool {
        self.persistent[p]
    }

    fn live(&self) -> Result<std::sync::MutexGuard<'_, Live>> {
        self.live
            .lock()
            .map_err(|_| candle_core::Error::Msg("ZeRO-3 state lock poisoned".into()))
    }

    /// Elements held by persistent parameters (whole on every rank).
    pub fn persistent_elems(&self) -> usize {
        self.numel
            .iter()
            .zip(&self.persistent)
            .filter(|(_, &k)| k)
            .map(|(n, _)| n)
            .sum()
    }

    /// (gathered elements resident now, the peak, elements all-gathered so far).
    pub fn live_stats(&self) -> (usize, usize, u64) {
        self.live()
            .map(|l| (l.elems, l.peak, l.gathered_total))
            .unwrap_or((0, 0, 0))
    }

    fn layer_elems(&self, l: usize) -> usize {
        self.layer_params.get(l).map_or(0, |ps| {
            ps.iter()
                .filter(|&&p| !self.persistent[p])
                .map(|&p| self.numel[p])
                .sum()
        })
    }

    /// Makes layer `l`'s parameters whole through `gather`, prefetching the next layers in the
    /// direction of the pass (`backward`: towards layer 0); `params` are the optimizer's.
    pub fn fetch_layer(
        &self,
        l: usize,
        backward: bool,
        params: &[Param],
        gather: &Gather,
    ) -> Result<()> {
        let mut live = self.live()?;
        let todo = self.plan(l, backward, &live);
        gather(&todo)?;
        Self::mark(&mut live, &todo, &self.numel);
        for &p in self.layer_params.get(l).into_iter().flatten() {
            live.in_use[p] += 1;
        }
        drop(live);
        self.enforce_live_cap(params)
    }

    /// Parameters a fetch of layer `l` gathers now: its own and the next layers' in the pass's
    /// direction, up to the prefetch bucket and the live cap.
    fn plan(&self, l: usize, backward: bool, live: &Live) -> Vec<usize> {
        let mut todo: Vec<usize> = Vec::new();
        let want = |p: usize, live: &Live, todo: &mut Vec<usize>| {
            if !self.persistent[p] && !live.gathered[p] && !todo.contains(&p) {
                todo.push(p);
            }
        };
        for &p in self.layer_params.get(l).into_iter().flatten() {
            want(p, live, &mut todo);
        }
        // Prefetch: the next layers' parameters, up to the bucket size and the live cap.
        let mut budget = self.config.prefetch_bucket_size;
        let mut next = l;
        while let Some(n) = self.after(next, backward) {
            let e = self.layer_elems(n);
            let needed: usize = todo.iter().map(|&p| self.numel[p]).sum();
            if e > budget || live.elems + needed + e > self.config.max_live_parameters {
                break;
            }
            budget -= e;
            for &p in &self.layer_params[n] {
                want(p, live, &mut todo);
            }
            next = n;
        }
        todo
    }

    fn mark(live: &mut Live, todo: &[usize], numel: &[usize]) {
        for &p in todo {
            live.gathered[p] = true;
            live.elems += numel[p];
            live.gathered_total += numel[p] as u64;
        }
        live.peak = live.peak.max(live.elems);
    }

    /// What the next forward's first fetch (layer 0) gathers once everything is released
    /// (after the optimizer step).
    pub fn first_gather(&self) -> Vec<usize> {
        let n = self.numel.len();
        let none = Live {
            gathered: vec![false; n],
            in_use: vec![0; n],
            ..Live::default()
        };
        self.plan(0, false, &none)
    }

    /// Parameters `todo` were made whole by someone else (the optimizer step, from its updated
    /// pieces): the next fetch finds them gathered.
    pub fn mark_gathered(&self, todo: &[usize]) -> Result<()> {
        let mut live = self.live()?;
        Self::mark(&mut live, todo, &self.numel);
        Ok(())
    }

    /// The layer after `l` in the pass's direction (towards layer 0 in `backward`), if any.
    fn after(&self, l: usize, backward: bool) -> Option<usize> {
        let n = if backward {
            l.checked_sub(1)
        } else {
            Some(l + 1)
        };
        n.filter(|&n| n < self.layer_params.len())
    }

    /// The parameters the next gather of this pass will read after layer `l`'s fetch: those of
    /// the first layer beyond `l` (towards layer 0 in `backward`) that are neither gathered nor
    /// persistent. Offload reads their pieces ahead while the layers before them run.
    pub fn next_gather(&self, l: usize, backward: bool) -> Result<Vec<usize>> {
        let live = self.live()?;
        let mut next = l;
        loop {
            let Some(n) = self.after(next, backward) else {
                return Ok(Vec::new());
            };
            let todo: Vec<usize> = self.layer_params[n]
                .iter()
                .copied()
                .filter(|&p| !self.persistent[p] && !live.gathered[p])
                .collect();
            if !todo.is_empty() {
                return Ok(todo);
            }
            next = n;
        }
    }

    /// Layer `l` is done for now; its parameters are freed unless they are used again within
    /// `stage3_max_reuse_distance` elements.
    pub fn release_layer(&self, l: usize, backward: bool, params: &[Param]) -> Result<()> {
        let n_layers = self.layer_params.len();
        let mut live = self.live()?;
        for &p in self.layer_params.get(l).into_iter().flatten() {
            live.in_use[p] = live.in_use[p].saturating_sub(1);
            if self.persistent[p] || live.in_use[p] > 0 || !live.gathered[p] {
                continue;
            }
            // Elements gathered between now and the parameter's next use in this pass.
            let distance = if backward {
                // Used again by an earlier layer (a tied weight) before the pass ends?
                (0..l)
                    .rev()
                    .find(|&m| self.layer_params[m].contains(&p))
                    .map(|m| (m + 1..l).map(|k| self.layer_elems(k)).sum::<usize>())
            } else {
                let later = (l + 1..n_layers).find(|&m| self.layer_params[m].contains(&p));
                Some(match later {
                    Some(m) => (l + 1..m).map(|k| self.layer_elems(k)).sum(),
                    // Next used by its own backward, after the rest of forward and backward.
                    None => {
                        2 * (l + 1..n_layers)
                            .map(|k| self.layer_elems(k))
                            .sum::<usize>()
                    }
                })
            };
            let keep = distance.is_some_and(|d| d <= self.config.max_reuse_distance)
                && live.elems <= self.config.max_live_parameters;
            if !keep {
                release_var(&params[p].var)?;
                live.gathered[p] = false;
                live.elems -= self.numel[p];
            }
        }
        Ok(())
    }

    /// Frees gathered parameters not in use while more than `stage3_max_live_parameters`
    /// elements are resident.
    fn enforce_live_cap(&self, params: &[Param]) -> Result<()> {
        let mut live = self.live()?;
        for (p, param) in params.iter().enumerate() {
            if live.elems <= self.config.max_live_parameters {
                break;
            }
            if live.gathered[p] && live.in_use[p] == 0 && !self.persistent[p] {
                release_var(&param.var)?;
                live.gathered[p] = false;
                live.elems -= self.numel[p];
            }
        }
        Ok(())
    }

    /// Frees every gathered parameter (after a pass, and before the optimizer step changes the
    /// partitions they were gathered from).
    pub fn release_all(&self, params: &[Param]) -> Result<()> {
        let mut live = self.live()?;
        for (p, param) in params.iter().enumerate() {
            if live.gathered[p] {
                release_var(&param.var)?;
                live.gathered[p] = false;
            }
            live.in_use[p] = 0;
        }
        live.elems = 0;
        Ok(())
    }

    /// DeepSpeed's `GatheredParameters`: every parameter whole (through `gather`) while `f`
    /// runs, released after.
    pub fn gathered<R>(
        &self,
        params: &[Param],
        gather: &Gather,
        f: impl FnOnce() -> Result<R>,
    ) -> Result<R> {
        let all: Vec<usize> = (0..params.len()).filter(|&p| !self.persistent[p]).collect();
        self.release_all(params)?;
        gather(&all)?;
        {
            let mut live = self.live()?;
            for &p in &all {
                live.gathered[p] = true;
                live.in_use[p] = 1;
                live.elems += self.numel[p];
            }
            live.peak = live.peak.max(live.elems);
        }
        let out = f();
        self.release_all(params)?;
        out
    }
}
