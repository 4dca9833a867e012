//! Megatron's BERT dataset (`bert_dataset.py`, `dataset_utils.py`): samples of one or more
//! consecutive sentences of a document, cut into segments A and B (swapped half of the time: the
//! binary head's sentence-order target, as Megatron v1.1.5 builds it), truncated to fit, wrapped as
//! `[CLS] A [SEP] B [SEP]`, with 15% of the tokens masked (80% `[MASK]`, 10% a random token, 10%
//! unchanged) and padded to the sequence length.
//!
//! Each sample draws from its own generator seeded by (seed, index), so a sample is the same
//! whichever rank reads it and in whatever order.
use crate::indexed_dataset::MMapIndexedDataset;
use crate::tokenizer::Tokenizer;
use candle_core::{bail, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::ops::Range;
use std::sync::Arc;

/// Documents as lists of tokenized sentences.
pub trait Documents: Send + Sync {
    fn num_documents(&self) -> usize;
    fn sentences(&self, doc: usize) -> Result<Vec<Vec<u32>>>;
}

impl Documents for MMapIndexedDataset {
    fn num_documents(&self) -> usize {
        MMapIndexedDataset::num_documents(self)
    }

    fn sentences(&self, doc: usize) -> Result<Vec<Vec<u32>>> {
        self.document_items(doc)?.map(|i| self.item(i)).collect()
    }
}

/// Sentence-split documents held in memory (text tokenized on the fly).
pub struct InMemoryDocuments(pub Vec<Vec<Vec<u32>>>);

impl Documents for InMemoryDocuments {
    fn num_documents(&self) -> usize {
        self.0.len()
    }

    fn sentences(&self, doc: usize) -> Result<Vec<Vec<u32>>> {
        match self.0.get(doc) {
            Some(d) => Ok(d.clone()),
            None => bail!("document {doc} out of range ({} documents)", self.0.len()),
        }
    }
}

/// The special tokens of a BERT vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Special {
    pub cls: u32,
    pub sep: u32,
    pub mask: u32,
    pub pad: u32,
    pub vocab_size: usize,
}

impl Special {
    pub fn from_tokenizer(tok: &Tokenizer) -> Result<Self> {
        let id = |t: &str| {
            tok.token_to_id(t).ok_or_else(|| {
                candle_core::Error::Msg(format!("the BERT vocabulary has no {t} token"))
            })
        };
        Ok(Self {
            cls: id("[CLS]")?,
            sep: id("[SEP]")?,
            mask: id("[MASK]")?,
            pad: id("[PAD]")?,
            vocab_size: tok.vocab_size(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct BertConfig {
    pub max_seq_length: usize,
    pub masked_lm_prob: f64,
    pub short_seq_prob: f64,
    /// Two segments and the sentence-order target (Megatron's binary head).
    pub binary_head: bool,
    pub seed: u64,
}

/// One training sample, padded to `max_seq_length`.
#[derive(Debug, Clone, PartialEq)]
pub struct BertSample {
    pub tokens: Vec<u32>,
    pub token_types: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub padding_mask: Vec<u32>,
    /// The original token at masked positions (0 elsewhere).
    pub labels: Vec<u32>,
    /// 1.0 at masked positions.
    pub loss_mask: Vec<f32>,
    /// Segments swapped (the binary target).
    pub is_random: bool,
}

pub struct BertDataset {
    docs: Arc<dyn Documents>,
    cfg: BertConfig,
    special: Special,
    /// (document, first sentence, end sentence, target length) per sample, shuffled.
    mapping: Vec<(usize, usize, usize, usize)>,
}

impl BertDataset {
    pub fn new(
        docs: Arc<dyn Documents>,
        documents: Range<usize>,
        num_samples: usize,
        cfg: BertConfig,
        special: Special,
    ) -> Result<Self> {
        let extra = if cfg.binary_head { 3 } else { 2 };
        if cfg.max_seq_length <= extra + 1 {
            bail!("BERT sequence length {} is too short", cfg.max_seq_length)
        }
        let max_tokens = cfg.max_seq_length - extra;
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        let mut mapping = Vec::new();
        let sizes: Vec<Vec<usize>> = documents
            .clone()
            .map(|d| Ok(docs.sentences(d)?.iter().map(|s| s.len()).collect()))
            .collect::<Result<_>>()?;
        let target = |rng: &mut rand::rngs::StdRng| {
            if rng.random::<f64>() < cfg.short_seq_prob {
                rng.random_range(2..=max_tokens)
            } else {
                max_tokens
            }
        };
        let min_sentences = if cfg.binary_head { 2 } else { 1 };
        while mapping.len() < num_samples.max(1) {
            let before = mapping.len();
            for (k, sents) in sizes.iter().enumerate() {
                let doc = documents.start + k;
                if sents.iter().filter(|&&n| n > 0).count() < min_sentences {
                    continue;
                }
                let mut want = target(&mut rng);
                let (mut start, mut len) = (0, 0);
                for (j, n) in sents.iter().enumerate() {
                    len += n;
                    let last = j + 1 == sents.len();
                    if (len >= want || last) && j + 1 - start >= min_sentences {
                        mapping.push((doc, start, j + 1, want));
                        start = j + 1;
                        len = 0;
                        want = target(&mut rng);
                    }
                }
            }
            if mapping.len() == before {
                bail!(
                    "no document of the split has {min_sentences} or more non-empty sentences \
                     (BERT data must be sentence split: preprocess-data --split-sentences)"
                )
            }
        }
        mapping.shuffle(&mut rng);
        Ok(Self {
            docs,
            cfg,
            special,
            mapping,
        })
    }

    pub fn len(&self) -> usize {
        self.mapping.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mapping.is_empty()
    }

    pub fn sample(&self, i: usize) -> Result<BertSample> {
        let Some(&(doc, s, e, target)) = self.mapping.get(i % self.len().max(1)) else {
            bail!("the BERT dataset is empty")
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64),
        );
        let sents = self.docs.sentences(doc)?;
        let sents = &sents[s..e];
        let sp = self.special;
        let extra = if self.cfg.binary_head { 3 } else { 2 };
        let (mut a, mut b, is_random) = if self.cfg.binary_head {
            let a_end = if sents.len() >= 2 {
                rng.random_range(1..sents.len())
            } else {
                1
            };
            let (a, b) = (sents[..a_end].concat(), sents[a_end..].concat());
            if rng.random::<f64>() < 0.5 {
                (b, a, true)
            } else {
                (a, b, false)
            }
        } else {
            (sents.concat(), Vec::new(), false)
        };
        // Megatron's truncate_segments to the sample's target length (shorter for a short_seq_prob
        // share of samples): trim the longer segment at a random end.
        let limit = target.clamp(2, self.cfg.max_seq_length - extra);
        while a.len() + b.len() > limit {
            let seg = if a.len() > b.len() { &mut a } else { &mut b };
            if rng.random::<f64>() < 0.5 {
                seg.remove(0);
            } else {
                seg.pop();
            }
        }
        let mut tokens = vec![sp.cls];
        tokens.extend(&a);
        tokens.push(sp.sep);
        let mut token_types = vec![0u32; tokens.len()];
        if self.cfg.binary_head {
            tokens.extend(&b);
            tokens.push(sp.sep);
            token_types.resize(tokens.len(), 1);
        }
        let n = tokens.len();
        let mut labels = vec![0u32; n];
        let mut loss_mask = vec![0f32; n];
        let mut candidates: Vec<usize> = (0..n)
            .filter(|&k| tokens[k] != sp.cls && tokens[k] != sp.sep)
            .collect();
        candidates.shuffle(&mut rng);
        let max_predictions =
            ((self.cfg.masked_lm_prob * self.cfg.max_seq_length as f64) as usize).max(1);
        let to_predict = ((n as f64 * self.cfg.masked_lm_prob).round() as usize)
            .max(1)
            .min(max_predictions)
            .min(candidates.len());
        for &k in &candidates[..to_predict] {
            labels[k] = tokens[k];
            loss_mask[k] = 1.0;
            let r: f64 = rng.random();
            if r < 0.8 {
                tokens[k] = sp.mask;
            } else if r >= 0.9 {
                tokens[k] = rng.random_range(0..sp.vocab_size as u32);
            }
        }
        let len = self.cfg.max_seq_length;
        let mut padding_mask = vec![1u32; n];
        tokens.resize(len, sp.pad);
        token_types.resize(len, 0);
        padding_mask.resize(len, 0);
        labels.resize(len, 0);
        loss_mask.resize(len, 0.0);
        Ok(BertSample {
            tokens,
            token_types,
            padding_mask,
            labels,
            loss_mask,
            is_random,
        })
    }
}
