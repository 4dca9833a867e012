//! Incremental decoding with the KV cache equals full recompute.
mod common;

use candle_core::{Device, Tensor};
use candle_deepscale::layers::module::ForwardCtx;
use zoo::generation::{generate, SamplingConfig};
use zoo::gpt2::KvCache;

#[test]
fn cached_logits_equal_full_recompute() {
    let cfg = common::tiny_gpt2_config();
    let model = common::random_gpt2(&cfg, 21);
    let tokens: Vec<u32> = (0..20).map(|i| (i * 13 % 257) as u32).collect();
    let full = model
        .forward(
            &Tensor::new(&tokens[..], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            &ForwardCtx::eval(),
        )
        .unwrap();
    let mut cache = KvCache::new(cfg.num_layers);
    // A prompt of 7, then one token at a time, then a chunk of 5.
    let mut pieces = vec![model
        .forward_cached(
            &Tensor::new(&tokens[..7], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            &mut cache,
        )
        .unwrap()];
    for i in 7..15 {
        pieces.push(
            model
                .forward_cached(
                    &Tensor::new(&tokens[i..i + 1], &Device::Cpu)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap(),
                    &mut cache,
                )
                .unwrap(),
        );
    }
    pieces.push(
        model
            .forward_cached(
                &Tensor::new(&tokens[15..], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                &mut cache,
            )
            .unwrap(),
    );
    let inc = Tensor::cat(&pieces, 1).unwrap();
    assert!(common::max_abs_diff(&inc, &full) < 1e-5);
}

#[test]
fn greedy_generation_with_cache_equals_recompute() {
    let cfg = common::tiny_gpt2_config();
    let model = common::random_gpt2(&cfg, 22);
    let prompt = [72u32, 101, 108, 108, 111];
    let run = |use_cache| {
        let c = SamplingConfig {
            greedy: true,
            max_new_tokens: 40,
            use_cache,
            ..Default::default()
        };
        generate(&model, &prompt, &c).unwrap()
    };
    let a = run(true);
    assert_eq!(a.len(), 40);
    assert_eq!(a, run(false));
    // Sampling is seeded: same seed, same tokens; cache or not.
    let s = |use_cache, seed| {
        let c = SamplingConfig {
            top_k: 20,
            temperature: 0.9,
            max_new_tokens: 30,
            seed,
            use_cache,
            ..Default::default()
        };
        generate(&model, &prompt, &c).unwrap()
    };
    assert_eq!(s(true, 7), s(false, 7));
    assert_ne!(s(true, 7), s(true, 8));
}

#[test]
fn generation_stops_at_the_context_limit() {
    let cfg = common::tiny_gpt2_config();
    let model = common::random_gpt2(&cfg, 23);
    let prompt: Vec<u32> = (0..60).collect();
    let c = SamplingConfig {
        greedy: true,
        max_new_tokens: 100,
        ..Default::default()
    };
    assert_eq!(generate(&model, &prompt, &c).unwrap().len(), 4);
}
