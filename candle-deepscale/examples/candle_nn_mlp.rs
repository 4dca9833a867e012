//! An ordinary candle-nn model — `candle_nn::linear`, `layer_norm`, `softmax_last_dim`, built
//! from a `VarBuilder` — trained by DeepScale with ZeRO-2 over 2 in-process ranks, unchanged.
//!
//! `candle_deepscale::initialize` takes a DeepSpeed config and the rank's communicator and gives
//! the engine and the `VarBuilder`; the loop is the usual forward, then `engine.backward(loss)`
//! and `engine.step()` (here both through `train_batch_with`). Each rank reads its slice of every
//! global batch from `engine.sampler()`.
//!
//! Run: `cargo run --release -p candle-deepscale --example candle_nn_mlp`
use candle_core::{Device, Module, Result, Tensor};
use candle_deepscale::comm::{Communicator, InProcessWorld};
use candle_deepscale::runtime::config::DeepSpeedConfig;
use candle_nn::VarBuilder;

struct Mlp {
    l1: candle_nn::Linear,
    ln: candle_nn::LayerNorm,
    l2: candle_nn::Linear,
    head: candle_nn::Linear,
}

impl Mlp {
    fn load(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            l1: candle_nn::linear(3, 64, vb.pp("l1"))?,
            ln: candle_nn::layer_norm(64, 1e-5, vb.pp("ln"))?,
            l2: candle_nn::linear(64, 64, vb.pp("l2"))?,
            head: candle_nn::linear(64, 1, vb.pp("head"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.ln.forward(&self.l1.forward(x)?)?.gelu()?;
        let gate = candle_nn::ops::softmax_last_dim(&self.l2.forward(&h)?)?;
        self.head.forward(&((h * gate)? * 64.0)?)
    }
}

/// Samples `range` of a regression task: y = sin(3 x0) + x1 x2.
fn data(range: std::ops::Range<usize>) -> Result<(Tensor, Tensor)> {
    let n = range.len();
    let x: Vec<f32> = (range.start * 3..range.end * 3)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let y: Vec<f32> = x
        .chunks(3)
        .map(|v| (3.0 * v[0]).sin() + v[1] * v[2])
        .collect();
    Ok((
        Tensor::from_vec(x, (n, 3), &Device::Cpu)?,
        Tensor::from_vec(y, (n, 1), &Device::Cpu)?,
    ))
}

fn main() -> Result<()> {
    let config = DeepSpeedConfig::from_json_str(
        r#"{"train_batch_size": 64, "train_micro_batch_size_per_gpu": 32,
            "optimizer": {"type": "AdamW", "params": {"lr": 0.005, "weight_decay": 0.01}},
            "zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}"#,
        "example",
    )?;
    let results = InProcessWorld::run(2, std::time::Duration::from_secs(60), |comm| {
        let rank = comm.rank();
        let (mut engine, vb) = candle_deepscale::initialize(&config, comm)?;
        let model = Mlp::load(vb)?;
        let (mut first, mut last) = (None, 0.0);
        for step in 0..200 {
            let (x, y) = data(engine.sampler().micro_batch(engine.iteration() + 1, 0))?;
            let report =
                engine.train_batch_with(vec![|| (model.forward(&x)? - &y)?.sqr()?.mean_all()])?;
            first.get_or_insert(report.loss);
            last = report.loss;
            if rank == 0 && step % 50 == 0 {
                println!("step {step:>3}: loss {:.4}", report.loss);
            }
        }
        if rank == 0 {
            println!("{}", engine.describe_memory());
        }
        Ok((first.unwrap_or(f64::NAN), last))
    });
    let (first, last) = results.into_iter().next().expect("rank 0")?;
    println!("{{\"initial_loss\": {first}, \"final_loss\": {last}}}");
    Ok(())
}
