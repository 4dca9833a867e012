//! `deepscale pretrain-gpt2` on several in-process ranks: the tp x dp ZeRO-2 run equals the 1-rank
//! run; DeepSpeed configs and Megatron's flags are read, checked against each other, or refused.
use std::path::Path;
use std::process::{Command, Output};

const ASSETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets");

fn deepscale(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepscale"))
        .args(args)
        .env("DEEPSCALE_ASSETS", ASSETS)
        .output()
        .expect("run deepscale")
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "deepscale failed: {stderr}");
    stderr
}

fn fails_with(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected an error; stderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "panic instead of an error: {stderr}"
    );
    for n in needles {
        assert!(stderr.contains(n), "error message lacks `{n}`: {stderr}");
    }
}

/// A tiny model on the shipped corpus, no dropout, `iters` iterations logged one by one.
fn tiny(iters: &str, metrics: &Path) -> Vec<String> {
    [
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
        iters,
        "--lr",
        "5e-3",
        "--log-interval",
        "1",
        "--eval-interval",
        "0",
        "--eval-iters",
        "1",
        "--hidden-dropout",
        "0",
        "--attention-dropout",
        "0",
        "--sample-length",
        "0",
        // Scratch files are reused between runs here.
        "--overwrite",
        "--metrics-file",
        metrics.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run(args: &[String], extra: &[&str]) -> Output {
    let mut all: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    all.extend_from_slice(extra);
    deepscale(&all)
}

/// The training lines of a metrics file (validation lines carry `valid_loss` instead of `loss`).
fn metrics(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l.get("loss").is_some())
        .collect()
}

#[test]
fn tp2_dp2_zero2_run_equals_the_one_rank_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (m1, m4) = (tmp.path().join("one.jsonl"), tmp.path().join("four.jsonl"));
    ok(&run(&tiny("5", &m1), &["--batch-size", "4"]));
    let stderr = ok(&run(
        &tiny("5", &m4),
        &[
            "--batch-size",
            "2",
            "--world-size",
            "4",
            "--model-parallel-size",
            "2",
            "--zero-stage",
            "2",
            "--zero-reduce-bucket-size",
            "20000",
        ],
    ));
    assert!(
        stderr.contains("ZeRO-2") && stderr.contains("vs formula"),
        "{stderr}"
    );
    let (one, four) = (metrics(&m1), metrics(&m4));
    assert_eq!(one.len(), 5);
    assert_eq!(four.len(), 5);
    for (a, b) in four.iter().zip(&one) {
        let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!(
            (la - lb).abs() <= 1e-5 * lb,
            "iteration {}: loss {la} vs {lb}",
            a["iteration"]
        );
        assert_eq!(
            (a["tp"].as_u64(), a["dp"].as_u64(), a["zero_stage"].as_u64()),
            (Some(2), Some(2), Some(2))
        );
        assert!(
            a["model_state_bytes"].as_u64().unwrap() < b["model_state_bytes"].as_u64().unwrap()
        );
    }
    assert!(one[4]["loss"].as_f64().unwrap() < one[0]["loss"].as_f64().unwrap());
    // ZeRO-3 over the same tp 2 x dp 2 (the word embedding is partitioned, the rest persistent
    // under the default threshold; a lower one partitions the blocks too).
    let m3 = tmp.path().join("zero3.jsonl");
    let stderr = ok(&run(
        &tiny("5", &m3),
        &[
            "--batch-size",
            "2",
            "--world-size",
            "4",
            "--model-parallel-size",
            "2",
            "--zero-stage",
            "3",
        ],
    ));
    assert!(stderr.contains("ZeRO-3"), "{stderr}");
    let three = metrics(&m3);
    for (a, b) in three.iter().zip(&one) {
        let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!(
            (la - lb).abs() <= 1e-5 * lb,
            "ZeRO-3 iteration {}: {la} vs {lb}",
            a["iteration"]
        );
        assert_eq!(a["zero_stage"].as_u64(), Some(3));
    }
    let two_bytes = four[0]["model_state_bytes"].as_u64().unwrap();
    assert!(three[0]["model_state_bytes"].as_u64().unwrap() < two_bytes);
    // The loss curve lands next to the metrics file.
    let png = std::fs::read(tmp.path().join("four.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
}

#[test]
fn deepspeed_config_and_the_seed_scripts_flags_are_honoured() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ds.json");
    std::fs::write(
        &config,
        r#"{
  "train_batch_size": 4,
  "gradient_accumulation_steps": 2,
  "zero_optimization": {"stage": 2, "reduce_bucket_size": 20000, "allgather_bucket_size": 20000,
                        "contiguous_gradients": true, "reduce_scatter": true},
  "optimizer": {"type": "Adam", "params": {"lr": 0.005, "weight_decay": 0.01}},
  "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.005, "warmup_num_steps": 2}},
  "gradient_clipping": 1.0,
  "activation_checkpointing": {"partition_activations": true, "cpu_checkpointing": true},
  "wall_clock_breakdown": true
}"#,
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    let m = tmp.path().join("m.jsonl");
    let data = format!("{ASSETS}/data/sample.jsonl");
    // Every accepted seed-script flag at once; each one that is built in says so.
    let stderr = ok(&run(
        &tiny("3", &m),
        &[
            "--world-size",
            "4",
            "--model-parallel-size",
            "2",
            "--deepspeed",
            "--deepspeed_config",
            cfg,
            "--gas",
            "2",
            "--zero-stage",
            "2",
            "--zero-reduce-bucket-size",
            "20000",
            "--zero-allgather-bucket-size",
            "20000",
            "--zero-contigious-gradients",
            "--zero-reduce-scatter",
            "--checkpoint-activations",
            "--deepspeed-activation-checkpointing",
            "--partition-activations",
            "--checkpoint-in-cpu",
            "--contigious-checkpointing",
            "--synchronize-each-layer",
            "--cpu-optimizer",
            "--data-impl",
            "mmap",
            "--split",
            "949,50,1",
            "--tokenizer-type",
            "GPT2BPETokenizer",
            "--distributed-backend",
            "nccl",
            "--train-data",
            &data,
            "--lazy-loader",
            "--no-load-optim",
            "--loose-json",
            "--text-key",
            "text",
        ],
    ));
    for flag in [
        "--zero-contigious-gradients",
        "--zero-reduce-scatter",
        "--deepspeed-activation-checkpointing",
        "--contigious-checkpointing",
        "--synchronize-each-layer",
        "--cpu-optimizer",
        "--no-load-optim",
        "--lazy-loader",
        "--distributed-backend",
        "--data-impl",
    ] {
        assert!(
            stderr.contains(&format!("note: {flag}")),
            "no note for {flag}: {stderr}"
        );
    }
    let lines = metrics(&m);
    // wall_clock_breakdown: DeepSpeed's timing line, and the same split in the metrics, within
    // the iteration's time.
    assert!(
        stderr.contains(" time (ms) | forward: ") && stderr.contains(" | optimizer_step: "),
        "{stderr}"
    );
    for l in &lines {
        let part = |k: &str| l[k].as_f64().unwrap_or_else(|| panic!("no {k}: {l}"));
        let (f, b, s) = (
            part("forward_ms"),
            part("backward_ms"),
            part("optimizer_step_ms"),
        );
        assert!(f > 0.0 && b > 0.0 && s > 0.0, "{l}");
        assert!(f + b + s <= part("ms_per_step") + 1.0, "{l}");
    }
    // WarmupLR, log warmup over 2 steps, stepped as DeepSpeed steps it (after each update, from
    // last_batch_iteration -1): warmup_min_lr at the first two steps, the max from the third on.
    assert_eq!(lines[0]["lr"].as_f64(), Some(0.0));
    assert_eq!(lines[1]["lr"].as_f64(), Some(0.0));
    assert!((lines[2]["lr"].as_f64().unwrap() - 0.005).abs() < 1e-12);
    assert_eq!(lines[0]["zero_stage"].as_u64(), Some(2));

    // Flags against the config: each disagreement is an error naming both.
    let base = tiny("1", &m);
    let with = |extra: &[&str]| {
        let mut v = vec!["--deepscale", "--deepscale-config", cfg];
        v.extend_from_slice(extra);
        run(&base, &v)
    };
    fails_with(
        &with(&["--batch-size", "3"]),
        &["inconsistent batch sizes", "train_batch_size 4"],
    );
    fails_with(
        &with(&["--gas", "4"]),
        &["--gas 4", "gradient_accumulation_steps 2"],
    );
    fails_with(
        &with(&["--zero-stage", "1"]),
        &["--zero-stage 1", "zero_optimization.stage 2"],
    );
    fails_with(
        &with(&["--clip-grad", "0.5"]),
        &["--clip-grad 0.5", "gradient_clipping 1"],
    );
    fails_with(
        &run(&base, &["--deepscale"]),
        &["--deepscale needs --deepscale-config"],
    );
    // The shipped ZeRO-3 config (fp16, stage-3 knobs) trains, with the seed's ZeRO-3 flags
    // noted.
    let z3 = format!("{ASSETS}/megatron-lm-v1.1.5-zero3/ds_zero_stage_3_config.json");
    let stderr = ok(&run(
        &base,
        &[
            "--deepscale",
            "--deepscale-config",
            &z3,
            "--world-size",
            "2",
            "--scattered-embeddings",
            "--split-transformers",
        ],
    ));
    assert!(
        stderr.contains("ZeRO-3") && stderr.contains("note: --scattered-embeddings"),
        "{stderr}"
    );
    // Missing files are named.
    fails_with(
        &run(&base, &["--deepscale-config", "/nonexistent/ds.json"]),
        &["/nonexistent/ds.json"],
    );
    fails_with(
        &run(&base, &["--data-path", "/nonexistent/corpus"]),
        &["/nonexistent/corpus"],
    );
    fails_with(
        &run(&base, &["--merge-file", "/nonexistent/merges.txt"]),
        &["/nonexistent/merges.txt"],
    );
}

#[test]
fn unsupported_seed_script_flags_are_refused_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m.jsonl");
    let base = tiny("1", &m);
    for (extra, flag) in [
        (
            vec!["--memory-centric-tiled-linear"],
            "--memory-centric-tiled-linear",
        ),
        (vec!["--tile-factor", "4"], "--tile-factor"),
        (
            vec!["--tokenizer-type", "BertWordPieceLowerCase"],
            "--tokenizer-type",
        ),
    ] {
        fails_with(&run(&base, &extra), &["not supported", flag, "because"]);
    }
}

#[test]
fn save_then_load_continues_bit_exactly_and_other_commands_load_it() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    let (m_whole, m_resumed) = (
        tmp.path().join("whole.jsonl"),
        tmp.path().join("resumed.jsonl"),
    );
    let layout = [
        "--world-size",
        "2",
        "--zero-stage",
        "2",
        "--lr-decay-iters",
        "6",
    ];
    // Dropout on: the resumed run must draw the same masks.
    let tiny = |iters: &str, m: &Path| -> Vec<String> {
        let mut v = tiny(iters, m);
        let at = v.iter().position(|a| a == "--hidden-dropout").unwrap();
        v[at + 1] = "0.1".into();
        v
    };
    let mut whole = layout.to_vec();
    whole.extend(["--train-iters", "6"]);
    let mut args = tiny("6", &m_whole);
    args.retain(|a| a != "--train-iters" && a != "6");
    ok(&run(&args, &whole));
    // Interrupted after 3 of 6 iterations, then resumed from the checkpoint.
    let mut first = layout.to_vec();
    first.extend([
        "--train-iters",
        "3",
        "--save",
        ck.to_str().unwrap(),
        "--save-interval",
        "2",
        "--keep-last",
        "1",
    ]);
    let scratch = tmp.path().join("scratch.jsonl");
    let mut args = tiny("3", &scratch);
    args.retain(|a| a != "--train-iters" && a != "3");
    ok(&run(&args, &first));
    assert_eq!(
        std::fs::read_to_string(ck.join("latest")).unwrap(),
        "global_step3"
    );
    assert!(
        !ck.join("global_step2").exists(),
        "--keep-last 1 pruned the older tag"
    );
    let mut second = layout.to_vec();
    second.extend(["--train-iters", "6", "--load", ck.to_str().unwrap()]);
    let mut args = tiny("6", &m_resumed);
    args.retain(|a| a != "--train-iters" && a != "6");
    let stderr = ok(&run(&args, &second));
    assert!(stderr.contains("loaded"), "{stderr}");
    let (a, b) = (metrics(&m_whole), metrics(&m_resumed));
    assert_eq!(b.len(), 3);
    for (x, y) in a[3..].iter().zip(&b) {
        assert_eq!(x["iteration"], y["iteration"]);
        assert_eq!(x["loss"], y["loss"], "resumed losses are bit-identical");
    }
    // The checkpoint also continues as a pipeline (each stage reads only its layers).
    let m_pipe = tmp.path().join("pipe.jsonl");
    let mut piped = vec![
        "--zero-stage",
        "1",
        "--lr-decay-iters",
        "6",
        "--batch-size",
        "4",
        "--world-size",
        "4",
        "--pipe-parallel-size",
        "2",
        "--load",
        ck.to_str().unwrap(),
    ];
    piped.extend(["--train-iters", "6"]);
    let mut args = tiny("6", &m_pipe);
    args.retain(|a| a != "--train-iters" && a != "6");
    ok(&run(&args, &piped));
    for (x, y) in a[3..].iter().zip(&metrics(&m_pipe)) {
        let (lx, ly) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!(
            (lx - ly).abs() <= 1e-5 * lx,
            "pipelined resume: {ly} vs {lx}"
        );
    }
    // generate and evaluate take the checkpoint at another layout.
    let g = deepscale(&[
        "generate",
        "--load",
        ck.to_str().unwrap(),
        "--prompt",
        "This License",
        "--greedy",
        "--out-seq-length",
        "4",
        "--world-size",
        "2",
        "--model-parallel-size",
        "2",
        "--json",
    ]);
    let out = String::from_utf8_lossy(&g.stdout).to_string();
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 4);
    let e = deepscale(&[
        "evaluate",
        "--task",
        "loss",
        "--load",
        ck.to_str().unwrap(),
        "--text",
        "This License is free.",
        "--json",
    ]);
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    fails_with(
        &deepscale(&[
            "generate",
            "--load",
            tmp.path().to_str().unwrap(),
            "--prompt",
            "x",
        ]),
        &["not a DeepScale checkpoint"],
    );
}

#[test]
fn pipeline_layouts_equal_the_one_rank_run() {
    let tmp = tempfile::tempdir().unwrap();
    let one = tmp.path().join("one.jsonl");
    ok(&run(&tiny("4", &one), &["--batch-size", "4"]));
    for (name, extra) in [
        (
            "pp2dp2",
            vec![
                "--batch-size",
                "1",
                "--gas",
                "2",
                "--world-size",
                "4",
                "--pipe-parallel-size",
                "2",
                "--zero-stage",
                "1",
            ],
        ),
        (
            "pp2tp2",
            vec![
                "--batch-size",
                "2",
                "--gas",
                "2",
                "--world-size",
                "4",
                "--pipe-parallel-size",
                "2",
                "--model-parallel-size",
                "2",
                "--partition-method",
                "uniform",
            ],
        ),
    ] {
        let m = tmp.path().join(format!("{name}.jsonl"));
        let stderr = ok(&run(&tiny("4", &m), &extra));
        assert!(stderr.contains("pipeline: 2 stages"), "{stderr}");
        for (a, b) in metrics(&m).iter().zip(&metrics(&one)) {
            let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
            assert!(
                (la - lb).abs() <= 1e-5 * lb,
                "{name} iteration {}: {la} vs {lb}",
                a["iteration"]
            );
            assert_eq!(a["pp"].as_u64(), Some(2));
            // The first stage's own passes are timed too.
            for k in ["forward_ms", "backward_ms", "optimizer_step_ms"] {
                assert!(a[k].as_f64().is_some_and(|v| v > 0.0), "{name}: {k} in {a}");
            }
        }
    }
    // ZeRO-2 with a pipeline is refused with the reason.
    fails_with(
        &run(
            &tiny("1", &one),
            &[
                "--world-size",
                "2",
                "--pipe-parallel-size",
                "2",
                "--zero-stage",
                "2",
            ],
        ),
        &["not supported: ZeRO stage 2 with a pipeline"],
    );
}

#[test]
fn pipeline_checkpoints_save_per_layer_resume_exactly_and_load_at_other_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    let pp2 = [
        "--world-size",
        "4",
        "--pipe-parallel-size",
        "2",
        "--model-parallel-size",
        "2",
        "--batch-size",
        "2",
        "--gas",
        "2",
        "--lr-decay-iters",
        "6",
    ];
    let with_iters = |iters: &str, m: &Path, extra: &[&str]| -> Vec<String> {
        let mut v = tiny(iters, m);
        let at = v.iter().position(|a| a == "--hidden-dropout").unwrap();
        v[at + 1] = "0.1".into(); // the resumed run must draw the same dropout masks
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let whole = tmp.path().join("whole.jsonl");
    ok(&run(&with_iters("6", &whole, &pp2), &[]));
    let scratch = tmp.path().join("scratch.jsonl");
    ok(&run(
        &with_iters("3", &scratch, &pp2),
        &["--save", ck.to_str().unwrap()],
    ));
    // Per-layer model files (embedding, 2 blocks, final LayerNorm, tied logits) at each tp rank,
    // per-rank optimizer files.
    let tag = ck.join("global_step3");
    for f in [
        "layer_00-model_00.safetensors",
        "layer_04-model_01.safetensors",
        "pp_rank_01_mp_rank_01_dp_rank_000.safetensors",
        "manifest.json",
    ] {
        assert!(tag.join(f).is_file(), "missing {f}");
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tag.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["pp"], 2);
    assert_eq!(manifest["pipeline_bounds"], serde_json::json!([0, 2, 5]));
    let names: Vec<&str> = manifest["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for n in [
        "embedding.word_embeddings.weight",
        "layers.1.mlp.dense_4h_to_h.weight",
        "final_layernorm.weight",
    ] {
        assert_eq!(names.iter().filter(|x| **x == n).count(), 1, "{n}");
    }
    // Resume in the same layout: bit-identical losses.
    let resumed = tmp.path().join("resumed.jsonl");
    ok(&run(
        &with_iters("6", &resumed, &pp2),
        &["--load", ck.to_str().unwrap()],
    ));
    let (a, b) = (metrics(&whole), metrics(&resumed));
    assert_eq!(b.len(), 3);
    for (x, y) in a[3..].iter().zip(&b) {
        assert_eq!(x["iteration"], y["iteration"]);
        assert_eq!(
            x["loss"], y["loss"],
            "resumed pipeline losses are bit-identical"
        );
    }
    // Without dropout (whose streams depend on the layout), the pipeline checkpoint continues on
    // one rank and at pp 2 x dp 2 with ZeRO-1 with the same numerics.
    let plain = |iters: &str, m: &Path, extra: &[&str]| -> Vec<String> {
        let mut v = tiny(iters, m);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let (ck0, whole0) = (tmp.path().join("ck0"), tmp.path().join("whole0.jsonl"));
    ok(&run(&plain("6", &whole0, &pp2), &[]));
    ok(&run(
        &plain("3", &scratch, &pp2),
        &["--save", ck0.to_str().unwrap()],
    ));
    let a = metrics(&whole0);
    for (name, layout) in [
        ("one", vec!["--batch-size", "4", "--lr-decay-iters", "6"]),
        (
            "pp2dp2",
            vec![
                "--world-size",
                "4",
                "--pipe-parallel-size",
                "2",
                "--zero-stage",
                "1",
                "--batch-size",
                "1",
                "--gas",
                "2",
                "--lr-decay-iters",
                "6",
            ],
        ),
    ] {
        let m = tmp.path().join(format!("{name}.jsonl"));
        ok(&run(
            &plain("6", &m, &layout),
            &["--load", ck0.to_str().unwrap()],
        ));
        let b = metrics(&m);
        assert_eq!(b.len(), 3, "{name}");
        for (x, y) in a[3..].iter().zip(&b) {
            let (lx, ly) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
            assert!((lx - ly).abs() <= 1e-5 * lx, "{name}: {ly} vs {lx}");
        }
    }
}

/// `estimate-memory` gives DeepSpeed's figures for the model's counts and this engine's per-rank
/// bytes, which a real run measures.
#[test]
fn estimate_memory_agrees_with_a_measured_run() {
    let tmp = tempfile::tempdir().unwrap();
    let estimate = |extra: &[&str]| -> serde_json::Value {
        let mut a = vec![
            "estimate-memory",
            "--num-layers",
            "2",
            "--hidden-size",
            "32",
            "--num-attention-heads",
            "2",
            "--max-position-embeddings",
            "32",
            "--json",
        ];
        a.extend_from_slice(extra);
        let out = deepscale(&a);
        ok(&out);
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap()
    };
    for (world, stage) in [("2", "2"), ("4", "3")] {
        let m = tmp.path().join(format!("z{stage}.jsonl"));
        let batch = if world == "2" { "2" } else { "1" };
        ok(&run(
            &tiny("1", &m),
            &[
                "--world-size",
                world,
                "--zero-stage",
                stage,
                "--batch-size",
                batch,
            ],
        ));
        let measured = metrics(&m)[0]["model_state_bytes"].as_u64().unwrap();
        let e = estimate(&["--num-gpus", world]);
        let ours = e["engine"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| {
                x["zero_stage"].as_u64() == stage.parse::<u64>().ok() && x["params"] == "fp32"
            })
            .unwrap()["model_state_bytes"]
            .as_u64()
            .unwrap();
        let r = measured as f64 / ours as f64;
        assert!(
            (r - 1.0).abs() < 0.02,
            "ZeRO-{stage} x {world}: measured {measured} vs estimate {ours}"
        );
    }
    // DeepSpeed's own numbers for the same counts (its formulas, checked against DeepSpeed 0.19.8
    // in the library's unit tests).
    let e = estimate(&["--num-gpus", "8"]);
    let total = e["total_params"].as_u64().unwrap();
    assert_eq!(
        total,
        50304 * 32 + 32 * 32 + 2 * (12 * 32 * 32 + 13 * 32) + 2 * 32
    );
    assert_eq!(e["largest_layer_params"].as_u64(), Some(50304 * 32));
    let z2 = &e["deepspeed"]["zero2"][1];
    assert_eq!(z2["offload_optimizer"], "none");
    assert_eq!(
        z2["per_gpu_bytes"].as_u64(),
        Some(2 * total + 18 * total / 8)
    );
    assert_eq!(e["deepspeed"]["zero3"].as_array().unwrap().len(), 6);
    fails_with(&deepscale(&["estimate-memory"]), &["give one of --model"]);
    fails_with(
        &deepscale(&["estimate-memory", "--model", "gpt2-7b"]),
        &["unknown GPT-2 preset `gpt2-7b`"],
    );
}

/// ZeRO-Infinity from a DeepSpeed config: optimizer state, gradients and parameters swapped to
/// NVMe (a temp folder); the run equals the one-rank run and reports what the swapper moved.
#[test]
fn nvme_offload_from_a_deepspeed_config_equals_the_one_rank_run() {
    let tmp = tempfile::tempdir().unwrap();
    let nvme = tmp.path().join("nvme");
    let cfg = tmp.path().join("ds.json");
    std::fs::write(
        &cfg,
        serde_json::json!({
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {
                "stage": 3,
                "stage3_param_persistence_threshold": 1000,
                "sub_group_size": 20000,
                "offload_optimizer": {"device": "nvme", "nvme_path": nvme, "buffer_count": 4,
                                      "pipeline_read": true, "pipeline_write": true},
                "offload_param": {"device": "nvme", "nvme_path": nvme, "max_in_cpu": 20000}
            },
            "aio": {"block_size": 1048576, "queue_depth": 8, "thread_count": 2,
                    "single_submit": false, "overlap_events": true}
        })
        .to_string(),
    )
    .unwrap();
    let (m1, m2) = (tmp.path().join("one.jsonl"), tmp.path().join("nvme.jsonl"));
    ok(&run(&tiny("4", &m1), &["--batch-size", "4"]));
    let stderr = ok(&run(
        &tiny("4", &m2),
        &[
            "--world-size",
            "2",
            "--deepscale",
            "--deepscale-config",
            cfg.to_str().unwrap(),
        ],
    ));
    assert!(stderr.contains("ZeRO-Infinity"), "{stderr}");
    let (one, off) = (metrics(&m1), metrics(&m2));
    assert_eq!(off.len(), 4);
    for (a, b) in off.iter().zip(&one) {
        let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!(
            (la - lb).abs() <= 1e-5 * lb,
            "iteration {}: {la} vs {lb}",
            a["iteration"]
        );
        assert!(a["offload_bytes_read"].as_u64().unwrap() > 0);
        assert!(a["offload_bytes_written"].as_u64().unwrap() > 0);
        assert!(a["swap_buffer_bytes"].as_u64().unwrap() > 0);
    }
    // A config asking for NVMe below stage 3 is refused, naming the rule.
    std::fs::write(
        &cfg,
        serde_json::json!({"train_micro_batch_size_per_gpu": 4,
            "zero_optimization": {"stage": 2,
                "offload_optimizer": {"device": "nvme", "nvme_path": nvme}}})
        .to_string(),
    )
    .unwrap();
    fails_with(
        &run(
            &tiny("1", &m1),
            &["--deepscale", "--deepscale-config", cfg.to_str().unwrap()],
        ),
        &["offload to nvme needs stage 3"],
    );
}

/// `--bf16` on the CPU: fp32 parameters as master weights and every matrix product in bf16. It
/// learns, follows the fp32 run within bf16's rounding (and is not the fp32 run), and its dp 2 run
/// equals its one-rank run. A DeepSpeed config that says `bf16.enabled false` contradicts the flag.
#[test]
fn bf16_on_the_cpu_learns_follows_fp32_and_is_layout_independent() {
    let tmp = tempfile::tempdir().unwrap();
    let (mf, mb, mb2) = (
        tmp.path().join("fp32.jsonl"),
        tmp.path().join("bf16.jsonl"),
        tmp.path().join("bf16-dp2.jsonl"),
    );
    ok(&run(&tiny("6", &mf), &["--batch-size", "4"]));
    ok(&run(&tiny("6", &mb), &["--batch-size", "4", "--bf16"]));
    ok(&run(
        &tiny("6", &mb2),
        &["--batch-size", "2", "--world-size", "2", "--bf16"],
    ));
    let (fp32, bf16, dp2) = (metrics(&mf), metrics(&mb), metrics(&mb2));
    assert_eq!(bf16.len(), 6);
    let loss = |v: &serde_json::Value| v["loss"].as_f64().unwrap();
    assert!(loss(&bf16[5]) < loss(&bf16[0]), "bf16 does not learn");
    let mut differs = false;
    for ((b, f), d) in bf16.iter().zip(&fp32).zip(&dp2) {
        let (lb, lf, ld) = (loss(b), loss(f), loss(d));
        assert!((lb - lf).abs() <= 0.02 * lf, "bf16 {lb} vs fp32 {lf}");
        differs |= lb != lf;
        assert!(
            (ld - lb).abs() <= 1e-3 * lb,
            "bf16 dp2 {ld} vs one rank {lb}"
        );
    }
    assert!(
        differs,
        "bf16 losses equal fp32's: the products were not rounded"
    );
    let config = tmp.path().join("ds.json");
    std::fs::write(
        &config,
        r#"{"train_batch_size": 4, "bf16": {"enabled": false}}"#,
    )
    .unwrap();
    fails_with(
        &run(
            &tiny("1", &mf),
            &[
                "--bf16",
                "--deepspeed",
                "--deepspeed_config",
                config.to_str().unwrap(),
            ],
        ),
        &["--bf16", "bf16.enabled false"],
    );
}
