//! Native checkpoints: exact resume, loading into other layouts (tp, dp, ZeRO stage), interrupted
//! and corrupt saves.
mod common;

use candle_core::{DType, Device, Tensor};
use candle_deepscale::comm::{Communicator, InProcessWorld, ProcessGroup};
use candle_deepscale::layers::init::RandomInit;
use candle_deepscale::layers::module::{Activations, ForwardCtx};
use candle_deepscale::layers::parameter::{ParamBuilder, ParamSource, Zero3Construction};
use candle_deepscale::runtime::checkpoint::{save, Checkpoint, SaveSpec};
use candle_deepscale::runtime::engine::{Engine, EngineConfig};
use candle_deepscale::runtime::lr_schedules::LrSchedule;
use candle_deepscale::runtime::topology::Topology;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use zoo::gpt2::Gpt2;

const BATCH: usize = 4;
const SEQ: usize = 12;

fn batch(step: usize) -> (Tensor, Tensor) {
    let data: Vec<u32> = (0..BATCH * (SEQ + 1))
        .map(|i| ((i * 31 + step * 17 + 3) % 257) as u32)
        .collect();
    let t = Tensor::from_vec(data, (BATCH, SEQ + 1), &Device::Cpu).unwrap();
    (t.narrow(1, 0, SEQ).unwrap(), t.narrow(1, 1, SEQ).unwrap())
}

fn config(stage: u8, dp: usize) -> EngineConfig {
    EngineConfig {
        zero_stage: stage,
        train_micro_batch_size_per_gpu: BATCH / dp,
        reduce_bucket_size: 6000,
        lr_schedule: LrSchedule::Constant(2e-3),
        gradient_clipping: 1.0,
        stage3: candle_deepscale::runtime::zero::Stage3Config {
            // The tiny model's matrices partitioned, its LayerNorms and biases whole.
            param_persistence_threshold: 1000,
            ..Default::default()
        },
        ..Default::default()
    }
}

struct Out {
    losses: Vec<f64>,
    /// Full logits of a fixed input before training (after loading).
    logits: Tensor,
    params: Vec<(String, Tensor)>,
}

/// Runs `steps` iterations on tp x dp ranks with ZeRO `stage`, starting from `load` when given,
/// saving to `save_to` at the end when given.
fn run(
    tp: usize,
    dp: usize,
    stage: u8,
    steps: usize,
    load: Option<&Path>,
    save_to: Option<&Path>,
) -> Out {
    run_with(tp, dp, stage, steps, load, save_to, false)
}

/// [`run`]; `device_states` keeps ZeRO's buffers as device tensors (the GPU's path).
fn run_with(
    tp: usize,
    dp: usize,
    stage: u8,
    steps: usize,
    load: Option<&Path>,
    save_to: Option<&Path>,
    device_states: bool,
) -> Out {
    let topo = Topology::new(1, dp, tp).unwrap();
    let mut outs = InProcessWorld::run(tp * dp, Duration::from_secs(120), |comm| {
        let rank = comm.rank();
        let comm: Arc<dyn Communicator> = comm;
        let tp_g = ProcessGroup::new(comm.clone(), topo.model_group(rank)).unwrap();
        let dp_g = ProcessGroup::new(comm.clone(), topo.data_group(rank)).unwrap();
        let dp_rank = dp_g.rank;
        let ck = load.map(|p| Checkpoint::open(p).unwrap());
        let init = RandomInit { seed: 21 };
        let src: &dyn ParamSource = match &ck {
            Some(c) => c,
            None => &init,
        };
        let zero3 = (stage == 3).then_some(Zero3Construction {
            parts: dp,
            rank: dp_rank,
            persistence_threshold: 1000,
        });
        let model = Arc::new(Gpt2::new(
            &common::tiny_gpt2_config(),
            &ParamBuilder::new(src, &Device::Cpu, DType::F32)
                .with_tp(Some(tp_g.clone()))
                .with_zero3(zero3),
        )?);
        let mut engine = Engine::new(
            model.clone(),
            EngineConfig {
                device_states: Some(device_states),
                ..config(stage, dp)
            },
            Some(dp_g),
            Some(tp_g.clone()),
        )?;
        if let Some(c) = &ck {
            c.restore(&mut engine, true)?;
        }
        let probe = batch(1000).0;
        let logits = engine.gathered(|| {
            model
                .full_logits(&model.forward(&probe, &ForwardCtx::eval())?)?
                .copy()
        })?;
        let start = engine.iteration() as usize;
        let mut losses = Vec::new();
        for step in start..start + steps {
            let (x, y) = batch(step);
            let (x, y) = (
                x.narrow(0, dp_rank * BATCH / dp, BATCH / dp)?,
                y.narrow(0, dp_rank * BATCH / dp, BATCH / dp)?,
            );
            let m = &model;
            let r = engine.train_batch(vec![(Activations::new(x), move |o: &Activations| {
                m.loss(&o.hidden, &y)
            })])?;
            losses.push(r.loss);
        }
        if let Some(dir) = save_to {
            save(
                &engine,
                &SaveSpec {
                    dir,
                    consumed_samples: (engine.iteration() as usize * BATCH) as u64,
                    seed: 21,
                    lr_schedule: LrSchedule::Constant(2e-3),
                    model: serde_json::json!({"type": "gpt2", "config": model.config}),
                    extra_files: vec![],
                    keep_last: Some(2),
                    first_layer: 0,
                },
            )?;
        }
        let params = engine.gathered(|| {
            Ok(model
                .parameters()
                .iter()
                .map(|p| {
                    (
                        p.meta.name.clone(),
                        common::tp::gather(Some(&tp_g), p, &p.tensor().copy().unwrap()),
                    )
                })
                .collect())
        })?;
        Ok(Out {
            losses,
            logits,
            params,
        })
    });
    outs.remove(0).unwrap()
}

fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d / b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-12)
}

/// Checkpoints of device-resident ZeRO states (the GPU's path, on CPU tensors): resume is
/// bit-exact at ZeRO-2 (tp 2 x dp 2) and ZeRO-3 (dp 2), and a host-path checkpoint continues on
/// the device path as the host path does.
#[test]
fn device_resident_states_save_and_resume() {
    for (tp, dp, stage) in [(2, 2, 2), (1, 2, 3)] {
        let tmp = tempfile::tempdir().unwrap();
        let whole = run_with(tp, dp, stage, 6, None, None, true);
        run_with(tp, dp, stage, 3, None, Some(tmp.path()), true);
        let rest = run_with(tp, dp, stage, 3, Some(tmp.path()), None, true);
        assert_eq!(
            &whole.losses[3..],
            &rest.losses[..],
            "device states tp {tp} dp {dp} ZeRO-{stage}: losses after resume"
        );
        for ((n, a), (_, b)) in whole.params.iter().zip(&rest.params) {
            assert_eq!(common::max_abs_diff(a, b), 0.0, "{n}");
        }
        let host_rest = run(tp, dp, stage, 3, Some(tmp.path()), None);
        for (a, b) in host_rest.losses.iter().zip(&rest.losses) {
            assert!((a - b).abs() <= 1e-5 * b.abs(), "host {a} vs device {b}");
        }
    }
}

#[test]
fn resume_is_bit_exact_in_the_same_layout() {
    for (tp, dp, stage) in [(1, 1, 0), (2, 2, 2)] {
        let tmp = tempfile::tempdir().unwrap();
        let whole = run(tp, dp, stage, 8, None, None);
        let first = run(tp, dp, stage, 4, None, Some(tmp.path()));
        let rest = run(tp, dp, stage, 4, Some(tmp.path()), None);
        assert_eq!(&whole.losses[..4], &first.losses[..]);
        assert_eq!(
            &whole.losses[4..],
            &rest.losses[..],
            "tp {tp} dp {dp} ZeRO-{stage}: losses after resume"
        );
        for ((n, a), (_, b)) in whole.params.iter().zip(&rest.params) {
            assert_eq!(common::max_abs_diff(a, b), 0.0, "{n}");
        }
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("latest")).unwrap(),
            "global_step4"
        );
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("latest_checkpointed_iteration.txt")).unwrap(),
            "4"
        );
    }
}

#[test]
fn a_checkpoint_loads_into_other_layouts_and_training_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let saved = run(2, 2, 2, 4, None, Some(tmp.path()));
    let cont = run(2, 2, 2, 3, Some(tmp.path()), None);
    let _ = saved;
    for (tp, dp, stage) in [
        (1, 1, 0),
        (4, 1, 0),
        (1, 2, 1),
        (2, 1, 0),
        (1, 4, 2),
        (2, 2, 3),
        (1, 4, 3),
    ] {
        let other = run(tp, dp, stage, 3, Some(tmp.path()), None);
        let r = rel(&other.logits, &cont.logits);
        assert!(
            r < 1e-6,
            "tp {tp} dp {dp} ZeRO-{stage}: logits differ by {r}"
        );
        for (s, (a, b)) in other.losses.iter().zip(&cont.losses).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b,
                "tp {tp} dp {dp} ZeRO-{stage} step {s}: {a} vs {b}"
            );
        }
    }
    // A ZeRO-3 checkpoint (each rank's fp32 pieces) loads into one rank and into ZeRO-3 again.
    let tmp3 = tempfile::tempdir().unwrap();
    run(2, 2, 3, 4, None, Some(tmp3.path()));
    for (tp, dp, stage) in [(1, 1, 0), (1, 2, 3)] {
        let other = run(tp, dp, stage, 3, Some(tmp3.path()), None);
        let r = rel(&other.logits, &cont.logits);
        assert!(
            r < 1e-5,
            "from ZeRO-3 into tp {tp} dp {dp} ZeRO-{stage}: logits differ by {r}"
        );
        for (s, (a, b)) in other.losses.iter().zip(&cont.losses).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b,
                "from ZeRO-3 into tp {tp} dp {dp} ZeRO-{stage} step {s}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn interrupted_and_corrupt_saves() {
    let tmp = tempfile::tempdir().unwrap();
    run(1, 2, 2, 2, None, Some(tmp.path()));
    // A later save that died part-way: files of one rank, no manifest, `latest` untouched.
    let partial = tmp.path().join("global_step9");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(
        partial.join("mp_rank_00_dp_rank_000.safetensors"),
        b"partial",
    )
    .unwrap();
    let ck = Checkpoint::open(tmp.path()).unwrap();
    assert_eq!(ck.manifest.iteration, 2);
    assert!(ck.logical("layers.0.mlp.dense_h_to_4h.weight").is_ok());
    // The partial tag itself is refused with the file named.
    let e = Checkpoint::open(&partial).err().unwrap().to_string();
    assert!(e.contains("global_step9") && e.contains("latest"), "{e}");
    // A truncated rank file is named.
    let f = tmp
        .path()
        .join("global_step2/mp_rank_00_dp_rank_001.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = Checkpoint::open(tmp.path()).err().unwrap().to_string();
    assert!(e.contains("global_step2"), "{e}");
    // --keep-last 2: older tags are pruned.
    let keep = tempfile::tempdir().unwrap();
    for _ in 0..3 {
        let start = Checkpoint::open(keep.path()).ok().map(|_| keep.path());
        run(1, 1, 0, 1, start, Some(keep.path()));
    }
    let tags: Vec<String> = std::fs::read_dir(keep.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("global_step"))
        .collect();
    assert_eq!(tags.len(), 2, "{tags:?}");
}
