//! A context as the commands use it: llama.cpp's context plus, for the two-tier
//! configurations (`logquant`, `kivi`, `streaming`), one [`Retention`] per sequence.
//!
//! After every successful decode, each new token advances its sequence's policy
//! (the step-by-step rule, also for a prompt: see below) and the resulting
//! full-precision set is pushed into the cache (include/logquant.h), which demotes
//! every other token. The cache gives every written token an overlay slot, and the
//! engine sizes the overlay as the budget plus one micro-batch, with one decode call
//! per micro-batch, so the newest tokens are always there when the policy runs.
//!
//! Prompts are fed through the same step-by-step rule in micro-batches, not the
//! reference's one-shot prefill rule (SPEC.md section 2): the cache cannot hold a
//! whole prompt at f16 to pick from afterwards, and step-by-step keeps more tokens
//! (3W versus 2W at N = 3W). `Retention::prefill` stays available and tested.

use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use crate::llama::{Batch, CacheLayers, Context, LlamaError, OverlayStats};
use crate::retention::{Policy, Pos, Retention};

pub struct Session<'m> {
    ctx: Context<'m>,
    /// Per sequence; None for a single-tier cache.
    retention: Option<Vec<Retention>>,
    /// The most tokens of one sequence per decode call.
    max_per_seq: u32,
    /// Sliding-window layers keep each sequence's newest D tokens (KvConfig::swa_recent).
    swa_recent: bool,
    /// Wall time in [`Session::decode`]'s two parts, summed over its calls.
    times: DecodeTimes,
    /// Per sequence: the positions last pushed into the cache as its full-precision set
    /// (None: push at the next decode). A decode that only appends its new tokens to that
    /// set demotes nothing, and its push is skipped (see `apply_policy`).
    pushed: Vec<Option<Vec<i32>>>,
    /// No push is skipped: keys by channel (the cache codes complete groups at every
    /// push) and swa=recent (the sliding-window layers' newest D change at every step).
    push_every_call: bool,
}

/// Where [`Session::decode`]'s wall time goes, summed over calls: llama.cpp's
/// `llama_decode` until the backend has finished the batch (on a GPU it returns
/// earlier; the wait is counted here, not in whatever next reads the results), and the
/// retention policy pushed into the cache after it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeTimes {
    pub llama_decode: Duration,
    pub policy: Duration,
}

impl<'m> Session<'m> {
    /// A single-tier context: llama.cpp's cache types, or q2.
    pub fn plain(ctx: Context<'m>) -> Session<'m> {
        let max_per_seq = ctx.n_batch();
        Session {
            ctx,
            retention: None,
            max_per_seq,
            swa_recent: false,
            times: DecodeTimes::default(),
            pushed: Vec::new(),
            push_every_call: false,
        }
    }

    /// A context whose overlay is already enabled, run by `policy` on each sequence,
    /// taking at most `max_per_seq` tokens of one sequence per decode call (the overlay
    /// holds the budget plus that many).
    /// With `swa_recent`, the cache of sliding-window layers keeps the newest D tokens
    /// of each sequence instead (where the model has such layers). `keys_by_channel`: the
    /// cache holds keys by channel (KvConfig::keys_by_channel).
    pub fn two_tier(
        ctx: Context<'m>,
        policy: Policy,
        max_per_seq: u32,
        swa_recent: bool,
        keys_by_channel: bool,
    ) -> Session<'m> {
        let n = ctx.n_seq_max() as usize;
        Session {
            ctx,
            retention: Some(vec![Retention::new(policy); n]),
            max_per_seq,
            swa_recent,
            times: DecodeTimes::default(),
            pushed: vec![None; n],
            push_every_call: keys_by_channel || swa_recent,
        }
    }

    /// The most tokens of one sequence a decode call may carry: feed prompts in chunks
    /// of this many.
    pub fn max_tokens_per_sequence(&self) -> usize {
        self.max_per_seq as usize
    }

    /// The policy state of `seq` (None for a single-tier cache or an unknown sequence).
    pub fn retention(&self, seq: i32) -> Option<&Retention> {
        self.retention.as_ref()?.get(usize::try_from(seq).ok()?)
    }

    /// The key of `seq`'s token at `pos` in `layer`, from the store or the overlay
    /// (Context::read_key).
    pub fn read_key(&mut self, seq: i32, layer: i32, pos: i32, from_store: bool) -> Result<Vec<f32>, LlamaError> {
        self.ctx.read_key(seq, layer, pos, from_store)
    }

    /// The overlay's state (None for a single-tier cache).
    pub fn overlay(&self) -> Option<OverlayStats> {
        self.ctx.overlay_stats()
    }

    /// Decodes `batch`, then runs the policy of every sequence it extends.
    pub fn decode(&mut self, batch: &Batch) -> Result<(), LlamaError> {
        if let Some(ret) = &self.retention {
            // Check before decoding, so that a refused batch leaves both sides unchanged.
            let start: Vec<Pos> = ret.iter().map(|r| r.len()).collect();
            let mut next = start.clone();
            for i in 0..batch.len() {
                let (seq, pos) = (batch.seq_of(i), batch.pos_of(i));
                let expect = usize::try_from(seq).ok().and_then(|s| next.get_mut(s));
                match expect {
                    Some(e) if pos >= 0 && pos as Pos == *e => *e += 1,
                    Some(e) => {
                        return Err(LlamaError::InvalidArgument(format!(
                            "sequence {seq} continues at position {e}, not {pos} (the two-tier cache tracks each sequence from 0 without gaps)"
                        )))
                    }
                    None => return Err(LlamaError::InvalidArgument(format!("sequence {seq} is not in this context"))),
                }
            }
            if let Some(s) = (0..next.len()).find(|&s| next[s] - start[s] > self.max_per_seq) {
                return Err(LlamaError::InvalidArgument(format!(
                    "{} tokens of sequence {s} in one decode; the two-tier cache takes at most {} per sequence and call",
                    next[s] - start[s],
                    self.max_per_seq
                )));
            }
        }
        let t = Instant::now();
        let decoded = self.ctx.decode(batch);
        // Logits and the policy's cache writes wait for the backend anyway: waiting
        // here costs nothing and puts the GPU's time where it belongs.
        self.ctx.synchronize();
        self.times.llama_decode += t.elapsed();
        let applied = decoded.and_then(|()| {
            let t = Instant::now();
            let applied = self.apply_policy(batch);
            self.times.policy += t.elapsed();
            applied
        });
        if applied.is_err() {
            // what the cache holds of the batch's sequences is not known: push them next
            for i in 0..batch.len() {
                self.forget_pushed(batch.seq_of(i));
            }
        }
        applied
    }

    /// The next decode of `seq` pushes its set whatever it holds.
    fn forget_pushed(&mut self, seq: i32) {
        if let Some(p) = usize::try_from(seq).ok().and_then(|s| self.pushed.get_mut(s)) {
            *p = None;
        }
    }

    /// Wall time spent in [`Session::decode`] so far, by part.
    pub fn decode_times(&self) -> DecodeTimes {
        self.times
    }

    /// Advances the policy of every sequence `batch` extended and pushes the result
    /// into the cache.
    fn apply_policy(&mut self, batch: &Batch) -> Result<(), LlamaError> {
        let Some(ret) = &mut self.retention else {
            return Ok(());
        };
        // Each touched sequence's length before this decode.
        let mut before: Vec<Option<Pos>> = vec![None; ret.len()];
        for i in 0..batch.len() {
            let seq = batch.seq_of(i) as usize;
            before[seq].get_or_insert(ret[seq].len());
            ret[seq].decode();
        }
        for (seq, r) in ret.iter().enumerate() {
            let Some(from) = before[seq] else { continue };
            let kept: Vec<i32> = r.full_precision().into_iter().map(|p| p as i32).collect();
            // The cache frees the slots of every token not listed: when the list is the
            // last one pushed plus all of this decode's tokens, there is nothing to free
            // (most steps of a LogQuant sequence). Not skipped: a sequence shorter than
            // LOGQUANT_CENTER_TOKENS before this decode (a centering cache freezes its
            // offsets in the push that reaches them; kept simple: with or without
            // centering), keys by channel and swa=recent (`push_every_call`).
            let unchanged = !self.push_every_call
                && from >= crate::llama::CENTER_TOKENS as Pos
                && self.pushed[seq].take().is_some_and(|prev| {
                    kept.len() == prev.len() + (r.len() - from) as usize
                        && kept.starts_with(&prev)
                        && kept[prev.len()..].iter().zip(from..).all(|(&k, p)| k as Pos == p)
                });
            if unchanged {
                self.pushed[seq] = Some(kept);
                continue;
            }
            if self.swa_recent {
                // A layer that sees only a window of recent tokens gains nothing from
                // older ones: there the same slots hold the newest D.
                self.ctx.set_full_precision_in(seq as i32, &kept, CacheLayers::Global)?;
                let d = r.policy().dense_budget();
                let newest: Vec<i32> = (r.len().saturating_sub(d)..r.len()).map(|p| p as i32).collect();
                self.ctx.set_full_precision_in(seq as i32, &newest, CacheLayers::SlidingWindow)?;
            } else {
                self.ctx.set_full_precision(seq as i32, &kept)?;
            }
            self.pushed[seq] = Some(kept);
        }
        Ok(())
    }

    /// Removes positions [p0, p1) of `seq` (p1 < 0: to the end). The two-tier cache
    /// supports removing a tail (a rollback), not a middle.
    pub fn remove(&mut self, seq: i32, p0: i32, p1: i32) -> Result<bool, LlamaError> {
        let Some(ret) = &self.retention else {
            return self.ctx.remove(seq, p0, p1);
        };
        let r = usize::try_from(seq)
            .ok()
            .and_then(|s| ret.get(s))
            .ok_or_else(|| LlamaError::InvalidArgument(format!("sequence {seq} is not in this context")))?;
        let p0 = p0.max(0);
        if p1 >= 0 && (p1 as Pos) < r.len() {
            return Err(LlamaError::InvalidArgument(
                "the two-tier cache can remove the tail of a sequence, not positions in its middle".into(),
            ));
        }
        self.forget_pushed(seq);
        let removed = self.ctx.remove(seq, p0, -1)?;
        let kept: Vec<Pos> = self.ctx.full_precision(seq)?.into_iter().map(|p| p as Pos).collect();
        if let Some(ret) = &mut self.retention {
            ret[seq as usize].truncate(p0 as Pos, &kept);
        }
        Ok(removed)
    }

    /// Keeps only `positions` of `seq` in the overlay (Context::set_full_precision), past
    /// the policy: the next decode pushes the policy's set again.
    pub fn set_full_precision(&mut self, seq: i32, positions: &[i32]) -> Result<(), LlamaError> {
        self.forget_pushed(seq);
        self.ctx.set_full_precision(seq, positions)
    }

    /// Copies every token of `src` to `dst`, with its policy state.
    pub fn copy_sequence(&mut self, src: i32, dst: i32) -> Result<(), LlamaError> {
        self.ctx.copy_sequence(src, dst)?;
        if let Some(ret) = &mut self.retention {
            ret[dst as usize] = ret[src as usize].clone();
            self.forget_pushed(dst);
        }
        Ok(())
    }

    /// Forgets every token of every sequence.
    pub fn clear(&mut self) {
        self.ctx.clear();
        if let Some(ret) = &mut self.retention {
            for r in ret.iter_mut() {
                *r = Retention::new(r.policy());
            }
            self.pushed.fill(None);
        }
    }
}

/// Read access (logits, memory, sizes) goes straight to the context.
impl<'m> Deref for Session<'m> {
    type Target = Context<'m>;
    fn deref(&self) -> &Context<'m> {
        &self.ctx
    }
}

/// For the sampler and synchronisation; decoding and removing go through the methods
/// above, which keep the policy in step.
impl<'m> DerefMut for Session<'m> {
    fn deref_mut(&mut self) -> &mut Context<'m> {
        &mut self.ctx
    }
}
