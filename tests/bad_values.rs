//! Values no run can use are refused before any work, naming the flag, key or variable and what
//! was expected: exit status 1 (an error, not a panic's 101 or an abort's 134), no iteration run.
use std::path::Path;
use std::process::Command;

#[path = "common/cli.rs"]
mod cli;
use cli::{deepscale_env as deepscale, ASSETS};

const TINY: &[&str] = &[
    "--num-layers",
    "1",
    "--hidden-size",
    "16",
    "--num-attention-heads",
    "2",
    "--seq-length",
    "16",
    "--batch-size",
    "2",
    "--train-iters",
    "2",
    "--eval-iters",
    "1",
    "--sample-length",
    "0",
];

/// `args` fail with exit status 1 before training, and stderr holds every one of `needles`.
fn refused(args: &[&str], env: &[(&str, &str)], needles: &[&str]) {
    let err = cli::refusal(&deepscale(args, env), args, needles);
    assert!(
        !err.contains(" iteration ") && !err.contains("iteration 1/"),
        "{args:?}: trained before refusing: {err}"
    );
}

fn gpt2(extra: &[&str]) -> Vec<String> {
    ["pretrain-gpt2"]
        .iter()
        .chain(TINY)
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
}

fn refused_gpt2(extra: &[&str], env: &[(&str, &str)], needles: &[&str]) {
    let args = gpt2(extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    refused(&args, env, needles);
}

#[test]
fn training_flags_out_of_range() {
    for (extra, needles) in [
        (&["--lr", "-1"][..], &["--lr -1", "at least 0"][..]),
        (&["--lr", "nan"], &["--lr NaN"]),
        (
            &["--min-lr", "0.1", "--lr", "0.01"],
            &["--min-lr 0.1", "above --lr"],
        ),
        (
            &["--hidden-dropout", "1.5"],
            &["--hidden-dropout 1.5", "below 1"],
        ),
        (
            &["--attention-dropout", "-0.5"],
            &["--attention-dropout -0.5"],
        ),
        (&["--warmup", "2"], &["--warmup 2", "at most 1"]),
        (&["--adam-beta2", "1"], &["--adam-beta2 1"]),
        (&["--adam-eps", "0"], &["--adam-eps 0"]),
        (&["--clip-grad", "-1"], &["--clip-grad -1"]),
        (&["--batch-size", "0"], &["--batch-size 0"]),
        (&["--log-interval", "0"], &["--log-interval 0"]),
        (&["--lr-decay-iters", "0"], &["--lr-decay-iters 0"]),
    ] {
        refused_gpt2(extra, &[], needles);
    }
    // Clap keeps the last of a repeated flag: --train-iters 0 after TINY's.
    refused_gpt2(&["--train-iters", "0"], &[], &["--train-iters 0"]);
}

#[test]
fn deepspeed_config_values_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (json, needles)) in [
        (
            r#"{"train_batch_size": 0}"#,
            &["train_batch_size", "is 0", "cfg0.json"][..],
        ),
        (
            r#"{"train_micro_batch_size_per_gpu": 0}"#,
            &["train_micro_batch_size_per_gpu", "cfg1.json"],
        ),
        (
            r#"{"train_batch_size": 4, "fp16": {"enabled": true, "loss_scale": -5}}"#,
            &["fp16.loss_scale", "-5", "cfg2.json"],
        ),
        (
            r#"{"train_batch_size": 4, "zero_optimization": {"stage": 3, "sub_group_size": 0}}"#,
            &["zero_optimization.sub_group_size is 0", "cfg3.json"],
        ),
        (
            r#"{"train_batch_size": 4, "optimizer": {"type": "Adam", "params": {"lr": -0.1}}}"#,
            &["optimizer.params.lr", "-0.1"],
        ),
        (
            r#"{"train_batch_size": 4, "gradient_clipping": -1.0}"#,
            &["gradient_clipping", "-1"],
        ),
        (
            r#"{"train_batch_size": 4, "fp16": {"enabled": true, "loss_scale_window": 0}}"#,
            &["fp16.loss_scale_window is 0"],
        ),
        (
            r#"{"train_batch_size": 4, "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.1, "warmup_max_lr": 0.01}}}"#,
            &["warmup_min_lr 0.1", "above warmup_max_lr"],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.path().join(format!("cfg{i}.json"));
        std::fs::write(&path, json).unwrap();
        let args = [
            "pretrain-gpt2",
            "--num-layers",
            "1",
            "--hidden-size",
            "16",
            "--num-attention-heads",
            "2",
            "--seq-length",
            "16",
            "--train-iters",
            "2",
            "--deepspeed",
            "--deepspeed_config",
            path.to_str().unwrap(),
        ];
        refused(&args, &[], needles);
    }
}

#[test]
fn environment_and_sampling_values() {
    refused_gpt2(
        &[],
        &[("DEEPSCALE_COMM_TIMEOUT", "abc")],
        &[
            "DEEPSCALE_COMM_TIMEOUT",
            "abc",
            "positive number of seconds",
        ],
    );
    for t in ["nan", "0", "-1", "inf"] {
        refused(
            &[
                "generate",
                "--hf-dir",
                "/nonexistent",
                "--temperature",
                t,
                "--prompt",
                "x",
            ],
            &[],
            &["--temperature"],
        );
    }
    for (extra, needles) in [
        (
            &["--task", "loss", "--text", "x", "--seq-length", "0"][..],
            &["--seq-length 0"][..],
        ),
        (
            &[
                "--task",
                "wikitext103",
                "--valid-data",
                "x",
                "--overlapping-eval",
                "0",
            ],
            &["--overlapping-eval 0"],
        ),
        (
            &["--task", "loss", "--text", "x", "--seq-length", "8"],
            &["--seq-length applies to --task wikitext103 only"],
        ),
        (
            &[
                "--task",
                "wikitext103",
                "--valid-data",
                "x",
                "--seq-length",
                "8",
                "--overlapping-eval",
                "16",
            ],
            &["--overlapping-eval 16 exceeds --seq-length 8"],
        ),
    ] {
        let mut args = vec!["evaluate", "--hf-dir", "/nonexistent"];
        args.extend(extra);
        refused(&args, &[], needles);
    }
    refused(
        &["pretrain-bert", "--mask-prob", "1.5"],
        &[],
        &["--mask-prob 1.5"],
    );
    refused(
        &["pretrain-bert", "--seq-length", "3"],
        &[],
        &["--seq-length 3", "[CLS]"],
    );
}

/// Megatron's check_checkpoint_args: explicit model-shape flags must equal the checkpoint's.
#[test]
fn load_refuses_shape_flags_that_disagree_with_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let save = gpt2(&["--save", ck.to_str().unwrap(), "--save-interval", "2"]);
    let save: Vec<&str> = save.iter().map(String::as_str).collect();
    let out = deepscale(&save, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(Path::new(&ck).join("latest").is_file());
    let load = |extra: &[&str]| {
        let mut v = vec![
            "pretrain-gpt2",
            "--load",
            ck.to_str().unwrap(),
            "--seq-length",
            "16",
            "--batch-size",
            "2",
            "--eval-iters",
            "1",
            "--sample-length",
            "0",
            "--train-iters",
            "3",
        ];
        v.extend(extra);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    for (flag, value) in [
        ("--num-layers", "2"),
        ("--hidden-size", "32"),
        ("--num-attention-heads", "4"),
        ("--max-position-embeddings", "64"),
    ] {
        let args = load(&[flag, value]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(
            &args,
            &[],
            &[&format!("{flag} {value} disagrees with --load"), "ck"],
        );
    }
    // The wrong model family is named before its tokenizer is read.
    refused(
        &["pretrain-bert", "--load", ck.to_str().unwrap()],
        &[],
        &["not BERT", "pretrain-gpt2"],
    );
    // An HF import from a folder that is not one says what it is instead.
    let out = dir.path().join("out");
    for (input, needle) in [
        (
            ck.to_str().unwrap(),
            "a DeepScale checkpoint: read it with --load",
        ),
        ("/nonexistent/hf", "no such folder"),
        (dir.path().to_str().unwrap(), "no config.json"),
    ] {
        refused(
            &[
                "convert",
                "--from",
                "hf",
                "--input",
                input,
                "--to",
                "native",
                "--output",
                out.to_str().unwrap(),
            ],
            &[],
            &[needle],
        );
    }
    // The same values as the checkpoint's are fine, and the run resumes.
    let args = load(&["--num-layers", "1", "--hidden-size", "16"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = deepscale(&args, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A token id past the vocabulary (data tokenized with another tokenizer) is refused at every
/// tensor-parallel size, naming the data and the id: at tp 2 the split embedding would otherwise
/// look it up as a zero row and train on.
#[test]
fn token_ids_outside_the_vocabulary_are_refused_at_every_layout() {
    use zoo::indexed_dataset::{DType, MMapIndexedDatasetBuilder};
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("oov_text_document");
    let mut b = MMapIndexedDatasetBuilder::create(&prefix, DType::I32).unwrap();
    for d in 0..8u32 {
        // Ids of a 60000-token vocabulary, past GPT-2's 50257 (and its padded 50304).
        let doc: Vec<u32> = (0..40)
            .map(|i| 100 + (d * 40 + i) * 1187 % 60_000)
            .collect();
        b.add_item(&doc).unwrap();
        b.end_document();
    }
    b.finalize().unwrap();
    for tp in ["1", "2"] {
        let args = gpt2(&[
            "--data-path",
            prefix.to_str().unwrap(),
            "--world-size",
            tp,
            "--model-parallel-size",
            tp,
        ]);
        let out = deepscale(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "tp {tp}: {err}");
        assert!(err.contains("oov_text_document"), "tp {tp}: {err}");
        assert!(
            err.contains("outside the model's vocabulary of 50257"),
            "tp {tp}: {err}"
        );
        assert!(!err.contains("loss is"), "tp {tp}: {err}");
    }
}

/// An HF config.json with fewer layers than its weights is refused (evaluating it would silently
/// drop the extra layers).
#[test]
fn an_hf_config_with_fewer_layers_than_its_weights_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let args = gpt2(&["--num-layers", "2", "--save-hf", hf.to_str().unwrap()]);
    let out = deepscale(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = hf.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    cfg["n_layer"] = 1.into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    refused(
        &[
            "evaluate",
            "--task",
            "loss",
            "--hf-dir",
            hf.to_str().unwrap(),
            "--text",
            "some text",
        ],
        &[],
        &["hold 2 layers", "n_layer is 1"],
    );
}

/// Under a low `ulimit -v`, a model that cannot fit is refused before any allocation with the
/// estimate and the limit (no allocator abort, exit status 1); a small one still trains.
#[test]
fn a_model_too_large_for_the_memory_limit_is_refused_before_allocating() {
    let run = |shape: &[&str]| {
        let mut args = vec![
            "pretrain-gpt2",
            "--seq-length",
            "128",
            "--batch-size",
            "4",
            "--train-iters",
            "2",
            "--eval-iters",
            "1",
            "--sample-length",
            "0",
        ];
        args.extend(shape);
        let cmd = format!(
            "ulimit -v 3000000 && exec {} {}",
            env!("CARGO_BIN_EXE_deepscale"),
            args.join(" ")
        );
        Command::new("bash")
            .args(["-c", &cmd])
            .env("DEEPSCALE_ASSETS", ASSETS)
            .output()
            .expect("bash")
    };
    // GPT-2 medium's shape: ~350M parameters.
    let medium = [
        "--num-layers",
        "24",
        "--hidden-size",
        "1024",
        "--num-attention-heads",
        "16",
    ];
    let out = run(&medium);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for n in ["not enough memory", "ulimit -v", "optimizer", "activations"] {
        assert!(err.contains(n), "lacks `{n}`: {err}");
    }
    assert!(!err.contains("memory allocation of"), "{err}");
    // ZeRO-3 with NVMe offload swaps the states out, but 64 swap buffers of DeepSpeed's
    // default sub_group_size (each one the largest block, 64 MiB) are too many: the refusal
    // counts the pool and says which knobs shrink it.
    let dir = tempfile::tempdir().unwrap();
    let nvme = dir.path().join("nvme");
    let cfg = dir.path().join("ds.json");
    std::fs::write(
        &cfg,
        serde_json::json!({
            "train_micro_batch_size_per_gpu": 4,
            "zero_optimization": {
                "stage": 3,
                "reduce_bucket_size": 50_000_000,
                "offload_optimizer": {"device": "nvme", "nvme_path": nvme, "buffer_count": 64},
                "offload_param": {"device": "nvme", "nvme_path": nvme}
            }
        })
        .to_string(),
    )
    .unwrap();
    let config = ["--deepspeed", "--deepspeed_config", cfg.to_str().unwrap()];
    let out = run(&[&medium[..], &config[..]].concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for n in [
        "not enough memory",
        "swap buffers",
        "sub_group_size or buffer_count",
    ] {
        assert!(err.contains(n), "lacks `{n}`: {err}");
    }
    assert!(!nvme.exists(), "swap files made before the refusal");
    let out = run(&[
        "--num-layers",
        "1",
        "--hidden-size",
        "16",
        "--num-attention-heads",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sizes at the edge of the integers (what clap accepts as a usize) are refused naming the
/// sizes, or estimated in floating point: never an overflow (a panic in this debug build, a
/// wrapped size in a release one).
#[test]
fn sizes_at_the_edge_of_the_integers_are_refused_not_overflowed() {
    const MAX: &str = "18446744073709551615";
    let count = "more parameters than this machine can count";
    for (extra, needles) in [
        (
            &[
                "--hidden-size",
                "4611686018427387904",
                "--num-attention-heads",
                "1",
            ][..],
            &[count][..],
        ),
        (&["--num-layers", MAX], &[count]),
        (&["--max-position-embeddings", MAX], &[count]),
        (&["--world-size", MAX], &["batch sizes too large"]),
        (
            &["--world-size", "2", "--gas", MAX],
            &["batch sizes too large"],
        ),
        (
            &["--seq-length", MAX, "--max-position-embeddings", MAX],
            &["seq_length 18446744073709551615"],
        ),
    ] {
        refused_gpt2(extra, &[], needles);
    }
    for (args, needles) in [
        (
            &[
                "pretrain-bert",
                "--hidden-size",
                "4611686018427387904",
                "--num-attention-heads",
                "1",
            ][..],
            &[count][..],
        ),
        (&["pretrain-bert", "--num-layers", MAX], &[count]),
        (
            &["pretrain-bert", "--micro-batch-size", MAX],
            &["overflows"],
        ),
        (
            &[
                "estimate-memory",
                "--num-layers",
                "2",
                "--hidden-size",
                MAX,
                "--num-attention-heads",
                "1",
            ],
            &[count],
        ),
        (&["bench", "tp", "--seq-length", MAX], &[count]),
        (
            &["bench", "whole", "--hidden-size", MAX],
            &["not enough memory"],
        ),
        (
            &["bench", "comm", "--sizes-mib", MAX],
            &["not enough memory"],
        ),
        (
            &["bench", "attention", "--seq-lengths", "100000000000"],
            &["not enough memory"],
        ),
        (
            &["bench", "pipe", "--micro-batches", MAX],
            &["not enough memory"],
        ),
    ] {
        refused(args, &[], needles);
    }
    // Estimated in floating point: an answer, not a panic.
    let huge = [
        "estimate-memory",
        "--model",
        "gpt2-125m",
        "--num-nodes",
        MAX,
        "--num-gpus",
        MAX,
    ];
    let out = deepscale(&huge, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
