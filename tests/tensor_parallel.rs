//! Tensor parallelism equals one rank: logits, losses, every gradient and 10 optimizer steps, for
//! GPT-2 and BERT at tp = 2 and 4 (in-process ranks).
mod common;

use common::tp::{
    assert_rel_close, assert_trace_matches, run_bert, run_bert_training, run_gpt2,
    run_gpt2_training, Trace, STEPS,
};

use candle_core::{Device, Tensor};
use candle_deepscale::comm::{Communicator, InProcessWorld};
use candle_deepscale::layers::module::ForwardCtx;
use candle_deepscale::layers::tensor_parallel::TensorParallel;
use std::sync::Arc;
use std::time::Duration;

fn compare(run: fn(Option<TensorParallel>, usize) -> Trace, tp: usize, what: &str) {
    let reference = run(None, STEPS);
    let traces = InProcessWorld::run(tp, Duration::from_secs(60), |comm| {
        let comm: Arc<dyn Communicator> = comm;
        let t = TensorParallel::new(comm, (0..tp).collect())?;
        Ok(run(Some(t), STEPS))
    });
    for (rank, t) in traces.into_iter().enumerate() {
        let t = t.unwrap_or_else(|e| panic!("{what} tp={tp} rank {rank}: {e}"));
        assert_trace_matches(&t, &reference, what, tp, rank);
    }
}

#[test]
fn gpt2_tp2_equals_tp1() {
    compare(run_gpt2, 2, "GPT-2");
}

#[test]
fn gpt2_tp4_equals_tp1() {
    compare(run_gpt2, 4, "GPT-2");
}

/// Training forwards: the fused LM head on each rank's vocabulary block (257 real columns of 512:
/// the last blocks hold one real column or none) against one rank's fused head over the whole
/// vocabulary.
#[test]
fn gpt2_training_forward_tp2_and_tp4_equal_tp1() {
    compare(run_gpt2_training, 2, "GPT-2 (training forward)");
    compare(run_gpt2_training, 4, "GPT-2 (training forward)");
}

#[test]
fn bert_tp2_equals_tp1() {
    compare(run_bert, 2, "BERT");
}

/// Training forwards: BERT's masked-LM decoder (tied weight and bias) as the fused LM head.
#[test]
fn bert_training_forward_tp2_and_tp4_equal_tp1() {
    compare(run_bert_training, 2, "BERT (training forward)");
    compare(run_bert_training, 4, "BERT (training forward)");
}

#[test]
fn bert_tp4_equals_tp1() {
    compare(run_bert, 4, "BERT");
}

#[test]
fn tp_model_loads_only_its_slices_of_an_hf_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::random_gpt2(&common::tiny_gpt2_config(), 5);
    common::write_hf_gpt2_dir(&model, tmp.path(), "transformer.", 2);
    let ids = Tensor::new(&[[1u32, 5, 9, 200, 256, 3]], &Device::Cpu).unwrap();
    let want = model
        .full_logits(&model.forward(&ids, &ForwardCtx::eval()).unwrap())
        .unwrap();
    let dir = tmp.path().to_path_buf();
    for tp in [2usize, 4] {
        let results = InProcessWorld::run(tp, Duration::from_secs(60), |comm| {
            let comm: Arc<dyn Communicator> = comm;
            let t = TensorParallel::new(comm, (0..tp).collect())?;
            let (m, _) = zoo::hub::load_gpt2_tp(&dir, &Device::Cpu, Some(t), |_| {})?;
            // Each rank holds 1/tp of every split parameter.
            let qkv = m
                .parameters()
                .into_iter()
                .find(|p| p.meta.name == "layers.0.attention.query_key_value.weight")
                .unwrap();
            assert_eq!(qkv.tensor().dims(), [3 * 64 / tp, 64]);
            m.full_logits(&m.forward(&ids, &ForwardCtx::eval())?)
        });
        for r in results {
            assert_rel_close(
                &r.unwrap(),
                &want,
                1e-5,
                &format!("tp={tp} logits from HF slices"),
            );
        }
    }
}

/// An id past the whole vocabulary is an error at tp 2 as at tp 1 (the split table would otherwise
/// look it up as a zero row on every rank and train on).
#[test]
fn vocab_parallel_embedding_refuses_ids_past_the_table() {
    use candle_deepscale::layers::init::RandomInit;
    use candle_deepscale::layers::parameter::{ParamBuilder, ParamOpts};
    use candle_deepscale::layers::tensor_parallel::layers::VocabParallelEmbedding;
    let results = InProcessWorld::run(2, Duration::from_secs(60), |comm| {
        let comm: Arc<dyn Communicator> = comm;
        let t = TensorParallel::new(comm, vec![0, 1])?;
        let init = RandomInit { seed: 7 };
        let pb = ParamBuilder::new(&init, &Device::Cpu, candle_core::DType::F32).with_tp(Some(t));
        let e = VocabParallelEmbedding::new(&pb, 8, 4, 0.02, ParamOpts::default())?;
        let inside = e.forward(&Tensor::new(&[0u32, 7, 3], &Device::Cpu)?)?;
        assert_eq!(inside.dims(), &[3, 4]);
        Ok(e.forward(&Tensor::new(&[1u32, 8], &Device::Cpu)?)
            .map(|_| ())
            .map_err(|e| e.to_string()))
    });
    for r in results {
        let err = r.unwrap().unwrap_err();
        assert!(err.contains("id 8 is outside the table of 8 rows"), "{err}");
    }
}
