//! Every trainable parameter gets a real gradient (candle's fused ops record no backward), and a
//! few optimizer steps on one batch lower the loss.
mod common;

use candle_core::{DType, Device, Tensor};
use candle_deepscale::layers::init::RandomInit;
use candle_deepscale::layers::loss::lm_cross_entropy;
use candle_deepscale::layers::module::ForwardCtx;
use candle_deepscale::layers::parameter::{Param, ParamBuilder};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use zoo::bert::{self, Bert};

fn assert_all_grads(params: &[&Param], loss: &Tensor) {
    let grads = loss.backward().unwrap();
    for p in params {
        let g = grads
            .get(p.tensor())
            .unwrap_or_else(|| panic!("parameter {} received no gradient", p.meta.name));
        let v: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{}: non-finite gradient",
            p.meta.name
        );
        assert!(
            v.iter().any(|x| *x != 0.0),
            "{}: gradient is all zeros",
            p.meta.name
        );
    }
}

fn batch() -> (Tensor, Tensor) {
    let data: Vec<u32> = (0..2 * 17).map(|i| ((i * 37 + 11) % 250) as u32).collect();
    let t = Tensor::from_vec(data, (2, 17), &Device::Cpu).unwrap();
    (t.narrow(1, 0, 16).unwrap(), t.narrow(1, 1, 16).unwrap())
}

#[test]
fn gpt2_every_parameter_gets_a_gradient_and_training_lowers_loss() {
    let mut cfg = common::tiny_gpt2_config();
    // Dropout on: its masks must be differentiable-through too.
    cfg.hidden_dropout = 0.1;
    cfg.attention_dropout = 0.1;
    let model = common::random_gpt2(&cfg, 1);
    let params = model.parameters();
    assert_eq!(
        params.len(),
        2 + 12 * cfg.num_layers + 2,
        "tied word embedding counted once"
    );
    let (x, y) = batch();
    let ctx = ForwardCtx::train(1, 0, 0);
    let loss =
        lm_cross_entropy(&model.forward(&x, &ctx).unwrap(), &y, cfg.vocab_size, None).unwrap();
    assert_all_grads(&params, &loss);

    let vars = params.iter().map(|p| p.var.clone()).collect();
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: 3e-3,
            ..Default::default()
        },
    )
    .unwrap();
    let eval = |m: &zoo::gpt2::Gpt2| -> f32 {
        lm_cross_entropy(
            &m.forward(&x, &ForwardCtx::eval()).unwrap(),
            &y,
            cfg.vocab_size,
            None,
        )
        .unwrap()
        .to_scalar()
        .unwrap()
    };
    let before = eval(&model);
    for step in 0..8 {
        let loss = lm_cross_entropy(
            &model.forward(&x, &ForwardCtx::train(1, step, 0)).unwrap(),
            &y,
            cfg.vocab_size,
            None,
        )
        .unwrap();
        opt.backward_step(&loss).unwrap();
    }
    let after = eval(&model);
    assert!(after < before - 0.5, "loss {before} -> {after}");
}

#[test]
fn padded_vocab_rows_never_enter_the_loss() {
    let cfg = common::tiny_gpt2_config();
    assert_eq!(cfg.padded_vocab_size(1), 384);
    let model = common::random_gpt2(&cfg, 2);
    let (x, y) = batch();
    let logits = model.forward(&x, &ForwardCtx::eval()).unwrap();
    let loss = lm_cross_entropy(&logits, &y, cfg.vocab_size, None).unwrap();
    // Reference: softmax over the real vocabulary only, computed by hand.
    let real: Vec<Vec<f32>> = logits
        .narrow(2, 0, cfg.vocab_size)
        .unwrap()
        .reshape((32, 257))
        .unwrap()
        .to_vec2()
        .unwrap();
    let labels: Vec<u32> = y.flatten_all().unwrap().to_vec1().unwrap();
    let mut total = 0f64;
    for (row, &l) in real.iter().zip(&labels) {
        let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
        total += lse - row[l as usize] as f64;
    }
    let want = total / labels.len() as f64;
    let got = loss.to_scalar::<f32>().unwrap() as f64;
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    // And the padded rows get no gradient.
    let grads = loss.backward().unwrap();
    let g = grads
        .get(model.embedding.word_embeddings.weight.tensor())
        .unwrap();
    let pad = g
        .narrow(0, 257, 384 - 257)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(pad, 0.0);
}

fn bert_grads(pre_ln: bool) {
    let cfg = bert::Config {
        pre_layer_norm: pre_ln,
        max_position_embeddings: 32,
        ..bert::Config::new(2, 64, 4, 300)
    };
    let src = RandomInit { seed: 4 };
    let model = Bert::new(&cfg, &ParamBuilder::new(&src, &Device::Cpu, DType::F32)).unwrap();
    let params = model.parameters();
    let (x, y) = batch();
    let types = Tensor::new(&[[0u32; 16], [1; 16]], &Device::Cpu).unwrap();
    let out = model
        .forward(&x, Some(&types), None, &ForwardCtx::train(4, 0, 0))
        .unwrap();
    let mlm = lm_cross_entropy(out.lm_logits.as_ref().unwrap(), &y, cfg.vocab_size, None).unwrap();
    let nsp_labels = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
    let nsp = lm_cross_entropy(out.binary_logits.as_ref().unwrap(), &nsp_labels, 2, None).unwrap();
    assert_all_grads(&params, &(mlm + nsp).unwrap());
}

#[test]
fn bert_post_ln_every_parameter_gets_a_gradient() {
    bert_grads(false);
}

#[test]
fn bert_pre_ln_every_parameter_gets_a_gradient() {
    bert_grads(true);
}

/// The vendored candle-core's backprop stores a node's first gradient as is (vendor/candle-core/
/// PATCHES.md): fan-in still sums, subtraction's first gradient is negated, broadcast and
/// transposed gradients arrive contiguous, and two variables fed the same gradient stay apart.
#[test]
fn patched_backprop_accumulates_like_candle() {
    use candle_core::Var;
    let dev = Device::Cpu;
    let x = Var::from_vec(vec![1f32, -2.0, 3.0, 0.5, 4.0, -1.5], (2, 3), &dev).unwrap();
    let w = Var::from_vec(vec![0.5f32, 2.0, -1.0], 3, &dev).unwrap();
    let (xt, wt) = (x.as_tensor(), w.as_tensor());
    // f = sum(x * x) - sum(x .* w) + sum(x^T) ; df/dx = 2x - w + 1, df/dw = -sum_rows(x)
    let f = ((xt.sqr().unwrap().sum_all().unwrap()
        - xt.broadcast_mul(wt).unwrap().sum_all().unwrap())
    .unwrap()
        + xt.t().unwrap().sum_all().unwrap())
    .unwrap();
    let g = f.backward().unwrap();
    let gx: Vec<Vec<f32>> = g.get(xt).unwrap().to_vec2().unwrap();
    let gw: Vec<f32> = g.get(wt).unwrap().to_vec1().unwrap();
    let xv: Vec<Vec<f32>> = xt.to_vec2().unwrap();
    let wv: Vec<f32> = wt.to_vec1().unwrap();
    for r in 0..2 {
        for c in 0..3 {
            assert_eq!(gx[r][c], 2.0 * xv[r][c] - wv[c] + 1.0, "dx[{r}][{c}]");
        }
    }
    for c in 0..3 {
        assert_eq!(gw[c], -(xv[0][c] + xv[1][c]), "dw[{c}]");
    }
    assert!(g.get(xt).unwrap().is_contiguous() && g.get(wt).unwrap().is_contiguous());
    // a - b: the first gradient of b is -1 (negated, not the incoming +1).
    let a = Var::from_vec(vec![1f32, 2.0], 2, &dev).unwrap();
    let b = Var::from_vec(vec![3f32, 4.0], 2, &dev).unwrap();
    let d = (a.as_tensor() - b.as_tensor()).unwrap().sum_all().unwrap();
    let g = d.backward().unwrap();
    assert_eq!(
        g.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
        [1.0, 1.0]
    );
    assert_eq!(
        g.get(b.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
        [-1.0, -1.0]
    );
}

/// Largest difference of `a` from `b` relative to `b`'s largest magnitude (at least 1).
fn close_rel(a: &Tensor, b: &Tensor, tol: f32) -> candle_core::Result<()> {
    let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let s = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert!(d <= tol * s.max(1.0), "max difference {d} (scale {s})");
    Ok(())
}

/// fp16 / bf16 on the CPU: the fused kernels run widened to fp32 and give back the input's
/// dtype — values and gradients equal candle's own half-precision ops to half rounding.
#[test]
fn half_precision_runs_widened_with_gradients() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for dt in [DType::F16, DType::BF16] {
        let tol = if dt == DType::F16 { 4e-3 } else { 3e-2 };
        let x = candle_core::Var::from_tensor(
            &Tensor::randn(0f32, 1.0, (12, 32), &dev)?.to_dtype(dt)?,
        )?;
        let w = candle_core::Var::from_tensor(
            &Tensor::randn(0f32, 0.2, (48, 32), &dev)?.to_dtype(dt)?,
        )?;
        let b = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, 48, &dev)?.to_dtype(dt)?)?;
        let lnw = candle_core::Var::from_tensor(&Tensor::ones(48, dt, &dev)?)?;
        let lnb = candle_core::Var::from_tensor(&Tensor::zeros(48, dt, &dev)?)?;
        let y = candle_deepscale::ops::matmul::linear(&x, &w, Some(&b))?;
        let y = candle_deepscale::ops::layer_norm::layer_norm(&y, &lnw, &lnb, 1e-5)?;
        let y = candle_deepscale::ops::bias_gelu::bias_gelu(&y, Some(&b))?;
        assert_eq!(y.dtype(), dt);
        // The reference: the composed ops in f32 on the widened inputs (x and w as variables for
        // the weight's gradient).
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let (x32, w32) = (
            candle_core::Var::from_tensor(&f(&x)?)?,
            candle_core::Var::from_tensor(&f(&w)?)?,
        );
        let r = x32.broadcast_matmul(&w32.t()?)?.broadcast_add(&f(&b)?)?;
        let r = candle_deepscale::ops::layer_norm::layer_norm_reference(
            &r,
            &f(&lnw)?,
            &f(&lnb)?,
            1e-5,
        )?;
        let r = r.broadcast_add(&f(&b)?)?.gelu()?;
        close_rel(&f(&y)?, &r, tol)?;
        let g = y.sum_all()?.backward()?;
        let gw = g.get(&w).expect("the weight's gradient");
        assert_eq!(gw.dtype(), dt);
        let g32 = r.sum_all()?.backward()?;
        close_rel(&f(gw)?, g32.get(&w32).expect("grad"), tol * 4.0)?;
        // Attention widens the same way.
        let qkv = Tensor::randn(0f32, 1.0, (1, 5, 2 * 3 * 8), &dev)?.to_dtype(dt)?;
        let o =
            candle_deepscale::ops::attention::causal_attention(&qkv, 2, 8, None)?.expect("fused");
        assert_eq!(o.dtype(), dt);
        let o32 = candle_deepscale::ops::attention::causal_attention(&f(&qkv)?, 2, 8, None)?
            .expect("f32");
        close_rel(&f(&o)?, &o32, tol)?;
    }
    Ok(())
}
