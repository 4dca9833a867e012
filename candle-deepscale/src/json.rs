//! JSON written by users or other tools (DeepSpeed configs, HF `config.json`, checkpoint
//! manifests): a wrong value names its key path (`zero_optimization.stage`), not only the line and
//! column serde_json reports, so a user finds it in a config of a hundred keys.
use serde::de::DeserializeOwned;
use std::fmt;

/// A parse error with the key path it happened at.
#[derive(Debug)]
pub struct KeyError {
    /// Dotted key path (`a.b[2].c`); empty at the top level or for malformed JSON.
    pub path: String,
    pub inner: serde_json::Error,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.path.is_empty() {
            true => write!(f, "{}", self.inner),
            false => write!(f, "`{}`: {}", self.path, self.inner),
        }
    }
}

impl std::error::Error for KeyError {}

/// Parses `text` as `T`, keeping the key path of an error. An unknown key's path is the key
/// itself (`zero_optimization.stge`).
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, KeyError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    let v = serde_path_to_error::deserialize(&mut *de).map_err(key_error)?;
    // Trailing characters after the value are an error too, as in `serde_json::from_str`.
    de.end().map_err(|inner| KeyError {
        path: String::new(),
        inner,
    })?;
    Ok(v)
}

/// `T` from a parsed JSON value (a section of a larger file), keeping the key path of an error
/// (relative to the value).
pub fn from_value<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, KeyError> {
    serde_path_to_error::deserialize(v).map_err(key_error)
}

fn key_error(e: serde_path_to_error::Error<serde_json::Error>) -> KeyError {
    let path = e.path().to_string();
    KeyError {
        // serde_path_to_error's "." is the top level, "?" where no key was being read.
        path: if path == "." || path == "?" {
            String::new()
        } else {
            path
        },
        inner: e.into_inner(),
    }
}

/// The candidate nearest to `key` by edit distance when close enough to be a likely typo
/// (for "did you mean").
pub fn nearest<'a>(key: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::levenshtein(key, c), c))
        .min_by_key(|(d, _)| *d)
        .filter(|(d, _)| *d <= key.len().max(4) / 2)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        #[allow(dead_code)]
        stage: u8,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        #[allow(dead_code)]
        zero_optimization: Option<Inner>,
        #[allow(dead_code)]
        betas: Option<Vec<f64>>,
    }

    fn err(text: &str) -> String {
        match from_str::<Outer>(text) {
            Ok(v) => panic!("{text} parsed as {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn errors_name_the_key_path() {
        let e = err(r#"{"zero_optimization": {"stage": "two"}}"#);
        assert!(
            e.starts_with("`zero_optimization.stage`: invalid type"),
            "{e}"
        );
        let e = err(r#"{"betas": [0.9, "x"]}"#);
        assert!(e.starts_with("`betas[1]`: invalid type"), "{e}");
        let e = err(r#"{"zero_optimization": {"stge": 2}}"#);
        assert!(
            e.starts_with("`zero_optimization.stge`: unknown field"),
            "{e}"
        );
        // Malformed JSON and trailing text have no key: serde_json's message alone.
        assert!(err("{").starts_with("EOF while parsing"), "{}", err("{"));
        assert!(
            err("{} x").starts_with("trailing characters"),
            "{}",
            err("{} x")
        );
        assert!(from_str::<Outer>(r#"{"zero_optimization": {"stage": 2}}"#).is_ok());
        let v = serde_json::json!({"zero_optimization": {"stage": -1}});
        let e = from_value::<Outer>(v).unwrap_err().to_string();
        assert!(
            e.starts_with("`zero_optimization.stage`: invalid value"),
            "{e}"
        );
    }

    #[test]
    fn nearest_suggests_close_keys_only() {
        let keys = ["stage3_param_persistence_threshold", "stage"];
        assert_eq!(
            nearest("stage3_param_persitance_threshold", keys),
            Some("stage3_param_persistence_threshold")
        );
        assert_eq!(nearest("stge", keys), Some("stage"));
        assert_eq!(nearest("offload", keys), None);
    }
}
