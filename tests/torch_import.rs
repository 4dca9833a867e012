//! Megatron and DeepSpeed `.pt` checkpoints (tiny fixtures written by
//! `tests/fixtures/torch/make_checkpoints.py`, see its docstring) import at mp=1 and mp=2, from
//! QKV layout versions 0, 1.0 and 2.0, legacy and zip files, ZeRO-2 fp32 partitions and pipeline
//! layer files, and give the logits of the script's independent torch forward.
use candle_core::{DType, Device, Tensor};
use candle_deepscale::layers::parameter::{ParamBuilder, ParamSource};
use std::path::{Path, PathBuf};
use std::process::Command;
use zoo::gpt2::megatron::{import_deepspeed, import_megatron};
use zoo::gpt2::{Config, Gpt2};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/torch");

fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

struct Expected {
    vocab: usize,
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

fn expected() -> Expected {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("expected_logits.json")).unwrap())
            .unwrap();
    Expected {
        vocab: v["vocab_size"].as_u64().unwrap() as usize,
        ids: v["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect(),
        logits: serde_json::from_value(v["logits"].clone()).unwrap(),
    }
}

/// Our GPT-2 built from `src` gives the script's logits.
fn check_logits(config: &Config, src: &dyn ParamSource, what: &str) {
    let e = expected();
    let pb = ParamBuilder::new(src, &Device::Cpu, DType::F32);
    let model = Gpt2::new(config, &pb).unwrap();
    let ids = Tensor::new(e.ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model
        .forward(&ids, &candle_deepscale::layers::module::ForwardCtx::eval())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .narrow(1, 0, e.vocab)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut worst = 0f32;
    for (a, b) in logits.iter().flatten().zip(e.logits.iter().flatten()) {
        worst = worst.max((a - b).abs());
    }
    assert!(worst < 1e-4, "{what}: logits differ by {worst}");
}

#[test]
fn megatron_checkpoints_import_from_every_qkv_version_and_file_format() {
    let vocab = expected().vocab;
    for (name, version, parts) in [
        ("megatron_v0_mp1_legacy", "version 0", "1 model-parallel"),
        ("megatron_v1_mp2", "version 1", "2 model-parallel"),
        ("megatron_v2_mp2_release", "version 2", "2 model-parallel"),
    ] {
        let imp = import_megatron(&fixture(name), vocab).unwrap();
        assert!(
            imp.description.contains(version) && imp.description.contains(parts),
            "{}",
            imp.description
        );
        assert_eq!(
            (imp.config.num_layers, imp.config.hidden_size),
            (2, 16),
            "shape from args"
        );
        check_logits(&imp.config, &imp.tensors, name);
    }
    // Dicts keep their insertion order through the pickle reader.
    let top = zoo::torch_pickle::load(&fixture(
        "megatron_v1_mp2/iter_0000010/mp_rank_00/model_optim_rng.pt",
    ))
    .unwrap();
    let transformer = top
        .get("model")
        .and_then(|m| m.get("language_model"))
        .and_then(|m| m.get("transformer"))
        .and_then(|m| m.as_dict())
        .unwrap();
    assert_eq!(transformer[0].0, "layers.0.input_layernorm.weight");
    assert_eq!(transformer.last().unwrap().0, "final_layernorm.bias");
    assert_eq!(
        top.get("args")
            .and_then(|a| a.get("num_layers"))
            .and_then(|v| v.as_i64()),
        Some(2)
    );
    // The iteration comes from the tracker file and the checkpoint.
    let imp = import_megatron(&fixture("megatron_v1_mp2"), vocab).unwrap();
    assert_eq!(imp.iteration, Some(10));
}

#[test]
fn deepspeed_checkpoints_import_zero_2_partitions_and_pipeline_layers() {
    let vocab = expected().vocab;
    let z = import_deepspeed(&fixture("deepspeed_zero2_mp2_dp2"), vocab).unwrap();
    assert!(
        z.description
            .contains("fp32 weights from the ZeRO partitions"),
        "{}",
        z.description
    );
    // fp32 master weights, not the fp16 module copies: the logits match at fp32 precision.
    check_logits(&z.config, &z.tensors, "deepspeed zero2");
    assert_eq!(z.iteration, Some(5));
    let p = import_deepspeed(&fixture("deepspeed_pipe_mp2"), vocab).unwrap();
    assert!(
        p.description.contains("pipeline layer files"),
        "{}",
        p.description
    );
    check_logits(&p.config, &p.tensors, "deepspeed pipeline");
}

#[test]
fn broken_checkpoints_are_clear_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    // A legacy file cut short.
    let src = fixture("megatron_v0_mp1_legacy");
    let dst = tmp.path().join("cut");
    let rank = dst.join("iter_0000010/mp_rank_00");
    std::fs::create_dir_all(&rank).unwrap();
    std::fs::copy(
        src.join("latest_checkpointed_iteration.txt"),
        dst.join("latest_checkpointed_iteration.txt"),
    )
    .unwrap();
    let bytes = std::fs::read(src.join("iter_0000010/mp_rank_00/model_optim_rng.pt")).unwrap();
    let file = rank.join("model_optim_rng.pt");
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    let e = import_megatron(&dst, 60).err().unwrap().to_string();
    assert!(
        e.contains("model_optim_rng.pt") && e.contains("truncated"),
        "{e}"
    );
    // Not a torch file at all.
    std::fs::write(&file, b"hello").unwrap();
    let e = import_megatron(&dst, 60).err().unwrap().to_string();
    assert!(e.contains("not a PyTorch checkpoint"), "{e}");
    // A vocabulary larger than the embedding.
    let e = import_megatron(&fixture("megatron_v1_mp2"), 50257)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("fewer than the tokenizer's 50257"), "{e}");
    // Not a checkpoint directory.
    let e = import_deepspeed(tmp.path(), 60).err().unwrap().to_string();
    assert!(e.contains("mp_rank_XX_model_states.pt"), "{e}");
}

#[test]
fn convert_from_megatron_and_deepspeed_writes_safetensors_and_native_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_deepscale"))
            .args(args)
            .env(
                "DEEPSCALE_ASSETS",
                concat!(env!("CARGO_MANIFEST_DIR"), "/../assets"),
            )
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // (a) consolidate a Megatron mp=2 checkpoint into one safetensors model.
    let st = tmp.path().join("model.safetensors");
    run(&[
        "convert",
        "--from",
        "megatron",
        "--input",
        fixture("megatron_v2_mp2_release").to_str().unwrap(),
        "--vocab-size",
        "60",
        "--to",
        "safetensors",
        "--output",
        st.to_str().unwrap(),
    ]);
    let tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let imp = import_megatron(&fixture("megatron_v2_mp2_release"), 60).unwrap();
    assert_eq!(
        tensors["embedding.word_embeddings.weight"].dims(),
        &[60, 16],
        "padding stripped"
    );
    let logical = zoo::weights::LogicalTensors::new(tensors.into_iter().collect());
    check_logits(&imp.config, &logical, "consolidated safetensors");
    // A DeepSpeed ZeRO-2 checkpoint as a native checkpoint at tp 2, which loads back at tp 1.
    let out = tmp.path().join("native");
    run(&[
        "convert",
        "--from",
        "deepspeed",
        "--input",
        fixture("deepspeed_zero2_mp2_dp2").to_str().unwrap(),
        "--vocab-size",
        "60",
        "--to",
        "native",
        "--output",
        out.to_str().unwrap(),
        "--world-size",
        "2",
        "--model-parallel-size",
        "2",
    ]);
    let ck = candle_deepscale::runtime::checkpoint::Checkpoint::open(&out).unwrap();
    assert_eq!(ck.manifest.tp, 2);
    let cfg: Config = serde_json::from_value(ck.manifest.model["config"].clone()).unwrap();
    check_logits(&cfg, &ck, "native from deepspeed");
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A missing tensor-parallel partition (Megatron's mp_rank_01, DeepSpeed's mp_rank_01 model
/// states) or ZeRO partition (zero_pp_rank_1_...) is named, not reported as a shape or value-count
/// mismatch.
#[test]
fn missing_partitions_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let meg = tmp.path().join("megatron");
    copy_tree(&fixture("megatron_v1_mp2"), &meg);
    std::fs::remove_dir_all(meg.join("iter_0000010/mp_rank_01")).unwrap();
    let e = import_megatron(&meg, 60).err().unwrap().to_string();
    assert!(
        e.contains("mp_rank_01 is missing") && e.contains("tensor_model_parallel_size 2"),
        "{e}"
    );
    let ds = tmp.path().join("deepspeed");
    copy_tree(&fixture("deepspeed_zero2_mp2_dp2"), &ds);
    std::fs::remove_file(ds.join("global_step5/zero_pp_rank_1_mp_rank_00_optim_states.pt"))
        .unwrap();
    let e = import_deepspeed(&ds, 60).err().unwrap().to_string();
    assert!(
        e.contains("zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"),
        "{e}"
    );
    std::fs::remove_file(ds.join("global_step5/mp_rank_01_model_states.pt")).unwrap();
    let e = import_deepspeed(&ds, 60).err().unwrap().to_string();
    assert!(e.contains("mp_rank_01_model_states.pt is missing"), "{e}");
}
