//! A candle-transformers model used unchanged — `candle_transformers::models::llama::Llama`, a tiny
//! config — trained by DeepScale with ZeRO-2 data parallelism: over 2 in-process ranks, or under
//! `mpirun -np 2` (build with `--features candle-deepscale/mpi`; each process is a rank).
//!
//! The task: a sequence of 8 tokens stepping by a constant (mod the vocabulary); predict the next
//! one. Llama's RMS norms, rotary embeddings and softmax are candle-nn's fused ops, which need
//! DeepScale's candle-nn patch to have a backward (README, "Use it from your own candle code").
//!
//! Run: `cargo run --release -p candle-deepscale --example llama_zero2`
use candle_core::{DType, Device, Result, Tensor};
use candle_deepscale::comm::InProcessWorld;
use candle_deepscale::runtime::config::DeepSpeedConfig;
use candle_deepscale::IntoComm;
use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};
use std::sync::Mutex;

const VOCAB: usize = 32;
const SEQ: usize = 8;
const STEPS: usize = 60;

/// Sample `i`: tokens `a, a + d, ..., a + 7d` (mod VOCAB) and the next one.
fn sample(i: usize) -> (Vec<u32>, u32) {
    let a = (i * 7 + 3) % VOCAB;
    let d = 1 + (i * 5) % 3;
    let tok = |k: usize| ((a + k * d) % VOCAB) as u32;
    ((0..SEQ).map(tok).collect(), tok(SEQ))
}

fn batch(range: std::ops::Range<usize>) -> Result<(Tensor, Tensor)> {
    let n = range.len();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for i in range {
        let (s, next) = sample(i);
        x.extend(s);
        y.push(next);
    }
    Ok((
        Tensor::from_vec(x, (n, SEQ), &Device::Cpu)?,
        Tensor::from_vec(y, n, &Device::Cpu)?,
    ))
}

/// Trains on this rank; returns (first loss, last loss, parameters).
fn train(comm: impl IntoComm) -> Result<(f64, f64, usize)> {
    let config = DeepSpeedConfig::from_json_str(
        r#"{"train_batch_size": 32, "train_micro_batch_size_per_gpu": 16,
            "optimizer": {"type": "AdamW", "params": {"lr": 0.003, "weight_decay": 0.01}},
            "zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}"#,
        "example",
    )?;
    let (mut engine, vb) = candle_deepscale::initialize(&config, comm)?;
    let cfg = LlamaConfig {
        hidden_size: 64,
        intermediate_size: 128,
        vocab_size: VOCAB,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: None,
        max_position_embeddings: SEQ,
        tie_word_embeddings: Some(true),
    }
    .into_config(false);
    // The model exactly as candle-transformers builds it.
    let model = Llama::load(vb, &cfg)?;
    let cache = Mutex::new(Cache::new(false, DType::F32, &cfg, &Device::Cpu)?);
    let params: usize = engine
        .registry()
        .map_or(0, |r| r.params().iter().map(|p| p.meta.numel()).sum());
    let (mut first, mut last) = (None, 0.0);
    for step in 0..STEPS {
        let (x, y) = batch(engine.sampler().micro_batch(engine.iteration() + 1, 0))?;
        let report = engine.train_batch_with(vec![|| {
            let mut cache = cache
                .lock()
                .map_err(|_| candle_core::Error::Msg("cache lock".into()))?;
            // Llama's forward returns the last position's logits: the next token.
            let logits = model.forward(&x, 0, &mut cache)?;
            candle_nn::loss::cross_entropy(&logits, &y)
        }])?;
        first.get_or_insert(report.loss);
        last = report.loss;
        if engine.dp_rank() == 0 && step % 10 == 0 {
            eprintln!("step {step:>3}: loss {:.4}", report.loss);
        }
    }
    Ok((first.unwrap_or(f64::NAN), last, params))
}

fn main() -> Result<()> {
    #[cfg(feature = "mpi")]
    if std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some() {
        use candle_deepscale::comm::Communicator;
        let comm = std::sync::Arc::new(candle_deepscale::comm::mpi::MpiComm::init(
            candle_deepscale::comm::default_timeout(),
        )?);
        let (rank, ranks) = (comm.rank(), comm.world_size());
        let (first, last, params) = train(comm)?;
        if rank == 0 {
            println!(
                "{{\"initial_loss\": {first}, \"final_loss\": {last}, \"parameters\": {params}, \"ranks\": {ranks}}}"
            );
        }
        return Ok(());
    }
    let results = InProcessWorld::run(2, std::time::Duration::from_secs(120), train);
    let (first, last, params) = results.into_iter().next().expect("rank 0")?;
    println!("{{\"initial_loss\": {first}, \"final_loss\": {last}, \"parameters\": {params}, \"ranks\": 2}}");
    Ok(())
}
