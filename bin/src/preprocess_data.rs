//! `deepscale preprocess-data`: Megatron's tools/preprocess_data.py — loose JSON in, mmap indexed
//! datasets out (`<prefix>_<key>_document.bin/.idx`, `_sentence` with `--split-sentences`).
use anyhow::{bail, Context, Result};
use clap::Args;
use rayon::prelude::*;
use serde_json::json;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use zoo::indexed_dataset::{DType, MMapIndexedDatasetBuilder};
use zoo::tokenizer::Tokenizer;

#[derive(Args, Debug)]
pub struct PreprocessDataArgs {
    /// Loose JSON: one object per line.
    #[arg(long)]
    pub input: PathBuf,
    /// Keys whose text becomes a dataset each.
    #[arg(long, num_args = 1.., default_values_t = ["text".to_string()])]
    pub json_keys: Vec<String>,
    /// GPT2BPETokenizer, BertWordPieceLowerCase or BertWordPieceCase.
    #[arg(long)]
    pub tokenizer_type: String,
    #[arg(long)]
    pub vocab_file: PathBuf,
    /// GPT-2 merges.txt (GPT2BPETokenizer).
    #[arg(long)]
    pub merge_file: Option<PathBuf>,
    /// Append the end-of-document token to every document.
    #[arg(long)]
    pub append_eod: bool,
    /// One item per sentence instead of one per document.
    #[arg(long)]
    pub split_sentences: bool,
    #[arg(long)]
    pub output_prefix: PathBuf,
    /// Megatron's dataset implementation: only mmap is written.
    #[arg(long, default_value = "mmap")]
    pub dataset_impl: String,
    /// Tokenizing threads (at most this machine's cores).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Documents between progress updates (Megatron's --log-interval).
    #[arg(long, default_value_t = 100)]
    pub log_interval: usize,
    #[arg(long)]
    pub json: bool,
}

/// Sentences of `text`: cut after `.`, `!` or `?` (and closing quotes/brackets) followed by
/// whitespace and an upper-case letter, digit or opening quote, except after common abbreviations
/// and single initials. (Megatron uses NLTK's punkt; this keeps the same shape without Python.)
pub fn split_sentences(text: &str) -> Vec<&str> {
    const ABBREV: [&str; 14] = [
        "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "inc", "no",
    ];
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < chars.len() {
        let (pos, c) = chars[i];
        if matches!(c, '.' | '!' | '?') {
            let mut j = i + 1;
            while j < chars.len() && matches!(chars[j].1, '.' | '!' | '?' | '"' | '\'' | ')' | ']')
            {
                j += 1;
            }
            let ws_end = {
                let mut k = j;
                while k < chars.len() && chars[k].1.is_whitespace() {
                    k += 1;
                }
                k
            };
            let next_ok = ws_end > j
                && ws_end < chars.len()
                && (chars[ws_end].1.is_uppercase()
                    || chars[ws_end].1.is_ascii_digit()
                    || matches!(chars[ws_end].1, '"' | '\'' | '(' | '['));
            let word: String = text[start..pos]
                .rsplit(|ch: char| ch.is_whitespace())
                .next()
                .unwrap_or("")
                .to_lowercase();
            let abbrev = c == '.'
                && (ABBREV.contains(&word.as_str())
                    || (word.chars().count() == 1 && word.chars().all(|ch| ch.is_alphabetic())));
            if next_ok && !abbrev {
                let end = if j < chars.len() {
                    chars[j].0
                } else {
                    text.len()
                };
                let s = text[start..end].trim();
                if !s.is_empty() {
                    out.push(s);
                }
                start = chars[ws_end].0;
                i = ws_end;
                continue;
            }
            i = j;
            continue;
        }
        i += 1;
    }
    let rest = text[start..].trim();
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

fn tokenizer(a: &PreprocessDataArgs) -> Result<Tokenizer> {
    Ok(match a.tokenizer_type.as_str() {
        "GPT2BPETokenizer" => {
            let Some(m) = &a.merge_file else {
                bail!("--tokenizer-type GPT2BPETokenizer needs --merge-file")
            };
            Tokenizer::gpt2_bpe(&a.vocab_file, m)?
        }
        "BertWordPieceLowerCase" => Tokenizer::bert_wordpiece(&a.vocab_file, true)?,
        "BertWordPieceCase" => Tokenizer::bert_wordpiece(&a.vocab_file, false)?,
        other => bail!(
            "--tokenizer-type {other} is not supported (GPT2BPETokenizer, BertWordPieceLowerCase, BertWordPieceCase)"
        ),
    })
}

pub fn output_prefix(prefix: &Path, key: &str, sentences: bool) -> PathBuf {
    let level = if sentences { "sentence" } else { "document" };
    PathBuf::from(format!("{}_{key}_{level}", prefix.display()))
}

pub fn run(a: PreprocessDataArgs) -> Result<()> {
    if a.dataset_impl != "mmap" {
        bail!(
            "not supported: --dataset-impl {}, because DeepScale writes Megatron's mmap format (the one the others convert to)",
            a.dataset_impl
        )
    }
    let tok = tokenizer(&a)?;
    let eod = match (a.append_eod, tok.eod_id) {
        (true, None) => bail!(
            "--append-eod: the {} tokenizer has no end-of-document token",
            a.tokenizer_type
        ),
        (true, Some(e)) => Some(e),
        (false, _) => None,
    };
    let file = std::fs::File::open(&a.input)
        .with_context(|| format!("cannot open --input {}", a.input.display()))?;
    let lines: Vec<String> = std::io::BufReader::new(file)
        .lines()
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", a.input.display()))?;
    let dtype = DType::for_vocab(tok.vocab_size());
    let mut builders = a
        .json_keys
        .iter()
        .map(|k| {
            MMapIndexedDatasetBuilder::create(
                &output_prefix(&a.output_prefix, k, a.split_sentences),
                dtype,
            )
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    // Tokenizing is CPU-bound: threads beyond the cores add nothing but their start-up (10^5 of
    // them took minutes), so --workers is capped there.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = a.workers.clamp(1, cores);
    if a.workers > cores {
        eprintln!(
            "--workers {}: using {workers} threads (this machine's cores)",
            a.workers
        );
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .build()?;
    let bar = indicatif::ProgressBar::new(lines.len() as u64);
    let start = std::time::Instant::now();
    let (mut docs, mut tokens) = (0usize, 0usize);
    // Chunks keep memory bounded and the output in input order.
    for (c, chunk) in lines.chunks(1024).enumerate() {
        let encoded: Vec<Vec<Vec<Vec<u32>>>> = pool.install(|| {
            chunk
                .par_iter()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, line)| -> Result<Vec<Vec<Vec<u32>>>> {
                    let n = c * 1024 + i + 1;
                    let v: serde_json::Value = serde_json::from_str(line)
                        .with_context(|| format!("{} line {n}: not JSON", a.input.display()))?;
                    a.json_keys
                        .iter()
                        .map(|k| {
                            let text = v.get(k).and_then(|t| t.as_str()).with_context(|| {
                                format!("{} line {n}: no string field `{k}`", a.input.display())
                            })?;
                            let pieces = if a.split_sentences {
                                split_sentences(text)
                            } else {
                                vec![text]
                            };
                            let mut ids: Vec<Vec<u32>> = Vec::new();
                            for p in pieces {
                                let t = tok.encode(p, false)?;
                                if !t.is_empty() {
                                    ids.push(t);
                                }
                            }
                            if let (Some(e), Some(last)) = (eod, ids.last_mut()) {
                                last.push(e);
                            }
                            Ok(ids)
                        })
                        .collect()
                })
                .collect::<Result<_>>()
        })?;
        for doc in encoded {
            for (b, items) in builders.iter_mut().zip(doc) {
                for item in &items {
                    tokens += item.len();
                    b.add_item(item)?;
                }
                b.end_document();
            }
            docs += 1;
            if docs % a.log_interval.max(1) == 0 {
                bar.set_position(docs as u64);
            }
        }
        bar.set_position(((c + 1) * 1024).min(lines.len()) as u64);
    }
    bar.finish_and_clear();
    let mut outputs = Vec::new();
    for (b, k) in builders.into_iter().zip(&a.json_keys) {
        b.finalize()?;
        outputs.push(output_prefix(&a.output_prefix, k, a.split_sentences));
    }
    let secs = start.elapsed().as_secs_f64();
    for o in &outputs {
        eprintln!("wrote {}.bin/.idx", o.display());
    }
    eprintln!(
        "{docs} documents, {tokens} tokens ({}) in {secs:.1} s ({:.0} documents/s)",
        dtype.name(),
        docs as f64 / secs.max(1e-9)
    );
    if a.json {
        println!(
            "{}",
            json!({"documents": docs, "tokens": tokens, "dtype": dtype.name(),
                   "outputs": outputs.iter().map(|o| o.display().to_string()).collect::<Vec<_>>()})
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::split_sentences;

    #[test]
    fn sentences() {
        assert_eq!(
            split_sentences("Mr. Smith went home. It rained! Did it? \"Yes.\" 3 cats."),
            vec![
                "Mr. Smith went home.",
                "It rained!",
                "Did it?",
                "\"Yes.\"",
                "3 cats."
            ]
        );
        assert_eq!(
            split_sentences("e.g. this stays. J. R. R. Tolkien wrote."),
            vec!["e.g. this stays.", "J. R. R. Tolkien wrote."]
        );
    }
}
