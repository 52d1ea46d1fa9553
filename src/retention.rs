//! Which tokens of a sequence stay at full precision: the retention policies of
//! SPEC.md section 2. Every other token is stored only at 2 bits.
//!
//! The policy lives here, in Rust, one [`Retention`] per sequence; the C side owns
//! storage, masks and kernels. A position that has left full precision never comes
//! back (its f16 copy is gone), which every policy here respects.
//!
//! Measured property of LogQuant's rule as SPEC.md gives it: each demotion halves
//! the older sparse set, so the density of kept tokens falls off with distance
//! (W = 16 after 20000 steps: 16, 12 and 3 kept in the octaves of distance
//! [16,32), [32,64), [64,128), then only position 0). See tests/retention.rs.
//!
//! [`crate::session::Session`] runs them: after every decode it advances each
//! sequence's [`Retention`] and pushes the set into the cache (include/logquant.h).

use std::fmt;

pub type Pos = u32;

/// A retention policy, with its parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Log-distributed: `W` recent tokens and up to `2W` older ones, thinned
    /// geometrically (SPEC.md section 2). Dense budget `D = 3W`.
    LogQuant { window: u32 },
    /// The most recent `recent` tokens (KIVI's residual window). `D = recent`.
    Kivi { recent: u32 },
    /// Positions 0..`sinks` plus the most recent `window` tokens (StreamingLLM's
    /// attention sinks). `D = sinks + window`.
    Streaming { sinks: u32, window: u32 },
    /// The newest `W` tokens, and older ones at the same count in every octave of
    /// distance: a kept position at distance `d >= W` is a multiple of
    /// `2^(floor(log2(d / W)) + shift)`, with `shift` the smallest (never decreasing)
    /// that keeps at most `2W` older tokens. About `W / 2^shift` per octave, so the
    /// density holds one count per octave where `LogQuant`'s halving falls faster.
    /// Dense budget `D = 3W`.
    Octaves { window: u32 },
    /// No full-precision token: everything at 2 bits. `D = 0`.
    Q2,
}

/// Attention sinks of the `streaming` baseline.
pub const STREAMING_SINKS: u32 = 4;

impl Policy {
    /// The policy of this kind with `d` full-precision tokens (SPEC.md's table).
    /// LogQuant's window is `d / 3` rounded down, so it keeps up to `3 * (d / 3)`:
    /// at D = 128 that is 126, two fewer than kivi and streaming.
    pub fn logquant(d: u32) -> Policy {
        Policy::LogQuant { window: d / 3 }
    }
    pub fn octaves(d: u32) -> Policy {
        Policy::Octaves { window: d / 3 }
    }
    pub fn kivi(d: u32) -> Policy {
        Policy::Kivi { recent: d }
    }
    pub fn streaming(d: u32) -> Policy {
        Policy::Streaming { sinks: STREAMING_SINKS.min(d), window: d.saturating_sub(STREAMING_SINKS) }
    }

    /// The most tokens this policy keeps at full precision at any time.
    pub fn dense_budget(&self) -> u32 {
        match *self {
            Policy::LogQuant { window } | Policy::Octaves { window } => 3 * window,
            Policy::Kivi { recent } => recent,
            Policy::Streaming { sinks, window } => sinks + window,
            Policy::Q2 => 0,
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::LogQuant { window } => write!(f, "logquant:W={window}"),
            Policy::Octaves { window } => write!(f, "octaves:W={window}"),
            Policy::Kivi { recent } => write!(f, "kivi:D={recent}"),
            Policy::Streaming { sinks, window } => write!(f, "streaming:D={}", sinks + window),
            Policy::Q2 => write!(f, "q2"),
        }
    }
}

/// The full-precision set of one sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    policy: Policy,
    /// Positions seen so far (the next one is `len`): positions are 0, 1, 2, ...
    len: Pos,
    /// LogQuant's two lists; for the window policies `recent` holds what they keep.
    recent: Vec<Pos>,
    sparse: Vec<Pos>,
    /// Positions demoted by the cache that the policy would keep again after a
    /// rollback ([`Retention::truncate`]): their f16 copy is gone. Ascending.
    lost: Vec<Pos>,
    /// `Octaves`: the stride exponent's offset (see [`Policy::Octaves`]).
    shift: u32,
}

impl Retention {
    pub fn new(policy: Policy) -> Retention {
        Retention { policy, len: 0, recent: Vec::new(), sparse: Vec::new(), lost: Vec::new(), shift: 0 }
    }

    /// Rolls the sequence back to its first `len` tokens (the cache removed the rest).
    /// `cache_kept` (ascending) is what the cache still holds at full precision: a
    /// position the policy would keep but the cache demoted meanwhile stays 2-bit.
    pub fn truncate(&mut self, len: Pos, cache_kept: &[Pos]) {
        if len >= self.len {
            return;
        }
        if len == 0 {
            // Nothing left: a new sequence (the octaves' shift starts again too).
            *self = Retention::new(self.policy);
            return;
        }
        self.len = len;
        self.recent.retain(|&p| p < len);
        self.sparse.retain(|&p| p < len);
        match self.policy {
            Policy::LogQuant { .. } => {}
            Policy::Octaves { window } => {
                // The newest W again (those demoted meanwhile are `lost` below).
                self.recent = (len.saturating_sub(window)..len).collect();
                let first = self.recent.first().copied().unwrap_or(len);
                self.sparse.retain(|&p| p < first);
            }
            _ => self.window_update(),
        }
        self.lost.retain(|&p| p < len);
        let wanted = self.full_precision();
        self.lost.extend(wanted.into_iter().filter(|p| cache_kept.binary_search(p).is_err()));
        self.lost.sort_unstable();
        self.lost.dedup();
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Tokens seen (the next position).
    pub fn len(&self) -> Pos {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Decodes one token (the next position), applying the step-by-step rule.
    pub fn decode(&mut self) {
        let p = self.len;
        self.len += 1;
        match self.policy {
            // W = 0 keeps nothing: the same as q2.
            Policy::LogQuant { window: 0 } => {}
            Policy::LogQuant { window } => {
                let w = window as usize;
                self.recent.push(p);
                if self.recent.len() > 2 * w {
                    let moved: Vec<Pos> = self.recent.drain(..w).collect();
                    if self.sparse.is_empty() {
                        self.sparse = moved;
                    } else {
                        let merged: Vec<Pos> = self.sparse.iter().chain(&moved).copied().collect();
                        self.sparse = merged.into_iter().step_by(2).collect();
                    }
                }
            }
            Policy::Octaves { window: 0 } => {}
            Policy::Octaves { window } => self.octaves_decode(p, window),
            Policy::Kivi { .. } | Policy::Streaming { .. } | Policy::Q2 => self.window_update(),
        }
    }

    /// `Octaves`: `p` joins the newest W; the token that leaves them stays if its
    /// position fits its stride; every older kept token is checked against its
    /// (grown) stride, and the shift rises until at most 2W remain. A stride only
    /// grows (distance and shift never fall), and a multiple of a larger power of two
    /// is a multiple of every smaller one, so a dropped position is never wanted again.
    fn octaves_decode(&mut self, p: Pos, window: u32) {
        self.recent.push(p);
        if self.recent.len() > window as usize {
            let left = self.recent.remove(0);
            self.sparse.push(left);
        }
        let newest = self.len - 1;
        loop {
            let shift = self.shift;
            self.sparse.retain(|&q| {
                let octave = ((newest - q) / window).max(1).ilog2();
                u64::from(q) % (1u64 << (octave + shift).min(63)) == 0
            });
            if self.sparse.len() <= 2 * window as usize {
                break;
            }
            self.shift += 1;
        }
    }

    /// Prefills `n` tokens at once from an empty sequence. LogQuant uses the
    /// reference's prefill rule (SPEC.md section 2), which keeps fewer tokens than
    /// decoding one by one would from N = 3W on; the window policies have no such
    /// difference. On a non-empty sequence this decodes the tokens one by one.
    pub fn prefill(&mut self, n: u32) {
        if let Policy::Octaves { .. } = self.policy {
            for _ in 0..n {
                self.decode();
            }
            return;
        }
        let Policy::LogQuant { window } = self.policy else {
            self.len += n;
            self.window_update();
            return;
        };
        if window == 0 {
            self.len += n;
            return;
        }
        if self.len > 0 {
            for _ in 0..n {
                self.decode();
            }
            return;
        }
        let (w, n_us) = (window as usize, n as usize);
        let mut tmp: Vec<Pos> = (0..n).collect();
        let mut sparse: Vec<Pos> = Vec::new();
        while tmp.len() >= 3 * w {
            sparse = tmp[..2 * w].iter().copied().step_by(2).collect();
            tmp = sparse.iter().chain(&tmp[2 * w..]).copied().collect();
        }
        let mut recent: Vec<Pos> = tmp.iter().copied().filter(|p| !sparse.contains(p)).collect();
        if w < n_us && n_us < 3 * w {
            sparse = tmp[..w].to_vec();
            recent = tmp[w..].to_vec();
        }
        self.len = n;
        self.sparse = sparse;
        self.recent = recent;
    }

    /// The window policies: recompute what they keep from `len`.
    fn window_update(&mut self) {
        let len = self.len;
        let (sinks, window) = match self.policy {
            Policy::Kivi { recent } => (0, recent),
            Policy::Streaming { sinks, window } => (sinks, window),
            Policy::Q2 => (0, 0),
            Policy::LogQuant { .. } | Policy::Octaves { .. } => unreachable!("these have their own rules"),
        };
        let start = len.saturating_sub(window).max(sinks.min(len));
        self.sparse = (0..sinks.min(len)).collect();
        self.recent = (start..len).collect();
    }

    /// Full-precision positions, ascending.
    pub fn full_precision(&self) -> Vec<Pos> {
        let mut all: Vec<Pos> = self.sparse.iter().chain(&self.recent).copied().collect();
        all.sort_unstable();
        all.dedup();
        if !self.lost.is_empty() {
            all.retain(|p| self.lost.binary_search(p).is_err());
        }
        all
    }

    /// How many tokens are at full precision.
    pub fn n_full_precision(&self) -> usize {
        self.full_precision().len()
    }

    /// LogQuant's recent list (for the window policies: what they keep of the tail).
    pub fn recent(&self) -> &[Pos] {
        &self.recent
    }

    /// LogQuant's sparse list (for streaming: the sinks).
    pub fn sparse(&self) -> &[Pos] {
        &self.sparse
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logquant_decode_follows_the_rule_by_hand() {
        // W = 2: recent grows to 5 (> 2W = 4), then the oldest 2 move to sparse.
        let mut r = Retention::new(Policy::LogQuant { window: 2 });
        for _ in 0..5 {
            r.decode();
        }
        assert_eq!((r.sparse(), r.recent()), (&[0, 1][..], &[2, 3, 4][..]));
        r.decode();
        r.decode(); // recent [2,3,4,5,6] -> moved [2,3]; sparse = every other of [0,1,2,3]
        assert_eq!((r.sparse(), r.recent()), (&[0, 2][..], &[4, 5, 6][..]));
    }

    #[test]
    fn logquant_prefill_follows_the_reference_rule() {
        // N = 3W keeps 2W (the documented difference from decoding).
        let mut r = Retention::new(Policy::LogQuant { window: 4 });
        r.prefill(12);
        assert_eq!(r.sparse(), &[0, 2, 4, 6]);
        assert_eq!(r.recent(), &[8, 9, 10, 11]);
        let mut r = Retention::new(Policy::LogQuant { window: 4 });
        r.prefill(7); // W < N < 3W: everything, split W / rest
        assert_eq!(r.sparse(), &[0, 1, 2, 3]);
        assert_eq!(r.recent(), &[4, 5, 6]);
    }

    #[test]
    fn baselines_keep_what_they_say() {
        let mut k = Retention::new(Policy::kivi(8));
        k.prefill(20);
        assert_eq!(k.full_precision(), (12..20).collect::<Vec<_>>());
        let mut s = Retention::new(Policy::streaming(8));
        s.prefill(20);
        assert_eq!(s.full_precision(), vec![0, 1, 2, 3, 16, 17, 18, 19]);
        let mut q = Retention::new(Policy::Q2);
        q.prefill(20);
        assert!(q.full_precision().is_empty());
        assert_eq!(Policy::logquant(384), Policy::LogQuant { window: 128 });
        assert_eq!(Policy::logquant(384).to_string(), "logquant:W=128");
    }
}
