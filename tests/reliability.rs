//! Nothing silent, nothing hangs: a stalled rank ends the whole run within --comm-timeout plus a
//! small grace, naming the rank and the collective (once prefixed).
use std::process::Command;
use std::time::{Duration, Instant};

const ASSETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets");

fn tiny() -> Vec<&'static str> {
    vec![
        "pretrain-gpt2",
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
        "4",
        "--eval-iters",
        "1",
        "--sample-length",
        "0",
    ]
}

#[test]
fn a_stalled_rank_ends_the_run_within_the_timeout() {
    let mut args = tiny();
    args.extend(["--world-size", "2", "--comm-timeout", "3"]);
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_deepscale"))
        .args(&args)
        .env("DEEPSCALE_ASSETS", ASSETS)
        // Rank 1 hangs before iteration 2, alive and outside any collective.
        .env("DEEPSCALE_INJECT_STALL", "1:2")
        .output()
        .expect("run");
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    // Startup (data, the GEMM peak) + 3 s timeout + 5 s grace, with room for a slow machine.
    assert!(took < Duration::from_secs(60), "took {took:?}: {err}");
    assert!(err.contains("timed out waiting for rank(s) [1]"), "{err}");
    assert!(err.contains("did not finish"), "{err}");
    assert!(!err.contains("rank 0: rank 0:"), "doubled prefix: {err}");
}

/// preprocess-data over an existing prefix with a bad input line: an error naming the line, and
/// the dataset that was there untouched (nothing truncated, no temporaries left).
#[test]
fn a_failed_prepress_keeps_the_dataset_that_was_there() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.jsonl");
    std::fs::write(
        &good,
        "{\"text\": \"one document\"}\n{\"text\": \"and another\"}\n",
    )
    .unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\nnot json at all\n").unwrap();
    let prefix = dir.path().join("ds");
    let run = |input: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_deepscale"))
            .args(["preprocess-data", "--input"])
            .arg(input)
            .args([
                "--tokenizer-type",
                "GPT2BPETokenizer",
                "--vocab-file",
                &format!("{ASSETS}/gpt2/gpt2-vocab.json"),
                "--merge-file",
                &format!("{ASSETS}/gpt2/gpt2-merges.txt"),
                "--output-prefix",
            ])
            .arg(&prefix)
            .output()
            .expect("run")
    };
    let out = run(&good);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files = |ext: &str| dir.path().join(format!("ds_text_document.{ext}"));
    let (bin, idx) = (
        std::fs::read(files("bin")).unwrap(),
        std::fs::read(files("idx")).unwrap(),
    );
    assert!(!bin.is_empty());
    let out = run(&bad);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("line 2"), "{err}");
    assert_eq!(
        std::fs::read(files("bin")).unwrap(),
        bin,
        "the .bin changed"
    );
    assert_eq!(
        std::fs::read(files("idx")).unwrap(),
        idx,
        "the .idx changed"
    );
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(left.is_empty(), "temporaries left: {left:?}");
}

/// Resuming at or past --train-iters is an error saying so (not a run of 2^64 - 2 iterations
/// with made-up figures).
#[test]
fn resuming_past_the_last_iteration_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let mut args = tiny();
    args.extend(["--save", ck.to_str().unwrap()]);
    let out = Command::new(env!("CARGO_BIN_EXE_deepscale"))
        .args(&args)
        .env("DEEPSCALE_ASSETS", ASSETS)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for iters in ["4", "2"] {
        let mut again = tiny();
        let at = again.iter().position(|a| *a == "--train-iters").unwrap();
        again[at + 1] = iters;
        again.extend(["--load", ck.to_str().unwrap(), "--json"]);
        let out = Command::new(env!("CARGO_BIN_EXE_deepscale"))
            .args(&again)
            .env("DEEPSCALE_ASSETS", ASSETS)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains("iteration 4") && err.contains("nothing to train"),
            "{err}"
        );
        assert!(!err.contains("18446744073709551"), "{err}");
        assert!(
            out.stdout.is_empty(),
            "no JSON summary of a run that did not happen"
        );
    }
}
