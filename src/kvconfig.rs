//! Names of KV cache configurations, one syntax for every command:
//!
//! - `f16`, `q8_0`, `q4_0`, ... — one of llama.cpp's cache types for both K and V;
//! - `q4_0/q8_0` — K type / V type;
//! - `q2` — every token in logquant's 2-bit format (`lq2`, 2.5 bits per value): the
//!   LogQuant baseline with no full-precision tokens (SPEC.md section 2).
//!
//! Later configurations (LogQuant and its baselines) extend this syntax.

use std::fmt;

use crate::gguf::KvCacheType;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvConfig {
    pub k: KvCacheType,
    pub v: KvCacheType,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown KV cache configuration '{name}': {why}")]
pub struct KvConfigError {
    pub name: String,
    pub why: String,
}

/// Every cache type this build accepts: llama.cpp's, then logquant's lq2.
pub fn cache_type_names() -> Vec<&'static str> {
    KvCacheType::ALL.iter().map(|t| t.name()).collect()
}

impl KvConfig {
    pub const F16: KvConfig = KvConfig { k: KvCacheType::F16, v: KvCacheType::F16 };
    pub const Q2: KvConfig = KvConfig { k: KvCacheType::Lq2, v: KvCacheType::Lq2 };

    pub fn new(k: KvCacheType, v: KvCacheType) -> KvConfig {
        KvConfig { k, v }
    }

    pub fn parse(text: &str) -> Result<KvConfig, KvConfigError> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("q2") {
            return Ok(KvConfig::Q2);
        }
        let err = |why: String| KvConfigError { name: text.to_string(), why };
        let kind = text.split(':').next().unwrap_or("").to_ascii_lowercase();
        if ["logquant", "kivi", "streaming"].contains(&kind.as_str()) {
            return Err(err(format!(
                "the two-tier cache that {kind} needs (f16 overlay over the 2-bit store) is not built yet; \
                 'q2' (every token at 2 bits) is available"
            )));
        }
        let one = |name: &str| {
            KvCacheType::from_name(name).ok_or_else(|| {
                err(format!("'{name}' is not a cache type; use one of {}", cache_type_names().join(", ")))
            })
        };
        match text.split_once('/') {
            Some((k, v)) => Ok(KvConfig { k: one(k)?, v: one(v)? }),
            None => {
                let t = one(text)?;
                Ok(KvConfig { k: t, v: t })
            }
        }
    }

    /// Parses a comma-separated list, e.g. `f16,q8_0,q4_0/q8_0`.
    pub fn parse_list(text: &str) -> Result<Vec<KvConfig>, KvConfigError> {
        text.split(',').filter(|s| !s.trim().is_empty()).map(KvConfig::parse).collect()
    }

    /// Average bits per cached value over K and V (SPEC.md section 2 accounting).
    pub fn bits_per_value(&self) -> f64 {
        (self.k.bits_per_value() + self.v.bits_per_value()) / 2.0
    }
}

impl fmt::Display for KvConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == KvConfig::Q2 {
            write!(f, "q2")
        } else if self.k == self.v {
            write!(f, "{}", self.k.name())
        } else {
            write!(f, "{}/{}", self.k.name(), self.v.name())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_and_pairs() {
        assert_eq!(KvConfig::parse("f16").unwrap(), KvConfig::F16);
        let p = KvConfig::parse("q4_0/q8_0").unwrap();
        assert_eq!((p.k, p.v), (KvCacheType::Q4_0, KvCacheType::Q8_0));
        assert_eq!(p.to_string(), "q4_0/q8_0");
        assert_eq!(KvConfig::parse("q8_0").unwrap().to_string(), "q8_0");
        assert_eq!(KvConfig::parse_list("f16, q8_0,q4_0/q8_0").unwrap().len(), 3);
    }

    #[test]
    fn q2_is_lq2_for_k_and_v() {
        assert_eq!(KvConfig::parse("q2").unwrap(), KvConfig::Q2);
        assert_eq!(KvConfig::parse("lq2").unwrap(), KvConfig::Q2);
        assert_eq!(KvConfig::Q2.to_string(), "q2");
        assert_eq!(KvConfig::Q2.bits_per_value(), 2.5);
    }

    #[test]
    fn every_stock_name_round_trips() {
        for name in cache_type_names().into_iter().filter(|&n| n != "lq2") {
            assert_eq!(KvConfig::parse(name).unwrap().to_string(), name);
        }
    }

    #[test]
    fn unknown_names_are_errors_that_list_the_choices() {
        let e = KvConfig::parse("q3_0").unwrap_err();
        assert!(e.to_string().contains("q3_0"));
        assert!(e.to_string().contains("q8_0"));
        assert!(KvConfig::parse("f16/").is_err());
        let e = KvConfig::parse("logquant:D=384").unwrap_err();
        assert!(e.to_string().contains("not built yet"), "{e}");
        assert!(KvConfig::parse("").is_err());
    }

    #[test]
    fn bits_per_value_matches_block_sizes() {
        assert_eq!(KvConfig::F16.bits_per_value(), 16.0);
        assert_eq!(KvConfig::parse("q8_0").unwrap().bits_per_value(), 8.5);
        assert_eq!(KvConfig::parse("q4_0").unwrap().bits_per_value(), 4.5);
    }
}
