//! The `deepscale` binary end to end: JSON outputs and clear errors on bad input.
mod common;

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

fn deepscale(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_deepscale"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run deepscale")
}

fn last_json(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "deepscale failed: {}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().expect("stdout has a last line");
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("last stdout line is not JSON ({e}): {line}"))
}

/// Asserts a clean failure whose message contains every `needle`.
fn assert_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    assert!(
        !stderr.contains("panicked"),
        "panic instead of an error: {stderr}"
    );
    for n in needles {
        assert!(stderr.contains(n), "error message lacks `{n}`: {stderr}");
    }
}

fn tiny_dir(dir: &Path) -> zoo::gpt2::Gpt2 {
    let model = common::random_gpt2(&common::tiny_gpt2_config(), 31);
    common::write_hf_gpt2_dir(&model, dir, "transformer.", 1);
    model
}

#[test]
fn evaluate_loss_json_equals_direct_computation() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_dir(tmp.path());
    let text = "The quick brown fox jumps over the lazy dog, again and again and again: a longer text than the context window of sixty-four positions.";
    let d = tmp.path().to_str().unwrap();
    let v = last_json(&deepscale(
        &[
            "evaluate", "--task", "loss", "--hf-dir", d, "--text", text, "--json",
        ],
        &[],
    ));
    // Direct computation: bytes are the token ids of the byte tokenizer; every token but the first
    // is predicted from (at most 64) preceding tokens.
    let tokens: Vec<u32> = text.bytes().map(u32::from).collect();
    assert_eq!(v["tokens"], tokens.len());
    let want = zoo::evaluation::lm_loss(&model, &tokens).unwrap();
    let got = v["loss"].as_f64().unwrap();
    assert!((got - want.loss).abs() < 1e-6, "{got} vs {}", want.loss);
    // And by hand: windows of 64 inputs, each predicting its successors.
    let mut sum = 0f64;
    let mut start = 0;
    while start + 1 < tokens.len() {
        let end = (start + 64).min(tokens.len() - 1);
        let ids = Tensor::new(&tokens[start..end], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model
            .forward(&ids, &candle_deepscale::ForwardCtx::eval())
            .unwrap();
        let labels = Tensor::new(&tokens[start + 1..end + 1], &Device::Cpu).unwrap();
        let l = candle_deepscale::layers::loss::token_losses(&logits, &labels, 257).unwrap();
        sum += l.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        start = end;
    }
    assert!(tokens.len() > 128, "the text spans three windows");
    let by_hand = sum / (tokens.len() - 1) as f64;
    assert!((got - by_hand).abs() < 1e-5, "{got} vs {by_hand}");
    for (k, want) in [("world_size", 1), ("tp", 1), ("pp", 1), ("dp", 1)] {
        assert_eq!(v[k], want, "{k}");
    }
}

#[test]
fn generate_json_greedy_with_and_without_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_dir(tmp.path());
    let d = tmp.path().to_str().unwrap();
    let base = [
        "generate",
        "--hf-dir",
        d,
        "--prompt",
        "Hello",
        "--greedy",
        "--out-seq-length",
        "12",
        "--json",
    ];
    let a = last_json(&deepscale(&base, &[]));
    let mut nc = base.to_vec();
    nc.push("--no-kv-cache");
    let b = last_json(&deepscale(&nc, &[]));
    assert_eq!(a["token_ids"], b["token_ids"]);
    let ids: Vec<u32> = serde_json::from_value(a["token_ids"].clone()).unwrap();
    let cfg = zoo::generation::SamplingConfig {
        greedy: true,
        max_new_tokens: 12,
        stop_token: Some(256),
        ..Default::default()
    };
    let want = zoo::generation::generate(&model, &[72, 101, 108, 108, 111], &cfg).unwrap();
    assert_eq!(ids, want);
    assert!(a["text"].is_string());
    assert_eq!(a["world_size"], 1);
    assert_eq!(a["tp"], 1);

    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "one\ntwo\n\nthree\n").unwrap();
    let out = tmp.path().join("samples.jsonl");
    let v = last_json(&deepscale(
        &[
            "generate",
            "--hf-dir",
            d,
            "--sample-input-file",
            prompts.to_str().unwrap(),
            "--sample-output-file",
            out.to_str().unwrap(),
            "--top_k",
            "5",
            "--out-seq-length",
            "4",
            "--json",
        ],
        &[],
    ));
    assert_eq!(v["samples"], 3);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["prompt"], "three");
}

fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, &path).unwrap();
}

#[test]
fn bad_inputs_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let eval = |dir: &Path| {
        deepscale(
            &[
                "evaluate",
                "--task",
                "loss",
                "--hf-dir",
                dir.to_str().unwrap(),
                "--text",
                "hello there",
            ],
            &[],
        )
    };

    let missing = tmp.path().join("missing");
    tiny_dir(&missing);
    rewrite_weights(&missing, |t| {
        t.remove("transformer.h.1.mlp.c_fc.weight");
    });
    assert_error(
        &eval(&missing),
        &[
            "transformer.h.1.mlp.c_fc.weight",
            "not found",
            "model.safetensors",
        ],
    );

    let shape = tmp.path().join("shape");
    tiny_dir(&shape);
    rewrite_weights(&shape, |t| {
        t.insert(
            "transformer.wpe.weight".into(),
            Tensor::zeros((64, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    });
    assert_error(
        &eval(&shape),
        &["transformer.wpe.weight", "[64, 32]", "[64, 64]"],
    );

    let config = tmp.path().join("config");
    tiny_dir(&config);
    std::fs::write(
        config.join("config.json"),
        "{\"model_type\": \"gpt2\", \"n_layer\": ",
    )
    .unwrap();
    assert_error(&eval(&config), &["config.json"]);

    let tok = tmp.path().join("tok");
    tiny_dir(&tok);
    std::fs::remove_file(tok.join("merges.txt")).unwrap();
    assert_error(&eval(&tok), &["no tokenizer", "vocab.json"]);

    let nodir = tmp.path().join("does-not-exist");
    assert_error(&eval(&nodir), &["does-not-exist", "no such folder"]);

    let home = tmp.path().join("hf-home");
    std::fs::create_dir_all(&home).unwrap();
    let out = deepscale(
        &[
            "generate",
            "--hf-repo",
            "openai-community/gpt2",
            "--prompt",
            "hi",
        ],
        &[("HF_HUB_OFFLINE", "1"), ("HF_HOME", home.to_str().unwrap())],
    );
    assert_error(&out, &["HF_HUB_OFFLINE", "openai-community/gpt2", "cache"]);

    let ok = tmp.path().join("ok");
    tiny_dir(&ok);
    let d = ok.to_str().unwrap();
    assert_error(
        &deepscale(&["generate", "--hf-dir", d, "--temperature", "0"], &[]),
        &["--temperature"],
    );
    assert_error(
        &deepscale(&["evaluate", "--task", "loss", "--hf-dir", d], &[]),
        &["--text"],
    );
    assert_error(
        &deepscale(
            &[
                "evaluate",
                "--task",
                "loss",
                "--hf-dir",
                d,
                "--text-file",
                "/nonexistent/file.txt",
            ],
            &[],
        ),
        &["/nonexistent/file.txt"],
    );
    assert_error(
        &deepscale(
            &["evaluate", "--task", "loss", "--hf-dir", d, "--text", "x"],
            &[],
        ),
        &["at least 2"],
    );
}

#[test]
fn pretrain_gpt2_logs_metrics_lowers_loss_and_exports_hf() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = tmp.path().join("m/metrics.jsonl");
    let out_dir = tmp.path().join("hf");
    let args = [
        "pretrain-gpt2",
        "--num-layers",
        "2",
        "--hidden-size",
        "32",
        "--num-attention-heads",
        "2",
        "--seq-length",
        "32",
        "--batch-size",
        "2",
        "--train-iters",
        "12",
        "--lr",
        "1e-2",
        "--lr-decay-style",
        "constant",
        "--log-interval",
        "4",
        "--eval-interval",
        "6",
        "--eval-iters",
        "1",
        "--hidden-dropout",
        "0",
        "--attention-dropout",
        "0",
        "--sample-length",
        "4",
        "--metrics-file",
        metrics.to_str().unwrap(),
        "--save-hf",
        out_dir.to_str().unwrap(),
        "--json",
    ];
    let v = last_json(&deepscale(
        &args,
        &[(
            "DEEPSCALE_ASSETS",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../assets"),
        )],
    ));
    assert!(
        v["final_loss"].as_f64().unwrap() < v["initial_loss"].as_f64().unwrap() - 1.0,
        "{v}"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train: Vec<_> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    let valid: Vec<_> = lines
        .iter()
        .filter(|l| l.get("valid_loss").is_some())
        .collect();
    assert_eq!(train.len(), 3);
    assert_eq!(valid.len(), 2);
    for l in &train {
        for k in [
            "iteration",
            "loss",
            "lr",
            "loss_scale",
            "grad_norm",
            "ms_per_step",
            "tokens_per_s",
            "mfu",
            "world_size",
            "tp",
            "pp",
            "dp",
            "zero_stage",
            "model_state_bytes",
            "peak_bytes",
        ] {
            assert!(l.get(k).is_some(), "metrics line lacks {k}: {l}");
        }
    }
    // The export loads and scores like the trained model did.
    let g = last_json(&deepscale(
        &[
            "generate",
            "--hf-dir",
            out_dir.to_str().unwrap(),
            "--prompt",
            "This License",
            "--greedy",
            "--out-seq-length",
            "4",
            "--json",
        ],
        &[],
    ));
    assert_eq!(g["token_ids"].as_array().unwrap().len(), 4);

    // Same seed, same run: deterministic (the metrics file replaced, as asked).
    let mut args = args.to_vec();
    args.push("--overwrite");
    let again = last_json(&deepscale(
        &args,
        &[(
            "DEEPSCALE_ASSETS",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../assets"),
        )],
    ));
    assert_eq!(again["final_loss"], v["final_loss"]);

    let bad = deepscale(
        &[
            "pretrain-gpt2",
            "--data-path",
            "/nonexistent/corpus.jsonl",
            "--train-iters",
            "1",
        ],
        &[],
    );
    assert_error(&bad, &["/nonexistent/corpus.jsonl"]);
    let bad = deepscale(
        &[
            "pretrain-gpt2",
            "--vocab-file",
            "/nonexistent/vocab.json",
            "--train-iters",
            "1",
        ],
        &[],
    );
    assert_error(&bad, &["/nonexistent/vocab.json"]);
}

#[test]
fn evaluate_and_generate_agree_across_tensor_parallel_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_dir(tmp.path());
    let d = tmp.path().to_str().unwrap();
    let text = "Tensor parallel evaluation must give the same loss whatever the layout, window after window of text.";
    let mut losses = Vec::new();
    let mut tokens = Vec::new();
    for (world, tp) in [("1", "1"), ("2", "2"), ("4", "4"), ("4", "2")] {
        let v = last_json(&deepscale(
            &[
                "evaluate",
                "--task",
                "loss",
                "--hf-dir",
                d,
                "--text",
                text,
                "--world-size",
                world,
                "--model-parallel-size",
                tp,
                "--json",
            ],
            &[],
        ));
        assert_eq!(v["world_size"].to_string(), world);
        assert_eq!(v["tp"].to_string(), tp);
        assert_eq!(
            v["dp"],
            world.parse::<usize>().unwrap() / tp.parse::<usize>().unwrap()
        );
        losses.push(v["loss"].as_f64().unwrap());
        let g = last_json(&deepscale(
            &[
                "generate",
                "--hf-dir",
                d,
                "--prompt",
                "Hello",
                "--greedy",
                "--out-seq-length",
                "16",
                "--world-size",
                world,
                "--tensor-model-parallel-size",
                tp,
                "--json",
            ],
            &[],
        ));
        tokens.push(g["token_ids"].clone());
    }
    for (l, t) in losses.iter().zip(&tokens) {
        assert!((l - losses[0]).abs() <= 1e-5 * losses[0], "{losses:?}");
        assert_eq!(t, &tokens[0]);
    }
    let bad = deepscale(
        &[
            "evaluate",
            "--task",
            "loss",
            "--hf-dir",
            d,
            "--text",
            text,
            "--world-size",
            "3",
            "--model-parallel-size",
            "2",
        ],
        &[],
    );
    assert_error(&bad, &["--world-size 3"]);
    let bad = deepscale(
        &[
            "evaluate",
            "--task",
            "loss",
            "--hf-dir",
            d,
            "--text",
            text,
            "--world-size",
            "8",
            "--model-parallel-size",
            "8",
        ],
        &[],
    );
    assert_error(&bad, &["tensor-parallel size 8"]);
}
