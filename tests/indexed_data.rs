//! Megatron's mmap indexed dataset and the GPT-2 dataset over it: round trips, a file built byte by
//! byte from the format spec, corruption caught, the sample index's guarantees, blending, and the
//! `preprocess-data` / `inspect-data` / `pretrain-gpt2 --data-path PREFIX` commands.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use zoo::gpt2_dataset::{build_train_valid_test, split_ranges, BlendedDataset, GptDataset};
use zoo::indexed_dataset::{DType, MMapIndexedDataset, MMapIndexedDatasetBuilder};

/// Documents of varied lengths (some empty, some multi-item) with ids below `max`.
fn corpus(max: u32) -> Vec<Vec<Vec<u32>>> {
    (0..23)
        .map(|d| {
            (0..(d % 4))
                .map(|s| {
                    (0..(d * 7 + s * 3 + 1) % 41)
                        .map(|t| (d * 1000 + s * 100 + t) as u32 % max)
                        .collect()
                })
                .collect()
        })
        .collect()
}

fn write(prefix: &Path, dtype: DType, docs: &[Vec<Vec<u32>>]) {
    let mut b = MMapIndexedDatasetBuilder::create(prefix, dtype).unwrap();
    for d in docs {
        for item in d {
            b.add_item(item).unwrap();
        }
        b.end_document();
    }
    b.finalize().unwrap();
}

#[test]
fn writer_reader_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    for (dtype, max) in [(DType::U16, 65000), (DType::I32, 1 << 30), (DType::U8, 250)] {
        let docs = corpus(max);
        let prefix = tmp.path().join(format!("rt_{}", dtype.name()));
        write(&prefix, dtype, &docs);
        let ds = MMapIndexedDataset::open(&prefix).unwrap();
        assert_eq!(ds.dtype, dtype);
        assert_eq!(ds.num_documents(), docs.len());
        assert_eq!(ds.len(), docs.iter().map(|d| d.len()).sum::<usize>());
        for (d, items) in docs.iter().enumerate() {
            let got: Vec<Vec<u32>> = ds
                .document_items(d)
                .unwrap()
                .map(|i| ds.item(i).unwrap())
                .collect();
            assert_eq!(&got, items, "{} document {d}", dtype.name());
        }
    }
}

/// The .idx/.bin of two documents ([5, 6, 7] and [[1], [65535, 2]]) as uint16, written from the
/// format description, not by our writer.
fn by_hand(prefix: &Path) -> (Vec<u8>, Vec<u8>) {
    let mut idx = b"MMIDIDX\x00\x00".to_vec();
    idx.extend(1u64.to_le_bytes());
    idx.push(8); // uint16
    idx.extend(3u64.to_le_bytes()); // items
    idx.extend(3u64.to_le_bytes()); // doc_idx entries
    for s in [3i32, 1, 2] {
        idx.extend(s.to_le_bytes());
    }
    for p in [0i64, 6, 8] {
        idx.extend(p.to_le_bytes());
    }
    for d in [0i64, 1, 3] {
        idx.extend(d.to_le_bytes());
    }
    let bin: Vec<u8> = [5u16, 6, 7, 1, 65535, 2]
        .iter()
        .flat_map(|t| t.to_le_bytes())
        .collect();
    std::fs::write(format!("{}.idx", prefix.display()), &idx).unwrap();
    std::fs::write(format!("{}.bin", prefix.display()), &bin).unwrap();
    (idx, bin)
}

#[test]
fn a_file_built_from_the_spec_reads_back_and_our_writer_produces_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("hand");
    let (idx, bin) = by_hand(&p);
    let ds = MMapIndexedDataset::open(&p).unwrap();
    assert_eq!((ds.len(), ds.num_documents(), ds.dtype), (3, 2, DType::U16));
    assert_eq!(ds.item(0).unwrap(), vec![5, 6, 7]);
    assert_eq!(ds.document_items(1).unwrap(), 1..3);
    assert_eq!(ds.item(2).unwrap(), vec![65535, 2]);
    assert_eq!(ds.get(0, 1, 2).unwrap(), vec![6, 7]);
    let q = tmp.path().join("ours");
    write(
        &q,
        DType::U16,
        &[vec![vec![5, 6, 7]], vec![vec![1], vec![65535, 2]]],
    );
    assert_eq!(std::fs::read(format!("{}.idx", q.display())).unwrap(), idx);
    assert_eq!(std::fs::read(format!("{}.bin", q.display())).unwrap(), bin);
}

#[test]
fn corrupt_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("c");
    let (idx, bin) = by_hand(&p);
    let idx_path = PathBuf::from(format!("{}.idx", p.display()));
    let bin_path = PathBuf::from(format!("{}.bin", p.display()));
    let check = |idx: &[u8], bin: &[u8], needle: &str| {
        std::fs::write(&idx_path, idx).unwrap();
        std::fs::write(&bin_path, bin).unwrap();
        let e = MMapIndexedDataset::open(&p)
            .err()
            .expect("must fail")
            .to_string();
        assert!(e.contains(needle) && e.contains("c.idx"), "{needle}: {e}");
    };
    let mut bad = idx.clone();
    bad[0] = b'X';
    check(&bad, &bin, "bad magic");
    let mut bad = idx.clone();
    bad[9] = 2;
    check(&bad, &bin, "version 2");
    let mut bad = idx.clone();
    bad[17] = 9;
    check(&bad, &bin, "unknown dtype code 9");
    check(&idx[..idx.len() - 3], &bin, "truncated");
    check(&idx[..20], &bin, "shorter than the 34-byte header");
    check(&idx, &bin[..10], "lies outside");
    let mut bad = idx.clone();
    let last = bad.len() - 8;
    bad[last..].copy_from_slice(&2i64.to_le_bytes());
    check(&bad, &bin, "document index");
    let mut bad = idx.clone();
    bad[34..38].copy_from_slice(&(-1i32).to_le_bytes());
    check(&bad, &bin, "lies outside");
    // Float data is not token data.
    let mut bad = idx.clone();
    bad[17] = 7;
    std::fs::write(&idx_path, &bad).unwrap();
    std::fs::write(&bin_path, [0u8; 24]).unwrap();
    let ds = MMapIndexedDataset::open(&p).unwrap();
    assert!(ds.item(0).unwrap_err().to_string().contains("float32"));
}

#[test]
fn split_weights_follow_megatron() {
    assert_eq!(
        split_ranges(1000, "949,50,1").unwrap(),
        [0..949, 949..999, 999..1000]
    );
    assert_eq!(split_ranges(10, "8,2").unwrap(), [0..8, 8..10, 10..10]);
    assert_eq!(split_ranges(3, "1,1,1").unwrap(), [0..1, 1..2, 2..3]);
    assert!(split_ranges(10, "a,b").is_err());
}

fn gpt_dataset(
    prefix: &Path,
    docs: std::ops::Range<usize>,
    n: usize,
    seq: usize,
    seed: u64,
) -> GptDataset {
    let data = Arc::new(MMapIndexedDataset::open(prefix).unwrap());
    GptDataset::new(data, prefix, "train", docs, n, seq, seed).unwrap()
}

/// One item per document (how pretraining data is written).
fn flat_corpus(prefix: &Path) -> Vec<Vec<u32>> {
    let docs: Vec<Vec<u32>> = (0..12u32)
        .map(|d| (0..(5 + d * 3)).map(|t| d * 100 + t).collect())
        .collect();
    write(
        prefix,
        DType::U16,
        &docs.iter().map(|d| vec![d.clone()]).collect::<Vec<_>>(),
    );
    docs
}

#[test]
fn sample_index_overlaps_by_one_covers_the_split_repeats_epochs_and_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("g");
    let docs = flat_corpus(&p);
    let seq = 8;
    let range = 2..10;
    let tokens: usize = docs[range.clone()].iter().map(|d| d.len()).sum();
    // Three epochs' worth of samples.
    let n = 3 * tokens / seq - 1;
    let ds = gpt_dataset(&p, range.clone(), n, seq, 7);
    assert!(ds.len() >= n);
    // Every document of the split appears once per epoch, nothing outside it.
    let order = ds.doc_order();
    assert_eq!(order.len(), 3 * range.len());
    for d in range.clone() {
        assert_eq!(order.iter().filter(|&&x| x as usize == d).count(), 3);
    }
    // Unshuffled samples chain: each starts on the previous one's last token, and together they
    // are the documents in `order` back to back.
    let mut stream: Vec<u32> = Vec::new();
    for s in 0..ds.len() {
        let t = ds.raw_sample(s).unwrap();
        assert_eq!(t.len(), seq + 1);
        if let Some(last) = stream.last() {
            assert_eq!(t[0], *last, "sample {s} overlaps the previous by one token");
            stream.extend_from_slice(&t[1..]);
        } else {
            stream.extend_from_slice(&t);
        }
    }
    let concat: Vec<u32> = order
        .iter()
        .flat_map(|&d| docs[d as usize].clone())
        .collect();
    assert_eq!(&concat[..stream.len()], &stream[..]);
    assert!(
        concat.len() - stream.len() < seq + 1,
        "all but the tail is covered"
    );
    // Shuffled access is a permutation of the same samples.
    let mut a: Vec<Vec<u32>> = (0..ds.len()).map(|i| ds.sample(i).unwrap()).collect();
    let mut b: Vec<Vec<u32>> = (0..ds.len()).map(|i| ds.raw_sample(i).unwrap()).collect();
    assert_ne!(a, b, "shuffled");
    a.sort();
    b.sort();
    assert_eq!(a, b);
    // Same seed elsewhere (no cache): same samples; the cache gives them back too.
    let q = tmp.path().join("h");
    flat_corpus(&q);
    let again = gpt_dataset(&q, range.clone(), n, seq, 7);
    let cached = gpt_dataset(&p, range.clone(), n, seq, 7);
    let other = gpt_dataset(&q, range, n, seq, 8);
    for i in 0..ds.len() {
        assert_eq!(ds.sample(i).unwrap(), again.sample(i).unwrap());
        assert_eq!(ds.sample(i).unwrap(), cached.sample(i).unwrap());
    }
    assert!((0..ds.len()).any(|i| ds.sample(i).unwrap() != other.sample(i).unwrap()));
    assert!(tmp
        .path()
        .join("g_train_indexmap_".to_string() + &format!("{n}ns_8sl_7s_doc_idx.npy"))
        .is_file());
}

#[test]
fn blending_follows_the_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    flat_corpus(&a);
    flat_corpus(&b);
    let mk = |p: &Path| gpt_dataset(p, 0..12, 100, 4, 1);
    let blend = BlendedDataset::new(vec![mk(&a), mk(&b)], &[0.3, 0.7], 1000).unwrap();
    let from_a = (0..1000).filter(|&i| blend.source(i).0 == 0).count();
    assert!(
        (295..=305).contains(&from_a),
        "{from_a} of 1000 from the 0.3 dataset"
    );
    // Prefix sums stay within one sample of the target at every point.
    let mut seen = 0usize;
    for i in 0..1000 {
        seen += usize::from(blend.source(i).0 == 0);
        assert!(
            ((i + 1) as f64 * 0.3 - seen as f64).abs() <= 1.5,
            "sample {i}"
        );
    }
    let [train, valid, test] = build_train_valid_test(
        &[(0.3, a.clone()), (0.7, b.clone())],
        "8,2,0",
        [200, 40, 0],
        4,
        1,
    )
    .unwrap();
    assert_eq!(train.unwrap().len(), 200);
    assert_eq!(valid.unwrap().len(), 40);
    assert!(test.is_none());
}

const ASSETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets");

fn deepscale(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepscale"))
        .args(args)
        .env("DEEPSCALE_ASSETS", ASSETS)
        .output()
        .unwrap()
}

fn json_of(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap()
}

#[test]
fn preprocess_inspect_and_pretrain_on_a_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    let texts = [
        "Hello, my dog is cute. It runs!",
        "Second document here.",
        "Third one. With two sentences.",
    ];
    std::fs::write(
        &input,
        texts
            .iter()
            .map(|t| serde_json::json!({"text": t}).to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let prefix = tmp.path().join("out/corpus");
    let vocab = format!("{ASSETS}/gpt2/gpt2-vocab.json");
    let merges = format!("{ASSETS}/gpt2/gpt2-merges.txt");
    // `preprocess-data` of `input` with GPT-2's tokenizer into `out`, plus `extra`.
    let preprocess = |input: &Path, out: &Path, extra: &[&str]| -> Output {
        let mut args = vec![
            "preprocess-data",
            "--input",
            input.to_str().unwrap(),
            "--tokenizer-type",
            "GPT2BPETokenizer",
            "--vocab-file",
            &vocab,
            "--merge-file",
            &merges,
            "--output-prefix",
            out.to_str().unwrap(),
            "--json",
        ];
        args.extend_from_slice(extra);
        deepscale(&args)
    };
    let v = json_of(&preprocess(
        &input,
        &prefix,
        &["--json-keys", "text", "--append-eod", "--workers", "2"],
    ));
    assert_eq!(v["documents"], 3);
    assert_eq!(v["dtype"], "uint16");
    let doc = format!("{}_text_document", prefix.display());
    // More workers than cores run on the cores (10^5 threads took minutes to start), writing the
    // same files.
    let many = tmp.path().join("many");
    let out = preprocess(&input, &many, &["--append-eod", "--workers", "100000"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--workers 100000: using "), "{err}");
    assert_eq!(json_of(&out)["documents"], 3);
    for ext in ["bin", "idx"] {
        assert_eq!(
            std::fs::read(format!("{doc}.{ext}")).unwrap(),
            std::fs::read(format!("{}_text_document.{ext}", many.display())).unwrap()
        );
    }
    let i = json_of(&deepscale(&[
        "inspect-data",
        &doc,
        "--document",
        "0",
        "--json",
    ]));
    assert_eq!(
        (i["items"].as_u64(), i["documents"].as_u64()),
        (Some(3), Some(3))
    );
    let toks: Vec<u64> = i["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    // GPT-2's real BPE ids for the first words, then the end-of-document token.
    assert_eq!(&toks[..6], &[15496, 11, 616, 3290, 318, 13779]);
    assert_eq!(*toks.last().unwrap(), 50256);
    // Sentence split: one item per sentence.
    let v = json_of(&preprocess(&input, &prefix, &["--split-sentences"]));
    assert_eq!(v["documents"], 3);
    let s = json_of(&deepscale(&[
        "inspect-data",
        &format!("{}_text_sentence", prefix.display()),
        "--json",
    ]));
    assert_eq!(s["items"], 5);
    // Errors name what is wrong.
    let bad = deepscale(&["inspect-data", "/nonexistent/prefix"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent/prefix.idx"));
    let bad = deepscale(&["inspect-data", &doc, "--document", "7"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("document 7 out of range"));

    // pretrain-gpt2 on the shipped corpus preprocessed: the loss falls.
    let sample = tmp.path().join("sample");
    json_of(&preprocess(
        Path::new(&format!("{ASSETS}/data/sample.jsonl")),
        &sample,
        &["--append-eod"],
    ));
    let data = format!("{}_text_document", sample.display());
    let run = json_of(&deepscale(&[
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
        "--world-size",
        "2",
        "--zero-stage",
        "2",
        "--train-iters",
        "12",
        "--lr",
        "1e-2",
        "--lr-decay-style",
        "constant",
        "--eval-interval",
        "6",
        "--eval-iters",
        "1",
        "--sample-length",
        "0",
        "--data-path",
        &data,
        "--json",
    ]));
    assert!(
        run["final_loss"].as_f64().unwrap() < run["initial_loss"].as_f64().unwrap() - 0.5,
        "{run}"
    );
    assert!(run["valid_loss"].as_f64().is_some());
    let bad = deepscale(&[
        "pretrain-gpt2",
        "--train-iters",
        "1",
        "--data-path",
        "0.5",
        &data,
        "0.5",
        "/nonexistent/x",
    ]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent/x.bin"));
}
