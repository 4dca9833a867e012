//! Tensor-parallel equivalence runs shared by the in-process and MPI suites: the same tiny GPT-2 /
//! BERT trained 10 steps, reporting losses, logits, gathered gradients and parameters.
use super::{max_abs_diff, tiny_gpt2_config};
use candle_core::{DType, Device, Tensor};
use candle_deepscale::layers::init::RandomInit;
use candle_deepscale::layers::module::ForwardCtx;
use candle_deepscale::layers::parameter::{Param, ParamBuilder, Partition};
use candle_deepscale::layers::tensor_parallel::TensorParallel;
use candle_deepscale::runtime::adamw::{AdamW, AdamWConfig};
use std::collections::BTreeMap;
use zoo::bert::{self, Bert};
use zoo::gpt2::Gpt2;

pub const STEPS: usize = 10;

/// The full logical tensor of a (possibly split) parameter or its gradient, real rows only.
pub fn gather(tp: Option<&TensorParallel>, p: &Param, local: &Tensor) -> Tensor {
    let full = match (tp, p.meta.partition) {
        (Some(tp), Partition::Split { dim, .. }) if tp.size() > 1 => {
            let v: Vec<f32> = local.flatten_all().unwrap().to_vec1().unwrap();
            let mut all = vec![0f32; v.len() * tp.size()];
            tp.comm.all_gather(&tp.group, &v, &mut all).unwrap();
            let parts: Vec<Tensor> = all
                .chunks(v.len())
                .map(|c| Tensor::from_vec(c.to_vec(), local.shape(), &Device::Cpu).unwrap())
                .collect();
            Tensor::cat(&parts, dim).unwrap()
        }
        _ => local.clone(),
    };
    match p.meta.real_rows {
        Some(r) => full.narrow(0, 0, r).unwrap(),
        None => full,
    }
}

/// Relative error in the L2 norm: ||a - b|| <= tol * ||b||.
pub fn assert_rel_close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let err = norm(&(a - b).unwrap());
    let scale = norm(b).max(1e-12);
    assert!(
        err <= tol * scale,
        "{what}: ||a - b|| = {err} vs ||b|| = {scale} (relative {})",
        err / scale
    );
}

/// What one rank reports: per-step losses, full real-vocab logits of step 0, gathered gradients of
/// step 0 and gathered parameters after the last step (by logical name).
pub struct Trace {
    pub losses: Vec<f32>,
    pub logits: Tensor,
    pub grads: BTreeMap<String, Tensor>,
    pub params: BTreeMap<String, Tensor>,
}

fn batches(step: usize) -> (Tensor, Tensor) {
    let data: Vec<u32> = (0..2 * 13)
        .map(|i| ((i * 31 + step * 7 + 3) % 257) as u32)
        .collect();
    let t = Tensor::from_vec(data, (2, 13), &Device::Cpu).unwrap();
    (t.narrow(1, 0, 12).unwrap(), t.narrow(1, 1, 12).unwrap())
}

fn snapshot(
    tp: Option<&TensorParallel>,
    params: &[&Param],
    f: impl Fn(&Param) -> Tensor,
) -> BTreeMap<String, Tensor> {
    params
        .iter()
        .map(|p| (p.meta.name.clone(), gather(tp, p, &f(p))))
        .collect()
}

pub fn run_gpt2(tp: Option<TensorParallel>, steps: usize) -> Trace {
    run_gpt2_with(tp, steps, false)
}

/// [`run_gpt2`] with training forwards (no dropout in the tiny config: the same numbers): the
/// logits are the fused LM head's, differentiated by the cross entropy straight into the head's
/// input and weight.
pub fn run_gpt2_training(tp: Option<TensorParallel>, steps: usize) -> Trace {
    run_gpt2_with(tp, steps, true)
}

fn run_gpt2_with(tp: Option<TensorParallel>, steps: usize, train: bool) -> Trace {
    let cfg = tiny_gpt2_config();
    let src = RandomInit { seed: 99 };
    let model = Gpt2::new(
        &cfg,
        &ParamBuilder::new(&src, &Device::Cpu, DType::F32).with_tp(tp.clone()),
    )
    .unwrap();
    let params = model.parameters();
    let mut opt = AdamW::new(
        &params,
        AdamWConfig {
            lr: 1e-3,
            ..Default::default()
        },
    )
    .unwrap();
    let (mut losses, mut logits0, mut grads0) = (Vec::new(), None, None);
    for step in 0..steps {
        let (x, y) = batches(step);
        let ctx = match train {
            true => ForwardCtx::train(7, step as u64, 0),
            false => ForwardCtx::eval(),
        };
        let logits = model.forward(&x, &ctx).unwrap();
        let loss = model.loss(&logits, &y).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        let grads = loss.backward().unwrap();
        if step == 0 {
            logits0 = Some(model.full_logits(&logits).unwrap());
            grads0 = Some(snapshot(tp.as_ref(), &params, |p| {
                grads.get(p.tensor()).expect("gradient").clone()
            }));
        }
        opt.step(&grads, 1.0).unwrap();
    }
    Trace {
        losses,
        logits: logits0.unwrap(),
        grads: grads0.unwrap(),
        params: snapshot(tp.as_ref(), &params, |p| p.tensor().clone()),
    }
}

fn tiny_bert() -> bert::Config {
    bert::Config {
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        max_position_embeddings: 32,
        ..bert::Config::new(2, 64, 4, 257)
    }
}

pub fn run_bert(tp: Option<TensorParallel>, steps: usize) -> Trace {
    run_bert_with(tp, steps, false)
}

/// [`run_bert`] with training forwards (no dropout in the tiny config): the masked-LM logits
/// are the fused LM head's, its bias's gradient included.
pub fn run_bert_training(tp: Option<TensorParallel>, steps: usize) -> Trace {
    run_bert_with(tp, steps, true)
}

fn run_bert_with(tp: Option<TensorParallel>, steps: usize, train: bool) -> Trace {
    let cfg = tiny_bert();
    let src = RandomInit { seed: 98 };
    let model = Bert::new(
        &cfg,
        &ParamBuilder::new(&src, &Device::Cpu, DType::F32).with_tp(tp.clone()),
    )
    .unwrap();
    let params = model.parameters();
    let mut opt = AdamW::new(
        &params,
        AdamWConfig {
            lr: 1e-3,
            ..Default::default()
        },
    )
    .unwrap();
    let (mut losses, mut logits0, mut grads0) = (Vec::new(), None, None);
    let types = Tensor::new(&[[0u32; 12], [1; 12]], &Device::Cpu).unwrap();
    let nsp = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
    for step in 0..steps {
        let (x, y) = batches(step);
        let ctx = match train {
            true => ForwardCtx::train(7, step as u64, 0),
            false => ForwardCtx::eval(),
        };
        let out = model.forward(&x, Some(&types), None, &ctx).unwrap();
        let lm = out.lm_logits.as_ref().unwrap();
        let mlm = model.lm_token_losses(lm, &y).unwrap().mean_all().unwrap();
        let sop = candle_deepscale::layers::loss::lm_cross_entropy(
            out.binary_logits.as_ref().unwrap(),
            &nsp,
            2,
            None,
        )
        .unwrap();
        let loss = (mlm + sop).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        let grads = loss.backward().unwrap();
        if step == 0 {
            let full =
                candle_deepscale::layers::tensor_parallel::mappings::gather_from_tp(lm, model.tp())
                    .unwrap();
            logits0 = Some(full.narrow(2, 0, cfg.vocab_size).unwrap());
            grads0 = Some(snapshot(tp.as_ref(), &params, |p| {
                grads.get(p.tensor()).expect("gradient").clone()
            }));
        }
        opt.step(&grads, 1.0).unwrap();
    }
    Trace {
        losses,
        logits: logits0.unwrap(),
        grads: grads0.unwrap(),
        params: snapshot(tp.as_ref(), &params, |p| p.tensor().clone()),
    }
}

/// Asserts that `t` (a tensor-parallel rank's trace) equals the one-rank `reference`.
pub fn assert_trace_matches(t: &Trace, reference: &Trace, what: &str, tp: usize, rank: usize) {
    let steps = STEPS;
    for (s, (a, b)) in t.losses.iter().zip(&reference.losses).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "{what} tp={tp} rank {rank} step {s}: loss {a} vs {b}"
        );
    }
    assert_rel_close(
        &t.logits,
        &reference.logits,
        1e-5,
        &format!("{what} tp={tp} logits"),
    );
    assert_eq!(
        t.grads.keys().collect::<Vec<_>>(),
        reference.grads.keys().collect::<Vec<_>>()
    );
    for (name, g) in &t.grads {
        assert_rel_close(
            g,
            &reference.grads[name],
            1e-5,
            &format!("{what} tp={tp} rank {rank} grad {name}"),
        );
    }
    assert_params_match(
        &t.params,
        &reference.params,
        &format!("{what} tp={tp} rank {rank}"),
        steps,
    );
}

/// Parameters (by logical name) equal the reference's within 1e-5 relative.
pub fn assert_params_match(
    params: &BTreeMap<String, Tensor>,
    reference: &BTreeMap<String, Tensor>,
    what: &str,
    steps: usize,
) {
    assert_eq!(
        params.keys().collect::<Vec<_>>(),
        reference.keys().collect::<Vec<_>>(),
        "{what}: parameter names"
    );
    for (name, p) in params {
        let what = format!("{what} param {name} after {steps} steps");
        let want = &reference[name];
        if name.ends_with("query_key_value.bias") {
            // The key bias has an exactly-zero gradient in exact arithmetic (softmax ignores a
            // per-row shift), so Adam's normalisation turns rounding noise into tiny updates whose
            // sign depends on summation order. Query and value biases must match; the key bias
            // only has to stay at noise level.
            let split = |t: &Tensor| t.reshape((4, 3, 16)).unwrap();
            let (a, b) = (split(p), split(want));
            // Query biases can hold an element whose gradient crosses zero during training
            // (seen: one of 64, 1e-6 apart after 10 steps under tp=2), so they get 1e-4.
            for (part, tol) in [(0, 1e-4), (2, 1e-5)] {
                assert_rel_close(
                    &a.narrow(1, part, 1).unwrap(),
                    &b.narrow(1, part, 1).unwrap(),
                    tol,
                    &what,
                );
            }
            let k = max_abs_diff(&a.narrow(1, 1, 1).unwrap(), &b.narrow(1, 1, 1).unwrap());
            assert!(k < 1e-4, "{what}: key bias drifted by {k}");
            continue;
        }
        // 2e-5: the GEMM library sums in shape-dependent orders (BLIS's small-matrix kernels
        // differ from its large ones, and tp splits shapes), and Adam's normalisation turns that
        // rounding into whole steps for elements whose gradient is near zero. Seen: 1.03e-5 for
        // one weight at pp=2 tp=2 under BLIS (6e-6 under OpenBLAS, 3e-6 under the gemm crate).
        assert_rel_close(p, want, 2e-5, &what);
    }
}
