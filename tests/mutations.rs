//! Mutation tests of every format the binary reads: the DeepSpeed JSON config, safetensors and
//! its index, Megatron `.idx`/`.bin`, torch `.pt` (zip and legacy pickles), the `.npy` index
//! caches, the native checkpoint manifest and tokenizer files. Each takes thousands of
//! truncations, byte flips, splices and insertions of a real file (proptest); every one must end
//! in Ok or an error — never a panic, an allocator abort or a hang (a watchdog aborts the run,
//! naming the format, if one input takes over a minute). Truncations, which always break these
//! formats, must be errors. `DEEPSCALE_MUTATION_CASES` sets the cases per format (default 1500),
//! `DEEPSCALE_MUTATION_SEED` other cases than CI's fixed ones.
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const ASSETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets");
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/torch");

/// One change to a file's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    /// Keep the first `n` bytes (n below the length).
    Truncate(usize),
    /// XOR byte `at` with `mask` (non-zero).
    Flip { at: usize, mask: u8 },
    /// Overwrite `len` bytes at `at` with the bytes at `from` (a splice of the file into itself).
    Splice { at: usize, from: usize, len: usize },
    /// Insert `bytes` at `at`.
    Insert { at: usize, bytes: Vec<u8> },
    /// Overwrite 8 bytes at `at` with an extreme little-endian integer (sizes, offsets, counts).
    Extreme { at: usize, value: u64 },
}

impl Mutation {
    fn apply(&self, seed: &[u8]) -> Vec<u8> {
        let n = seed.len().max(1);
        let mut b = seed.to_vec();
        match self {
            Mutation::Truncate(k) => b.truncate(k % n),
            Mutation::Flip { at, mask } => {
                if let Some(x) = b.get_mut(at % n) {
                    *x ^= mask;
                }
            }
            Mutation::Splice { at, from, len } => {
                let (at, from) = (at % n, from % n);
                let len = (*len).min(b.len() - at).min(seed.len() - from);
                b[at..at + len].copy_from_slice(&seed[from..from + len]);
            }
            Mutation::Insert { at, bytes } => {
                let at = at % (b.len() + 1);
                b.splice(at..at, bytes.iter().copied());
            }
            Mutation::Extreme { at, value } => {
                let at = at % n;
                for (i, v) in value.to_le_bytes().iter().enumerate() {
                    if let Some(x) = b.get_mut(at + i) {
                        *x = *v;
                    }
                }
            }
        }
        b
    }

    fn truncates(&self) -> bool {
        matches!(self, Mutation::Truncate(_))
    }
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let extreme = prop_oneof![
        Just(u64::MAX),
        Just(u64::MAX / 2),
        Just(1u64 << 32),
        Just(1u64 << 40),
        Just(0xffff_ffff),
        Just(0),
        any::<u64>(),
    ];
    prop_oneof![
        3 => any::<usize>().prop_map(Mutation::Truncate),
        4 => (any::<usize>(), 1u8..=255).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        2 => (any::<usize>(), any::<usize>(), 1usize..64)
            .prop_map(|(at, from, len)| Mutation::Splice { at, from, len }),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        2 => (any::<usize>(), extreme).prop_map(|(at, value)| Mutation::Extreme { at, value }),
    ]
}

fn cases() -> u32 {
    std::env::var("DEEPSCALE_MUTATION_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

/// The time of the last finished case, for the watchdog (one per test binary; tests of this file
/// run one at a time under it).
static PROGRESS: AtomicU64 = AtomicU64::new(0);
static SERIAL: Mutex<()> = Mutex::new(());

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs `parse` on `cases()` mutations of `seed`: a panic fails the test (proptest reports the
/// smallest mutation that does it), a truncation that parses fails it, and a case that hangs
/// aborts the process after a minute, naming `what`.
fn fuzz(what: &'static str, seed: &[u8], parse: impl Fn(&[u8]) -> Result<(), String>) {
    fuzz_with(what, seed, true, parse)
}

/// [`fuzz`] for formats where a shorter file can be valid (a smaller vocabulary, a cache that is
/// rebuilt): only never a panic, abort or hang.
fn fuzz_lenient(what: &'static str, seed: &[u8], parse: impl Fn(&[u8]) -> Result<(), String>) {
    fuzz_with(what, seed, false, parse)
}

fn fuzz_with(
    what: &'static str,
    seed: &[u8],
    strict: bool,
    parse: impl Fn(&[u8]) -> Result<(), String>,
) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    PROGRESS.store(now_s(), Ordering::SeqCst);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
                if now_s().saturating_sub(PROGRESS.load(Ordering::SeqCst)) > 60 {
                    eprintln!("{what}: one mutated input ran for over a minute (a hang)");
                    std::process::abort();
                }
            }
        })
    };
    assert!(parse(seed).is_ok(), "{what}: the unmutated seed must parse");
    let started = Instant::now();
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    };
    // The same cases on every run (CI), unless DEEPSCALE_MUTATION_SEED picks others.
    let rng = match std::env::var("DEEPSCALE_MUTATION_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        Some(seed) => {
            let mut bytes = [0u8; 32];
            bytes[..8].copy_from_slice(&seed.to_le_bytes());
            proptest::test_runner::TestRng::from_seed(
                proptest::test_runner::RngAlgorithm::ChaCha,
                &bytes,
            )
        }
        None => proptest::test_runner::TestRng::deterministic_rng(config.rng_algorithm),
    };
    let mut runner = TestRunner::new_with_rng(config, rng);
    let result = runner.run(&mutation(), |m| {
        let bytes = m.apply(seed);
        let r = parse(&bytes);
        PROGRESS.store(now_s(), Ordering::SeqCst);
        // A truncation that only drops trailing whitespace leaves a valid file.
        let cut_content = seed[bytes.len().min(seed.len())..]
            .iter()
            .any(|c| !c.is_ascii_whitespace());
        if strict && m.truncates() && cut_content {
            prop_assert!(
                r.is_err(),
                "{what}: a truncation to {} bytes parsed",
                bytes.len()
            );
        }
        Ok(())
    });
    done.store(true, Ordering::SeqCst);
    let _ = watchdog.join();
    if let Err(e) = result {
        panic!("{what}: {e}");
    }
    eprintln!("{what}: {} mutations in {:.1?}", cases(), started.elapsed());
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

#[test]
fn deepspeed_configs() {
    for name in [
        "megatron-lm-v1.1.5-3d/ds_zero_stage_2_config.json",
        "megatron-lm-v1.1.5-zero3/ds_zero_stage_infinity_config.json",
    ] {
        let seed = std::fs::read(Path::new(ASSETS).join(name)).unwrap();
        fuzz("DeepSpeed config", &seed, |b| {
            let text = String::from_utf8_lossy(b);
            let c = candle_deepscale::runtime::config::DeepSpeedConfig::from_json_str(&text, name)
                .map_err(err)?;
            candle_deepscale::runtime::engine_config::EngineConfig::from_deepspeed(&c, 2)
                .map_err(err)?;
            c.batch(2, None, None).map_err(err)?;
            Ok(())
        });
    }
}

/// A tiny model's HF export (single file) and a sharded one with an index, written by the binary.
fn hf_exports(dir: &Path) -> (PathBuf, PathBuf) {
    let ck = dir.join("ck");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_deepscale"))
            .args(args)
            .env("DEEPSCALE_ASSETS", ASSETS)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "pretrain-gpt2",
        "--num-layers",
        "1",
        "--hidden-size",
        "8",
        "--num-attention-heads",
        "2",
        "--seq-length",
        "8",
        "--max-position-embeddings",
        "8",
        "--batch-size",
        "2",
        "--train-iters",
        "1",
        "--eval-iters",
        "1",
        "--sample-length",
        "0",
        "--make-vocab-size-divisible-by",
        "1",
        "--save",
        ck.to_str().unwrap(),
    ]);
    let (single, sharded) = (dir.join("hf"), dir.join("hf-sharded"));
    for (out, extra) in [(&single, None), (&sharded, Some("200KB"))] {
        let mut args = vec![
            "convert",
            "--load",
            ck.to_str().unwrap(),
            "--to",
            "hf",
            "--output",
        ];
        args.push(out.to_str().unwrap());
        if let Some(s) = extra {
            args.extend(["--max-shard-size", s]);
        }
        run(&args);
    }
    (single, sharded)
}

#[test]
fn safetensors_index_and_checkpoint_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let (single, sharded) = hf_exports(tmp.path());
    // safetensors: a small file of its own (the export's header and a few tensors).
    let st = tmp.path().join("small.safetensors");
    {
        let dev = candle_core::Device::Cpu;
        let t = |n: usize| candle_core::Tensor::arange(0f32, n as f32, &dev).unwrap();
        let map = std::collections::HashMap::from([
            ("a.weight".to_string(), t(64).reshape((8, 8)).unwrap()),
            ("a.bias".to_string(), t(8)),
            ("b".to_string(), t(3)),
        ]);
        candle_core::safetensors::save(&map, &st).unwrap();
    }
    let seed = std::fs::read(&st).unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let target = work.join("model.safetensors");
    fuzz("safetensors", &seed, |b| {
        std::fs::write(&target, b).map_err(err)?;
        let f = zoo::weights::SafetensorsFiles::open(std::slice::from_ref(&target)).map_err(err)?;
        for n in f.names() {
            f.load_f32(&n, &candle_core::Device::Cpu).map_err(err)?;
        }
        Ok(())
    });
    // The HF index of the sharded export.
    let index = sharded.join("model.safetensors.index.json");
    let seed = std::fs::read(&index).unwrap();
    let copy = tmp.path().join("index-copy");
    copy_dir(&sharded, &copy);
    fuzz("safetensors index", &seed, |b| {
        std::fs::write(copy.join("model.safetensors.index.json"), b).map_err(err)?;
        let f = zoo::weights::SafetensorsFiles::open_dir(&copy).map_err(err)?;
        for n in f.names() {
            f.shape(&n).map_err(err)?;
        }
        Ok(())
    });
    let _ = single;
    // The native checkpoint's manifest.
    let tag = tmp.path().join("ck/global_step1");
    let seed = std::fs::read(tag.join("manifest.json")).unwrap();
    let ck = tmp.path().join("ck-copy");
    copy_dir(&tag, &ck);
    fuzz("checkpoint manifest", &seed, |b| {
        std::fs::write(ck.join("manifest.json"), b).map_err(err)?;
        let c = candle_deepscale::runtime::checkpoint::Checkpoint::open(&ck).map_err(err)?;
        for m in c.manifest.params.clone() {
            c.logical(&m.name).map_err(err)?;
            c.optimizer_logical("exp_avg", &m.name).map_err(err)?;
        }
        Ok(())
    });
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A small Megatron dataset (documents of varied lengths, int32 ids).
fn megatron_dataset(dir: &Path) -> PathBuf {
    use zoo::indexed_dataset::{DType, MMapIndexedDatasetBuilder};
    let prefix = dir.join("data_text_document");
    let mut b = MMapIndexedDatasetBuilder::create(&prefix, DType::U16).unwrap();
    for d in 0..12u32 {
        let doc: Vec<u32> = (0..20 + d * 7)
            .map(|i| (d * 131 + i * 17) % 50_000)
            .collect();
        b.add_item(&doc).unwrap();
        b.end_document();
    }
    b.finalize().unwrap();
    prefix
}

#[test]
fn megatron_idx_bin_and_npy_caches() {
    use zoo::indexed_dataset::MMapIndexedDataset;
    let tmp = tempfile::tempdir().unwrap();
    let prefix = megatron_dataset(tmp.path());
    let read_all = |p: &Path| -> Result<(), String> {
        let d = MMapIndexedDataset::open(p).map_err(err)?;
        for i in 0..d.len() {
            d.item(i).map_err(err)?;
        }
        for doc in 0..d.num_documents() {
            d.document_items(doc).map_err(err)?;
        }
        Ok(())
    };
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let wp = work.join("data_text_document");
    let idx = std::fs::read(prefix.with_extension("idx")).unwrap();
    let bin = std::fs::read(prefix.with_extension("bin")).unwrap();
    std::fs::write(wp.with_extension("bin"), &bin).unwrap();
    fuzz("Megatron .idx", &idx, |b| {
        std::fs::write(wp.with_extension("idx"), b).map_err(err)?;
        read_all(&wp)
    });
    std::fs::write(wp.with_extension("idx"), &idx).unwrap();
    fuzz("Megatron .bin", &bin, |b| {
        std::fs::write(wp.with_extension("bin"), b).map_err(err)?;
        read_all(&wp)
    });
    // The GPT-2 dataset's .npy index caches: a damaged cache is rebuilt or refused.
    let build = |p: &Path| -> Result<zoo::gpt2_dataset::GptDataset, String> {
        let data = std::sync::Arc::new(MMapIndexedDataset::open(p).map_err(err)?);
        zoo::gpt2_dataset::GptDataset::new(data, p, "train", 0..12, 40, 16, 1234).map_err(err)
    };
    let ds = build(&prefix).unwrap();
    let reference: Vec<Vec<u32>> = (0..ds.len()).map(|i| ds.sample(i).unwrap()).collect();
    for kind in ["doc_idx", "sample_idx", "shuffle_idx"] {
        let cache = PathBuf::from(format!(
            "{}_train_indexmap_40ns_16sl_1234s_{kind}.npy",
            prefix.display()
        ));
        let seed = std::fs::read(&cache).unwrap();
        // Truncations are rebuilt (Ok): only no-panic and the samples' equality apply.
        fuzz_lenient("GPT-2 dataset .npy cache", &seed, |b| {
            std::fs::write(&cache, b).map_err(err)?;
            let r = build(&prefix).and_then(|d| {
                (0..d.len())
                    .map(|i| d.sample(i).map_err(err))
                    .collect::<Result<Vec<_>, _>>()
            });
            // Whatever the cache held, the samples are the true ones (rebuilt) or an error.
            if let Ok(samples) = &r {
                assert_eq!(
                    samples, &reference,
                    "{kind}: a damaged cache changed the samples"
                );
            }
            let _ = std::fs::write(&cache, &seed);
            r.map(|_| ())
        });
    }
}

#[test]
fn torch_pt_files() {
    for (what, file) in [
        (
            "torch .pt (zip)",
            "megatron_v2_mp2_release/release/mp_rank_00/model_optim_rng.pt",
        ),
        (
            "torch .pt (legacy pickle)",
            "megatron_v0_mp1_legacy/iter_0000010/mp_rank_00/model_optim_rng.pt",
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let seed = std::fs::read(Path::new(FIXTURES).join(file)).unwrap();
        let target = tmp.path().join("model_optim_rng.pt");
        fuzz(what, &seed, |b| {
            std::fs::write(&target, b).map_err(err)?;
            let v = zoo::torch_pickle::load(&target).map_err(err)?;
            let _ = v.flatten_tensors();
            Ok(())
        });
    }
}

#[test]
fn tokenizer_files() {
    let tmp = tempfile::tempdir().unwrap();
    // Small files of each kind: WordPiece vocab.txt, GPT-2 vocab.json + merges.txt, and a
    // tokenizer.json written by the tokenizers crate.
    let vocab_txt = tmp.path().join("vocab.txt");
    let mut words: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    words.extend(["the", "quick", "brown", "fox", "##s", "jump", "##ed", "."].map(String::from));
    words.extend(('a'..='z').map(|c| c.to_string()));
    std::fs::write(&vocab_txt, words.join("\n")).unwrap();
    let tok = zoo::tokenizer::Tokenizer::bert_wordpiece(&vocab_txt, true).unwrap();
    let tj = tmp.path().join("tokenizer.json");
    tok.save(&tj).unwrap();
    let bpe_vocab = tmp.path().join("vocab.json");
    let merges = tmp.path().join("merges.txt");
    let mut vocab = serde_json::Map::new();
    // GPT-2's byte-level alphabet for ASCII letters and space (Ġ), a few merges.
    for (i, t) in ('a'..='z')
        .map(|c| c.to_string())
        .chain([
            "Ġ".to_string(),
            "Ġt".into(),
            "he".into(),
            "Ġthe".into(),
            "<|endoftext|>".into(),
        ])
        .enumerate()
    {
        vocab.insert(t, i.into());
    }
    std::fs::write(&bpe_vocab, serde_json::Value::Object(vocab).to_string()).unwrap();
    std::fs::write(&merges, "#version: 0.2\nĠ t\nh e\nĠt he\n").unwrap();
    zoo::tokenizer::Tokenizer::gpt2_bpe(&bpe_vocab, &merges).unwrap();

    let encode = |t: zoo::tokenizer::Tokenizer| -> Result<(), String> {
        let ids = t
            .encode("the quick brown foxes jumped.", false)
            .map_err(err)?;
        t.decode(&ids).map_err(err)?;
        Ok(())
    };
    let seed = std::fs::read(&tj).unwrap();
    let t2 = tmp.path().join("t2.json");
    fuzz("tokenizer.json", &seed, |b| {
        std::fs::write(&t2, b).map_err(err)?;
        encode(zoo::tokenizer::Tokenizer::from_json(&t2).map_err(err)?)
    });
    let seed = std::fs::read(&bpe_vocab).unwrap();
    let v2 = tmp.path().join("v2.json");
    fuzz("GPT-2 vocab.json", &seed, |b| {
        std::fs::write(&v2, b).map_err(err)?;
        encode(zoo::tokenizer::Tokenizer::gpt2_bpe(&v2, &merges).map_err(err)?)
    });
    // A shorter merges.txt or vocab.txt is still a valid (smaller) one: only no-panic applies.
    let seed = std::fs::read(&merges).unwrap();
    let m2 = tmp.path().join("m2.txt");
    fuzz_lenient("GPT-2 merges.txt", &seed, |b| {
        std::fs::write(&m2, b).map_err(err)?;
        encode(zoo::tokenizer::Tokenizer::gpt2_bpe(&bpe_vocab, &m2).map_err(err)?)
    });
    let seed = std::fs::read(&vocab_txt).unwrap();
    let w2 = tmp.path().join("w2.txt");
    fuzz_lenient("WordPiece vocab.txt", &seed, |b| {
        std::fs::write(&w2, b).map_err(err)?;
        encode(zoo::tokenizer::Tokenizer::bert_wordpiece(&w2, true).map_err(err)?)
    });
}
