//! Any candle model through `candle_deepscale::initialize` (the whole-model engine): a candle-nn
//! model built unchanged from DeepScale's `VarBuilder` gets a gradient for every parameter;
//! data parallel 2 with ZeRO 1 and 2 equals one rank over 10 steps; one rank equals the stock
//! candle loop (`VarMap` + `candle_nn::AdamW`); a run saved at dp 2 and resumed at dp 1 equals the
//! uninterrupted run; ZeRO-3 is refused with the reason; the export reloads into the stock model.
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_deepscale::comm::InProcessWorld;
use candle_deepscale::layers::var_builder::NoDecay;
use candle_deepscale::runtime::checkpoint::{self, Checkpoint, SaveSpec};
use candle_deepscale::runtime::config::DeepSpeedConfig;
use candle_deepscale::runtime::lr_schedules::LrSchedule;
use candle_deepscale::{initialize_with, InitOptions};
use candle_nn::{Optimizer, VarBuilder};
use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const GLOBAL: usize = 16;
const STEPS: usize = 10;

/// A candle-nn model as any user writes it: linear, LayerNorm (fused on contiguous inputs),
/// GeLU, a softmax gate (fused `softmax_last_dim`), a head.
struct Mlp {
    l1: candle_nn::Linear,
    ln: candle_nn::LayerNorm,
    l2: candle_nn::Linear,
    head: candle_nn::Linear,
}

impl Mlp {
    fn load(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            l1: candle_nn::linear(3, 32, vb.pp("l1"))?,
            ln: candle_nn::layer_norm(32, 1e-5, vb.pp("ln"))?,
            l2: candle_nn::linear(32, 32, vb.pp("l2"))?,
            head: candle_nn::linear(32, 1, vb.pp("head"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.ln.forward(&self.l1.forward(x)?)?.gelu()?;
        let gate = candle_nn::ops::softmax_last_dim(&self.l2.forward(&h)?)?;
        self.head.forward(&((h * gate)? * 32.0)?)
    }

    fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        (self.forward(x)? - y)?.sqr()?.mean_all()
    }
}

/// Samples `range` of a fixed regression task: y = sin(3 x0) + x1 x2.
fn data(range: std::ops::Range<usize>) -> Result<(Tensor, Tensor)> {
    let n = range.len();
    let x: Vec<f32> = (range.start * 3..range.end * 3)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let y: Vec<f32> = x
        .chunks(3)
        .map(|v| (3.0 * v[0]).sin() + v[1] * v[2])
        .collect();
    Ok((
        Tensor::from_vec(x, (n, 3), &Device::Cpu)?,
        Tensor::from_vec(y, (n, 1), &Device::Cpu)?,
    ))
}

fn config(stage: u8, dp: usize, clip: f64) -> DeepSpeedConfig {
    DeepSpeedConfig::from_json_str(
        &format!(
            r#"{{"train_batch_size": {GLOBAL}, "train_micro_batch_size_per_gpu": {},
                "optimizer": {{"type": "AdamW", "params": {{"lr": 0.01, "weight_decay": 0.01}}}},
                "zero_optimization": {{"stage": {stage}, "reduce_bucket_size": 500}},
                "gradient_clipping": {clip}}}"#,
            GLOBAL / dp
        ),
        "test",
    )
    .expect("config")
}

struct Run {
    losses: Vec<f64>,
    params: BTreeMap<String, Tensor>,
}

fn params_of(engine: &candle_deepscale::runtime::engine::Engine) -> BTreeMap<String, Tensor> {
    engine
        .optimizer()
        .params()
        .iter()
        .map(|p| (p.meta.name.clone(), p.tensor().copy().unwrap()))
        .collect()
}

/// A model and its task: how it is built from a VarBuilder and its loss on samples `range`.
trait Task: Sync {
    type Model;
    fn build(&self, vb: VarBuilder) -> Result<Self::Model>;
    fn loss(&self, m: &Self::Model, range: std::ops::Range<usize>) -> Result<Tensor>;
}

struct MlpTask;

impl Task for MlpTask {
    type Model = Mlp;
    fn build(&self, vb: VarBuilder) -> Result<Mlp> {
        Mlp::load(vb)
    }
    fn loss(&self, m: &Mlp, range: std::ops::Range<usize>) -> Result<Tensor> {
        let (x, y) = data(range)?;
        m.loss(&x, &y)
    }
}

/// candle-transformers' Llama, unchanged, on next-token prediction of stepping sequences.
struct LlamaTask;

struct LlamaModel {
    llama: Llama,
    cache: std::sync::Mutex<Cache>,
}

fn llama_config() -> candle_transformers::models::llama::Config {
    LlamaConfig {
        hidden_size: 32,
        intermediate_size: 64,
        vocab_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: None,
        max_position_embeddings: 6,
        tie_word_embeddings: Some(true),
    }
    .into_config(false)
}

impl Task for LlamaTask {
    type Model = LlamaModel;
    fn build(&self, vb: VarBuilder) -> Result<LlamaModel> {
        let cfg = llama_config();
        Ok(LlamaModel {
            llama: Llama::load(vb, &cfg)?,
            cache: std::sync::Mutex::new(Cache::new(false, DType::F32, &cfg, &Device::Cpu)?),
        })
    }
    fn loss(&self, m: &LlamaModel, range: std::ops::Range<usize>) -> Result<Tensor> {
        let n = range.len();
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in range {
            let (a, d) = ((i * 7 + 3) % 24, 1 + (i * 5) % 3);
            x.extend((0..6).map(|k| ((a + k * d) % 24) as u32));
            y.push(((a + 6 * d) % 24) as u32);
        }
        let x = Tensor::from_vec(x, (n, 6), &Device::Cpu)?;
        let y = Tensor::from_vec(y, n, &Device::Cpu)?;
        let logits = m.llama.forward(&x, 0, &mut m.cache.lock().unwrap())?;
        candle_nn::loss::cross_entropy(&logits, &y)
    }
}

/// `steps` iterations of `task` on `dp` in-process ranks at ZeRO `stage`; optionally saving at
/// the end, or restoring a checkpoint's optimizer state and counters first.
fn train_task<T: Task>(
    task: &T,
    dp: usize,
    stage: u8,
    steps: usize,
    options: InitOptions,
    save: Option<&std::path::Path>,
    load: Option<&Checkpoint>,
) -> Run {
    let cfg = config(stage, dp, 1.0);
    let run = |comm: Option<Arc<InProcessComm>>| -> Result<Run> {
        let (mut engine, vb) = initialize_with(&cfg, comm, options.clone())?;
        let model = task.build(vb)?;
        if let Some(c) = load {
            c.restore(&mut engine, true)?;
        }
        let mut losses = Vec::new();
        for _ in 0..steps {
            let r = engine.sampler().micro_batch(engine.iteration() + 1, 0);
            let report = engine.train_batch_with(vec![|| task.loss(&model, r)])?;
            losses.push(report.loss);
        }
        if let Some(dir) = save {
            checkpoint::save(
                &engine,
                &SaveSpec {
                    dir,
                    consumed_samples: engine.iteration() * GLOBAL as u64,
                    seed: 1234,
                    lr_schedule: LrSchedule::Constant(0.01),
                    model: serde_json::json!({"type": "custom"}),
                    extra_files: Vec::new(),
                    keep_last: None,
                    first_layer: 0,
                },
            )?;
        }
        Ok(Run {
            losses,
            params: params_of(&engine),
        })
    };
    if dp == 1 {
        return run(None).unwrap();
    }
    let mut res = InProcessWorld::run(dp, Duration::from_secs(60), |c| run(Some(c)));
    res.remove(0).unwrap()
}

fn train(
    dp: usize,
    stage: u8,
    steps: usize,
    options: InitOptions,
    save: Option<&std::path::Path>,
    load: Option<&Checkpoint>,
) -> Run {
    train_task(&MlpTask, dp, stage, steps, options, save, load)
}

use candle_deepscale::comm::InProcessComm;

fn close(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let s = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    d / s.max(1e-6)
}

fn assert_runs_match(a: &Run, b: &Run, what: &str) {
    assert_eq!(a.losses.len(), b.losses.len());
    for (i, (x, y)) in a.losses.iter().zip(&b.losses).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * y.abs().max(1e-3),
            "{what}: step {i}: loss {x} vs {y}"
        );
    }
    assert_eq!(a.params.len(), b.params.len(), "{what}");
    for (name, t) in &a.params {
        let e = close(t, &b.params[name]);
        assert!(e < 1e-5, "{what}: parameter {name} differs by {e}");
    }
}

#[test]
fn every_parameter_gets_a_gradient() -> Result<()> {
    assert_every_parameter_learns(&MlpTask, "mlp")?;
    let (engine, vb) = initialize_with(&config(0, 1, 0.0), (), InitOptions::default())?;
    let _model = Mlp::load(vb)?;
    let params = engine.registry().expect("whole-model engine").params();
    assert_eq!(params.len(), 8, "4 weights and 4 biases (LayerNorm's too)");
    // Megatron's no-decay rule: biases and the 1-D LayerNorm weight.
    for p in &params {
        let want = p.meta.shape.len() > 1;
        assert_eq!(p.meta.weight_decay, want, "{}", p.meta.name);
    }
    Ok(())
}

/// Every trainable parameter of `task`'s model gets a non-zero gradient from its loss.
fn assert_every_parameter_learns<T: Task>(task: &T, what: &str) -> Result<()> {
    let (engine, vb) = initialize_with(&config(0, 1, 0.0), (), InitOptions::default())?;
    let model = task.build(vb)?;
    let params = engine.registry().expect("whole-model engine").params();
    let g = task.loss(&model, 0..GLOBAL)?.backward()?;
    for p in &params {
        let n = g
            .get(p.tensor())
            .unwrap_or_else(|| panic!("{what}: {}: no gradient", p.meta.name))
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?;
        assert!(n > 0.0, "{what}: {}: zero gradient", p.meta.name);
    }
    Ok(())
}

#[test]
fn every_llama_parameter_gets_a_gradient() -> Result<()> {
    // RMS norms, rotary embeddings and softmax are candle-nn's fused ops: without the backward
    // DeepScale's candle-nn patch adds, everything before the last norm gets none.
    assert_every_parameter_learns(&LlamaTask, "llama")
}

#[test]
fn data_parallel_zero_1_and_2_equal_one_rank() {
    let one = train(1, 0, STEPS, InitOptions::default(), None, None);
    assert!(one.losses[STEPS - 1] < one.losses[0], "{:?}", one.losses);
    for stage in [1u8, 2] {
        let two = train(2, stage, STEPS, InitOptions::default(), None, None);
        assert_runs_match(&two, &one, &format!("dp 2 ZeRO-{stage}"));
    }
}

#[test]
fn llama_data_parallel_zero_1_and_2_equal_one_rank() {
    let one = train_task(&LlamaTask, 1, 0, STEPS, InitOptions::default(), None, None);
    assert!(one.losses[STEPS - 1] < one.losses[0], "{:?}", one.losses);
    for stage in [1u8, 2] {
        let two = train_task(
            &LlamaTask,
            2,
            stage,
            STEPS,
            InitOptions::default(),
            None,
            None,
        );
        assert_runs_match(&two, &one, &format!("llama dp 2 ZeRO-{stage}"));
    }
}

#[test]
fn one_rank_equals_the_stock_candle_loop() -> Result<()> {
    // The engine with no clipping and decay on every parameter, as candle_nn::AdamW does.
    let cfg = config(0, 1, 0.0);
    let options = InitOptions {
        no_decay: NoDecay::None,
        ..Default::default()
    };
    let (mut engine, vb) = initialize_with(&cfg, (), options)?;
    let model = Mlp::load(vb)?;
    // The engine takes the model's parameters now (it would at the first backward).
    engine.prepare()?;
    // The stock model, from a VarMap holding the same initial values.
    let map = candle_nn::VarMap::new();
    let stock = Mlp::load(VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu))?;
    let ours = params_of(&engine);
    for (name, var) in map.data().lock().unwrap().iter() {
        var.set(&ours[name])?;
    }
    let mut opt = candle_nn::AdamW::new(
        map.all_vars(),
        candle_nn::ParamsAdamW {
            lr: 0.01,
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    for step in 0..STEPS {
        let (x, y) = data(step * GLOBAL..(step + 1) * GLOBAL)?;
        let ours = engine.train_batch_with(vec![|| model.loss(&x, &y)])?.loss;
        let loss = stock.loss(&x, &y)?;
        opt.backward_step(&loss)?;
        let theirs = loss.to_scalar::<f32>()? as f64;
        assert!(
            (ours - theirs).abs() <= 1e-5 * theirs.abs(),
            "step {step}: loss {ours} vs stock {theirs}"
        );
    }
    let ours = params_of(&engine);
    for (name, var) in map.data().lock().unwrap().iter() {
        let e = close(&ours[name], var.as_tensor());
        assert!(e < 1e-5, "{name} differs from the stock loop by {e}");
    }
    Ok(())
}

#[test]
fn saved_at_dp_2_resumed_at_dp_1_equals_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let whole = train(2, 2, STEPS, InitOptions::default(), None, None);
    let first = train(
        2,
        2,
        STEPS / 2,
        InitOptions::default(),
        Some(dir.path()),
        None,
    );
    assert_eq!(first.losses[..], whole.losses[..STEPS / 2]);
    let ck = Checkpoint::open(dir.path()).unwrap();
    let options = InitOptions {
        weights: Some(Arc::new(Checkpoint::open(dir.path()).unwrap())),
        ..Default::default()
    };
    let rest = train(1, 0, STEPS / 2, options, None, Some(&ck));
    let resumed = Run {
        losses: first.losses.iter().chain(&rest.losses).copied().collect(),
        params: rest.params,
    };
    assert_runs_match(&resumed, &whole, "dp 2 -> save -> dp 1");
}

#[test]
fn zero_3_and_activation_checkpointing_are_refused_with_the_reason() {
    let err = initialize_with(&config(3, 1, 0.0), (), InitOptions::default())
        .err()
        .expect("ZeRO-3 refused")
        .to_string();
    assert!(
        err.contains("ZeRO stage 3") && err.contains("list of layers"),
        "{err}"
    );
    let err = candle_deepscale::runtime::engine::Engine::whole_model(
        Default::default(),
        candle_deepscale::runtime::engine::EngineConfig {
            checkpoint_num_layers: 1,
            ..Default::default()
        },
        None,
    )
    .err()
    .expect("activation checkpointing refused")
    .to_string();
    assert!(
        err.contains("activation checkpointing") && err.contains("list of layers"),
        "{err}"
    );
    // A layer-list method on a whole-model engine says what to do instead.
    let (mut engine, vb) = initialize_with(&config(0, 1, 0.0), (), InitOptions::default()).unwrap();
    let _model = Mlp::load(vb).unwrap();
    let x = candle_deepscale::Activations::new(
        Tensor::zeros((1, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = engine
        .train_batch(vec![(x, |o: &candle_deepscale::Activations| {
            o.hidden.sum_all()
        })])
        .expect_err("refused")
        .to_string();
    assert!(err.contains("Engine::backward"), "{err}");
}

#[test]
fn the_export_reloads_into_the_stock_model() -> Result<()> {
    let (mut engine, vb) = initialize_with(&config(0, 1, 0.0), (), InitOptions::default())?;
    let model = Mlp::load(vb)?;
    let (x, y) = data(0..GLOBAL)?;
    engine.train_batch_with(vec![|| model.loss(&x, &y)])?;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    engine.registry().unwrap().save_safetensors(&path, true)?;
    // SAFETY: the file was just written and is not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &Device::Cpu)? };
    let stock = Mlp::load(vb)?;
    let (a, b) = (model.forward(&x)?, stock.forward(&x)?);
    assert_eq!(close(&a, &b), 0.0);
    // A frozen rule keeps matching parameters out of training (a plain tensor, no optimizer state).
    let (engine, vb) = initialize_with(
        &config(0, 1, 0.0),
        (),
        InitOptions {
            frozen: Some(regex::Regex::new(r"^l1\.").unwrap()),
            ..Default::default()
        },
    )?;
    let _m = Mlp::load(vb)?;
    let names: Vec<String> = engine
        .registry()
        .unwrap()
        .params()
        .iter()
        .map(|p| p.meta.name.clone())
        .collect();
    assert!(!names.iter().any(|n| n.starts_with("l1.")), "{names:?}");
    assert_eq!(
        engine.registry().unwrap().frozen_names(),
        ["l1.bias", "l1.weight"]
    );
    Ok(())
}

/// The DeepSpeed config's monitor sections in whole-model mode: DeepSpeed's CSV layout with the
/// engine's train_loss at global-sample steps (values equal the losses), TensorBoard event files,
/// and the flops profiler's summary at its step (totals: there is no module tree here).
#[test]
fn monitors_work_in_whole_model_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let report = d.join("flops.txt");
    let cfg = DeepSpeedConfig::from_json_str(
        &serde_json::json!({
            "train_batch_size": GLOBAL, "train_micro_batch_size_per_gpu": GLOBAL / 2,
            "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
            "zero_optimization": {"stage": 2},
            "tensorboard": {"enabled": true, "output_path": d.join("tb"), "job_name": "job"},
            "csv_monitor": {"enabled": true, "output_path": d.join("csv"), "job_name": "job"},
            "flops_profiler": {"enabled": true, "profile_step": 2, "output_file": report},
        })
        .to_string(),
        "monitors",
    )
    .unwrap();
    let losses = InProcessWorld::run(2, Duration::from_secs(60), |comm| {
        let (mut engine, vb) = initialize_with(&cfg, Some(comm), InitOptions::default())?;
        let model = MlpTask.build(vb)?;
        let mut losses = Vec::new();
        for _ in 0..4 {
            let r = engine.sampler().micro_batch(engine.iteration() + 1, 0);
            losses.push(
                engine
                    .train_batch_with(vec![|| MlpTask.loss(&model, r)])?
                    .loss,
            );
        }
        Ok(losses)
    })
    .remove(0)
    .unwrap();
    let csv = std::fs::read_to_string(d.join("csv/job/Train_Samples_train_loss.csv")).unwrap();
    let rows: Vec<&str> = csv.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(rows[0], "step,train_loss");
    assert_eq!(rows.len(), 5, "{csv}");
    for (i, (row, loss)) in rows[1..].iter().zip(&losses).enumerate() {
        let (step, v) = row.split_once(',').unwrap();
        assert_eq!(step.parse::<usize>().unwrap(), i * GLOBAL, "{row}");
        let v: f64 = v.parse().unwrap();
        assert!(
            (v - loss).abs() <= 1e-6 * loss.abs().max(1e-6),
            "{v} vs {loss}"
        );
    }
    let events: Vec<_> = std::fs::read_dir(d.join("tb/job"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        events.iter().any(|f| f.starts_with("events.out.tfevents.")),
        "{events:?}"
    );
    let text = std::fs::read_to_string(&report).unwrap();
    assert!(text.contains("Profile Summary at step 2:"), "{text}");
    assert!(text.contains("fwd MACs per GPU:"), "{text}");
}
