//! Tokenizers through the `tokenizers` crate: `tokenizer.json` when present, else GPT-2's
//! `vocab.json` + `merges.txt`, else BERT's `vocab.txt`.
use candle_core::{bail, Error, Result};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::AddedToken;

/// A text tokenizer with the id of its end-of-document token.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `<|endoftext|>` for GPT-2, `[SEP]` for BERT.
    pub eod_id: Option<u32>,
}

fn tk_err(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("{what} {}: {e}", path.display()))
}

impl Tokenizer {
    /// From a `tokenizer.json`.
    pub fn from_json(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| tk_err("cannot read tokenizer", path, e))?;
        // JSON syntax first: tokenizers 0.22 panics (an `expect` in its decoder's Deserialize)
        // on a file that ends inside its `decoder` section.
        serde_json::from_str::<serde::de::IgnoredAny>(&text).map_err(|e| {
            tk_err(
                "cannot load tokenizer",
                path,
                format!("not valid JSON: {e}"),
            )
        })?;
        let mut inner: tokenizers::Tokenizer = text
            .parse()
            .map_err(|e| tk_err("cannot load tokenizer", path, e))?;
        // Sequences are padded, truncated and windowed by the caller, never silently here.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| tk_err("cannot configure tokenizer", path, e))?;
        let eod_id = ["<|endoftext|>", "[SEP]", "</s>"]
            .iter()
            .find_map(|t| inner.token_to_id(t));
        Ok(Self { inner, eod_id })
    }

    /// GPT-2 byte-level BPE from `vocab.json` (a.k.a. encoder.json) and `merges.txt` (vocab.bpe).
    pub fn gpt2_bpe(vocab: &Path, merges: &Path) -> Result<Self> {
        for p in [vocab, merges] {
            if !p.exists() {
                bail!("GPT-2 tokenizer file {} does not exist", p.display())
            }
        }
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .build()
            .map_err(|e| tk_err("cannot load GPT-2 BPE from", vocab, e))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let eod_id = inner.token_to_id("<|endoftext|>");
        Ok(Self { inner, eod_id })
    }

    /// BERT WordPiece from `vocab.txt`; `lower_case` as BertWordPieceLowerCase.
    pub fn bert_wordpiece(vocab: &Path, lower_case: bool) -> Result<Self> {
        if !vocab.exists() {
            bail!("BERT vocab file {} does not exist", vocab.display())
        }
        let wp = WordPiece::from_file(&vocab.to_string_lossy())
            .unk_token("[UNK]".into())
            .build()
            .map_err(|e| tk_err("cannot load WordPiece vocab", vocab, e))?;
        let mut inner = tokenizers::Tokenizer::new(wp);
        let (Some(cls), Some(sep)) = (inner.token_to_id("[CLS]"), inner.token_to_id("[SEP]"))
        else {
            bail!("{}: BERT vocab lacks [CLS] or [SEP]", vocab.display())
        };
        inner.with_normalizer(Some(BertNormalizer::new(true, true, None, lower_case)));
        inner.with_pre_tokenizer(Some(BertPreTokenizer));
        inner.with_post_processor(Some(BertProcessing::new(
            ("[SEP]".into(), sep),
            ("[CLS]".into(), cls),
        )));
        inner.with_decoder(Some(WordPieceDecoder::default()));
        let specials: Vec<AddedToken> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            .iter()
            .filter(|t| inner.token_to_id(t).is_some())
            .map(|t| AddedToken::from(*t, true))
            .collect();
        inner.add_special_tokens(&specials);
        Ok(Self {
            inner,
            eod_id: Some(sep),
        })
    }

    /// Finds the tokenizer files in a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        if json.exists() {
            return Self::from_json(&json);
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if vocab.exists() && merges.exists() {
            return Self::gpt2_bpe(&vocab, &merges);
        }
        let txt = dir.join("vocab.txt");
        if txt.exists() {
            return Self::bert_wordpiece(&txt, lower_case_from_config(dir));
        }
        bail!(
            "no tokenizer in {}: expected tokenizer.json, vocab.json + merges.txt, or vocab.txt",
            dir.display()
        )
    }

    /// Token ids of `text`; `special` adds the model's special tokens ([CLS] ... [SEP] for BERT).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, special)
            .map_err(|e| Error::Msg(format!("tokenization failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Msg(format!("detokenization failed: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Writes `tokenizer.json`.
    /// The tokenizer as `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| candle_core::Error::Msg(format!("cannot serialise the tokenizer: {e}")))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, false)
            .map_err(|e| tk_err("cannot write tokenizer", path, e))
    }
}

fn lower_case_from_config(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("do_lower_case").and_then(|b| b.as_bool()))
        .unwrap_or(true)
}
