//! `deepscale inspect-data PREFIX`: what a Megatron mmap dataset holds.
use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use zoo::indexed_dataset::MMapIndexedDataset;
use zoo::tokenizer::Tokenizer;

#[derive(Args, Debug)]
pub struct InspectDataArgs {
    /// Dataset prefix (PREFIX.bin and PREFIX.idx).
    pub prefix: PathBuf,
    /// Document whose tokens are shown.
    #[arg(long, default_value_t = 0)]
    pub document: usize,
    /// Detokenize with this GPT-2 vocab.json (with --merge-file) or BERT vocab.txt.
    #[arg(long)]
    pub vocab_file: Option<PathBuf>,
    #[arg(long)]
    pub merge_file: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: InspectDataArgs) -> Result<()> {
    let ds = MMapIndexedDataset::open(&a.prefix)?;
    let mut tokens = Vec::new();
    if ds.num_documents() > 0 || a.document > 0 {
        for i in ds.document_items(a.document)? {
            tokens.extend(ds.item(i)?);
        }
    }
    let text = match (&a.vocab_file, &a.merge_file) {
        (Some(v), Some(m)) => Some(Tokenizer::gpt2_bpe(v, m)?),
        (Some(v), None) => Some(Tokenizer::bert_wordpiece(v, true)?),
        (None, _) => None,
    }
    .map(|t| t.decode(&tokens))
    .transpose()
    .context("detokenizing")?;
    eprintln!(
        "{}: {} items, {} documents, {}; document {}: {} tokens",
        a.prefix.display(),
        ds.len(),
        ds.num_documents(),
        ds.dtype.name(),
        a.document,
        tokens.len()
    );
    match &text {
        Some(t) => eprintln!("{t}"),
        None => eprintln!(
            "(token ids only: give --vocab-file (with --merge-file for GPT-2's BPE) to see the text)"
        ),
    }
    if a.json {
        let mut v = json!({"items": ds.len(), "documents": ds.num_documents(),
                           "dtype": ds.dtype.name(), "document": a.document, "tokens": tokens});
        // `text` only when there is one: a null would read as "the document is empty".
        if let Some(t) = text {
            v["text"] = json!(t);
        }
        println!("{v}");
    } else {
        println!("{tokens:?}");
    }
    Ok(())
}
