//! Evaluation tasks. `loss`: mean next-token cross entropy over a text.
use crate::gpt2::Gpt2Lm;
use candle_core::{bail, Result, Tensor};
use candle_deepscale::comm::ProcessGroup;
use candle_deepscale::layers::module::ForwardCtx;
use candle_deepscale::runtime::pipe::Stage;
use serde::Serialize;

/// Logits of `ids` on this rank: the whole model, or (`stage`) this pipeline stage's part, which
/// yields logits on the last stage only.
fn logits(model: &dyn Gpt2Lm, stage: Option<&Stage>, ids: &Tensor) -> Result<Option<Tensor>> {
    match stage {
        None => Ok(Some(
            candle_deepscale::layers::module::forward_layers(
                &model.layers(),
                candle_deepscale::layers::module::Activations::new(ids.clone()),
                &ForwardCtx::eval(),
            )?
            .hidden,
        )),
        Some(s) => Ok(candle_deepscale::runtime::pipe::pipeline_forward(
            &s.layers,
            Some(s.pipe),
            candle_deepscale::layers::module::Activations::new(ids.clone()),
            &ForwardCtx::eval(),
        )?
        .map(|a| a.hidden)),
    }
}

/// Sums what the last pipeline stage computed onto every stage (no-op without a pipeline).
fn share(stage: Option<&Stage>, v: &mut [f64]) -> Result<()> {
    match stage {
        Some(s) => s.share(v),
        None => Ok(()),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LossResult {
    /// Mean next-token cross entropy (nats) over every predicted token.
    pub loss: f64,
    pub perplexity: f64,
    /// Tokens in the tokenized text.
    pub tokens: usize,
    /// Tokens predicted (`tokens - 1`: the first has no context).
    pub predicted_tokens: usize,
}

/// Mean next-token loss of `tokens` (nothing prepended). Texts longer than the model's context are
/// cut into consecutive windows of `max_position_embeddings` inputs; each window predicts its
/// successors, so every token but the first is scored exactly once. With a data-parallel group the
/// windows are shared out round-robin and the sums all-reduced.
pub fn lm_loss(model: &dyn Gpt2Lm, tokens: &[u32]) -> Result<LossResult> {
    lm_loss_dp(model, tokens, None, None)
}

/// [`lm_loss`] over the windows this data-parallel rank owns, summed over `dp`.
pub fn lm_loss_dp(
    model: &dyn Gpt2Lm,
    tokens: &[u32],
    dp: Option<&ProcessGroup>,
    stage: Option<&Stage>,
) -> Result<LossResult> {
    if tokens.len() < 2 {
        bail!(
            "the text has {} token(s); the loss needs at least 2",
            tokens.len()
        )
    }
    let vocab = model.config().vocab_size;
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        bail!("token id {bad} is outside the model's vocabulary of {vocab}")
    }
    let dev = model.device();
    let window = model.config().max_position_embeddings;
    let (dp_size, dp_rank) = dp.map_or((1, 0), |g| (g.size(), g.rank));
    let mut total = 0f64;
    let mut count = 0usize;
    let mut start = 0;
    let mut w = 0usize;
    while start + 1 < tokens.len() {
        let end = (start + window).min(tokens.len() - 1);
        w += 1;
        if (w - 1) % dp_size != dp_rank {
            start = end;
            continue;
        }
        let input = Tensor::new(&tokens[start..end], &dev)?.unsqueeze(0)?;
        let labels = Tensor::new(&tokens[start + 1..end + 1], &dev)?;
        if let Some(logits) = logits(model, stage, &input)? {
            let losses = model.token_losses(&logits, &labels)?;
            total += losses
                .to_dtype(candle_core::DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
        count += end - start;
        start = end;
    }
    let mut t = [total];
    share(stage, &mut t)?;
    total = t[0];
    if let Some(g) = dp {
        let mut sums = [total, count as f64];
        g.all_reduce(&mut sums, candle_deepscale::comm::ReduceOp::Sum)?;
        total = sums[0];
        count = sums[1] as usize;
    }
    let loss = total / count as f64;
    Ok(LossResult {
        loss,
        perplexity: loss.exp(),
        tokens: tokens.len(),
        predicted_tokens: count,
    })
}

/// Megatron's `wikitext_detokenizer`: undoes WikiText's tokenisation artefacts (` @-@ `, spaced
/// punctuation and brackets) before the text is tokenized for perplexity.
pub fn wikitext_detokenize(s: &str) -> String {
    let mut s = s.replace("s '", "s'");
    s = s
        .replace(" @-@ ", "-")
        .replace(" @,@ ", ",")
        .replace(" @.@ ", ".");
    for (a, b) in [
        (" : ", ": "),
        (" ; ", "; "),
        (" . ", ". "),
        (" ! ", "! "),
        (" ? ", "? "),
        (" , ", ", "),
        ("( ", "("),
        (" )", ")"),
        ("[ ", "["),
        (" ]", "]"),
        ("{ ", "{"),
        (" }", "}"),
        ("= = = =", "===="),
        ("= = =", "==="),
        ("= =", "=="),
        (" \u{b0} ", "\u{b0}"),
        (" \n", "\n"),
        ("\n ", "\n"),
        (" N ", " 1 "),
        (" 's", "'s"),
    ] {
        s = s.replace(a, b);
    }
    s
}

/// Result of `--task wikitext103`: perplexity over overlapping windows, and Megatron's adjusted
/// perplexity (the loss scaled by tokenized / original word count, comparable across tokenizers).
#[derive(Debug, Clone, Serialize)]
pub struct WikitextResult {
    pub loss: f64,
    pub perplexity: f64,
    pub adjusted_perplexity: f64,
    pub num_tokenized_tokens: usize,
    pub num_original_tokens: usize,
    pub token_ratio: f64,
}

/// Megatron's `_LMDataset` windows over `tokens`: window `i` starts at `i * overlap`, holds
/// `seq_len + 1` tokens and scores only its last `overlap` targets (all of them in window 0).
/// Returns the summed loss of this data-parallel rank's windows (round-robin), summed over `dp`.
pub fn overlapping_windows_loss(
    model: &dyn Gpt2Lm,
    tokens: &[u32],
    seq_len: usize,
    overlap: usize,
    dp: Option<&ProcessGroup>,
    stage: Option<&Stage>,
) -> Result<f64> {
    if tokens.len() < 2 {
        bail!(
            "the text has {} token(s); perplexity needs at least 2",
            tokens.len()
        )
    }
    let overlap = if overlap == 0 {
        seq_len
    } else {
        overlap.min(seq_len)
    };
    if seq_len == 0 || seq_len > model.config().max_position_embeddings {
        bail!(
            "sequence length {seq_len} must be between 1 and the model's {} positions",
            model.config().max_position_embeddings
        )
    }
    let dev = model.device();
    let targets = tokens.len() - 1;
    let windows = (targets.saturating_sub(overlap)).div_ceil(overlap) + 1;
    let (dp_size, dp_rank) = dp.map_or((1, 0), |g| (g.size(), g.rank));
    let mut total = 0f64;
    for w in (0..windows).filter(|w| w % dp_size == dp_rank) {
        let start = w * overlap;
        let end = (start + seq_len + 1).min(tokens.len());
        if end <= start + 1 {
            continue;
        }
        let chunk = &tokens[start..end];
        let n = chunk.len() - 1;
        let input = Tensor::new(&chunk[..n], &dev)?.unsqueeze(0)?;
        let labels = Tensor::new(&chunk[1..], &dev)?;
        let Some(out) = logits(model, stage, &input)? else {
            continue;
        };
        let losses: Vec<f32> = model.token_losses(&out, &labels)?.to_vec1()?;
        // Later windows score only the targets no earlier window scored.
        let first = if w == 0 || overlap == seq_len {
            0
        } else {
            (seq_len + 1).saturating_sub(overlap).saturating_sub(1)
        };
        total += losses[first.min(n)..]
            .iter()
            .map(|x| *x as f64)
            .sum::<f64>();
    }
    let mut v = [total];
    share(stage, &mut v)?;
    if let Some(g) = dp {
        g.all_reduce(&mut v, candle_deepscale::comm::ReduceOp::Sum)?;
    }
    Ok(v[0])
}

/// Perplexity of a (detokenized) text the way Megatron's zero-shot WikiText-103 task reports it.
pub fn wikitext_perplexity(
    model: &dyn Gpt2Lm,
    text: &str,
    tokens: &[u32],
    seq_len: usize,
    overlap: usize,
    dp: Option<&ProcessGroup>,
    stage: Option<&Stage>,
) -> Result<WikitextResult> {
    let total = overlapping_windows_loss(model, tokens, seq_len, overlap, dp, stage)?;
    let num_tokenized_tokens = tokens.len();
    let num_original_tokens = text.trim().split(' ').count();
    let loss = total / (num_tokenized_tokens - 1) as f64;
    let token_ratio = (num_tokenized_tokens - 1) as f64 / (num_original_tokens.max(2) - 1) as f64;
    Ok(WikitextResult {
        loss,
        perplexity: loss.min(20.0).exp(),
        adjusted_perplexity: (loss * token_ratio).min(20.0).exp(),
        num_tokenized_tokens,
        num_original_tokens,
        token_ratio,
    })
}

/// Result of `--task lambada`.
#[derive(Debug, Clone, Serialize)]
pub struct AccuracyResult {
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
}

/// LAMBADA: each example is a context and the tokens of its last word; it counts as correct when
/// greedy prediction gets every token of the word right (Megatron's `_LambadaDataset` + accuracy).
/// Examples are shared round-robin over `dp` and the counts summed.
pub fn lambada_accuracy(
    model: &dyn Gpt2Lm,
    examples: &[(Vec<u32>, Vec<u32>)],
    dp: Option<&ProcessGroup>,
    stage: Option<&Stage>,
) -> Result<AccuracyResult> {
    let dev = model.device();
    let max = model.config().max_position_embeddings;
    let (dp_size, dp_rank) = dp.map_or((1, 0), |g| (g.size(), g.rank));
    let mut correct = 0usize;
    for (i, (context, target)) in examples.iter().enumerate() {
        if i % dp_size != dp_rank {
            continue;
        }
        if context.is_empty() || target.is_empty() {
            bail!("LAMBADA example {i}: empty context or target")
        }
        let mut all: Vec<u32> = context.iter().chain(target).copied().collect();
        // Keep the end (the target and the context nearest it) within the model's positions.
        if all.len() > max + 1 {
            all.drain(..all.len() - (max + 1));
        }
        let n = all.len() - 1;
        let input = Tensor::new(&all[..n], &dev)?.unsqueeze(0)?;
        let Some(out) = logits(model, stage, &input)? else {
            continue;
        };
        let logits = model.full_logits(&out)?;
        let pred: Vec<u32> = logits
            .squeeze(0)?
            .argmax(candle_core::D::Minus1)?
            .to_vec1()?;
        let t = target.len();
        if pred[n - t..] == all[n + 1 - t..] {
            correct += 1;
        }
    }
    let mut c = [correct as f64];
    share(stage, &mut c)?;
    let correct = c[0] as usize;
    let mut counts = [correct as f64, examples.len() as f64];
    if let Some(g) = dp {
        let mut c = [correct as f64];
        g.all_reduce(&mut c, candle_deepscale::comm::ReduceOp::Sum)?;
        counts[0] = c[0];
    }
    Ok(AccuracyResult {
        correct: counts[0] as usize,
        total: examples.len(),
        accuracy: counts[0] / counts[1].max(1.0),
    })
}
