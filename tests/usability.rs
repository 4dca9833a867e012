//! What a newcomer trips on: metrics files kept apart between runs, a lone validation point on
//! the loss plot, `inspect-data --json` without a vocabulary, `evaluate` printing JSON only with
//! `--json`, the end-of-run sample readable even when it is whitespace.
use std::path::Path;

#[path = "common/cli.rs"]
mod cli;
use cli::{deepscale, ok, ASSETS};

const TINY: &[&str] = &[
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
    "--eval-iters",
    "1",
    "--log-interval",
    "1",
];

fn tiny(extra: &[&str]) -> Vec<String> {
    TINY.iter().chain(extra).map(|s| s.to_string()).collect()
}

fn iterations(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v.get("loss")?;
            v["iteration"].as_u64()
        })
        .collect()
}

#[test]
fn metrics_files_are_kept_apart_and_a_resume_continues_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m.jsonl");
    let ck = tmp.path().join("ck");
    let ms = m.to_str().unwrap();
    let args = tiny(&[
        "--train-iters",
        "4",
        "--sample-length",
        "0",
        "--metrics-file",
        ms,
        "--save",
        ck.to_str().unwrap(),
        "--save-interval",
        "2",
    ]);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(iterations(&m), [1, 2, 3, 4]);
    // A second run into the same file is refused before any work, the file untouched.
    let before = std::fs::read(&m).unwrap();
    let again = tiny(&[
        "--train-iters",
        "2",
        "--sample-length",
        "0",
        "--metrics-file",
        ms,
    ]);
    let out = deepscale(&again.iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--metrics-file") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(std::fs::read(&m).unwrap(), before);
    // Resuming from iteration 2 continues the file: lines 3 and 4 (logged after that checkpoint)
    // are replaced by the resumed run's.
    let resume = tiny(&[
        "--train-iters",
        "5",
        "--sample-length",
        "0",
        "--metrics-file",
        ms,
        "--load",
        ck.join("global_step2").to_str().unwrap(),
    ]);
    ok(&resume.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(iterations(&m), [1, 2, 3, 4, 5]);
    // --overwrite replaces it.
    let mut over = again.clone();
    over.push("--overwrite".into());
    ok(&over.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(iterations(&m), [1, 2]);
}

#[test]
fn a_lone_validation_point_is_drawn() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m.jsonl");
    // Validation only at the end: one point.
    let args = tiny(&[
        "--train-iters",
        "3",
        "--eval-interval",
        "0",
        "--sample-length",
        "0",
        "--metrics-file",
        m.to_str().unwrap(),
    ]);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let png = image::open(m.with_extension("png")).unwrap().to_rgb8();
    let red = png
        .pixels()
        .filter(|p| p[0] > 200 && p[1] < 60 && p[2] < 60)
        .count();
    // The legend's short red line alone is about 30 pixels; the point's disc doubles that.
    assert!(
        red > 50,
        "{red} red pixels: the validation point is not drawn"
    );
}

#[test]
fn inspect_data_without_a_vocabulary_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("d");
    let jsonl = tmp.path().join("d.jsonl");
    std::fs::write(&jsonl, "{\"text\": \"hello world\"}\n").unwrap();
    ok(&[
        "preprocess-data",
        "--input",
        jsonl.to_str().unwrap(),
        "--output-prefix",
        prefix.to_str().unwrap(),
        "--vocab-file",
        &format!("{ASSETS}/gpt2/gpt2-vocab.json"),
        "--merge-file",
        &format!("{ASSETS}/gpt2/gpt2-merges.txt"),
        "--tokenizer-type",
        "GPT2BPETokenizer",
    ]);
    let doc = format!("{}_text_document", prefix.display());
    let out = ok(&["inspect-data", &doc, "--json"]);
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert!(v.get("text").is_none(), "{v}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vocab-file"));
    let out = ok(&[
        "inspect-data",
        &doc,
        "--json",
        "--vocab-file",
        &format!("{ASSETS}/gpt2/gpt2-vocab.json"),
        "--merge-file",
        &format!("{ASSETS}/gpt2/gpt2-merges.txt"),
    ]);
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert!(v["text"].as_str().unwrap().contains("hello world"), "{v}");
}

#[test]
fn evaluate_prints_json_only_with_json_and_the_sample_is_quoted() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    let args = tiny(&[
        "--train-iters",
        "2",
        "--sample-length",
        "4",
        "--save-hf",
        hf.to_str().unwrap(),
    ]);
    let out = ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sample (top-k 40, temperature 0.8, 4 tokens): \"This License\" + \""),
        "{err}"
    );
    let wiki = format!("{ASSETS}/eval/wikitext_sample.txt");
    let plain = ok(&[
        "evaluate",
        "--task",
        "wikitext103",
        "--hf-dir",
        hf.to_str().unwrap(),
        "--valid-data",
        &wiki,
    ]);
    let stdout = String::from_utf8_lossy(&plain.stdout);
    assert!(stdout.starts_with("wikitext103 loss "), "{stdout}");
    assert!(serde_json::from_str::<serde_json::Value>(stdout.trim()).is_err());
    let json = ok(&[
        "evaluate",
        "--task",
        "wikitext103",
        "--hf-dir",
        hf.to_str().unwrap(),
        "--valid-data",
        &wiki,
        "--json",
    ]);
    let last = String::from_utf8_lossy(&json.stdout);
    let v: serde_json::Value = serde_json::from_str(last.lines().last().unwrap()).unwrap();
    assert!(v["perplexity"].as_f64().unwrap() > 1.0);
}
