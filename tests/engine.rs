//! The layer-sequential loop: per-layer backward (with and without activation checkpointing) gives
//! the gradients of one whole-graph backward, for GPT-2 and for BERT's two-output head.
mod common;

use candle_core::{DType, Device, Tensor};
use candle_deepscale::layers::init::RandomInit;
use candle_deepscale::layers::loss::lm_cross_entropy;
use candle_deepscale::layers::module::GradLookup;
use candle_deepscale::layers::module::{Activations, ForwardCtx};
use candle_deepscale::layers::parameter::{Param, ParamBuilder};
use candle_deepscale::runtime::layer_loop::forward_backward;
use common::tp::assert_rel_close;
use zoo::bert::{self, Bert};

fn compare(
    params: &[&Param],
    whole: &candle_core::backprop::GradStore,
    per_layer: &impl GradLookup,
    what: &str,
) {
    for p in params {
        let a = per_layer
            .grad(p.tensor())
            .unwrap_or_else(|| panic!("{what}: no gradient for {}", p.meta.name));
        let b = whole.get(p.tensor()).unwrap();
        assert_rel_close(a, b, 1e-6, &format!("{what}: {}", p.meta.name));
    }
}

#[test]
fn gpt2_per_layer_backward_equals_whole_graph() {
    let mut cfg = common::tiny_gpt2_config();
    cfg.hidden_dropout = 0.1;
    cfg.attention_dropout = 0.1;
    let model = common::random_gpt2(&cfg, 3);
    let params = model.parameters();
    let data: Vec<u32> = (0..2 * 17).map(|i| ((i * 41 + 5) % 257) as u32).collect();
    let t = Tensor::from_vec(data, (2, 17), &Device::Cpu).unwrap();
    let (x, y) = (t.narrow(1, 0, 16).unwrap(), t.narrow(1, 1, 16).unwrap());
    // Dropout on: the recomputed forward must draw the same masks.
    let ctx = ForwardCtx::train(7, 3, 1);
    let whole_loss = model.loss(&model.forward(&x, &ctx).unwrap(), &y).unwrap();
    let whole = whole_loss.backward().unwrap();
    for checkpoint in [false, true] {
        let (loss, grads) = forward_backward(
            &model.layers(),
            Activations::new(x.clone()),
            &ctx,
            checkpoint,
            |out| model.loss(&out.hidden, &y),
        )
        .unwrap();
        assert_eq!(
            loss,
            whole_loss.to_scalar::<f32>().unwrap(),
            "checkpoint {checkpoint}"
        );
        assert_eq!(grads.len(), params.len(), "tied embedding accumulated once");
        compare(
            &params,
            &whole,
            &grads,
            &format!("GPT-2 checkpoint={checkpoint}"),
        );
    }
}

#[test]
fn bert_two_output_head_per_layer_backward_equals_whole_graph() {
    let cfg = bert::Config {
        max_position_embeddings: 32,
        ..bert::Config::new(2, 64, 4, 300)
    };
    let src = RandomInit { seed: 9 };
    let model = Bert::new(&cfg, &ParamBuilder::new(&src, &Device::Cpu, DType::F32)).unwrap();
    let params = model.parameters();
    let ids = Tensor::new(
        &[[5u32, 9, 33, 200, 7, 2], [3, 4, 5, 6, 7, 8]],
        &Device::Cpu,
    )
    .unwrap();
    let types = Tensor::new(&[[0u32, 0, 0, 1, 1, 1], [0; 6]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32; 6], [1, 1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let labels = Tensor::new(
        &[[6u32, 10, 34, 201, 8, 3], [4, 5, 6, 7, 8, 9]],
        &Device::Cpu,
    )
    .unwrap();
    let nsp = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
    let ctx = ForwardCtx::train(1, 0, 0);
    let loss_of = |lm: &Tensor, bin: &Tensor| {
        let mlm = model
            .lm_token_losses(lm, &labels)
            .unwrap()
            .mean_all()
            .unwrap();
        (mlm + lm_cross_entropy(bin, &nsp, 2, None).unwrap()).unwrap()
    };
    let out = model
        .forward(&ids, Some(&types), Some(&mask), &ctx)
        .unwrap();
    let whole_loss = loss_of(
        out.lm_logits.as_ref().unwrap(),
        out.binary_logits.as_ref().unwrap(),
    );
    let whole = whole_loss.backward().unwrap();
    for checkpoint in [false, true] {
        let input = Activations::with_aux(ids.clone(), vec![types.clone(), mask.clone()]);
        let (loss, grads) = forward_backward(&model.layers(), input, &ctx, checkpoint, |out| {
            Ok(loss_of(&out.hidden, &out.aux[0]))
        })
        .unwrap();
        assert!((loss - whole_loss.to_scalar::<f32>().unwrap()).abs() < 1e-6);
        compare(
            &params,
            &whole,
            &grads,
            &format!("BERT checkpoint={checkpoint}"),
        );
    }
}
