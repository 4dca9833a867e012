//! The GPU suite (features `cuda` + `nccl`; `cargo test -p deepscale --features nccl --test gpu`):
//! the equivalence tests again with tensors on CUDA devices, on 1 and 2 GPUs. Each test skips
//! (saying so) when the machine has too few GPUs, unless DEEPSCALE_REQUIRE_GPU=1 makes that a
//! failure. CI only compiles this file (it has no GPU); results on real GPUs are in the README.
mod common;

use candle_core::{DType, Device, Tensor};
use candle_deepscale::comm::nccl::NcclComm;
use candle_deepscale::comm::{Communicator, ProcessGroup, ReduceOp};
use candle_deepscale::layers::init::RandomInit;
use candle_deepscale::layers::module::Activations;
use candle_deepscale::layers::parameter::ParamBuilder;
use candle_deepscale::runtime::adamw::AdamWConfig;
use candle_deepscale::runtime::engine::{Engine, EngineConfig};
use candle_deepscale::runtime::lr_schedules::LrSchedule;
use candle_deepscale::runtime::topology::Topology;
use common::tp::gather;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use zoo::gpt2::Gpt2;

const STEPS: usize = 10;
const GLOBAL_BATCH: usize = 4;
const SEQ: usize = 12;

/// `n` CUDA devices, or None (and a note) when the machine has fewer.
fn gpus(n: usize) -> Option<Vec<Device>> {
    let count = candle_core::cuda_backend::cudarc::driver::CudaContext::device_count()
        .map(|c| c.max(0) as usize)
        .unwrap_or(0);
    if count < n {
        let msg = format!("needs {n} GPU(s), this machine has {count}");
        if std::env::var("DEEPSCALE_REQUIRE_GPU").as_deref() == Ok("1") {
            panic!("{msg}")
        }
        eprintln!("skipped: {msg}");
        return None;
    }
    Some((0..n).map(|i| Device::new_cuda(i).unwrap()).collect())
}

fn batch(step: usize) -> Tensor {
    let data: Vec<u32> = (0..GLOBAL_BATCH * (SEQ + 1))
        .map(|i| ((i * 31 + step * 17 + (i / 13) * 5 + 3) % 257) as u32)
        .collect();
    Tensor::from_vec(data, (GLOBAL_BATCH, SEQ + 1), &Device::Cpu).unwrap()
}

fn config(stage: u8, micro: usize) -> EngineConfig {
    EngineConfig {
        zero_stage: stage,
        train_micro_batch_size_per_gpu: micro,
        gradient_accumulation_steps: 1,
        reduce_bucket_size: 6000,
        optimizer: AdamWConfig {
            lr: 1e-3,
            weight_decay: 0.01,
            ..Default::default()
        },
        lr_schedule: LrSchedule::Constant(1e-3),
        gradient_clipping: 1.0,
        ..Default::default()
    }
}

struct Run {
    losses: Vec<f64>,
    params: BTreeMap<String, Tensor>,
}

/// Trains the tiny GPT-2 on `device` as rank `rank` of `tp x dp` (comm None: one rank).
fn train(
    device: &Device,
    comm: Option<Arc<dyn Communicator>>,
    tp: usize,
    dp: usize,
    cfg: EngineConfig,
    dtype: DType,
) -> candle_core::Result<Run> {
    let topo = Topology::new(1, dp, tp)?;
    let rank = comm.as_ref().map_or(0, |c| c.rank());
    let group = |g: Vec<usize>| -> candle_core::Result<Option<ProcessGroup>> {
        match &comm {
            Some(c) if g.len() > 1 => Ok(Some(ProcessGroup::new(c.clone(), g)?)),
            _ => Ok(None),
        }
    };
    let tp_group = group(topo.model_group(rank))?;
    let dp_group = group(topo.data_group(rank))?;
    let dp_rank = dp_group.as_ref().map_or(0, |g| g.rank);
    let micro = cfg.train_micro_batch_size_per_gpu;
    let model = Arc::new(Gpt2::new(
        &common::tiny_gpt2_config(),
        &ParamBuilder::new(&RandomInit { seed: 5 }, device, dtype).with_tp(tp_group.clone()),
    )?);
    let mut engine = Engine::new(model.clone(), cfg, dp_group, tp_group.clone())?;
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let t = batch(step)
            .narrow(0, dp_rank * micro, micro)?
            .to_device(device)?;
        let x = t.narrow(1, 0, SEQ)?;
        let y = t.narrow(1, 1, SEQ)?;
        let model = &model;
        let r = engine.train_batch(vec![(Activations::new(x), move |out: &Activations| {
            model.loss(&out.hidden.to_dtype(DType::F32)?, &y)
        })])?;
        losses.push(r.loss);
    }
    let params = model
        .parameters()
        .iter()
        .map(|p| {
            let t = p.tensor().to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
            Ok((p.meta.name.clone(), gather(tp_group.as_ref(), p, &t)))
        })
        .collect::<candle_core::Result<_>>()?;
    Ok(Run { losses, params })
}

fn cpu_reference() -> Run {
    train(
        &Device::Cpu,
        None,
        1,
        1,
        config(0, GLOBAL_BATCH),
        DType::F32,
    )
    .unwrap()
}

/// GPU arithmetic differs from the CPU's in summation order (cuBLAS, NCCL rings): 1e-4 relative.
fn assert_close(run: &Run, reference: &Run, what: &str) {
    for (s, (a, b)) in run.losses.iter().zip(&reference.losses).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs(),
            "{what} step {s}: loss {a} vs {b}"
        );
    }
    for (name, p) in &run.params {
        let r = &reference.params[name];
        let diff = (p - r)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = r
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff <= 1e-3 * scale.max(1e-3),
            "{what}: {name} differs by {diff}"
        );
    }
}

/// Runs `f` on every rank of an in-process NCCL world over `devices`.
fn on_ranks<T: Send>(
    devices: &[Device],
    f: impl Fn(&Device, Arc<dyn Communicator>) -> candle_core::Result<T> + Sync,
) -> Vec<T> {
    let comms = NcclComm::in_process(devices, Duration::from_secs(120)).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .zip(devices)
            .map(|(c, d)| {
                let f = &f;
                s.spawn(move || f(d, Arc::new(c)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    })
}

#[test]
fn one_gpu_training_equals_the_cpu_run() {
    let Some(dev) = gpus(1) else { return };
    let reference = cpu_reference();
    let run = train(&dev[0], None, 1, 1, config(0, GLOBAL_BATCH), DType::F32).unwrap();
    assert_close(&run, &reference, "1 GPU");
}

#[test]
fn nccl_collectives_on_device_and_host_buffers() {
    let Some(devs) = gpus(2) else { return };
    on_ranks(&devs, |d, c| {
        let r = c.rank() as f32;
        let g = [0usize, 1];
        let t = Tensor::new(&[r + 1.0, 2.0 * r, 3.0], d)?;
        let sum = c
            .all_reduce_tensor(&g, &t, ReduceOp::Sum)?
            .to_vec1::<f32>()?;
        assert_eq!(sum, [3.0, 2.0, 6.0]);
        let all = c.all_gather_tensor(&g, &t)?.to_vec2::<f32>()?;
        assert_eq!(all, [[1.0, 0.0, 3.0], [2.0, 2.0, 3.0]]);
        let wide = Tensor::new(&[r, 1.0, 2.0, r], d)?;
        let mine = c
            .reduce_scatter_tensor(&g, &wide, ReduceOp::Sum)?
            .to_vec1::<f32>()?;
        assert_eq!(mine, if r == 0.0 { [1.0, 2.0] } else { [4.0, 1.0] });
        let b = c.broadcast_tensor(&g, &t, 1)?.to_vec1::<f32>()?;
        assert_eq!(b, [2.0, 2.0, 3.0]);
        let half = t.to_dtype(DType::BF16)?;
        let hs = c.all_reduce_tensor(&g, &half, ReduceOp::Sum)?;
        assert_eq!(hs.dtype(), DType::BF16);
        if c.rank() == 0 {
            c.send_tensor(1, 7, &t)?;
        } else {
            let got = c.recv_tensor(0, 7, &[3], DType::F32, d)?.to_vec1::<f32>()?;
            assert_eq!(got, [1.0, 0.0, 3.0]);
        }
        let mut host = [r as f64 + 0.5];
        c.all_reduce(&g, &mut host, ReduceOp::Sum)?;
        assert_eq!(host, [2.0]);
        c.barrier(&g)?;
        Ok(())
    });
}

#[test]
fn two_gpus_data_and_tensor_parallel_equal_the_cpu_run() {
    let Some(devs) = gpus(2) else { return };
    let reference = cpu_reference();
    for stage in [0u8, 1, 2] {
        let runs = on_ranks(&devs, |d, c| {
            train(d, Some(c), 1, 2, config(stage, 2), DType::F32)
        });
        for (r, run) in runs.iter().enumerate() {
            assert_close(
                run,
                &reference,
                &format!("2 GPUs dp=2 ZeRO-{stage} rank {r}"),
            );
        }
    }
    let runs = on_ranks(&devs, |d, c| {
        train(d, Some(c), 2, 1, config(1, GLOBAL_BATCH), DType::F32)
    });
    for (r, run) in runs.iter().enumerate() {
        assert_close(run, &reference, &format!("2 GPUs tp=2 rank {r}"));
    }
}

#[test]
fn bf16_on_gpu_learns_and_follows_fp32() {
    let Some(dev) = gpus(1) else { return };
    let fp32 = train(&dev[0], None, 1, 1, config(0, GLOBAL_BATCH), DType::F32).unwrap();
    let cfg = EngineConfig {
        bf16: true,
        ..config(0, GLOBAL_BATCH)
    };
    let bf16 = train(&dev[0], None, 1, 1, cfg, DType::BF16).unwrap();
    assert!(bf16.losses[STEPS - 1] < bf16.losses[0], "{:?}", bf16.losses);
    for (a, b) in bf16.losses.iter().zip(&fp32.losses) {
        assert!((a - b).abs() < 0.05 * b.abs(), "bf16 {a} vs fp32 {b}");
    }
}

/// The command line on GPUs: pipeline, tensor and data parallel layouts of `pretrain-gpt2`
/// follow the one-rank CPU run iteration by iteration.
#[test]
fn pretrain_gpt2_layouts_on_gpus_equal_the_cpu_run() {
    let Some(_) = gpus(2) else { return };
    let assets = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets");
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| -> Vec<f64> {
        let metrics = tmp.path().join(format!("{name}.jsonl"));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_deepscale"))
            .args([
                "pretrain-gpt2",
                "--num-layers",
                "2",
                "--hidden-size",
                "32",
                "--num-attention-heads",
                "2",
                "--seq-length",
                "32",
                "--train-iters",
                "5",
                "--lr",
                "5e-3",
                "--log-interval",
                "1",
                "--eval-interval",
                "0",
                "--hidden-dropout",
                "0",
                "--attention-dropout",
                "0",
                "--sample-length",
                "0",
                "--metrics-file",
                metrics.to_str().unwrap(),
            ])
            .args(extra)
            .env("DEEPSCALE_ASSETS", assets)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read_to_string(&metrics)
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
            .collect()
    };
    let reference = run("cpu", &["--batch-size", "4"]);
    assert_eq!(reference.len(), 5);
    for (name, extra) in [
        ("gpu1", &["--device", "cuda", "--batch-size", "4"][..]),
        (
            "dp2",
            &[
                "--device",
                "cuda",
                "--world-size",
                "2",
                "--batch-size",
                "2",
                "--zero-stage",
                "2",
            ],
        ),
        (
            "tp2",
            &[
                "--device",
                "cuda",
                "--world-size",
                "2",
                "--batch-size",
                "4",
                "--model-parallel-size",
                "2",
            ],
        ),
        (
            "pp2",
            &[
                "--device",
                "cuda",
                "--world-size",
                "2",
                "--batch-size",
                "4",
                "--pipe-parallel-size",
                "2",
            ],
        ),
    ] {
        let got = run(name, extra);
        assert_eq!(got.len(), reference.len(), "{name}");
        for (i, (a, b)) in got.iter().zip(&reference).enumerate() {
            assert!(
                (a - b).abs() <= 1e-3 * b.abs(),
                "{name} iteration {i}: {a} vs {b}"
            );
        }
    }
}
