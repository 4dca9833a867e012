//! HF-layout checkpoints load and agree with the same weights in the native layout.
mod common;

use candle_core::{DType, Device, Tensor};
use candle_deepscale::layers::init::RandomInit;
use candle_deepscale::layers::module::ForwardCtx;
use candle_deepscale::layers::parameter::ParamBuilder;
use zoo::bert::{self, Bert};
use zoo::gpt2::{self, Gpt2};
use zoo::weights::{save_native, NativeSource, SafetensorsFiles};

fn ids() -> Tensor {
    Tensor::new(
        &[
            [3u32, 70, 101, 255, 256, 9, 17, 42],
            [0, 1, 2, 3, 4, 5, 6, 7],
        ],
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn gpt2_hf_layouts_give_native_logits() {
    let cfg = common::tiny_gpt2_config();
    let model = common::random_gpt2(&cfg, 11);
    let tmp = tempfile::tempdir().unwrap();

    let native_path = tmp.path().join("native.safetensors");
    save_native(&model.parameters(), &native_path).unwrap();
    let src = NativeSource {
        files: SafetensorsFiles::open(&[native_path]).unwrap(),
    };
    let native = Gpt2::new(&cfg, &ParamBuilder::new(&src, &Device::Cpu, DType::F32)).unwrap();
    let want = native.forward(&ids(), &ForwardCtx::eval()).unwrap();
    assert_eq!(
        common::max_abs_diff(&want, &model.forward(&ids(), &ForwardCtx::eval()).unwrap()),
        0.0
    );

    for (name, prefix, shards) in [
        ("plain", "", 1),
        ("prefixed", "transformer.", 1),
        ("sharded", "transformer.", 3),
    ] {
        let dir = tmp.path().join(name);
        common::write_hf_gpt2_dir(&model, &dir, prefix, shards);
        let (loaded, tok) = zoo::hub::load_gpt2(&dir, &Device::Cpu).unwrap();
        assert_eq!(loaded.config.vocab_size, 257);
        assert_eq!(tok.eod_id, Some(256));
        let got = loaded.forward(&ids(), &ForwardCtx::eval()).unwrap();
        // HF stores no vocabulary padding: compare the real-vocabulary logits.
        let real = |t: &Tensor| t.narrow(2, 0, cfg.vocab_size).unwrap();
        assert_eq!(
            common::max_abs_diff(&real(&got), &real(&want)),
            0.0,
            "{name} HF layout"
        );
    }
}

#[test]
fn gpt2_exporter_matches_hand_built_hf_layout() {
    let cfg = common::tiny_gpt2_config();
    let model = common::random_gpt2(&cfg, 5);
    let by_hand = common::hf_gpt2_tensors_by_hand(&model, "transformer.");
    let exported = gpt2::hf::to_hf_tensors(&model.parameters(), &cfg, true).unwrap();
    assert_eq!(
        exported.len(),
        by_hand.len() - 2 * cfg.num_layers,
        "every parameter exported, buffers not"
    );
    for (k, t) in exported {
        let h = by_hand
            .get(&k)
            .unwrap_or_else(|| panic!("exported key {k} is not an HF GPT-2 key"));
        assert_eq!(t.dims(), h.dims(), "{k}");
        assert_eq!(common::max_abs_diff(&t, h), 0.0, "{k}");
    }
}

fn tiny_bert(pre_ln: bool) -> bert::Config {
    bert::Config {
        pre_layer_norm: pre_ln,
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        max_position_embeddings: 32,
        ..bert::Config::new(2, 64, 4, 300)
    }
}

#[test]
fn bert_hf_round_trip_both_key_styles() {
    let cfg = tiny_bert(false);
    let src = RandomInit { seed: 3 };
    let model = Bert::new(&cfg, &ParamBuilder::new(&src, &Device::Cpu, DType::F32)).unwrap();
    let types = Tensor::new(&[[0u32, 0, 0, 0, 1, 1, 1, 1], [0; 8]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32; 8], [1, 1, 1, 1, 1, 0, 0, 0]], &Device::Cpu).unwrap();
    let want = model
        .forward(&ids(), Some(&types), Some(&mask), &ForwardCtx::eval())
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for (i, prefix) in [false, true].into_iter().enumerate() {
        let tensors: std::collections::HashMap<String, Tensor> =
            bert::hf::to_hf_tensors(&model.parameters(), &cfg, prefix)
                .unwrap()
                .into_iter()
                .collect();
        assert!(tensors.contains_key(if prefix {
            "bert.encoder.layer.1.attention.self.value.weight"
        } else {
            "encoder.layer.1.attention.self.value.weight"
        }));
        assert!(tensors.contains_key("cls.predictions.transform.LayerNorm.weight"));
        assert_eq!(tensors["cls.predictions.bias"].dims(), [300]);
        let dir = tmp.path().join(format!("bert{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
        let mut c = serde_json::to_value(&cfg).unwrap();
        c["model_type"] = "bert".into();
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        let vocab: String = (0..300)
            .map(|i| match i {
                0 => "[PAD]\n".into(),
                1 => "[UNK]\n".into(),
                2 => "[CLS]\n".into(),
                3 => "[SEP]\n".into(),
                _ => format!("w{i}\n"),
            })
            .collect();
        std::fs::write(dir.join("vocab.txt"), vocab).unwrap();
        let (loaded, tok) = zoo::hub::load_bert(&dir, &Device::Cpu).unwrap();
        assert_eq!(tok.encode("w7 w8", true).unwrap(), [2, 7, 8, 3]);
        let got = loaded
            .forward(&ids(), Some(&types), Some(&mask), &ForwardCtx::eval())
            .unwrap();
        assert_eq!(
            common::max_abs_diff(&got.sequence_output, &want.sequence_output),
            0.0
        );
        let real = |t: &Option<Tensor>| t.as_ref().unwrap().narrow(2, 0, cfg.vocab_size).unwrap();
        assert_eq!(
            common::max_abs_diff(&real(&got.lm_logits), &real(&want.lm_logits)),
            0.0
        );
        assert_eq!(
            common::max_abs_diff(
                got.binary_logits.as_ref().unwrap(),
                want.binary_logits.as_ref().unwrap()
            ),
            0.0
        );
    }
}

#[test]
fn bert_padding_mask_hides_padded_positions() {
    let cfg = tiny_bert(false);
    let src = RandomInit { seed: 8 };
    let model = Bert::new(&cfg, &ParamBuilder::new(&src, &Device::Cpu, DType::F32)).unwrap();
    let short = Tensor::new(&[[5u32, 6, 7]], &Device::Cpu).unwrap();
    let padded = Tensor::new(&[[5u32, 6, 7, 0, 0]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let a = model
        .forward(&short, None, None, &ForwardCtx::eval())
        .unwrap()
        .sequence_output;
    let b = model
        .forward(&padded, None, Some(&mask), &ForwardCtx::eval())
        .unwrap()
        .sequence_output;
    assert!(common::max_abs_diff(&a, &b.narrow(1, 0, 3).unwrap()) < 1e-5);
}

/// ZeRO-3 construction from an HF folder: each rank reads only its piece of every parameter
/// (Conv1D columns, vocabulary rows), and the pieces put together are the whole model.
#[test]
fn gpt2_hf_zero3_pieces_make_up_the_model() {
    let cfg = common::tiny_gpt2_config();
    let model = common::random_gpt2(&cfg, 11);
    let tmp = tempfile::tempdir().unwrap();
    common::write_hf_gpt2_dir(&model, tmp.path(), "transformer.", 2);
    drop(model);
    let src = zoo::gpt2::hf::HfSource::new(SafetensorsFiles::open_dir(tmp.path()).unwrap(), &cfg)
        .unwrap();
    let parts = 3;
    let ranks: Vec<Gpt2> = (0..parts)
        .map(|rank| {
            let pb = ParamBuilder::new(&src, &Device::Cpu, DType::F32).with_zero3(Some(
                candle_deepscale::layers::parameter::Zero3Construction {
                    parts,
                    rank,
                    persistence_threshold: 1,
                },
            ));
            Gpt2::new(&cfg, &pb).unwrap()
        })
        .collect();
    // The HF folder holds no vocabulary padding: compare with the whole model read from it.
    let whole = Gpt2::new(&cfg, &ParamBuilder::new(&src, &Device::Cpu, DType::F32)).unwrap();
    for (i, p) in whole.parameters().iter().enumerate() {
        let mut joined: Vec<f32> = Vec::new();
        for r in &ranks {
            let q = r.parameters()[i];
            assert_eq!(q.meta.name, p.meta.name);
            let piece = q
                .piece
                .as_ref()
                .unwrap()
                .with_values(|v| v.unwrap().to_vec())
                .unwrap();
            joined.extend(piece);
        }
        let want: Vec<f32> = p.tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            joined[..want.len()] == want[..],
            "{}: pieces differ",
            p.meta.name
        );
        assert!(joined[want.len()..].iter().all(|x| *x == 0.0), "padding");
    }
}
