//! Autoregressive sampling from GPT-2: greedy, temperature, top-k, top-p (Megatron's
//! `generate_samples`), incremental with a KV cache or by full recompute.
use crate::gpt2::{Gpt2Lm, KvCache};
use candle_core::{bail, DType, Result, Tensor};
use candle_deepscale::layers::module::ForwardCtx;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct SamplingConfig {
    pub greedy: bool,
    pub temperature: f64,
    /// 0 = off.
    pub top_k: usize,
    /// 0.0 = off; used when `top_k` is 0, as in Megatron.
    pub top_p: f64,
    /// Number of tokens to generate (`--out-seq-length`).
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Stop after generating this token (end of document).
    pub stop_token: Option<u32>,
    /// Incremental decoding with a KV cache; false recomputes the whole sequence each step.
    pub use_cache: bool,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            greedy: false,
            temperature: 1.0,
            top_k: 0,
            top_p: 0.0,
            max_new_tokens: 64,
            seed: 1234,
            stop_token: None,
            use_cache: true,
        }
    }
}

impl SamplingConfig {
    pub fn validate(&self) -> Result<()> {
        let usable = self.temperature > 0.0 && self.temperature.is_finite();
        if !self.greedy && !usable {
            bail!(
                "--temperature must be a positive number, got {}",
                self.temperature
            )
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            bail!("--top_p must be within [0, 1], got {}", self.top_p)
        }
        Ok(())
    }
}

/// Picks the next token from real-vocabulary logits `[vocab]`.
pub fn sample_token(logits: &[f32], cfg: &SamplingConfig, rng: &mut StdRng) -> u32 {
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
                if x > bv {
                    (i, x)
                } else {
                    (bi, bv)
                }
            })
            .0 as u32
    };
    if cfg.greedy {
        return argmax(logits);
    }
    let t = cfg.temperature as f32;
    let mut idx: Vec<(usize, f32)> = logits.iter().map(|&x| x / t).enumerate().collect();
    idx.sort_by(|a, b| b.1.total_cmp(&a.1));
    if cfg.top_k > 0 {
        idx.truncate(cfg.top_k.max(1));
    }
    let max = idx[0].1;
    let mut probs: Vec<f64> = idx.iter().map(|(_, x)| ((x - max) as f64).exp()).collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if cfg.top_k == 0 && cfg.top_p > 0.0 {
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= cfg.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let s: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= s);
    }
    let u: f64 = rng.random();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return idx[i].0 as u32;
        }
    }
    idx[probs.len() - 1].0 as u32
}

/// Generates up to `cfg.max_new_tokens` tokens after `prompt`; returns the new tokens.
pub fn generate(model: &dyn Gpt2Lm, prompt: &[u32], cfg: &SamplingConfig) -> Result<Vec<u32>> {
    generate_on(model, None, prompt, cfg)
}

/// [`generate`] on this rank's part of the model: with `stage`, every step runs through the
/// pipeline (the sequence is recomputed), the last stage samples and every stage receives the token.
pub fn generate_on(
    model: &dyn Gpt2Lm,
    stage: Option<&candle_deepscale::runtime::pipe::Stage>,
    prompt: &[u32],
    cfg: &SamplingConfig,
) -> Result<Vec<u32>> {
    cfg.validate()?;
    if prompt.is_empty() {
        bail!("generation needs at least one prompt token")
    }
    let vocab = model.config().vocab_size;
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        bail!("prompt token id {bad} is outside the vocabulary of {vocab}")
    }
    let max_pos = model.config().max_position_embeddings;
    let budget = max_pos.saturating_sub(prompt.len()).min(cfg.max_new_tokens);
    if prompt.len() > max_pos {
        bail!(
            "prompt of {} tokens exceeds max_position_embeddings {max_pos}",
            prompt.len()
        )
    }
    let dev = model.device();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut cache = KvCache::new(model.config().num_layers);
    let mut tokens = prompt.to_vec();
    let mut out = Vec::new();
    for step in 0..budget {
        if let Some(st) = stage {
            let ids = Tensor::new(&tokens[..], &dev)?.unsqueeze(0)?;
            let stage_out = candle_deepscale::runtime::pipe::pipeline_forward(
                &st.layers,
                Some(st.pipe),
                candle_deepscale::layers::module::Activations::new(ids),
                &ForwardCtx::eval(),
            )?;
            let mut next = [0f64];
            if let Some(o) = stage_out {
                let logits = o.hidden;
                let last = logits.narrow(1, logits.dim(1)? - 1, 1)?;
                let last = model
                    .full_logits(&last)?
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?;
                next[0] = sample_token(&last, cfg, &mut rng) as f64;
            }
            st.share(&mut next)?;
            let next = next[0] as u32;
            tokens.push(next);
            out.push(next);
            if cfg.stop_token == Some(next) {
                break;
            }
            continue;
        }
        let logits = if let (true, Some(whole)) = (cfg.use_cache, model.whole()) {
            let fresh = if step == 0 {
                &tokens[..]
            } else {
                &tokens[tokens.len() - 1..]
            };
            let ids = Tensor::new(fresh, &dev)?.unsqueeze(0)?;
            whole.forward_cached(&ids, &mut cache)?
        } else {
            let ids = Tensor::new(&tokens[..], &dev)?.unsqueeze(0)?;
            candle_deepscale::layers::module::forward_layers(
                &model.layers(),
                candle_deepscale::layers::module::Activations::new(ids),
                &ForwardCtx::eval(),
            )?
            .hidden
        };
        let last = logits.narrow(1, logits.dim(1)? - 1, 1)?;
        let last = model
            .full_logits(&last)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let next = sample_token(&last, cfg, &mut rng);
        tokens.push(next);
        out.push(next);
        if cfg.stop_token == Some(next) {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_one_is_greedy() {
        let logits = [0.1f32, 2.0, -1.0, 1.9];
        let cfg = SamplingConfig {
            top_k: 1,
            ..Default::default()
        };
        let mut rng = StdRng::seed_from_u64(0);
        for _ in 0..20 {
            assert_eq!(sample_token(&logits, &cfg, &mut rng), 1);
        }
    }

    #[test]
    fn top_p_keeps_nucleus() {
        // probabilities ~ [0.0, 0.5, 0.0, 0.5]: top_p 0.4 keeps only the first of the two.
        let logits = [-50f32, 5.0, -50.0, 4.999];
        let cfg = SamplingConfig {
            top_p: 0.4,
            ..Default::default()
        };
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..20 {
            assert_eq!(sample_token(&logits, &cfg, &mut rng), 1);
        }
    }

    #[test]
    fn sampling_follows_distribution() {
        let logits = [0f32, (3f32).ln()]; // p = [0.25, 0.75]
        let cfg = SamplingConfig::default();
        let mut rng = StdRng::seed_from_u64(42);
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| sample_token(&logits, &cfg, &mut rng) == 1)
            .count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
    }
}
