//! `deepscale convert`: a tp 2 x dp 2 ZeRO-2 checkpoint consolidated to one safetensors model and
//! exported to an HF folder in HF's names and layout; the HF folder imported back as a native
//! checkpoint at another tp is bit-exact.
use candle_core::{DType, Device};
use candle_deepscale::runtime::checkpoint::Checkpoint;
use std::path::Path;
use std::process::{Command, Output};

const ASSETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets");

fn deepscale(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_deepscale"))
        .args(args)
        .env("DEEPSCALE_ASSETS", ASSETS)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn last_json(o: &Output) -> serde_json::Value {
    serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn consolidate_export_and_import_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    deepscale(&[
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
        "2",
        "--world-size",
        "4",
        "--model-parallel-size",
        "2",
        "--zero-stage",
        "2",
        "--sample-length",
        "0",
        "--save",
        s(&ck),
    ]);
    let orig = Checkpoint::open(&ck).unwrap();
    assert_eq!(
        (orig.manifest.tp, orig.manifest.dp, orig.manifest.zero_stage),
        (2, 2, 2)
    );

    // (a) One safetensors model: logical names, padding stripped, the requested dtype, sharded.
    let st = tmp.path().join("flat/model.safetensors");
    deepscale(&[
        "convert",
        "--load",
        s(&ck),
        "--to",
        "safetensors",
        "--output",
        s(&st),
        "--dtype",
        "fp16",
        "--max-shard-size",
        "2MB",
    ]);
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("flat/model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), orig.manifest.params.len());
    for meta in &orig.manifest.params {
        let file = tmp
            .path()
            .join("flat")
            .join(map[&meta.name].as_str().unwrap());
        let t = candle_core::safetensors::load(&file, &Device::Cpu)
            .unwrap()
            .remove(&meta.name)
            .unwrap();
        assert_eq!(t.dtype(), DType::F16);
        let want = orig
            .logical(&meta.name)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        assert_eq!(t.dims(), want.dims(), "{}", meta.name);
        let diff = (t.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{}", meta.name);
    }
    assert!(map["embedding.word_embeddings.weight"].as_str().is_some());

    // (b) An HF folder in HF's key names and Conv1D layout, vocabulary padding stripped.
    let hf = tmp.path().join("hf");
    deepscale(&[
        "convert",
        "--load",
        s(&ck),
        "--to",
        "hf",
        "--output",
        s(&hf),
    ]);
    let t = candle_core::safetensors::load(hf.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(t["transformer.wte.weight"].dims(), &[50257, 32]);
    assert_eq!(t["transformer.wpe.weight"].dims(), &[32, 32]);
    assert_eq!(t["transformer.h.0.attn.c_attn.weight"].dims(), &[32, 96]);
    assert_eq!(t["transformer.h.1.mlp.c_proj.weight"].dims(), &[128, 32]);
    assert!(t.contains_key("transformer.ln_f.bias"));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "gpt2");
    assert!(hf.join("tokenizer.json").is_file());

    // (c) HF -> native at tp 1: bit-exact logical parameters; the three load the same model.
    let back = tmp.path().join("back");
    deepscale(&[
        "convert",
        "--from",
        "hf",
        "--input",
        s(&hf),
        "--to",
        "native",
        "--output",
        s(&back),
    ]);
    let imported = Checkpoint::open(&back).unwrap();
    assert_eq!(imported.manifest.tp, 1);
    for meta in &orig.manifest.params {
        let (a, b) = (
            orig.logical(&meta.name).unwrap(),
            imported.logical(&meta.name).unwrap(),
        );
        assert_eq!(a.dims(), b.dims(), "{}", meta.name);
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{}", meta.name);
    }
    let gen = |src: &[&str]| {
        let mut a = vec![
            "generate",
            "--prompt",
            "This License",
            "--greedy",
            "--out-seq-length",
            "6",
            "--json",
        ];
        a.extend_from_slice(src);
        last_json(&deepscale(&a))["token_ids"].clone()
    };
    let want = gen(&["--load", s(&ck)]);
    assert_eq!(gen(&["--hf-dir", s(&hf)]), want);
    assert_eq!(
        gen(&[
            "--load",
            s(&back),
            "--world-size",
            "2",
            "--model-parallel-size",
            "2"
        ]),
        want
    );
    // HF -> native at pp 2 x tp 2: each stage writes its layers; same parameters, same text.
    let piped = tmp.path().join("piped");
    deepscale(&[
        "convert",
        "--from",
        "hf",
        "--input",
        s(&hf),
        "--to",
        "native",
        "--output",
        s(&piped),
        "--world-size",
        "4",
        "--model-parallel-size",
        "2",
        "--pipe-parallel-size",
        "2",
        "--partition-method",
        "uniform",
    ]);
    let p = Checkpoint::open(&piped).unwrap();
    assert_eq!((p.manifest.tp, p.manifest.pp), (2, 2));
    assert!(p.dir.join("layer_03-model_01.safetensors").is_file());
    for meta in &orig.manifest.params {
        let d = (orig.logical(&meta.name).unwrap() - p.logical(&meta.name).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{}", meta.name);
    }
    assert_eq!(gen(&["--load", s(&piped)]), want);
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// An export into a folder holding an earlier one replaces it whole: no stale index sending
/// loaders to old shards, no stale single file, no temporaries; --save-hf likewise.
#[test]
fn an_export_over_an_earlier_one_leaves_no_stale_files() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    let hf = tmp.path().join("hf");
    deepscale(&[
        "pretrain-gpt2",
        "--num-layers",
        "2",
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
        "--save",
        s(&ck),
        "--save-interval",
        "2",
    ]);
    let export = |extra: &[&str]| {
        let mut args = vec![
            "convert",
            "--load",
            s(&ck),
            "--to",
            "hf",
            "--output",
            s(&hf),
        ];
        args.extend(extra);
        deepscale(&args);
    };
    export(&["--max-shard-size", "300KB"]);
    let sharded = listing(&hf);
    assert!(
        sharded.contains(&"model.safetensors.index.json".to_string()),
        "{sharded:?}"
    );
    assert!(
        !sharded.contains(&"model.safetensors".to_string()),
        "{sharded:?}"
    );
    export(&[]);
    assert_eq!(
        listing(&hf),
        ["config.json", "model.safetensors", "tokenizer.json"],
        "the sharded export's index and shards are gone"
    );
    export(&["--max-shard-size", "300KB"]);
    assert_eq!(listing(&hf), sharded, "the single file is gone again");
    // --save-hf over the sharded export.
    deepscale(&[
        "pretrain-gpt2",
        "--num-layers",
        "2",
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
        "--save-hf",
        s(&hf),
    ]);
    assert_eq!(
        listing(&hf),
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    let ev = deepscale(&[
        "evaluate",
        "--task",
        "loss",
        "--hf-dir",
        s(&hf),
        "--text",
        "some text",
        "--json",
    ]);
    assert!(last_json(&ev)["loss"].as_f64().unwrap().is_finite());
}
