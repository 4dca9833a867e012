//! Plain `.txt` / `.jsonl` corpora tokenized on the fly (small runs; the Megatron `.bin/.idx`
//! pipeline is the production path).
use crate::tokenizer::Tokenizer;
use candle_core::{bail, Error, Result};
use std::path::Path;

/// Documents of a text corpus: `.jsonl` (or `.json`, one object per line) takes `text_key` of each
/// line; anything else is plain text with documents separated by blank lines.
pub fn read_documents(path: &Path, text_key: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Msg(format!("cannot read data file {}: {e}", path.display())))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let docs: Vec<String> = if ext == "jsonl" || ext == "json" {
        let mut docs = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                Error::Msg(format!(
                    "{}:{}: not a JSON object: {e}",
                    path.display(),
                    i + 1
                ))
            })?;
            match v.get(text_key).and_then(|t| t.as_str()) {
                Some(t) => docs.push(t.to_string()),
                None => bail!(
                    "{}:{}: no string field `{text_key}` (choose it with --text-key / --json-keys)",
                    path.display(),
                    i + 1
                ),
            }
        }
        docs
    } else {
        text.split("\n\n")
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(String::from)
            .collect()
    };
    if docs.is_empty() {
        bail!("data file {} holds no documents", path.display())
    }
    Ok(docs)
}

/// Tokenizes documents into one stream, each document followed by the end-of-document token.
pub fn tokenize_documents(docs: &[String], tok: &Tokenizer) -> Result<Vec<u32>> {
    let eod = tok
        .eod_id
        .ok_or_else(|| Error::Msg("the tokenizer has no end-of-document token".into()))?;
    let mut out = Vec::new();
    for d in docs {
        out.extend(tok.encode(d, false)?);
        out.push(eod);
    }
    Ok(out)
}

/// Fixed-length training samples over a token stream: sample `i` is `seq_len + 1` tokens starting at
/// `i * seq_len` (consecutive samples overlap by one token, as Megatron's GPT-2 samples do).
#[derive(Debug, Clone)]
pub struct TokenSamples {
    tokens: Vec<u32>,
    seq_len: usize,
}

impl TokenSamples {
    pub fn new(tokens: Vec<u32>, seq_len: usize) -> Result<Self> {
        if tokens.len() <= seq_len {
            bail!(
                "the data has {} tokens, fewer than one sample of seq_length {} + 1",
                tokens.len(),
                seq_len
            )
        }
        Ok(Self { tokens, seq_len })
    }

    pub fn len(&self) -> usize {
        (self.tokens.len() - 1) / self.seq_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn sample(&self, i: usize) -> &[u32] {
        let s = (i % self.len()) * self.seq_len;
        &self.tokens[s..s + self.seq_len + 1]
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }
}

/// Splits documents by Megatron's `--split` weights (e.g. `949,50,1`) into train/valid/test.
pub fn split_documents(docs: Vec<String>, split: &str) -> Result<[Vec<String>; 3]> {
    let mut w: Vec<f64> = split
        .split([',', '/'])
        .map(|s| s.trim().parse::<f64>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| {
            Error::Msg(format!(
                "--split `{split}` must be up to three numbers like 949,50,1"
            ))
        })?;
    if w.is_empty() || w.len() > 3 || w.iter().any(|x| *x < 0.0) || w.iter().sum::<f64>() <= 0.0 {
        bail!("--split `{split}` must be up to three non-negative numbers like 949,50,1")
    }
    w.resize(3, 0.0);
    let total: f64 = w.iter().sum();
    let n = docs.len();
    let mut bounds = [0usize; 4];
    let mut acc = 0.0;
    for i in 0..3 {
        acc += w[i] / total;
        bounds[i + 1] = ((acc * n as f64).round() as usize).min(n);
    }
    let mut it = docs.into_iter();
    let mut take = |k: usize| it.by_ref().take(k).collect::<Vec<_>>();
    let train = take(bounds[1] - bounds[0]);
    let valid = take(bounds[2] - bounds[1]);
    let test = take(bounds[3] - bounds[2]);
    Ok([train, valid, test])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_overlap_by_one() {
        let s = TokenSamples::new((0..21).collect(), 5).unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s.sample(0), &[0, 1, 2, 3, 4, 5]);
        assert_eq!(s.sample(1), &[5, 6, 7, 8, 9, 10]);
        assert_eq!(s.sample(3), &[15, 16, 17, 18, 19, 20]);
        assert_eq!(s.sample(4), s.sample(0));
    }

    #[test]
    fn split_by_weights() {
        let docs: Vec<String> = (0..100).map(|i| i.to_string()).collect();
        let [a, b, c] = split_documents(docs, "949,50,1").unwrap();
        assert_eq!((a.len(), b.len(), c.len()), (95, 5, 0));
        assert!(split_documents(vec!["x".into()], "a,b").is_err());
    }
}
