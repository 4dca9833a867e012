//! Pipeline parallelism: pp=2, pp=4, pp=2 x tp=2 and pp=2 x tp=2 x dp=2 (8 in-process ranks) with
//! the 1F1B schedule equal the 1-rank run over 10 steps (losses, gradient norms, parameters; the
//! tied word embedding equal on the first and last stage).
mod common;

use candle_core::{DType, Device, Tensor};
use candle_deepscale::comm::{Communicator, InProcessWorld, ProcessGroup};
use candle_deepscale::layers::init::RandomInit;
use candle_deepscale::layers::module::{Activations, LayerSlice, Sequential};
use candle_deepscale::layers::parameter::ParamBuilder;
use candle_deepscale::runtime::engine::{Engine, EngineConfig};
use candle_deepscale::runtime::lr_schedules::LrSchedule;
use candle_deepscale::runtime::pipe::PipeContext;
use candle_deepscale::runtime::pipe::{partition_layers, PartitionMethod};
use candle_deepscale::runtime::topology::Topology;
use common::tp::{assert_params_match, gather};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use zoo::gpt2::Gpt2;

const STEPS: usize = 10;
const GLOBAL: usize = 4;
const SEQ: usize = 12;

fn batch(step: usize) -> Tensor {
    let data: Vec<u32> = (0..GLOBAL * (SEQ + 1))
        .map(|i| ((i * 31 + step * 17 + (i / 13) * 5 + 3) % 257) as u32)
        .collect();
    Tensor::from_vec(data, (GLOBAL, SEQ + 1), &Device::Cpu).unwrap()
}

struct Run {
    losses: Vec<f64>,
    norms: Vec<f64>,
    params: BTreeMap<String, Tensor>,
}

fn train(pp: usize, dp: usize, tp: usize, zero: u8, device_states: bool) -> Vec<Run> {
    train_overlap(pp, dp, tp, zero, device_states, false)
}

/// [`train`], with DeepSpeed's `overlap_comm` set to `overlap`.
fn train_overlap(
    pp: usize,
    dp: usize,
    tp: usize,
    zero: u8,
    device_states: bool,
    overlap: bool,
) -> Vec<Run> {
    let gas = GLOBAL / dp; // micro-batch 1 per pipeline micro-step
    let micro = if pp == 1 && dp == 1 { GLOBAL } else { 1 };
    let gas = if micro == GLOBAL { 1 } else { gas };
    let topo = Topology::new(pp, dp, tp).unwrap();
    let res = InProcessWorld::run(pp * dp * tp, Duration::from_secs(120), |comm| {
        let rank = comm.rank();
        let comm: Arc<dyn Communicator> = comm;
        let g = |v: Vec<usize>| ProcessGroup::new(comm.clone(), v).unwrap();
        let (tp_g, dp_g, pp_g) = (
            g(topo.model_group(rank)),
            g(topo.data_group(rank)),
            g(topo.pipe_group(rank)),
        );
        let (stage, dp_rank) = (pp_g.rank, dp_g.rank);
        let src = RandomInit { seed: 5 };
        let model = Arc::new(Gpt2::new(
            &common::tiny_gpt2_config(),
            &ParamBuilder::new(&src, &Device::Cpu, DType::F32).with_tp(Some(tp_g.clone())),
        )?);
        let bounds = partition_layers(&model.layers(), pp, &PartitionMethod::Uniform)?;
        let mine = Arc::new(LayerSlice {
            model: model.clone(),
            range: bounds[stage]..bounds[stage + 1],
        });
        let cfg = EngineConfig {
            zero_stage: zero,
            train_micro_batch_size_per_gpu: micro,
            gradient_accumulation_steps: gas,
            reduce_bucket_size: 6000,
            lr_schedule: LrSchedule::Constant(2e-3),
            gradient_clipping: 1.0,
            device_states: Some(device_states),
            overlap_comm: overlap,
            ..Default::default()
        };
        let tied =
            (stage == 0 || stage + 1 == pp).then(|| g(vec![pp_g.group[0], pp_g.group[pp - 1]]));
        let mut engine = Engine::new(mine.clone(), cfg, Some(dp_g), Some(tp_g.clone()))?
            .with_pipeline(PipeContext { stages: pp_g, tied })?;
        let (mut losses, mut norms) = (Vec::new(), Vec::new());
        for step in 0..STEPS {
            let t = batch(step).narrow(0, dp_rank * micro * gas, micro * gas)?;
            let m = &model;
            let mbs = (0..gas)
                .map(|k| {
                    let s = t.narrow(0, k * micro, micro).unwrap();
                    let (x, y) = (s.narrow(1, 0, SEQ).unwrap(), s.narrow(1, 1, SEQ).unwrap());
                    (Activations::new(x), move |o: &Activations| {
                        m.loss(&o.hidden, &y)
                    })
                })
                .collect();
            let r = engine.train_batch(mbs)?;
            losses.push(r.loss);
            norms.push(r.grad_norm);
        }
        let params = candle_deepscale::layers::module::unique_parameters(&mine.layers())
            .iter()
            .map(|p| (p.meta.name.clone(), gather(Some(&tp_g), p, p.tensor())))
            .collect();
        Ok(Run {
            losses,
            norms,
            params,
        })
    });
    res.into_iter().map(|r| r.unwrap()).collect()
}

fn check(pp: usize, dp: usize, tp: usize, zero: u8, reference: &Run) {
    check_with(pp, dp, tp, zero, false, reference)
}

fn check_with(pp: usize, dp: usize, tp: usize, zero: u8, device: bool, reference: &Run) {
    let runs = train(pp, dp, tp, zero, device);
    let what = format!("pp={pp} dp={dp} tp={tp} ZeRO-{zero} device states {device}");
    let mut merged: BTreeMap<String, Tensor> = BTreeMap::new();
    for (rank, r) in runs.iter().enumerate() {
        for s in 0..STEPS {
            let (a, b) = (r.losses[s], reference.losses[s]);
            assert!(
                (a - b).abs() <= 1e-5 * b,
                "{what} rank {rank} step {s}: loss {a} vs {b}"
            );
            let (a, b) = (r.norms[s], reference.norms[s]);
            assert!(
                (a - b).abs() <= 1e-5 * b,
                "{what} rank {rank} step {s}: grad norm {a} vs {b}"
            );
        }
        for (n, t) in &r.params {
            if let Some(prev) = merged.get(n) {
                // The tied embedding on the first and last stage stays identical.
                assert_eq!(
                    common::max_abs_diff(prev, t),
                    0.0,
                    "{what}: {n} differs between stages"
                );
            }
            merged.insert(n.clone(), t.clone());
        }
    }
    assert_params_match(&merged, &reference.params, &what, STEPS);
}

#[test]
fn pipelines_equal_one_rank() {
    let reference = train(1, 1, 1, 0, false).remove(0);
    assert!(reference.losses[STEPS - 1] < reference.losses[0]);
    check(2, 1, 1, 0, &reference);
    check(4, 1, 1, 1, &reference);
    check(2, 1, 2, 0, &reference);
    check(2, 2, 2, 1, &reference);
    // overlap_comm in a pipeline: the buckets of each micro-batch's backward in flight (ZeRO-1
    // all-reduces them at the last micro-batch), the tied embedding summed after them.
    let on = train_overlap(2, 2, 2, 1, false, true);
    let off = train(2, 2, 2, 1, false);
    for (rank, (a, b)) in on.iter().zip(&off).enumerate() {
        assert_eq!(a.losses, b.losses, "overlap_comm rank {rank}: losses");
        for (n, t) in &a.params {
            assert_eq!(
                common::max_abs_diff(t, &b.params[n]),
                0.0,
                "overlap_comm rank {rank}: {n}"
            );
        }
    }
}

/// The GPU's code path (ZeRO buffers as device tensors, tied gradients summed as tensors), run
/// on CPU tensors: pp=2 and pp=2 x tp=2 x dp=2 with ZeRO-1 equal one rank.
#[test]
fn pipelines_with_device_resident_states_equal_one_rank() {
    let reference = train(1, 1, 1, 0, false).remove(0);
    check_with(2, 1, 1, 0, true, &reference);
    check_with(2, 2, 2, 1, true, &reference);
}

#[test]
fn zero_2_with_a_pipeline_is_refused_with_the_reason() {
    let res = InProcessWorld::run(2, Duration::from_secs(30), |comm| {
        let comm: Arc<dyn Communicator> = comm;
        let pp = ProcessGroup::new(comm.clone(), vec![0, 1])?;
        let src = RandomInit { seed: 5 };
        let model = Arc::new(Gpt2::new(
            &common::tiny_gpt2_config(),
            &ParamBuilder::new(&src, &Device::Cpu, DType::F32),
        )?);
        let cfg = EngineConfig {
            zero_stage: 2,
            ..Default::default()
        };
        let e = Engine::new(model.clone(), cfg, None, None)?.with_pipeline(PipeContext {
            stages: pp,
            tied: None,
        });
        Ok(e.err().map(|e| e.to_string()).unwrap_or_default())
    });
    for r in res {
        let e = r.unwrap();
        assert!(
            e.contains("not supported: ZeRO stage 2 with a pipeline"),
            "{e}"
        );
    }
}

#[test]
fn partition_methods_cut_a_gpt2_where_expected() {
    // Embedding, 6 transformer blocks, head (final LayerNorm + tied logits).
    let cfg = zoo::gpt2::Config {
        seq_length: 64,
        max_position_embeddings: 64,
        ..zoo::gpt2::Config::new(6, 64, 4, 257)
    };
    let model = common::random_gpt2(&cfg, 1);
    let layers = model.layers();
    let part = |m: &str, p: usize| {
        partition_layers(&layers, p, &m.parse::<PartitionMethod>().unwrap()).unwrap()
    };
    assert_eq!(part("uniform", 2), vec![0, 4, 8]);
    assert_eq!(part("uniform", 3), vec![0, 3, 6, 8]);
    // Three blocks per stage; embedding and head go with the ends.
    assert_eq!(part("type:transformer", 2), vec![0, 4, 8]);
    assert_eq!(part("type:transformer", 3), vec![0, 3, 5, 8]);
    // Parameters: embedding 384x64 + 64x64 = 28672, a block 49984, the head (LayerNorm + the
    // tied 384x64 word embedding) 24704: balanced at 2 stages = 178624 | 174656.
    assert_eq!(part("parameters", 2), vec![0, 4, 8]);
    assert!(partition_layers(&layers, 9, &PartitionMethod::Uniform).is_err());
}

#[test]
fn gpt2_model_pipe_builds_only_its_stage() {
    let cfg = zoo::gpt2::Config {
        seq_length: 64,
        max_position_embeddings: 64,
        ..zoo::gpt2::Config::new(6, 64, 4, 257)
    };
    let whole = common::random_gpt2(&cfg, 1);
    let src = RandomInit { seed: 1 };
    let pb = ParamBuilder::new(&src, &Device::Cpu, DType::F32);
    // GPT2ModelPipe's list: tied embedding, 6 transformer layers, LayerNorm, tied logits.
    let all = zoo::gpt2::Gpt2Pipe::new(&cfg, &pb, 0..9).unwrap();
    let types: Vec<String> = all.layers().iter().map(|l| l.type_name()).collect();
    assert_eq!(types[0], "EmbeddingPipe");
    assert_eq!(types[7], "LayerNorm");
    assert_eq!(types[8], "EmbeddingPipe");
    for method in ["uniform", "parameters", "type:transformer"] {
        let m: PartitionMethod = method.parse().unwrap();
        for stages in [2, 3] {
            // The shape-only partition equals the one over the built layers.
            let bounds = zoo::gpt2::Gpt2Pipe::partition(&cfg, stages, &m).unwrap();
            assert_eq!(
                bounds,
                partition_layers(&all.layers(), stages, &m).unwrap(),
                "{method} x {stages}"
            );
        }
    }
    // Built whole, the pipe form computes what the plain model does.
    let ids = Tensor::new(&[[1u32, 5, 9, 200, 3]], &Device::Cpu).unwrap();
    let ctx = candle_deepscale::layers::module::ForwardCtx::eval();
    let plain = whole.forward(&ids, &ctx).unwrap();
    let piped = candle_deepscale::layers::module::forward_layers(
        &all.layers(),
        candle_deepscale::layers::module::Activations::new(ids.clone()),
        &ctx,
    )
    .unwrap()
    .hidden;
    assert_eq!(common::max_abs_diff(&plain, &piped), 0.0);
    let middle = zoo::gpt2::Gpt2Pipe::new(&cfg, &pb, 2..5).unwrap();
    let names: Vec<String> = candle_deepscale::layers::module::unique_parameters(&middle.layers())
        .iter()
        .map(|p| p.meta.name.clone())
        .collect();
    assert_eq!(middle.layers().len(), 3);
    assert!(
        names.iter().all(|n| n.starts_with("layers.1.")
            || n.starts_with("layers.2.")
            || n.starts_with("layers.3.")),
        "{names:?}"
    );
    // The last stage holds the head with its own tied copy of the word embedding, equal to the
    // first stage's.
    let last = zoo::gpt2::Gpt2Pipe::new(&cfg, &pb, 5..9).unwrap();
    let first = zoo::gpt2::Gpt2Pipe::new(&cfg, &pb, 0..2).unwrap();
    let wte = |s: &zoo::gpt2::Gpt2Pipe| {
        candle_deepscale::layers::module::unique_parameters(&s.layers())
            .into_iter()
            .find(|p| p.meta.name == "embedding.word_embeddings.weight")
            .map(|p| p.tensor().clone())
            .unwrap()
    };
    assert_eq!(common::max_abs_diff(&wte(&last), &wte(&first)), 0.0);
    assert_eq!(last.layers().len(), 4);
    assert!(zoo::gpt2::Gpt2Pipe::new(&cfg, &pb, 8..10).is_err());
}
