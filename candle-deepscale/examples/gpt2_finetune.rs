//! Fine-tuning the zoo's GPT-2 from a Hugging Face folder through the whole-model path, with
//! ZeRO-2 over 2 in-process ranks: the weights come from the folder (`HfSource`), every parameter
//! the model builds lands in the engine's registry (`ParamBuilder::with_registry`), the forward is
//! the model's own, and `engine.backward` / `engine.step` do the rest; the tuned weights are
//! exported as safetensors under the model's names.
//!
//! Run: `cargo run --release -p candle-deepscale --example gpt2_finetune -- HF_DIR [STEPS]`
//! (an HF GPT-2 folder, e.g. one `deepscale pretrain-gpt2 --save-hf` wrote).
use candle_core::{DType, Device, Result, Tensor};
use candle_deepscale::comm::InProcessWorld;
use candle_deepscale::layers::parameter::ParamBuilder;
use candle_deepscale::runtime::config::DeepSpeedConfig;
use candle_deepscale::{ForwardCtx, InitOptions};
use std::path::PathBuf;
use zoo::gpt2::{hf::HfSource, Config, Gpt2};

/// Tokens of the text the model is tuned on: a repeated sentence it should learn to continue.
fn tokens(vocab: usize, n: usize) -> Vec<u32> {
    let sentence = [12u32, 345, 6789, 42, 7, 1000, 23, 5];
    (0..n)
        .map(|i| sentence[i % sentence.len()] % vocab as u32)
        .collect()
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        candle_core::bail!("usage: gpt2_finetune HF_DIR [STEPS]")
    };
    let steps: usize = args
        .next()
        .map_or(Ok(20), |s| s.parse())
        .map_err(|e| candle_core::Error::Msg(format!("STEPS: {e}")))?;
    let cfg = Config::from_hf_json(&dir.join("config.json"))?;
    let seq = cfg.seq_length.min(32);
    let config = DeepSpeedConfig::from_json_str(
        r#"{"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4,
            "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.0}},
            "zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}"#,
        "example",
    )?;
    let data = tokens(cfg.vocab_size, 8 * steps * (seq + 1) + seq + 1);
    let results = InProcessWorld::run(2, std::time::Duration::from_secs(120), |comm| {
        // The zoo's GPT-2 builds through a ParamBuilder into the engine's registry (the
        // VarBuilder is for candle-nn models).
        let (mut engine, _vb) =
            candle_deepscale::initialize_with(&config, comm, InitOptions::default())?;
        let registry = engine.registry().expect("whole-model engine").clone();
        let source = HfSource::new(zoo::weights::SafetensorsFiles::open_dir(&dir)?, &cfg)?;
        let pb = ParamBuilder::new(&source, &Device::Cpu, DType::F32).with_registry(registry);
        let model = Gpt2::new(&cfg, &pb)?;
        let (mut first, mut last) = (None, 0.0);
        for _ in 0..steps {
            let it = engine.iteration() + 1;
            let r = engine.sampler().micro_batch(it, 0);
            let rows: Vec<u32> = r
                .clone()
                .flat_map(|i| data[i * seq..i * seq + seq + 1].to_vec())
                .collect();
            let t = Tensor::from_vec(rows, (r.len(), seq + 1), &Device::Cpu)?;
            let (x, y) = (t.narrow(1, 0, seq)?, t.narrow(1, 1, seq)?);
            let ctx = ForwardCtx::train(1234, it, engine.dp_rank() as u64);
            let report =
                engine.train_batch_with(vec![|| model.loss(&model.forward(&x, &ctx)?, &y)])?;
            first.get_or_insert(report.loss);
            last = report.loss;
        }
        if engine.dp_rank() == 0 {
            let out = std::env::temp_dir()
                .join(format!("gpt2_finetune_{}.safetensors", std::process::id()));
            engine
                .registry()
                .expect("registry")
                .save_safetensors(&out, false)?;
            eprintln!("tuned weights: {}", out.display());
            std::fs::remove_file(&out).ok();
        }
        Ok((
            first.unwrap_or(f64::NAN),
            last,
            engine.registry().map_or(0, |r| r.len()),
        ))
    });
    let (first, last, n) = results.into_iter().next().expect("rank 0")?;
    println!("{{\"initial_loss\": {first}, \"final_loss\": {last}, \"parameters\": {n}}}");
    Ok(())
}
