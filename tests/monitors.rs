//! Monitors, read back by tools no one here wrote: TensorBoard event files (DeepSpeed's config
//! section: `Train/Samples/*`, step = global samples; Megatron's --tensorboard-dir:
//! `learning_rate`, `lm loss`, validation `lm loss value` / `ppl`, step = iteration) through the
//! `tensorboard` package's EventAccumulator, which checks every record's CRC; DeepSpeed's CSV
//! layout; wandb/comet sections as TensorBoard files with the upload command printed; the
//! `steps_per_print` line. The values equal the metrics file's.
mod common;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::cli::{self, ASSETS};

/// Every scalar under `dir` as {tag: [[step, value], ...]}, read by tensorboard's reader.
fn read_events(python: &Path, dir: &Path) -> Value {
    let script = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
ea.Reload()
print(json.dumps({t: [[e.step, e.value] for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}))
"#;
    let out = Command::new(python)
        .args(["-c", script, dir.to_str().unwrap()])
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "tensorboard's reader failed on {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn tb_python() -> Option<PathBuf> {
    common::fixture("tb-venv").map(|d| d.join("bin/python"))
}

/// (iteration, loss, lr, loss_scale) of a training line.
type TrainLine = (u64, f64, f64, f64);

/// The metrics file's training lines and validation losses.
fn metrics(path: &Path) -> (Vec<TrainLine>, Vec<(u64, f64)>) {
    let (mut train, mut valid) = (Vec::new(), Vec::new());
    for l in std::fs::read_to_string(path).unwrap().lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        let it = v["iteration"].as_u64().unwrap();
        if let Some(loss) = v["loss"].as_f64() {
            train.push((
                it,
                loss,
                v["lr"].as_f64().unwrap(),
                v["loss_scale"].as_f64().unwrap(),
            ));
        } else if let Some(vl) = v["valid_loss"].as_f64() {
            valid.push((it, vl));
        }
    }
    (train, valid)
}

fn series(events: &Value, tag: &str) -> Vec<(u64, f64)> {
    events[tag]
        .as_array()
        .unwrap_or_else(|| panic!("no tag `{tag}` in {events}"))
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
        .collect()
}

/// Equal as f32 (TensorBoard's simple_value).
fn close(a: f64, b: f64) -> bool {
    ((a as f32) - (b as f32)).abs() <= 1e-6 * (b.abs() as f32).max(1e-6)
}

fn assert_series(got: &[(u64, f64)], want: &[(u64, f64)], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!(g.0 == w.0 && close(g.1, w.1), "{what}: {got:?} vs {want:?}");
    }
}

fn run(args: &[&str]) -> String {
    String::from_utf8_lossy(&cli::ok(args).stderr).into_owned()
}

fn config(dir: &Path, extra: Value) -> PathBuf {
    let mut cfg = json!({
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "wall_clock_breakdown": true,
        "steps_per_print": 2,
        "tensorboard": {"enabled": true, "output_path": dir.join("ds").to_str().unwrap(), "job_name": "job"},
        "csv_monitor": {"enabled": true, "output_path": dir.join("csv").to_str().unwrap(), "job_name": "job"},
    });
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    let p = dir.join("ds_config.json");
    std::fs::write(&p, cfg.to_string()).unwrap();
    p
}

const TINY: &[&str] = &[
    "pretrain-gpt2",
    "--num-layers",
    "2",
    "--hidden-size",
    "16",
    "--num-attention-heads",
    "2",
    "--seq-length",
    "16",
    "--train-iters",
    "4",
    "--eval-interval",
    "2",
    "--eval-iters",
    "1",
    "--log-interval",
    "1",
    "--sample-length",
    "0",
    "--world-size",
    "2",
    "--deepspeed",
];

#[test]
fn deepspeed_and_megatron_tensorboard_events_and_csv() {
    let Some(py) = tb_python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // wandb: its folder is relative to the working directory, as DeepSpeed's is.
    let cfg = config(
        d,
        json!({"wandb": {"enabled": true, "project": "proj", "team": "me"}, "fp16": {"enabled": true, "initial_scale_power": 8}}),
    );
    let m = d.join("m.jsonl");
    let megatron = d.join("megatron");
    let mut args = TINY.to_vec();
    args.extend([
        "--deepspeed_config",
        cfg.to_str().unwrap(),
        "--metrics-file",
        m.to_str().unwrap(),
        "--tensorboard-dir",
        megatron.to_str().unwrap(),
        "--log-timers-to-tensorboard",
    ]);
    let out = Command::new(env!("CARGO_BIN_EXE_deepscale"))
        .args(&args)
        .current_dir(d)
        .env("DEEPSCALE_ASSETS", ASSETS)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    let (train, valid) = metrics(&m);
    assert_eq!(train.len(), 4);
    let b = 4; // micro 2 x dp 2

    // DeepSpeed's engine events, step = global samples.
    let ds = read_events(&py, &d.join("ds/job"));
    let loss: Vec<_> = train.iter().map(|t| ((t.0 - 1) * b, t.1)).collect();
    assert_series(
        &series(&ds, "Train/Samples/train_loss"),
        &loss,
        "train_loss",
    );
    let lr: Vec<_> = train.iter().map(|t| (t.0 * b, t.2)).collect();
    assert_series(&series(&ds, "Train/Samples/lr"), &lr, "lr");
    let scale: Vec<_> = train.iter().map(|t| (t.0 * b, t.3)).collect();
    assert_series(
        &series(&ds, "Train/Samples/loss_scale"),
        &scale,
        "loss_scale",
    );
    for what in ["forward", "backward", "step"] {
        let s = series(&ds, &format!("Train/Samples/elapsed_time_ms_{what}"));
        assert_eq!(s.len(), 4, "{what}");
        assert!(s.iter().all(|(_, ms)| *ms >= 0.0), "{what}: {s:?}");
    }

    // Megatron's training loop, step = iteration.
    let mg = read_events(&py, &d.join("megatron"));
    let lr: Vec<_> = train.iter().map(|t| (t.0, t.2)).collect();
    assert_series(&series(&mg, "learning_rate"), &lr, "learning_rate");
    let loss: Vec<_> = train.iter().map(|t| (t.0, t.1)).collect();
    assert_series(&series(&mg, "lm loss"), &loss, "lm loss");
    let scale: Vec<_> = train.iter().map(|t| (t.0, t.3)).collect();
    assert_series(&series(&mg, "loss_scale"), &scale, "loss_scale");
    assert_series(&series(&mg, "lm loss value"), &valid, "lm loss value");
    let ppl: Vec<_> = valid.iter().map(|v| (v.0, v.1.min(20.0).exp())).collect();
    assert_series(&series(&mg, "lm loss ppl"), &ppl, "lm loss ppl");
    assert_eq!(series(&mg, "forward_time").len(), 4);

    // DeepSpeed's CSV layout.
    let csv = std::fs::read_to_string(d.join("csv/job/Train_Samples_train_loss.csv")).unwrap();
    let mut lines = csv.split("\r\n");
    assert_eq!(lines.next(), Some("step,train_loss"));
    for t in &train {
        let row = lines.next().unwrap();
        let (step, value) = row.split_once(',').unwrap();
        assert_eq!(step.parse::<u64>().unwrap(), (t.0 - 1) * b);
        assert_eq!(
            value.parse::<f64>().unwrap(),
            t.1,
            "CSV keeps the full value"
        );
    }
    assert!(d.join("csv/job/Train_Samples_lr.csv").is_file());

    // wandb: TensorBoard files and the command that uploads them.
    let wb = read_events(&py, &d.join("wandb_tensorboard/proj"));
    assert_eq!(series(&wb, "Train/Samples/train_loss").len(), 4);
    assert!(
        err.contains("wandb sync --sync-tensorboard --project proj --entity me"),
        "{err}"
    );
    // steps_per_print 2: DeepSpeed's progress line at steps 2 and 4.
    assert_eq!(err.matches("[Rank 0] step=").count(), 2, "{err}");
    assert!(err.contains("[Rank 0] step=2, skipped=0, lr=["), "{err}");
}

#[test]
fn pipeline_events_and_every_section_key_accepted() {
    let Some(py) = tb_python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Every key DeepSpeed 0.19.8 accepts in these sections.
    let cfg = config(
        d,
        json!({
            "wall_clock_breakdown": false,
            "comet": {"enabled": false, "samples_log_interval": 100, "project": "p", "workspace": "w",
                      "api_key": "k", "experiment_name": "e", "experiment_key": "x", "online": false,
                      "mode": "get_or_create"},
            "wandb": {"enabled": false, "group": "g", "team": "t", "project": "p"},
            "comms_logger": {"enabled": false, "verbose": false, "prof_all": true, "prof_ops": ["all_reduce"], "debug": false},
            "flops_profiler": {"enabled": false, "recompute_fwd_factor": 0.0, "profile_step": 1,
                               "module_depth": -1, "top_modules": 1, "detailed": true, "output_file": null}
        }),
    );
    let m = d.join("m.jsonl");
    let mut args = TINY.to_vec();
    args.extend([
        "--deepspeed_config",
        cfg.to_str().unwrap(),
        "--metrics-file",
        m.to_str().unwrap(),
        "--pipe-parallel-size",
        "2",
    ]);
    run(&args);
    let (train, valid) = metrics(&m);
    let ds = read_events(&py, &d.join("ds/job"));
    // The pipeline engine writes train_loss after the step, eval_loss at the samples so far.
    let b = 2; // micro 2 x dp 1
    let loss: Vec<_> = train.iter().map(|t| (t.0 * b, t.1)).collect();
    assert_series(
        &series(&ds, "Train/Samples/train_loss"),
        &loss,
        "pipe train_loss",
    );
    let eval: Vec<_> = valid.iter().map(|v| (v.0 * b, v.1)).collect();
    assert_series(
        &series(&ds, "Train/Samples/eval_loss"),
        &eval,
        "pipe eval_loss",
    );
}

/// comms_logger: DeepSpeed's log_summary table on rank 0; `prof_ops` narrows it; `verbose` prints
/// each op.
#[test]
fn comms_logger_summarises_the_collectives() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = |name: &str, logger: Value| {
        let p = d.join(name);
        std::fs::write(
            &p,
            json!({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
                   "comms_logger": logger})
            .to_string(),
        )
        .unwrap();
        p
    };
    let all = cfg("all.json", json!({"enabled": true, "prof_all": true}));
    let some = cfg(
        "some.json",
        json!({"enabled": true, "prof_all": false, "prof_ops": ["all_reduce"], "verbose": true}),
    );
    // Without validation (its collectives would mix in).
    let mut args = TINY.to_vec();
    let at = args.iter().position(|a| *a == "--eval-interval").unwrap();
    args[at + 1] = "0";
    let summary = |cfg: &Path| {
        let mut a = args.clone();
        a.extend(["--deepspeed_config", cfg.to_str().unwrap()]);
        run(&a)
    };
    let err = summary(&all);
    let table = err
        .split("comms_logger (rank 0):")
        .nth(1)
        .expect("a summary");
    assert!(
        table.contains("Comm. Op            Message Size        Count"),
        "{table}"
    );
    // ZeRO-2 over 2 ranks: gradients reduce-scattered and parameters all-gathered every step.
    let rows: Vec<&str> = table.lines().collect();
    for op in ["reduce_scatter", "all_gather", "all_reduce"] {
        let at = rows
            .iter()
            .position(|l| *l == op)
            .unwrap_or_else(|| panic!("{op}: {table}"));
        let count: u64 = rows[at + 1]
            .split_whitespace()
            .nth(2)
            .unwrap()
            .parse()
            .unwrap();
        assert!(count >= 4, "{op} ran every iteration: {table}");
    }
    let err = summary(&some);
    let table = err
        .split("comms_logger (rank 0):")
        .nth(1)
        .expect("a summary");
    assert!(
        table.contains("all_reduce") && !table.contains("reduce_scatter"),
        "{table}"
    );
    assert!(
        err.contains("comm op: all_reduce | time (ms):"),
        "verbose: {err}"
    );
}

/// flops_profiler: DeepSpeed's report at profile_step, its MACs equal to the model's own count
/// (GPT-2: 12 h^2 per token and layer, the full t x t attention square, the LM head), per layer.
#[test]
fn flops_profiler_reports_the_profile_step() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("profile.txt");
    let cfg = tmp.path().join("fp.json");
    std::fs::write(
        &cfg,
        json!({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
               "flops_profiler": {"enabled": true, "profile_step": 1, "detailed": true,
                                  "output_file": out.to_str().unwrap()}})
        .to_string(),
    )
    .unwrap();
    run(&[
        "pretrain-gpt2",
        "--num-layers",
        "2",
        "--hidden-size",
        "16",
        "--num-attention-heads",
        "2",
        "--seq-length",
        "16",
        "--train-iters",
        "3",
        "--eval-iters",
        "1",
        "--sample-length",
        "0",
        "--deepspeed",
        "--deepspeed_config",
        cfg.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("Profile Summary at step 1:"), "{text}");
    // Per micro-batch: 32 tokens x (2 layers x 12 x 16^2 + 50304 x 16) + 2 x 2 x 2 x 16^2 x 16;
    // two micro-batches.
    let macs = 2 * (32 * (2 * 12 * 256 + 50304 * 16) + 2 * 2 * 2 * 256 * 16);
    assert_eq!(macs, 51_970_048);
    assert!(
        text.contains("fwd MACs per GPU:                                             51.97 MMACs"),
        "{text}"
    );
    for layer in ["(embedding):", "(layers.0):", "(layers.1):", "(final):"] {
        assert!(text.contains(layer), "{layer}: {text}");
    }
    assert!(
        text.contains("(layers.0): 3.28 K, 0.40% Params, 229.38 KMACs"),
        "{text}"
    );
}

/// BERT logs Megatron's loss dict: `lm loss` (masked LM) and `sop loss` (the binary head) apart,
/// whose sum is the loss it trains on — in the log line, the metrics file (`lm_loss`,
/// `sop_loss`, `valid_*`) and Megatron's TensorBoard tags; equal at pp 2 and dp 2 to one rank.
#[test]
fn bert_reports_lm_and_sop_loss_apart() {
    let Some(py) = tb_python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let fields = |m: &Path| -> Vec<Value> {
        std::fs::read_to_string(m)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let mut runs = Vec::new();
    for (name, layout) in [
        ("one", &["--batch-size", "2"][..]),
        (
            "pp2",
            &[
                "--batch-size",
                "2",
                "--world-size",
                "2",
                "--pipe-parallel-size",
                "2",
            ],
        ),
        ("dp2", &["--batch-size", "1", "--world-size", "2"]),
    ] {
        let m = d.join(format!("{name}.jsonl"));
        let tb = d.join(format!("tb-{name}"));
        let mut args = vec![
            "pretrain-bert",
            "--num-layers",
            "2",
            "--hidden-size",
            "32",
            "--num-attention-heads",
            "2",
            "--seq-length",
            "32",
            "--train-iters",
            "4",
            "--log-interval",
            "1",
            "--eval-interval",
            "2",
            "--eval-iters",
            "1",
            "--hidden-dropout",
            "0",
            "--attention-dropout",
            "0",
            "--metrics-file",
            m.to_str().unwrap(),
            "--tensorboard-dir",
            tb.to_str().unwrap(),
        ];
        args.extend(layout);
        let err = run(&args);
        assert!(
            err.contains("| lm loss: ") && err.contains(" | sop loss: "),
            "{err}"
        );
        assert!(err.contains("| sop loss PPL: "), "{err}");
        runs.push((fields(&m), read_events(&py, &tb)));
    }
    let (one, events) = &runs[0];
    for l in one {
        if let Some(loss) = l["loss"].as_f64() {
            let (lm, sop) = (
                l["lm_loss"].as_f64().unwrap(),
                l["sop_loss"].as_f64().unwrap(),
            );
            assert!((lm + sop - loss).abs() <= 1e-5 * loss, "{l}");
            assert!(sop > 0.3 && sop < 1.5 && lm > 5.0, "{l}");
        } else {
            assert!(l["valid_lm_loss"].as_f64().is_some(), "{l}");
            let (lm, sop) = (
                l["valid_lm_loss"].as_f64().unwrap(),
                l["valid_sop_loss"].as_f64().unwrap(),
            );
            assert!(
                (lm + sop - l["valid_loss"].as_f64().unwrap()).abs() <= 1e-5 * lm,
                "{l}"
            );
        }
    }
    // Megatron's TensorBoard tags carry the parts (step = iteration), never the sum as `lm loss`.
    let pick = |key: &str, valid: bool| -> Vec<(u64, f64)> {
        one.iter()
            .filter(|l| l["loss"].is_null() == valid)
            .map(|l| (l["iteration"].as_u64().unwrap(), l[key].as_f64().unwrap()))
            .collect()
    };
    for (tag, key) in [("lm loss", "lm_loss"), ("sop loss", "sop_loss")] {
        assert_series(&series(events, tag), &pick(key, false), tag);
        let valid = pick(&format!("valid_{key}"), true);
        assert_series(&series(events, &format!("{tag} value")), &valid, tag);
        let ppl: Vec<_> = valid.iter().map(|v| (v.0, v.1.min(20.0).exp())).collect();
        assert_series(&series(events, &format!("{tag} ppl")), &ppl, tag);
    }
    // Every layout reports the same parts as one rank.
    for (other, _) in &runs[1..] {
        assert_eq!(other.len(), one.len());
        for (a, b) in one.iter().zip(other) {
            for k in ["lm_loss", "sop_loss", "valid_lm_loss", "valid_sop_loss"] {
                if let (Some(x), Some(y)) = (a[k].as_f64(), b[k].as_f64()) {
                    assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{k}: {a} vs {b}");
                } else {
                    assert_eq!(a[k].is_null(), b[k].is_null(), "{k}: {a} vs {b}");
                }
            }
        }
    }
}
