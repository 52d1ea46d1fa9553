//! Names of KV cache configurations, one syntax for every command:
//!
//! - `f16`, `q8_0`, `q4_0`, ... — one of llama.cpp's cache types for both K and V;
//! - `q4_0/q8_0` — K type / V type;
//! - `q2` — every token in logquant's 2-bit format (`lq2`, 2.5 bits per value): the
//!   LogQuant baseline with no full-precision tokens (SPEC.md section 2);
//! - `logquant[:D=384]` (or `logquant:W=128`), `kivi[:D=384]`, `streaming[:D=384]` —
//!   the two-tier cache: every token in the 2-bit store, plus an f16 overlay of the `D`
//!   tokens the retention policy keeps (src/retention.rs), attention over both.
//!
//! The default budget is D = 384 (LogQuant's W = 128): the newest 128 tokens and 256
//! log-spaced older ones. It is 9% of a 4096-token context, and at 16384 tokens the
//! overlay (budget plus one micro-batch) costs under 0.5 bits per value, which keeps
//! the whole cache under 3 bits per value.

use std::fmt;

use crate::gguf::KvCacheType;
use crate::retention::Policy;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvConfig {
    pub k: KvCacheType,
    pub v: KvCacheType,
    /// The two-tier cache's retention policy; None for a single-tier cache.
    pub policy: Option<Policy>,
}

/// The dense budget of `logquant`, `kivi` and `streaming` when none is given.
pub const DEFAULT_BUDGET: u32 = 384;

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
    pub const F16: KvConfig = KvConfig { k: KvCacheType::F16, v: KvCacheType::F16, policy: None };
    pub const Q2: KvConfig = KvConfig { k: KvCacheType::Lq2, v: KvCacheType::Lq2, policy: None };

    pub fn new(k: KvCacheType, v: KvCacheType) -> KvConfig {
        KvConfig { k, v, policy: None }
    }

    /// The two-tier cache: lq2 store plus the policy's f16 overlay.
    pub fn two_tier(policy: Policy) -> KvConfig {
        KvConfig { k: KvCacheType::Lq2, v: KvCacheType::Lq2, policy: Some(policy) }
    }

    /// `logquant:D=384`, `logquant:W=128`, `kivi:D=384`, `streaming:D=384`, or the bare
    /// name for the default budget.
    fn parse_two_tier(text: &str) -> Option<Result<KvConfig, KvConfigError>> {
        let (kind, param) = match text.split_once(':') {
            Some((k, p)) => (k.to_ascii_lowercase(), Some(p)),
            None => (text.to_ascii_lowercase(), None),
        };
        let make: fn(u32) -> Policy = match kind.as_str() {
            "logquant" => Policy::logquant,
            "kivi" => Policy::kivi,
            "streaming" => Policy::streaming,
            _ => return None,
        };
        let err = |why: String| KvConfigError { name: text.to_string(), why };
        let Some(param) = param else {
            return Some(Ok(KvConfig::two_tier(make(DEFAULT_BUDGET))));
        };
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k.trim().to_ascii_uppercase(), v.trim()),
            None => return Some(Err(err(format!("write {kind}:D=N (N full-precision tokens)")))),
        };
        let Ok(n) = value.parse::<u32>() else {
            return Some(Err(err(format!("'{value}' is not a token count"))));
        };
        if n > MAX_BUDGET {
            return Some(Err(err(format!("a budget of {n} tokens is above the {MAX_BUDGET} this build allows"))));
        }
        Some(match (key.as_str(), kind.as_str()) {
            ("D", _) => Ok(KvConfig::two_tier(make(n))),
            ("W", "logquant") => Ok(KvConfig::two_tier(Policy::LogQuant { window: n.min(MAX_BUDGET / 3) })),
            _ => Err(err(format!("{kind} takes D=N{}", if kind == "logquant" { " or W=N" } else { "" }))),
        })
    }

    pub fn parse(text: &str) -> Result<KvConfig, KvConfigError> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("q2") {
            return Ok(KvConfig::Q2);
        }
        if let Some(two_tier) = KvConfig::parse_two_tier(text) {
            return two_tier;
        }
        let err = |why: String| KvConfigError { name: text.to_string(), why };
        let one = |name: &str| {
            KvCacheType::from_name(name).ok_or_else(|| {
                err(format!("'{name}' is not a cache type; use one of {}", cache_type_names().join(", ")))
            })
        };
        match text.split_once('/') {
            Some((k, v)) => Ok(KvConfig::new(one(k)?, one(v)?)),
            None => {
                let t = one(text)?;
                Ok(KvConfig::new(t, t))
            }
        }
    }

    /// Parses a comma-separated list, e.g. `f16,q8_0,q4_0/q8_0`.
    pub fn parse_list(text: &str) -> Result<Vec<KvConfig>, KvConfigError> {
        text.split(',').filter(|s| !s.trim().is_empty()).map(KvConfig::parse).collect()
    }

    /// Average bits per cached value over K and V of the store (SPEC.md section 2
    /// accounting); the two-tier cache adds its overlay (see [`KvConfig::bits_with_overlay`]).
    pub fn bits_per_value(&self) -> f64 {
        (self.k.bits_per_value() + self.v.bits_per_value()) / 2.0
    }

    /// Bits per value of an allocation whose `overlay` bytes (of `kv` in all) are the
    /// two-tier cache's f16 overlay: the store's bits, scaled up by the overlay.
    pub fn allocated_bits_per_value(&self, kv: u64, overlay: u64) -> f64 {
        if overlay == 0 || overlay >= kv {
            return self.bits_per_value();
        }
        self.bits_per_value() * kv as f64 / (kv - overlay) as f64
    }

    /// Bits per value when `full_precision` of every `tokens` also have an f16 copy.
    pub fn bits_with_overlay(&self, full_precision: f64, tokens: f64) -> f64 {
        self.bits_per_value() + if tokens > 0.0 { 16.0 * full_precision / tokens } else { 0.0 }
    }
}

/// The largest dense budget accepted (the overlay is sized for it in every layer).
pub const MAX_BUDGET: u32 = 1 << 20;

impl fmt::Display for KvConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = self.policy {
            match p {
                Policy::LogQuant { .. } => write!(f, "logquant:D={}", p.dense_budget()),
                Policy::Kivi { .. } => write!(f, "kivi:D={}", p.dense_budget()),
                Policy::Streaming { .. } => write!(f, "streaming:D={}", p.dense_budget()),
                Policy::Q2 => write!(f, "q2:D=0"),
            }
        } else if *self == KvConfig::Q2 {
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
        assert!(KvConfig::parse("logquant:X=3").is_err());
        assert!(KvConfig::parse("kivi:W=3").is_err());
        assert!(KvConfig::parse("streaming:D=abc").is_err());
        assert!(KvConfig::parse("logquant:D").is_err());
        assert!(KvConfig::parse("").is_err());
    }

    #[test]
    fn two_tier_configurations() {
        let lq = KvConfig::parse("logquant").unwrap();
        assert_eq!(lq.policy, Some(Policy::LogQuant { window: 128 }));
        assert_eq!((lq.k, lq.v), (KvCacheType::Lq2, KvCacheType::Lq2));
        assert_eq!(lq.to_string(), "logquant:D=384");
        assert_eq!(KvConfig::parse("logquant:W=42").unwrap().to_string(), "logquant:D=126");
        assert_eq!(KvConfig::parse("kivi:D=128").unwrap().policy, Some(Policy::Kivi { recent: 128 }));
        assert_eq!(
            KvConfig::parse("streaming:d=128").unwrap().policy,
            Some(Policy::Streaming { sinks: 4, window: 124 })
        );
        for name in ["logquant:D=384", "kivi:D=384", "streaming:D=384", "logquant:D=0"] {
            assert_eq!(KvConfig::parse(name).unwrap().to_string(), name);
        }
        assert_ne!(KvConfig::parse("logquant:D=0").unwrap(), KvConfig::Q2);
        assert_eq!(lq.bits_with_overlay(512.0, 16384.0), 3.0);
    }

    #[test]
    fn bits_per_value_matches_block_sizes() {
        assert_eq!(KvConfig::F16.bits_per_value(), 16.0);
        assert_eq!(KvConfig::parse("q8_0").unwrap().bits_per_value(), 8.5);
        assert_eq!(KvConfig::parse("q4_0").unwrap().bits_per_value(), 4.5);
    }
}
