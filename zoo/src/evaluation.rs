//! Evaluation tasks. `loss`: mean next-token cross entropy over a text.
use crate::gpt2::Gpt2;
use candle_core::{bail, Result, Tensor};
use candle_deepscale::comm::ProcessGroup;
use candle_deepscale::module::ForwardCtx;
use serde::Serialize;

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
pub fn lm_loss(model: &Gpt2, tokens: &[u32]) -> Result<LossResult> {
    lm_loss_dp(model, tokens, None)
}

/// [`lm_loss`] over the windows this data-parallel rank owns, summed over `dp`.
pub fn lm_loss_dp(model: &Gpt2, tokens: &[u32], dp: Option<&ProcessGroup>) -> Result<LossResult> {
    if tokens.len() < 2 {
        bail!(
            "the text has {} token(s); the loss needs at least 2",
            tokens.len()
        )
    }
    let vocab = model.config.vocab_size;
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        bail!("token id {bad} is outside the model's vocabulary of {vocab}")
    }
    let dev = model
        .embedding
        .word_embeddings
        .weight
        .tensor()
        .device()
        .clone();
    let window = model.config.max_position_embeddings;
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
        let logits = model.forward(&input, &ForwardCtx::eval())?;
        let losses = model.token_losses(&logits, &labels)?;
        total += losses
            .to_dtype(candle_core::DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        count += end - start;
        start = end;
    }
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
