//! BERT samples: masking statistics (15%; 80/10/10), well-formed sentence pairs, determinism; and
//! `pretrain-bert` from text and from a sentence-split Megatron dataset.
use std::process::Command;
use std::sync::Arc;
use zoo::bert_dataset::{BertConfig, BertDataset, InMemoryDocuments, Special};

const SP: Special = Special {
    cls: 101,
    sep: 102,
    mask: 103,
    pad: 0,
    vocab_size: 30522,
};

fn corpus() -> Arc<InMemoryDocuments> {
    Arc::new(InMemoryDocuments(
        (0..40u32)
            .map(|d| {
                (0..(2 + d % 5))
                    .map(|s| {
                        (0..(5 + (d * 7 + s * 3) % 20))
                            .map(|t| 1000 + d * 1000 + s * 30 + t)
                            .collect()
                    })
                    .collect()
            })
            .collect(),
    ))
}

fn dataset(binary_head: bool, seed: u64) -> BertDataset {
    let cfg = BertConfig {
        max_seq_length: 48,
        masked_lm_prob: 0.15,
        short_seq_prob: 0.1,
        binary_head,
        seed,
    };
    BertDataset::new(corpus(), 0..40, 2000, cfg, SP).unwrap()
}

#[test]
fn masking_follows_15_percent_and_80_10_10() {
    let ds = dataset(true, 3);
    let (mut real, mut masked, mut as_mask, mut kept, mut random, mut swapped) = (0, 0, 0, 0, 0, 0);
    for i in 0..ds.len().min(2000) {
        let s = ds.sample(i).unwrap();
        let n = s.padding_mask.iter().filter(|&&m| m == 1).count();
        real += n - 3; // minus [CLS] and two [SEP]
        swapped += usize::from(s.is_random);
        for k in 0..s.tokens.len() {
            if s.loss_mask[k] == 1.0 {
                masked += 1;
                assert_ne!(s.labels[k], 0);
                assert!(
                    ![SP.cls, SP.sep, SP.pad].contains(&s.labels[k]),
                    "special tokens are never masked"
                );
                if s.tokens[k] == SP.mask {
                    as_mask += 1;
                } else if s.tokens[k] == s.labels[k] {
                    kept += 1;
                } else {
                    random += 1;
                }
            } else {
                assert_eq!(s.labels[k], 0);
            }
        }
    }
    let frac = masked as f64 / real as f64;
    assert!((0.13..0.18).contains(&frac), "masked fraction {frac}");
    let m = masked as f64;
    assert!(
        (as_mask as f64 / m - 0.8).abs() < 0.03,
        "[MASK] {}",
        as_mask as f64 / m
    );
    assert!(
        (kept as f64 / m - 0.1).abs() < 0.03,
        "kept {}",
        kept as f64 / m
    );
    assert!(
        (random as f64 / m - 0.1).abs() < 0.03,
        "random {}",
        random as f64 / m
    );
    let n = ds.len().min(2000) as f64;
    assert!(
        (swapped as f64 / n - 0.5).abs() < 0.05,
        "swapped {}",
        swapped as f64 / n
    );
}

#[test]
fn sentence_pairs_are_well_formed_and_deterministic() {
    let ds = dataset(true, 5);
    let again = dataset(true, 5);
    let mut short = 0;
    for i in 0..500 {
        let s = ds.sample(i).unwrap();
        assert_eq!(
            s,
            again.sample(i).unwrap(),
            "sample {i} is a function of (seed, index)"
        );
        assert_eq!(s.tokens.len(), 48);
        assert_eq!(s.tokens[0], SP.cls);
        let n = s.padding_mask.iter().filter(|&&m| m == 1).count();
        assert!(
            s.padding_mask[..n].iter().all(|&m| m == 1)
                && s.padding_mask[n..].iter().all(|&m| m == 0)
        );
        assert!(s.tokens[n..].iter().all(|&t| t == SP.pad));
        // [CLS] A [SEP] B [SEP]: both segments non-empty, types 0 then 1.
        let seps: Vec<usize> = (0..n)
            .filter(|&k| s.tokens[k] == SP.sep && s.loss_mask[k] == 0.0)
            .collect();
        assert_eq!(seps.len(), 2, "sample {i}: {:?}", &s.tokens[..n]);
        assert_eq!(seps[1], n - 1);
        assert!(
            seps[0] > 1 && seps[1] > seps[0] + 1,
            "empty segment in sample {i}"
        );
        assert!(s.token_types[..=seps[0]].iter().all(|&t| t == 0));
        assert!(s.token_types[seps[0] + 1..n].iter().all(|&t| t == 1));
        // Unmasked tokens of a pair come from one document, in order unless swapped.
        let orig: Vec<u32> = (0..n)
            .map(|k| {
                if s.loss_mask[k] == 1.0 {
                    s.labels[k]
                } else {
                    s.tokens[k]
                }
            })
            .collect();
        let a: Vec<u32> = orig[1..seps[0]].to_vec();
        let b: Vec<u32> = orig[seps[0] + 1..n - 1].to_vec();
        assert_eq!(a[0] / 1000, b[0] / 1000, "one document");
        assert_eq!(
            a.last().unwrap() < b.first().unwrap(),
            !s.is_random,
            "sample {i}: order vs label"
        );
        short += usize::from(n < 40);
    }
    assert!(
        short > 10,
        "short_seq_prob makes some samples shorter ({short})"
    );
    let other = dataset(true, 6);
    assert!((0..50).any(|i| other.sample(i).unwrap() != ds.sample(i).unwrap()));
    // Without the binary head: one segment.
    let mono = dataset(false, 5).sample(0).unwrap();
    let n = mono.padding_mask.iter().filter(|&&m| m == 1).count();
    assert_eq!(mono.tokens[n - 1], SP.sep);
    assert!(mono.token_types.iter().all(|&t| t == 0));
}

const ASSETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets");

fn deepscale(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_deepscale"))
        .args(args)
        .env("DEEPSCALE_ASSETS", ASSETS)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap()
}

#[test]
fn pretrain_bert_from_text_and_from_a_sentence_dataset() {
    let common = [
        "pretrain-bert",
        "--num-layers",
        "2",
        "--hidden-size",
        "32",
        "--num-attention-heads",
        "2",
        "--seq-length",
        "48",
        "--batch-size",
        "4",
        "--train-iters",
        "15",
        "--lr",
        "5e-3",
        "--lr-decay-style",
        "constant",
        "--eval-interval",
        "15",
        "--eval-iters",
        "1",
        "--json",
    ];
    let mut args = common.to_vec();
    args.extend(["--world-size", "2", "--zero-stage", "2"]);
    let v = deepscale(&args);
    assert_eq!(
        (v["dp"].as_u64(), v["zero_stage"].as_u64()),
        (Some(2), Some(2))
    );
    assert!(
        v["final_loss"].as_f64().unwrap() < v["initial_loss"].as_f64().unwrap() - 0.3,
        "{v}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("bert");
    let vocab = format!("{ASSETS}/bert/bert-uncased-vocab.txt");
    let p = deepscale(&[
        "preprocess-data",
        "--input",
        &format!("{ASSETS}/data/sample.jsonl"),
        "--tokenizer-type",
        "BertWordPieceLowerCase",
        "--vocab-file",
        &vocab,
        "--output-prefix",
        prefix.to_str().unwrap(),
        "--split-sentences",
        "--json",
    ]);
    assert_eq!(p["dtype"], "uint16");
    let data = format!("{}_text_sentence", prefix.display());
    let mut args = common.to_vec();
    args.extend([
        "--data-path",
        &data,
        "--world-size",
        "2",
        "--model-parallel-size",
        "2",
    ]);
    let v = deepscale(&args);
    assert_eq!(v["tp"].as_u64(), Some(2));
    assert!(
        v["final_loss"].as_f64().unwrap() < v["initial_loss"].as_f64().unwrap() - 0.3,
        "{v}"
    );
    assert!(v["valid_loss"].as_f64().is_some());
    // A pipeline: 2 stages x 2 data-parallel ranks, 2 micro-batches each.
    let base = [
        "pretrain-bert",
        "--num-layers",
        "2",
        "--hidden-size",
        "32",
        "--num-attention-heads",
        "2",
        "--seq-length",
        "48",
        "--train-iters",
        "3",
        "--lr",
        "5e-3",
        "--lr-decay-style",
        "constant",
        "--eval-interval",
        "3",
        "--eval-iters",
        "1",
        "--hidden-dropout",
        "0",
        "--attention-dropout",
        "0",
        "--json",
    ];
    // Same micro-batches without the pipeline (the masked-LM mean is per micro-batch, as in
    // Megatron, so the split must match).
    let one = deepscale(
        &[
            &base[..],
            &["--batch-size", "1", "--gas", "2", "--world-size", "2"],
        ]
        .concat(),
    );
    let piped = deepscale(
        &[
            &base[..],
            &[
                "--batch-size",
                "1",
                "--gas",
                "2",
                "--world-size",
                "4",
                "--pipe-parallel-size",
                "2",
            ],
        ]
        .concat(),
    );
    assert_eq!(piped["pp"].as_u64(), Some(2));
    let (a, b) = (
        piped["final_loss"].as_f64().unwrap(),
        one["final_loss"].as_f64().unwrap(),
    );
    assert!(
        (a - b).abs() <= 1e-5 * b,
        "BERT pp=2 x dp=2 {a} vs dp=2 {b}"
    );
    // A pipeline checkpoint (each stage writes its layers) continues without the pipeline.
    let tmp2 = tempfile::tempdir().unwrap();
    let ck = tmp2.path().join("ck");
    let ck = ck.to_str().unwrap();
    let pp2 = [
        "--batch-size",
        "1",
        "--gas",
        "2",
        "--world-size",
        "4",
        "--pipe-parallel-size",
        "2",
    ];
    deepscale(&[&base[..], &pp2, &["--save", ck]].concat());
    let dp2 = ["--batch-size", "1", "--gas", "2", "--world-size", "2"];
    let mut four = base.to_vec();
    let at = four.iter().position(|a| *a == "--train-iters").unwrap();
    four[at + 1] = "4";
    let whole = deepscale(&[&four[..], &dp2].concat());
    let resumed = deepscale(&[&four[..], &dp2, &["--load", ck]].concat());
    let (a, b) = (
        resumed["final_loss"].as_f64().unwrap(),
        whole["final_loss"].as_f64().unwrap(),
    );
    assert!(
        (a - b).abs() <= 1e-5 * b,
        "BERT resumed from pp=2 {a} vs uninterrupted {b}"
    );
    // fp16 parameters with dynamic loss scaling train too.
    let mut args = common.to_vec();
    args.extend(["--fp16", "--world-size", "2", "--zero-stage", "2"]);
    let v = deepscale(&args);
    assert!(
        v["final_loss"].as_f64().unwrap().is_finite()
            && v["final_loss"].as_f64() < v["initial_loss"].as_f64(),
        "{v}"
    );
}
