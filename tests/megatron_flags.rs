//! Today's Megatron-LM names beside the v1.1.5 ones: each does what Megatron's does (checked
//! against the v1.1.5 flag it maps onto, on the same model, data and seed) or is refused with a
//! reason; `--local_rank` and launcher environments.
use std::path::Path;
use std::process::{Command, Output};

#[path = "common/cli.rs"]
mod cli;

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
    "--eval-iters",
    "1",
    "--eval-interval",
    "0",
    "--sample-length",
    "0",
    "--log-interval",
    "1",
    "--json",
];

fn run_env(extra: &[&str], env: &[(&str, &str)]) -> Output {
    cli::deepscale_env(&[TINY, extra].concat(), env)
}

fn ok(extra: &[&str]) -> (serde_json::Value, String) {
    let out = run_env(extra, &[]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{extra:?}: {err}");
    let v =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    (v, err)
}

fn refused(extra: &[&str], env: &[(&str, &str)], needles: &[&str]) {
    cli::refusal(&run_env(extra, env), extra, needles);
}

/// (iteration, loss, lr, loss_scale) of every training line of a metrics file.
fn metrics(path: &Path) -> Vec<(u64, f64, f64, f64)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((
                v["iteration"].as_u64()?,
                v.get("loss")?.as_f64()?,
                v["lr"].as_f64()?,
                v["loss_scale"].as_f64()?,
            ))
        })
        .collect()
}

fn with_metrics(dir: &Path, name: &str, extra: &[&str]) -> Vec<(u64, f64, f64, f64)> {
    let m = dir.join(format!("{name}.jsonl"));
    let mut args = extra.to_vec();
    args.extend(["--metrics-file", m.to_str().unwrap()]);
    ok(&args);
    metrics(&m)
}

#[test]
fn batch_and_sample_based_training_map_onto_iterations() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Global batch 8 = micro 2 x dp 2 x accumulation 2.
    let today = with_metrics(
        d,
        "today",
        &[
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "8",
            "--world-size",
            "2",
            "--train-samples",
            "40",
            "--lr-warmup-samples",
            "16",
            "--lr-decay-samples",
            "40",
        ],
    );
    let v115 = with_metrics(
        d,
        "v115",
        &[
            "--batch-size",
            "2",
            "--gas",
            "2",
            "--world-size",
            "2",
            "--train-iters",
            "5",
            "--warmup",
            "0.4",
            "--lr-decay-iters",
            "5",
        ],
    );
    assert_eq!(today.len(), 5, "40 samples / 8 per iteration");
    assert_eq!(today, v115);
    // Warmup in iterations is the same schedule.
    let iters = with_metrics(
        d,
        "iters",
        &[
            "--batch-size",
            "2",
            "--gas",
            "2",
            "--world-size",
            "2",
            "--train-iters",
            "5",
            "--lr-warmup-iters",
            "2",
            "--lr-decay-iters",
            "5",
        ],
    );
    assert_eq!(iters, v115);
    let (v, _) = ok(&[
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "8",
        "--train-iters",
        "1",
    ]);
    assert_eq!(v["train_batch_size"], 8);
}

#[test]
fn recompute_init_and_pipeline_names() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let base = ["--train-iters", "3", "--batch-size", "2"];
    let ckpt = with_metrics(
        d,
        "ckpt",
        &[&base[..], &["--checkpoint-activations"]].concat(),
    );
    let full = with_metrics(
        d,
        "full",
        &[
            &base[..],
            &[
                "--recompute-granularity",
                "full",
                "--recompute-method",
                "uniform",
                "--recompute-num-layers",
                "1",
            ],
        ]
        .concat(),
    );
    assert_eq!(full, ckpt);
    let (_, err) = ok(&[&base[..], &["--recompute-activations", "--use-flash-attn"]].concat());
    assert!(
        err.contains("--recompute-granularity selective") && err.contains("--use-flash-attn"),
        "{err}"
    );
    // --init-method-std 0.02 is the default; another std is another model.
    let plain = with_metrics(d, "plain", &base);
    assert_eq!(
        with_metrics(
            d,
            "std02",
            &[&base[..], &["--init-method-std", "0.02"]].concat()
        ),
        plain
    );
    assert_ne!(
        with_metrics(
            d,
            "std05",
            &[&base[..], &["--init-method-std", "0.05"]].concat()
        )[0]
        .1,
        plain[0].1
    );
    // --pipeline-model-parallel-size is --pipe-parallel-size.
    let (v, _) = ok(&[
        &base[..],
        &["--world-size", "2", "--pipeline-model-parallel-size", "2"],
    ]
    .concat());
    assert_eq!(v["pp"], 2);
}

#[test]
fn loss_scale_flags_set_the_fp16_scaler() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let base = ["--train-iters", "2", "--batch-size", "2", "--fp16"];
    let fixed = with_metrics(d, "fixed", &[&base[..], &["--loss-scale", "128"]].concat());
    assert!(fixed.iter().all(|m| m.3 == 128.0), "{fixed:?}");
    let dynamic = with_metrics(
        d,
        "dyn",
        &[&base[..], &["--initial-loss-scale", "1024"]].concat(),
    );
    assert_eq!(dynamic[0].3, 1024.0, "{dynamic:?}");
    refused(
        &["--loss-scale", "128", "--train-iters", "1"],
        &[],
        &["add --fp16"],
    );
    refused(
        &[&base[..], &["--initial-loss-scale", "1000"]].concat(),
        &[],
        &["--initial-loss-scale 1000", "power of two"],
    );
}

#[test]
fn finetune_starts_afresh_from_the_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    let base = ["--batch-size", "2"];
    ok(&[
        &base[..],
        &["--train-iters", "6", "--save", ck.to_str().unwrap()],
    ]
    .concat());
    let fresh = with_metrics(
        tmp.path(),
        "fresh",
        &[&base[..], &["--train-iters", "3"]].concat(),
    );
    let tuned = with_metrics(
        tmp.path(),
        "tuned",
        &[
            &base[..],
            &[
                "--train-iters",
                "3",
                "--load",
                ck.to_str().unwrap(),
                "--finetune",
            ],
        ]
        .concat(),
    );
    // Iterations and schedule restart (same lrs as a fresh run), from the trained weights.
    assert_eq!(
        tuned.iter().map(|m| (m.0, m.2)).collect::<Vec<_>>(),
        fresh.iter().map(|m| (m.0, m.2)).collect::<Vec<_>>()
    );
    assert!(tuned[0].1 < fresh[0].1 - 0.01, "{tuned:?} vs {fresh:?}");
    refused(
        &[&base[..], &["--train-iters", "3", "--finetune"]].concat(),
        &[],
        &["--finetune", "--load"],
    );
    let (_, err) = ok(&[
        &base[..],
        &[
            "--train-iters",
            "7",
            "--load",
            ck.to_str().unwrap(),
            "--no-load-rng",
        ],
    ]
    .concat());
    assert!(err.contains("--no-load-rng"), "{err}");
}

#[test]
fn conflicting_or_unsupported_names_are_refused() {
    let b = ["--batch-size", "2"];
    for (extra, needles) in [
        (
            &["--train-iters", "5", "--train-samples", "40"][..],
            &["--train-iters or --train-samples"][..],
        ),
        (
            &["--warmup", "0.1", "--lr-warmup-iters", "3"],
            &["--lr-warmup-iters"],
        ),
        (
            &["--lr-warmup-iters", "3", "--lr-warmup-samples", "6"],
            &["not both"],
        ),
        (
            &[
                "--recompute-granularity",
                "full",
                "--recompute-method",
                "block",
            ],
            &["not supported: --recompute-method block"],
        ),
        (
            &["--recompute-num-layers", "2"],
            &["--recompute-granularity full"],
        ),
        (
            &["--global-batch-size", "6", "--world-size", "4"],
            &["batch"],
        ),
    ] {
        refused(&[&b[..], extra].concat(), &[], needles);
    }
}

#[test]
fn launcher_names_and_environments() {
    let (v, _) = ok(&[
        "--train-iters",
        "1",
        "--batch-size",
        "2",
        "--local_rank",
        "0",
    ]);
    assert_eq!(v["world_size"], 1);
    refused(
        &["--train-iters", "1", "--local_rank", "1"],
        &[("LOCAL_RANK", "0")],
        &["--local_rank 1 disagrees"],
    );
    // torchrun's environment without MPI: never a silent world of one per process.
    refused(
        &["--train-iters", "1"],
        &[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")],
        &["RANK=0 WORLD_SIZE=2", "mpirun -np 2", "MASTER_PORT+1"],
    );
    // On GPUs the NCCL id travels over TCP at MASTER_PORT + 1, which must be known.
    let gpu = ["--train-iters", "1", "--device", "cuda"];
    refused(
        &gpu,
        &[("RANK", "1"), ("WORLD_SIZE", "2")],
        &["MASTER_PORT", "DEEPSCALE_RENDEZVOUS_PORT"],
    );
    refused(
        &gpu,
        &[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "65535")],
        &["MASTER_PORT=65535"],
    );
    refused(
        &[&gpu[..], &["--comm-file", "/tmp/x"]].concat(),
        &[],
        &["RANK and WORLD_SIZE"],
    );
}

/// `deepscale launch` reads a DeepSpeed hostfile with --num_nodes/--num_gpus/--include/--exclude
/// and prints the mpirun command it runs (here only printed: the MPI suite runs one).
#[test]
fn launch_builds_the_mpirun_command_from_a_hostfile() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hostfile");
    std::fs::write(
        &hf,
        "worker-0 slots=4\nworker-1 slots=4 # second\n\nworker-2 slots=2\n",
    )
    .unwrap();
    let launch = |extra: &[&str]| {
        let mut args = vec!["launch", "--hostfile", hf.to_str().unwrap(), "--dry-run"];
        args.extend(extra);
        args.extend(["pretrain-gpt2", "--zero-stage", "2"]);
        Command::new(env!("CARGO_BIN_EXE_deepscale"))
            .args(&args)
            .output()
            .unwrap()
    };
    let cmd = |extra: &[&str]| {
        let out = launch(extra);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{extra:?}: {err}");
        err.lines()
            .find(|l| l.starts_with("launch: "))
            .unwrap()
            .to_string()
    };
    let all = cmd(&[]);
    assert!(
        all.contains("mpirun -np 10 -H worker-0:4,worker-1:4,worker-2:2"),
        "{all}"
    );
    assert!(
        all.contains("MASTER_ADDR=worker-0") && all.ends_with("pretrain-gpt2 --zero-stage 2"),
        "{all}"
    );
    assert!(
        cmd(&["--num_nodes", "2", "--num_gpus", "2"]).contains("-np 4 -H worker-0:2,worker-1:2")
    );
    assert!(cmd(&["--exclude", "worker-1"]).contains("-np 6 -H worker-0:4,worker-2:2"));
    let inc = cmd(&["--include", "worker-0:1,3@worker-1:1,3"]);
    assert!(
        inc.contains("-np 4") && inc.contains("CUDA_VISIBLE_DEVICES=1,3"),
        "{inc}"
    );
    let bad = launch(&["--include", "worker-9"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("host worker-9 is not in the hostfile"));
}
