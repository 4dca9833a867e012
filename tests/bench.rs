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
    for round in v["rounds"].as_array().unwrap() {
        for key in ["ratio", "overlap_ratio", "overlap_ms", "dp_ms"] {
            assert!(round[key].as_f64().is_some_and(|r| r > 0.0), "{key}: {v}");
        }
    }
}

/// `bench attention`: the tiled kernel's scratch does not grow with the sequence, the others'
/// do; `--key-block` is rounded up to whole row blocks as the kernel runs it.
#[test]
fn bench_attention_reports_each_kernels_scratch() {
    let args = [
        "bench",
        "attention",
        "--seq-lengths",
        "100,300",
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
    let bad = ["bench", "attention", "--key-block", "0"];
    refusal(&deepscale(&bad), &bad, &["--key-block"]);
}
