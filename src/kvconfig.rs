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
//! Options of the two-tier cache follow the budget, separated by colons:
//! `k=TYPE` / `v=TYPE` give the store's K / V type (default lq2; any of llama.cpp's
//! types runs on the CPU, the CUDA op runs lq2 or lq3 K and lq2 V), and `center=kv|k|v|none` centers
//! K and/or V per sequence before they are quantized (include/logquant.h,
//! LOGQUANT_CENTER_K), `keys=channel` quantizes demoted keys by channel in groups of
//! 64 tokens (KIVI; lq2 or lq3 K store, without the Hadamard rotation), and
//! `swa=recent|same` chooses what the sliding-window layers keep (their newest D
//! tokens, or the policy's set), e.g. `logquant:D=384:k=q4_0:center=k` or
//! `logquant:D=126:k=lq3:keys=channel` (3-bit keys by channel, 2-bit values).
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
    /// Which of K and V the two-tier cache centers (none for a single-tier cache).
    pub center: Centering,
    /// Two-tier cache: in the sliding-window layers (a cache of their own), keep the
    /// newest D tokens rather than the policy's set (`swa=recent`; `swa=same`: the
    /// policy's set everywhere). No effect on a model without such layers.
    pub swa_recent: bool,
    /// Two-tier cache: keys by channel (KIVI; `keys=channel`): groups of 64 demoted
    /// tokens are quantized per channel rather than per token (include/logquant.h,
    /// LOGQUANT_KEYS_BY_CHANNEL). Needs an lq2 or lq3 K store.
    pub keys_by_channel: bool,
}

/// Per-sequence centering of the two-tier cache's K and V: each channel's offset,
/// taken from the first tokens, subtracted before quantizing (include/logquant.h).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Centering {
    pub k: bool,
    pub v: bool,
}

impl Centering {
    pub const NONE: Centering = Centering { k: false, v: false };

    fn parse(text: &str) -> Option<Centering> {
        let (k, v) = match text.to_ascii_lowercase().as_str() {
            "kv" | "vk" | "both" => (true, true),
            "k" => (true, false),
            "v" => (false, true),
            "none" | "off" => (false, false),
            _ => return None,
        };
        Some(Centering { k, v })
    }

    fn name(&self) -> &'static str {
        match (self.k, self.v) {
            (true, true) => "kv",
            (true, false) => "k",
            (false, true) => "v",
            (false, false) => "none",
        }
    }
}

/// The dense budget of `logquant`, `kivi` and `streaming` when none is given.
pub const DEFAULT_BUDGET: u32 = 384;

/// Whether sliding-window layers keep their newest D tokens when not told.
pub const DEFAULT_SWA_RECENT: bool = true;

/// The two-tier cache's centering when none is given.
pub const DEFAULT_CENTERING: Centering = Centering { k: true, v: false };

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
    pub const F16: KvConfig = KvConfig {
        k: KvCacheType::F16,
        v: KvCacheType::F16,
        policy: None,
        center: Centering::NONE,
        swa_recent: false,
        keys_by_channel: false,
    };
    pub const Q2: KvConfig = KvConfig {
        k: KvCacheType::Lq2,
        v: KvCacheType::Lq2,
        policy: None,
        center: Centering::NONE,
        swa_recent: false,
        keys_by_channel: false,
    };

    pub fn new(k: KvCacheType, v: KvCacheType) -> KvConfig {
        KvConfig { k, v, policy: None, center: Centering::NONE, swa_recent: false, keys_by_channel: false }
    }

    /// The two-tier cache: lq2 store plus the policy's f16 overlay.
    pub fn two_tier(policy: Policy) -> KvConfig {
        KvConfig {
            k: KvCacheType::Lq2,
            v: KvCacheType::Lq2,
            policy: Some(policy),
            center: DEFAULT_CENTERING,
            swa_recent: DEFAULT_SWA_RECENT,
            keys_by_channel: false,
        }
    }

    /// The same configuration with K/V centering as given (two-tier caches only).
    pub fn with_centering(self, center: Centering) -> KvConfig {
        KvConfig { center: if self.policy.is_some() { center } else { Centering::NONE }, ..self }
    }

    /// `logquant:D=384`, `logquant:W=128`, `kivi:D=384`, `streaming:D=384`, or the bare
    /// name for the default budget; then options (`:center=kv`).
    fn parse_two_tier(text: &str) -> Option<Result<KvConfig, KvConfigError>> {
        let mut parts = text.split(':');
        let kind = parts.next().unwrap_or_default().to_ascii_lowercase();
        let make: fn(u32) -> Policy = match kind.as_str() {
            "logquant" => Policy::logquant,
            "octaves" => Policy::octaves,
            "kivi" => Policy::kivi,
            "streaming" => Policy::streaming,
            _ => return None,
        };
        let err = |why: String| KvConfigError { name: text.to_string(), why };
        let mut cfg = KvConfig::two_tier(make(DEFAULT_BUDGET));
        for param in parts {
            let Some((key, value)) = param.split_once('=') else {
                return Some(Err(err(format!(
                    "write {kind}:D=N (N full-precision tokens), then options such as :center=kv"
                ))));
            };
            let (key, value) = (key.trim().to_ascii_uppercase(), value.trim());
            if key == "K" || key == "V" {
                let Some(t) = KvCacheType::from_name(value) else {
                    return Some(Err(err(format!(
                        "'{value}' is not a cache type; use one of {}",
                        cache_type_names().join(", ")
                    ))));
                };
                if key == "K" {
                    cfg.k = t;
                } else {
                    cfg.v = t;
                }
                continue;
            }
            if key == "SWA" {
                cfg.swa_recent = match value.to_ascii_lowercase().as_str() {
                    "recent" => true,
                    "same" => false,
                    _ => return Some(Err(err(format!("swa takes recent or same, not '{value}'")))),
                };
                continue;
            }
            if key == "KEYS" {
                cfg.keys_by_channel = match value.to_ascii_lowercase().as_str() {
                    "channel" => true,
                    "token" => false,
                    _ => return Some(Err(err(format!("keys takes channel or token, not '{value}'")))),
                };
                continue;
            }
            if key == "CENTER" {
                let Some(c) = Centering::parse(value) else {
                    return Some(Err(err(format!("center takes kv, k, v or none, not '{value}'"))));
                };
                cfg.center = c;
                continue;
            }
            let Ok(n) = value.parse::<u32>() else {
                return Some(Err(err(format!("'{value}' is not a token count"))));
            };
            if n > MAX_BUDGET {
                return Some(Err(err(format!("a budget of {n} tokens is above the {MAX_BUDGET} this build allows"))));
            }
            cfg.policy = Some(match (key.as_str(), kind.as_str()) {
                ("D", _) => make(n),
                ("W", "logquant") => Policy::LogQuant { window: n.min(MAX_BUDGET / 3) },
                _ => {
                    return Some(Err(err(format!(
                    "{kind} takes D=N{}, k=TYPE, v=TYPE, center=kv|k|v|none, keys=channel|token and swa=recent|same",
                    if kind == "logquant" { " or W=N" } else { "" }
                ))))
                }
            });
        }
        if cfg.keys_by_channel && !matches!(cfg.k, KvCacheType::Lq2 | KvCacheType::Lq3) {
            return Some(Err(err(format!(
                "keys=channel quantizes an lq2 or lq3 K store by channel; use k=lq2 or k=lq3, or drop keys=channel (not k={})",
                cfg.k.name()
            ))));
        }
        Some(Ok(cfg))
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
                Policy::Octaves { .. } => write!(f, "octaves:D={}", p.dense_budget()),
                Policy::Kivi { .. } => write!(f, "kivi:D={}", p.dense_budget()),
                Policy::Streaming { .. } => write!(f, "streaming:D={}", p.dense_budget()),
                Policy::Q2 => write!(f, "q2:D=0"),
            }?;
            if self.k != KvCacheType::Lq2 {
                write!(f, ":k={}", self.k.name())?;
            }
            if self.v != KvCacheType::Lq2 {
                write!(f, ":v={}", self.v.name())?;
            }
            if self.center != DEFAULT_CENTERING {
                write!(f, ":center={}", self.center.name())?;
            }
            if self.keys_by_channel {
                write!(f, ":keys=channel")?;
            }
            if self.swa_recent != DEFAULT_SWA_RECENT {
                write!(f, ":swa={}", if self.swa_recent { "recent" } else { "same" })?;
            }
            Ok(())
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
        let oct = KvConfig::parse("octaves:D=384").unwrap();
        assert_eq!((oct.policy, oct.to_string()), (Some(Policy::Octaves { window: 128 }), "octaves:D=384".into()));
        assert_eq!(
            KvConfig::parse("streaming:d=128").unwrap().policy,
            Some(Policy::Streaming { sinks: 4, window: 124 })
        );
        for name in [
            "logquant:D=384",
            "kivi:D=384",
            "streaming:D=384",
            "logquant:D=0",
            "kivi:D=8:center=none",
            "logquant:D=384:center=kv",
            "streaming:D=64:swa=same",
        ] {
            assert_eq!(KvConfig::parse(name).unwrap().to_string(), name);
        }
        assert_ne!(KvConfig::parse("logquant:D=0").unwrap(), KvConfig::Q2);
        assert_eq!(lq.bits_with_overlay(512.0, 16384.0), 3.0);
    }

    #[test]
    fn two_tier_options() {
        let c = KvConfig::parse("logquant:D=128:k=q4_0:center=k").unwrap();
        assert_eq!(c.policy, Some(Policy::LogQuant { window: 42 }));
        assert_eq!((c.k, c.v), (KvCacheType::Q4_0, KvCacheType::Lq2));
        assert_eq!(c.center, Centering { k: true, v: false });
        assert_eq!(c.to_string(), "logquant:D=126:k=q4_0"); // center=k is the default
        assert_eq!(KvConfig::parse(&c.to_string()).unwrap(), c);
        assert_eq!(c.bits_per_value(), 3.5);
        // options without a budget keep the default one
        let d = KvConfig::parse("kivi:center=kv:v=q8_0").unwrap();
        assert_eq!(d.policy, Some(Policy::Kivi { recent: DEFAULT_BUDGET }));
        assert_eq!((d.v, d.center), (KvCacheType::Q8_0, Centering { k: true, v: true }));
        assert_eq!(KvConfig::parse("streaming:center=none").unwrap().center, Centering::NONE);
        let kc = KvConfig::parse("logquant:D=384:keys=channel").unwrap();
        assert!(kc.keys_by_channel);
        assert_eq!(kc.to_string(), "logquant:D=384:keys=channel");
        assert!(!KvConfig::parse("logquant:keys=token").unwrap().keys_by_channel);
        let k3 = KvConfig::parse("logquant:D=126:k=lq3:keys=channel").unwrap();
        assert_eq!((k3.k, k3.v, k3.keys_by_channel), (KvCacheType::Lq3, KvCacheType::Lq2, true));
        assert_eq!(k3.to_string(), "logquant:D=126:k=lq3:keys=channel");
        assert_eq!(k3.bits_per_value(), 2.875);
        for bad in [
            "logquant:center=x",
            "logquant:k=q3_0",
            "logquant:D=5:center",
            "kivi:W=3:center=k",
            "logquant:keys=row",
            "logquant:k=q4_0:keys=channel",
        ] {
            assert!(KvConfig::parse(bad).is_err(), "{bad}");
        }
        // single-tier caches are never centered
        assert_eq!(
            KvConfig::parse("q4_0").unwrap().with_centering(Centering { k: true, v: true }).center,
            Centering::NONE
        );
    }

    #[test]
    fn bits_per_value_matches_block_sizes() {
        assert_eq!(KvConfig::F16.bits_per_value(), 16.0);
        assert_eq!(KvConfig::parse("q8_0").unwrap().bits_per_value(), 8.5);
        assert_eq!(KvConfig::parse("q4_0").unwrap().bits_per_value(), 4.5);
    }
}
