//! `deepscale bench` subcommands run on tiny sizes and report what they measure (their speed is
//! recorded in BENCHMARKS.md, never asserted here).
mod common;
use common::cli::{deepscale, last_json, ok, refusal, BENCH_DP_TINY};

/// `bench dp`: one rank and dp 2 alternate; each in-process rank computes on its own share of
/// the threads (the one-rank run on all of them).
#[test]
fn bench_dp_pairs_one_rank_with_dp2_on_shared_cores() {
    let v = last_json(&ok(&BENCH_DP_TINY));
    assert_eq!(v["bench"], "dp");
    assert_eq!(v["data_parallel"], 2);
    assert_eq!(v["mpi"], false);
    let round = &v["rounds"][0];
    assert!(round["ratio"].as_f64().is_some_and(|r| r > 0.0), "{v}");
    let cores = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    assert_eq!(round["threads_per_rank"]["one_rank"], cores);
    assert_eq!(round["threads_per_rank"]["dp"], (cores / 2).max(1));
    let bad = ["bench", "dp", "--batch-size", "3"];
    refusal(
        &deepscale(&bad),
        &bad,
        &["global batch (3)", "2 data-parallel ranks"],
    );
}

/// `bench dp --overlap-comm`: dp 2 is timed with and without DeepSpeed's `overlap_comm` in each
/// round (small buckets, so that there are several to overlap).
#[test]
fn bench_dp_times_overlap_comm_beside_waiting() {
    let mut args = BENCH_DP_TINY.to_vec();
    args.extend([
        "--overlap-comm",
        "--reduce-bucket-size",
        "200000",
        "--rounds",
        "2",
    ]);
    let v = last_json(&ok(&args));
    assert_eq!(v["overlap_comm"], true);
    assert_eq!(v["reduce_bucket_size"], 200000);
    assert_eq!(v["rounds"].as_array().map(Vec::len), Some(2), "{v}");
    let rounds = v["rounds"].as_array().unwrap();
    for round in rounds {
        for key in ["ratio", "overlap_ratio", "overlap_ms", "dp_ms"] {
            assert!(round[key].as_f64().is_some_and(|r| r > 0.0), "{key}: {v}");
        }
        assert!(round["one_rank_split_ms"]["backward"]
            .as_f64()
            .is_some_and(|r| r > 0.0));
    }
    // The summary over the rounds is of the rounds' own ratios.
    for (key, summary) in [
        ("ratio", "ratio_summary"),
        ("overlap_ratio", "overlap_ratio_summary"),
    ] {
        let r: Vec<f64> = rounds.iter().map(|x| x[key].as_f64().unwrap()).collect();
        let s = &v[summary];
        let (lo, hi) = (r[0].min(r[1]), r[0].max(r[1]));
        assert_eq!(s["min"].as_f64(), Some(lo), "{v}");
        assert_eq!(s["max"].as_f64(), Some(hi), "{v}");
        assert!(
            (s["median"].as_f64().unwrap() - (lo + hi) / 2.0).abs() < 1e-9,
            "{v}"
        );
        assert!(
            (s["geomean"].as_f64().unwrap() - (lo * hi).sqrt()).abs() < 1e-9,
            "{v}"
        );
    }
}

/// `bench attention`: the tiled kernel's scratch does not grow with the sequence, the others'
/// do; `--key-block` is rounded up to whole row blocks as the kernel runs it. A list flag takes
/// its values apart (as `--help` shows the default) or joined by commas.
#[test]
fn bench_attention_reports_each_kernels_scratch() {
    let args = [
        "bench",
        "attention",
        "--seq-lengths",
        "100",
        "300",
        "--tokens",
        "300",
        "--num-attention-heads",
        "2",
        "--head-dim",
        "8",
        "--key-block",
        "100",
        "--rounds",
        "1",
        "--json",
    ];
    let v = last_json(&ok(&args));
    let r = v["results"].as_array().expect("results");
    assert_eq!(r[0]["key_block"], 192);
    let kib = |i: usize, k: &str| r[i]["scratch_kib"][k].as_f64().expect("scratch");
    // 96 x 192 floats at t = 300; 96 x 100 at t = 100 (the tile is cut at t).
    assert_eq!(kib(1, "tiled"), 96.0 * 192.0 * 4.0 / 1024.0);
    assert_eq!(kib(1, "whole_rows"), 96.0 * 300.0 * 4.0 / 1024.0);
    assert_eq!(kib(1, "square"), 300.0 * 300.0 * 4.0 / 1024.0);
    assert!(kib(0, "tiled") < kib(1, "tiled"));
    let mut joined: Vec<&str> = args.to_vec();
    joined.splice(2..5, ["--seq-lengths", "100,300"]);
    let w = last_json(&ok(&joined));
    assert_eq!(w["results"][1]["scratch_kib"], r[1]["scratch_kib"]);
    assert_eq!(w["results"].as_array().map(Vec::len), Some(2));
    let bad = ["bench", "attention", "--key-block", "0"];
    refusal(&deepscale(&bad), &bad, &["--key-block"]);
}

/// `bench --compare-torch --torch-bf16 on`: the bf16 mode is paired round by round with the
/// peer's `prec=bf16` (autocast) figures, fp32 with its fp32 ones, and each ratio is the median
/// of the per-round ratios. The peer here is a stand-in `torch_bench.py` (PyTorch is not in CI;
/// BENCHMARKS.md has the real runs) that fails on any argument list but the two it expects, so
/// what is checked is the invocation and the arithmetic, not PyTorch's speed.
#[test]
fn bench_pairs_the_bf16_mode_with_torch_autocast() {
    let dir = tempfile::tempdir().unwrap();
    let peer = dir.path().join("torch_bench.py");
    std::fs::write(
        &peer,
        r#"import json, sys
args = sys.argv[1:]
if args == ["small"]:
    print(json.dumps({"tokens_per_s": 100.0, "fwd_tokens_per_s": 400.0}))
elif args == ["small", "prec=bf16"]:
    print(json.dumps({"tokens_per_s": 20.0, "fwd_tokens_per_s": 50.0}))
else:
    sys.exit("unexpected arguments %r" % args)
"#,
    )
    .unwrap();
    let peer = peer.to_str().unwrap();
    let args = [
        "bench",
        "--config",
        "small",
        "--iters",
        "1",
        "--compare-torch",
        "--rounds",
        "2",
        "--torch-bf16",
        "on",
        "--torch-python",
        "python3",
        "--torch-bench",
        peer,
        "--json",
    ];
    let v = last_json(&ok(&args));
    let row = &v["results"][0];
    let f = |k: &str| -> Vec<f64> {
        row[k]
            .as_array()
            .unwrap_or_else(|| panic!("{k}: {row}"))
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let median_ratio = |ours: Vec<f64>, theirs: f64| {
        assert_eq!(ours.len(), 2, "{row}");
        let mut r: Vec<f64> = ours.iter().map(|o| o / theirs).collect();
        r.sort_by(f64::total_cmp);
        r[1]
    };
    let close = |k: &str, want: f64| {
        let got = row[k].as_f64().unwrap_or_else(|| panic!("{k}: {row}"));
        assert!((got - want).abs() <= 1e-9 * want, "{k}: {got} != {want}");
    };
    close("vs_torch", median_ratio(f("rounds_tokens_per_s"), 100.0));
    close(
        "fwd_vs_torch",
        median_ratio(f("rounds_fwd_tokens_per_s"), 400.0),
    );
    close(
        "bf16_vs_torch_bf16",
        median_ratio(f("rounds_bf16_tokens_per_s"), 20.0),
    );
    close(
        "bf16_fwd_vs_torch_bf16",
        median_ratio(f("rounds_bf16_fwd_tokens_per_s"), 50.0),
    );
    assert_eq!(f("rounds_torch_bf16_tokens_per_s"), [20.0, 20.0]);
    assert!(row["bf16_fwd_tokens_per_s"]
        .as_f64()
        .is_some_and(|t| t > 0.0));

    // `off`: fp32 is still paired, the bf16 mode is not, and the log says why.
    let mut off = args;
    off[9] = "off";
    let out = ok(&off);
    let row = &last_json(&out)["results"][0];
    assert!(row["vs_torch"].as_f64().is_some(), "{row}");
    assert!(row.get("bf16_vs_torch_bf16").is_none(), "{row}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not paired with PyTorch's autocast"));

    // Asking for the pairing where nothing can be paired is refused before any work.
    let bad = ["bench", "--torch-bf16", "on"];
    refusal(
        &deepscale(&bad),
        &bad,
        &["--torch-bf16 on", "--compare-torch"],
    );
    let bad = [
        "bench",
        "--torch-bf16",
        "on",
        "--compare-torch",
        "--no-bf16",
    ];
    refusal(&deepscale(&bad), &bad, &["--torch-bf16 on", "--no-bf16"]);
}

/// `bench offload` on a tiny model: the NVMe run stays within the RAM budget the in-memory
/// one exceeds, moves bytes through every state's swap file, and steps during backward unless
/// `--gradient-clipping` makes the step wait for the global norm.
#[test]
fn bench_offload_reports_the_swap_and_where_the_step_ran() {
    let dir = tempfile::tempdir().unwrap();
    let nvme = dir.path().to_str().unwrap();
    let tiny = [
        "bench",
        "offload",
        "--num-layers",
        "1",
        "--hidden-size",
        "32",
        "--num-attention-heads",
        "2",
        "--seq-length",
        "8",
        "--iters",
        "1",
        "--ram-budget-mib",
        "8",
        "--sub-group-size",
        "65536",
        "--nvme-path",
        nvme,
        "--json",
    ];
    for clip in ["0", "1.0"] {
        let mut args = tiny.to_vec();
        args.extend(["--gradient-clipping", clip]);
        let v = last_json(&ok(&args));
        assert_eq!(v["in_memory_exceeds_budget"], true, "{v}");
        // The default buffer_count fills the budget: (8 MiB - 1/64) over 260 KiB slots (64 Ki
        // elements and a header, 4 KiB-aligned) — and the run stays within it.
        assert_eq!(v["buffer_count"].as_u64(), Some(31), "{v}");
        assert_eq!(v["nvme_within_budget"], true, "{v}");
        assert_eq!(v["gradient_clipping"].as_f64(), clip.parse().ok(), "{v}");
        let nvme = &v["nvme"];
        for file in ["exp_avg", "exp_avg_sq", "fp32_params"] {
            let b = &nvme["swap_bytes_per_step_by_buffer"][file];
            assert!(b["read"].as_f64().unwrap() > 0.0, "{file}: {v}");
            assert!(b["written"].as_f64().unwrap() > 0.0, "{file}: {v}");
        }
        let in_backward = nvme["elements_stepped_in_backward_per_step"]
            .as_f64()
            .unwrap();
        assert_eq!(in_backward > 0.0, clip == "0", "{v}");
    }
    let bad = ["bench", "offload", "--gradient-clipping=-1"];
    refusal(&deepscale(&bad), &bad, &["--gradient-clipping -1"]);
}

/// Every `bench` refuses sizes it cannot run before any work: a zero where at least one is
/// needed (naming the flag), and buffers beyond what the process may use (here a 3 GB
/// `ulimit -v`) with the flags that size them and the limit — an error, never a panic, an
/// allocator abort or the OOM killer minutes in.
#[test]
fn bench_refuses_impossible_sizes_before_any_work() {
    let zeros: [(&[&str], &str); 8] = [
        (&["bench", "comm", "--sizes-mib", "0"], "--sizes-mib"),
        (
            &["bench", "attention", "--seq-lengths", "0"],
            "--seq-lengths",
        ),
        (&["bench", "attention", "--head-dim", "0"], "--head-dim"),
        (
            &["bench", "attention", "--num-attention-heads", "0"],
            "--num-attention-heads",
        ),
        (&["bench", "gemm", "--hidden-size", "0"], "--hidden-size"),
        (&["bench", "gemm", "--tokens", "0"], "--tokens"),
        (
            &["bench", "offload", "--ram-budget-mib", "0"],
            "--ram-budget-mib",
        ),
        (&["bench", "whole", "--batch-size", "0"], "--batch-size"),
    ];
    for (args, flag) in zeros {
        refusal(&deepscale(args), args, &[flag]);
    }
    let dir = tempfile::tempdir().unwrap();
    let nvme = dir.path().join("nvme");
    let too_big: [(Vec<&str>, &[&str]); 9] = [
        (vec!["comm", "--sizes-mib", "1,4096"], &["--sizes-mib 4096"]),
        (
            vec!["attention", "--tokens", "100000000"],
            &["--tokens 100000000"],
        ),
        (vec!["gemm", "--tokens", "10000000"], &["--tokens 10000000"]),
        (vec!["adam", "--model", "gpt2-1.3b"], &["--model gpt2-1.3b"]),
        (
            vec!["tp", "--batch-size", "100000", "--tp", "1"],
            &["--batch-size 100000", "activations"],
        ),
        (
            vec!["dp", "--batch-size", "100000", "--data-parallel", "1"],
            &["--batch-size 100000", "activations"],
        ),
        (
            vec!["train", "--batch-size", "100000"],
            &["--batch-size 100000", "4 model(s)"],
        ),
        (
            vec![
                "offload",
                "--hidden-size",
                "100000",
                "--nvme-path",
                nvme.to_str().unwrap(),
            ],
            &["--hidden-size 100000"],
        ),
        (
            vec!["whole", "--hidden-size", "1000000"],
            &["--hidden-size 1000000"],
        ),
    ];
    for (args, needles) in too_big {
        let cmd = format!(
            "ulimit -v 3000000 && exec {} bench {}",
            env!("CARGO_BIN_EXE_deepscale"),
            args.join(" ")
        );
        let out = std::process::Command::new("bash")
            .args(["-c", &cmd])
            .output()
            .expect("bash");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        for n in [&["not enough memory", "ulimit -v"][..], needles].concat() {
            assert!(err.contains(n), "{args:?}: lacks `{n}`: {err}");
        }
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert!(
        !nvme.exists(),
        "bench offload probed the disk before refusing"
    );
}
