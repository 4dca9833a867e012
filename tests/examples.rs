//! The library's examples, run as their users run them: each trains and its loss falls. The
//! README's test command (scripts/test.sh) builds them first (`cargo build --workspace
//! --examples`) into `target/<profile>/examples/`.
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn example(name: &str) -> PathBuf {
    // target/<profile>/deps/examples-<hash> -> target/<profile>/examples/<name>
    let exe = std::env::current_exe().expect("test binary");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>")
        .join("examples");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: `cargo build --workspace --examples` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Runs an example; its last stdout line is a JSON summary.
fn run(name: &str, args: &[&str]) -> Value {
    let out = Command::new(example(name))
        .args(args)
        .output()
        .expect("run the example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{name} failed\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{name} printed `{last}`: {e}"))
}

fn assert_learns(v: &Value, what: &str) {
    let (a, b) = (
        v["initial_loss"].as_f64().expect("initial_loss"),
        v["final_loss"].as_f64().expect("final_loss"),
    );
    assert!(b < 0.7 * a, "{what}: loss {a} -> {b}");
}

#[test]
fn the_candle_nn_mlp_example_learns() {
    assert_learns(&run("candle_nn_mlp", &[]), "candle_nn_mlp");
}

#[test]
fn the_custom_layer_list_example_runs() {
    let out = Command::new(example("custom_model_zero2"))
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_candle_transformers_llama_example_learns_with_zero_2() {
    let v = run("llama_zero2", &[]);
    assert_eq!(v["ranks"], 2);
    assert_learns(&v, "llama_zero2");
}

#[test]
fn the_gpt2_finetune_example_tunes_an_hf_folder() {
    use candle_deepscale::layers::init::RandomInit;
    use candle_deepscale::layers::parameter::ParamBuilder;
    let dir = tempfile::tempdir().unwrap();
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let tok = zoo::tokenizer::Tokenizer::gpt2_bpe(
        &root.join("assets/gpt2/gpt2-vocab.json"),
        &root.join("assets/gpt2/gpt2-merges.txt"),
    )
    .unwrap();
    let cfg = zoo::gpt2::Config {
        seq_length: 32,
        max_position_embeddings: 32,
        hidden_dropout: 0.0,
        attention_dropout: 0.0,
        ..zoo::gpt2::Config::new(2, 32, 2, tok.vocab_size())
    };
    let src = RandomInit { seed: 3 };
    let model = zoo::gpt2::Gpt2::new(
        &cfg,
        &ParamBuilder::new(&src, &candle_core::Device::Cpu, candle_core::DType::F32),
    )
    .unwrap();
    zoo::gpt2::hf::save_hf_dir(&model, &tok, dir.path()).unwrap();
    let v = run("gpt2_finetune", &[dir.path().to_str().unwrap(), "15"]);
    assert_learns(&v, "gpt2_finetune");
}
