//! Helpers shared by the cross-crate tests.
#![allow(dead_code)]
pub mod cli;
pub mod tp;
use candle_core::{DType, Device, Tensor};
use candle_deepscale::layers::init::RandomInit;
use candle_deepscale::layers::parameter::ParamBuilder;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use zoo::gpt2::{self, Gpt2};

/// A fetched fixture folder (scripts/fetch-test-assets.sh). Missing: a failure under CI=true, else
/// a loud skip (returns None).
pub fn fixture(name: &str) -> Option<PathBuf> {
    let root = std::env::var_os("DEEPSCALE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.fixtures"));
    let dir = root.join(name);
    if dir.is_dir() {
        return Some(dir);
    }
    let msg = format!(
        "fixture {} is missing: run scripts/fetch-test-assets.sh",
        dir.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED (not in CI): {msg}");
    None
}

/// A 2-layer, 64-wide GPT-2 over a 257-token byte-level vocabulary.
pub fn tiny_gpt2_config() -> gpt2::Config {
    gpt2::Config {
        seq_length: 32,
        max_position_embeddings: 64,
        hidden_dropout: 0.0,
        attention_dropout: 0.0,
        ..gpt2::Config::new(2, 64, 4, 257)
    }
}

pub fn random_gpt2(cfg: &gpt2::Config, seed: u64) -> Gpt2 {
    let src = RandomInit { seed };
    Gpt2::new(cfg, &ParamBuilder::new(&src, &Device::Cpu, DType::F32)).unwrap()
}

/// GPT-2's byte-to-unicode table (the byte-level BPE alphabet), byte order.
pub fn byte_alphabet() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut pairs: Vec<(u32, u32)> = bs.into_iter().zip(cs).collect();
    pairs.sort();
    pairs
        .into_iter()
        .map(|(_, c)| char::from_u32(c).unwrap())
        .collect()
}

/// Writes a byte-level GPT-2 tokenizer with no merges: ids 0..256 are the bytes, 256 is
/// `<|endoftext|>`.
pub fn write_byte_tokenizer(dir: &Path) {
    let mut vocab = serde_json::Map::new();
    for (i, c) in byte_alphabet().into_iter().enumerate() {
        vocab.insert(c.to_string(), i.into());
    }
    vocab.insert("<|endoftext|>".into(), 256.into());
    std::fs::write(
        dir.join("vocab.json"),
        serde_json::Value::Object(vocab).to_string(),
    )
    .unwrap();
    std::fs::write(dir.join("merges.txt"), "#version: 0.2\n").unwrap();
}

/// HF GPT-2 tensors built key by key from the native parameters, independently of the library's
/// exporter (Conv1D transposes, QKV reordered from [heads, 3, hd] to [3, heads, hd]).
pub fn hf_gpt2_tensors_by_hand(model: &Gpt2, prefix: &str) -> HashMap<String, Tensor> {
    let cfg = &model.config;
    let (nh, hd, h) = (cfg.num_attention_heads, cfg.head_dim(), cfg.hidden_size);
    let native: HashMap<String, Tensor> = model
        .parameters()
        .into_iter()
        .map(|p| (p.meta.name.clone(), p.tensor().clone()))
        .collect();
    let get = |n: &str| native[n].clone();
    let mut out = HashMap::new();
    let mut put = |k: String, t: Tensor| {
        out.insert(format!("{prefix}{k}"), t.contiguous().unwrap());
    };
    put(
        "wte.weight".into(),
        get("embedding.word_embeddings.weight")
            .narrow(0, 0, cfg.vocab_size)
            .unwrap(),
    );
    put(
        "wpe.weight".into(),
        get("embedding.position_embeddings.weight"),
    );
    put("ln_f.weight".into(), get("final_layernorm.weight"));
    put("ln_f.bias".into(), get("final_layernorm.bias"));
    for i in 0..cfg.num_layers {
        let n = |s: &str| format!("layers.{i}.{s}");
        let k = |s: &str| format!("h.{i}.{s}");
        put(k("ln_1.weight"), get(&n("input_layernorm.weight")));
        put(k("ln_1.bias"), get(&n("input_layernorm.bias")));
        put(k("ln_2.weight"), get(&n("post_attention_layernorm.weight")));
        put(k("ln_2.bias"), get(&n("post_attention_layernorm.bias")));
        // native rows: [head][q|k|v][hd]; HF columns: [q|k|v][head][hd].
        let w = get(&n("attention.query_key_value.weight"))
            .to_vec2::<f32>()
            .unwrap();
        let b = get(&n("attention.query_key_value.bias"))
            .to_vec1::<f32>()
            .unwrap();
        let mut hw = vec![0f32; h * 3 * h];
        let mut hb = vec![0f32; 3 * h];
        for head in 0..nh {
            for part in 0..3 {
                for d in 0..hd {
                    let native_row = head * 3 * hd + part * hd + d;
                    let hf_col = part * h + head * hd + d;
                    hb[hf_col] = b[native_row];
                    for j in 0..h {
                        hw[j * 3 * h + hf_col] = w[native_row][j];
                    }
                }
            }
        }
        put(
            k("attn.c_attn.weight"),
            Tensor::from_vec(hw, (h, 3 * h), &Device::Cpu).unwrap(),
        );
        put(
            k("attn.c_attn.bias"),
            Tensor::from_vec(hb, 3 * h, &Device::Cpu).unwrap(),
        );
        put(
            k("attn.c_proj.weight"),
            get(&n("attention.dense.weight")).t().unwrap(),
        );
        put(k("attn.c_proj.bias"), get(&n("attention.dense.bias")));
        put(
            k("mlp.c_fc.weight"),
            get(&n("mlp.dense_h_to_4h.weight")).t().unwrap(),
        );
        put(k("mlp.c_fc.bias"), get(&n("mlp.dense_h_to_4h.bias")));
        put(
            k("mlp.c_proj.weight"),
            get(&n("mlp.dense_4h_to_h.weight")).t().unwrap(),
        );
        put(k("mlp.c_proj.bias"), get(&n("mlp.dense_4h_to_h.bias")));
        // HF checkpoints carry these non-parameter buffers; loaders must ignore them.
        let mask = Tensor::ones(
            (
                1,
                1,
                cfg.max_position_embeddings,
                cfg.max_position_embeddings,
            ),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        put(k("attn.bias"), mask);
        put(
            k("attn.masked_bias"),
            Tensor::new(-1e4f32, &Device::Cpu).unwrap(),
        );
    }
    out
}

/// Writes an HF GPT-2 folder (config.json, weights, byte tokenizer); `shards` > 1 writes
/// `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`.
pub fn write_hf_gpt2_dir(model: &Gpt2, dir: &Path, prefix: &str, shards: usize) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        model.config.to_hf_json().to_string(),
    )
    .unwrap();
    write_byte_tokenizer(dir);
    let tensors = hf_gpt2_tensors_by_hand(model, prefix);
    if shards <= 1 {
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
        return;
    }
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for s in 0..shards {
        let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
        let part: HashMap<String, Tensor> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| i % shards == s)
            .map(|(_, n)| {
                weight_map.insert((*n).clone(), file.clone().into());
                ((*n).clone(), tensors[*n].clone())
            })
            .collect();
        candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
