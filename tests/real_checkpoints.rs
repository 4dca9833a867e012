//! Real checkpoints no one here wrote: all-MiniLM-L6-v2 (BERT) and GPT-2's BPE.
mod common;

use candle_core::{Device, Tensor};
use candle_deepscale::layers::module::ForwardCtx;
use zoo::bert::mean_pool;
use zoo::tokenizer::Tokenizer;

const SENTENCE: &str = "The quick brown fox jumps over the lazy dog.";

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "{what}[{i}]: got {g}, transformers gives {w} (tolerance {tol})"
        );
    }
}

#[test]
fn minilm_matches_transformers() {
    let Some(dir) = common::fixture("all-minilm-l6-v2") else {
        return;
    };
    let (model, tok) = zoo::hub::load_bert(&dir, &Device::Cpu).unwrap();
    let ids = tok.encode(SENTENCE, true).unwrap();
    assert_eq!(
        ids,
        [101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 1012, 102]
    );
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let out = model
        .forward(&input, None, None, &ForwardCtx::eval())
        .unwrap();
    let hidden = out.sequence_output.squeeze(0).unwrap();
    let n = ids.len();
    let row = |i: usize| {
        hidden
            .get(i)
            .unwrap()
            .narrow(0, 0, 5)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_close(
        &row(n - 2),
        &[0.388274, 0.281268, 0.030910, 0.945480, -0.155699],
        1e-4,
        "last_hidden_state[-2]",
    );
    assert_close(
        &row(n - 1),
        &[0.347714, 0.094004, 0.256376, 0.871072, -0.074529],
        1e-4,
        "last_hidden_state[-1]",
    );
    let pooled = out
        .pooled_output
        .expect("MiniLM has a pooler")
        .squeeze(0)
        .unwrap();
    assert_close(
        &pooled.narrow(0, 0, 5).unwrap().to_vec1::<f32>().unwrap(),
        &[-0.066271, 0.028093, 0.070613, 0.116599, -0.015158],
        1e-4,
        "pooler_output",
    );
    let mask = Tensor::ones((1, n), candle_core::DType::U32, &Device::Cpu).unwrap();
    let emb = mean_pool(&out.sequence_output, &mask)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let norm = emb.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
    let emb = emb.broadcast_div(&norm).unwrap();
    assert_close(
        &emb.narrow(0, 0, 5).unwrap().to_vec1::<f32>().unwrap(),
        &[0.043934, 0.058934, 0.048178, 0.077548, 0.026744],
        1e-4,
        "mean-pooled normalised embedding",
    );
}

#[test]
fn minilm_vocab_txt_tokenizer_matches_tokenizer_json() {
    let Some(dir) = common::fixture("all-minilm-l6-v2") else {
        return;
    };
    let from_txt = Tokenizer::bert_wordpiece(&dir.join("vocab.txt"), true).unwrap();
    let ids = from_txt.encode(SENTENCE, true).unwrap();
    assert_eq!(
        ids,
        [101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 1012, 102]
    );
    assert_eq!(from_txt.decode(&ids).unwrap(), SENTENCE.to_lowercase());
}

#[test]
fn gpt2_bpe_real_vocab() {
    let Some(dir) = common::fixture("gpt2-bpe") else {
        return;
    };
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let text = "Hello, my dog is cute";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(ids, [15496, 11, 616, 3290, 318, 13779]);
    assert_eq!(tok.decode(&ids).unwrap(), text);
    assert_eq!(tok.eod_id, Some(50256));
    let tricky = "  Unicode: naïve café — 日本語, tabs\tand\nnewlines <|endoftext|>";
    let ids = tok.encode(tricky, false).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), tricky);
}

/// A config.json with fewer layers than its weights is refused, not evaluated on a truncated model.
#[test]
fn minilm_config_with_fewer_layers_than_its_weights_is_refused() {
    let Some(dir) = common::fixture("all-minilm-l6-v2") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&dir).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() && f.file_name().unwrap() != "config.json" {
            std::os::unix::fs::symlink(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
        }
    }
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    cfg["num_hidden_layers"] = 3.into();
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let err = zoo::hub::load_bert(tmp.path(), &Device::Cpu)
        .err()
        .expect("a truncated config must be refused")
        .to_string();
    assert!(err.contains("hold 6 layers"), "{err}");
    assert!(err.contains("num_hidden_layers is 3"), "{err}");
}
