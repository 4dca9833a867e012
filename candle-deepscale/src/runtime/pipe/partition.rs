//! Cutting a layer list into pipeline stages (DeepSpeed's `PipelineModule` partition methods):
//! `uniform` (equal layer counts), `parameters` (balanced parameter counts) and `type:REGEX`
//! (balanced count of layers whose type name matches, e.g. `type:transformer`).
use crate::layers::module::Layer;
use candle_core::{bail, Result};

#[derive(Debug, Clone)]
pub enum PartitionMethod {
    Uniform,
    Parameters,
    /// Case-insensitive regex over [`Layer::type_name`].
    Type(regex::Regex),
}

impl std::str::FromStr for PartitionMethod {
    type Err = candle_core::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "uniform" => Ok(Self::Uniform),
            "parameters" => Ok(Self::Parameters),
            _ => match s.split_once(':') {
                Some((kind, re)) if kind.eq_ignore_ascii_case("type") => {
                    regex::RegexBuilder::new(re)
                        .case_insensitive(true)
                        .build()
                        .map(Self::Type)
                        .map_err(|e| {
                            candle_core::Error::Msg(format!("partition method `{s}`: {e}"))
                        })
                }
                _ => bail!("partition method `{s}`: expected uniform, parameters or type:REGEX"),
            },
        }
    }
}

/// DeepSpeed's `partition_uniform`: `parts + 1` boundaries, the first `n % parts` stages one larger.
pub fn partition_uniform(num_items: usize, num_parts: usize) -> Vec<usize> {
    if num_items <= num_parts {
        return (0..=num_parts).map(|p| p.min(num_items)).collect();
    }
    let (chunk, residual) = (num_items / num_parts, num_items % num_parts);
    (0..=num_parts)
        .map(|p| p * chunk + p.min(residual))
        .collect()
}

/// Contiguous stages whose heaviest weight is as small as possible (stages filled greedily from
/// the first), as `parts + 1` boundaries.
pub fn partition_balanced(weights: &[u64], num_parts: usize) -> Vec<usize> {
    if weights.len() <= num_parts {
        return partition_uniform(weights.len(), num_parts);
    }
    let pack = |cap: u64| -> Option<Vec<usize>> {
        let mut bounds = vec![0];
        let mut sum = 0u64;
        for (i, w) in weights.iter().enumerate() {
            if *w > cap {
                return None;
            }
            if sum + w > cap {
                bounds.push(i);
                sum = 0;
            }
            sum += w;
        }
        bounds.push(weights.len());
        (bounds.len() <= num_parts + 1).then_some(bounds)
    };
    let (mut lo, mut hi) = (
        weights.iter().copied().max().unwrap_or(0),
        weights.iter().sum::<u64>(),
    );
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pack(mid).is_some() {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let mut bounds = pack(lo).unwrap_or_else(|| partition_uniform(weights.len(), num_parts));
    // Fewer stages than asked (light tail): split the last ones so every stage has a layer.
    while bounds.len() < num_parts + 1 {
        let at = bounds
            .windows(2)
            .enumerate()
            .filter(|(_, w)| w[1] - w[0] > 1)
            .map(|(i, _)| i)
            .next_back()
            .unwrap_or(0);
        let mid = bounds[at + 1] - 1;
        bounds.insert(at + 1, mid);
    }
    bounds
}

/// Stage boundaries of `layers` over `stages` stages: stage `s` runs `bounds[s]..bounds[s + 1]`.
pub fn partition_layers(
    layers: &[&dyn Layer],
    stages: usize,
    method: &PartitionMethod,
) -> Result<Vec<usize>> {
    let items: Vec<(String, u64)> = layers
        .iter()
        .map(|l| {
            let n = l
                .parameters()
                .iter()
                .map(|p| p.tensor().elem_count() as u64)
                .sum();
            (l.type_name(), n)
        })
        .collect();
    partition_items(&items, stages, method)
}

/// Stage boundaries of a layer list given as (type name, parameter count) per layer, so a
/// pipeline can be cut before anything is built.
pub fn partition_items(
    items: &[(String, u64)],
    stages: usize,
    method: &PartitionMethod,
) -> Result<Vec<usize>> {
    if stages == 0 {
        bail!("the pipeline needs at least one stage")
    }
    if items.len() < stages {
        bail!(
            "{} layers cannot fill {stages} pipeline stages",
            items.len()
        )
    }
    Ok(match method {
        PartitionMethod::Uniform => partition_uniform(items.len(), stages),
        PartitionMethod::Parameters => {
            let w: Vec<u64> = items.iter().map(|i| i.1).collect();
            partition_balanced(&w, stages)
        }
        PartitionMethod::Type(re) => {
            let w: Vec<u64> = items.iter().map(|i| u64::from(re.is_match(&i.0))).collect();
            if w.iter().sum::<u64>() < stages as u64 {
                bail!(
                    "partition method type:{re}: only {} layers match, fewer than {stages} stages",
                    w.iter().sum::<u64>()
                )
            }
            partition_balanced(&w, stages)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_spreads_the_remainder_over_the_first_stages() {
        assert_eq!(partition_uniform(10, 4), vec![0, 3, 6, 8, 10]);
        assert_eq!(partition_uniform(8, 4), vec![0, 2, 4, 6, 8]);
        assert_eq!(partition_uniform(3, 4), vec![0, 1, 2, 3, 3]);
    }

    #[test]
    fn balanced_minimises_the_heaviest_stage() {
        // GPT-2 shaped: a heavy embedding, 6 equal blocks, a light head.
        let w = [50u64, 12, 12, 12, 12, 12, 12, 2];
        assert_eq!(partition_balanced(&w, 2), vec![0, 2, 8]); // 62 | 62
        assert_eq!(partition_balanced(&w, 3), vec![0, 1, 5, 8]);
        // Type counts: embedding and head weigh 0, blocks 1.
        let t = [0u64, 1, 1, 1, 1, 1, 1, 0];
        assert_eq!(partition_balanced(&t, 2), vec![0, 4, 8]);
        assert_eq!(partition_balanced(&t, 3), vec![0, 3, 5, 8]);
        // Never an empty stage.
        assert_eq!(partition_balanced(&[1, 1, 100], 3), vec![0, 1, 2, 3]);
    }

    #[test]
    fn methods_parse() {
        assert!(matches!(
            "uniform".parse::<PartitionMethod>().unwrap(),
            PartitionMethod::Uniform
        ));
        assert!(matches!(
            "Parameters".parse::<PartitionMethod>().unwrap(),
            PartitionMethod::Parameters
        ));
        assert!(matches!(
            "type:transformer".parse::<PartitionMethod>().unwrap(),
            PartitionMethod::Type(_)
        ));
        assert!("type:(".parse::<PartitionMethod>().is_err());
        assert!("weights".parse::<PartitionMethod>().is_err());
    }
}
