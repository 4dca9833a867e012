//! Your own candle model trained by the DeepScale engine with ZeRO-2 over 2 in-process ranks.
//!
//! The model is three plain dense layers; it lists its layers and knows nothing of data parallelism,
//! ZeRO or the optimizer. Run: `cargo run --release -p candle-deepscale --example custom_model_zero2`
use candle_core::{DType, Device, Result, Tensor};
use candle_deepscale::comm::{Communicator, InProcessWorld};
use candle_deepscale::layers::parameter::{Init, ParamOpts};
use candle_deepscale::runtime::engine::{Engine, EngineConfig};
use candle_deepscale::runtime::topology::{Grid, Topology};
use candle_deepscale::{Activations, ForwardCtx, Layer, Param, ParamBuilder};
use std::sync::Arc;

struct Dense {
    name: String,
    w: Param,
    b: Param,
    relu: bool,
}

impl Dense {
    fn new(pb: &ParamBuilder, name: &str, (i, o): (usize, usize), relu: bool) -> Result<Self> {
        let pb = pb.push_prefix(name);
        let w = pb.get(
            &[o, i],
            "weight",
            Init::Normal {
                std: (1.0 / i as f64).sqrt(),
            },
            ParamOpts::default(),
        )?;
        let no_decay = ParamOpts {
            no_weight_decay: true,
            ..Default::default()
        };
        let b = pb.get(&[o], "bias", Init::Zeros, no_decay)?;
        Ok(Self {
            name: name.into(),
            w,
            b,
            relu,
        })
    }
}

impl Layer for Dense {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn parameters(&self) -> Vec<&Param> {
        vec![&self.w, &self.b]
    }
    fn forward(&self, x: &Activations, _: &ForwardCtx) -> Result<Activations> {
        let y = x
            .hidden
            .matmul(&self.w.tensor().t()?)?
            .broadcast_add(self.b.tensor())?;
        Ok(Activations::new(if self.relu { y.relu()? } else { y }))
    }
}

/// Samples `start..start + n` of a fixed regression task: y = sin(3 x0) + x1 x2.
fn data(start: usize, n: usize) -> Result<(Tensor, Tensor)> {
    let x: Vec<f32> = (start * 3..(start + n) * 3)
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
    let results = InProcessWorld::run(2, std::time::Duration::from_secs(60), |comm| {
        let rank = comm.rank();
        // The library builds the process groups: data parallel 2 here.
        let grid = Grid::new(Topology::new(1, 2, 1)?, comm)?;
        // Same seed on both ranks: identical initial weights.
        let src = candle_deepscale::layers::init::RandomInit { seed: 42 };
        let pb = ParamBuilder::new(&src, &Device::Cpu, DType::F32);
        let model: Vec<Box<dyn Layer>> = vec![
            Box::new(Dense::new(&pb, "fc1", (3, 64), true)?),
            Box::new(Dense::new(&pb, "fc2", (64, 64), true)?),
            Box::new(Dense::new(&pb, "head", (64, 1), false)?),
        ];
        let config = EngineConfig {
            zero_stage: 2,
            train_micro_batch_size_per_gpu: 32,
            gradient_clipping: 1.0,
            lr_schedule: candle_deepscale::runtime::lr_schedules::LrSchedule::Constant(1e-2),
            ..Default::default()
        };
        // The engine owns the model (a list of layers).
        let mut engine = Engine::new(Arc::new(model), config, grid.dp()?, grid.tp()?)?;
        if rank == 0 {
            println!("{}", engine.describe_memory());
        }
        let mut last = 0.0;
        for step in 0..300 {
            // Global batch 64: each rank takes its half.
            let (x, y) = data(step * 64 + rank * 32, 32)?;
            let mse = move |out: &Activations| (&out.hidden - &y)?.sqr()?.mean_all();
            let report = engine.train_batch(vec![(Activations::new(x), mse)])?;
            if rank == 0 && step % 50 == 0 {
                println!(
                    "step {step:>3}: loss {:.4}, grad norm {:.3}",
                    report.loss, report.grad_norm
                );
            }
            last = report.loss;
        }
        Ok(last)
    });
    for r in results {
        println!("final loss {:.4}", r?);
    }
    Ok(())
}
