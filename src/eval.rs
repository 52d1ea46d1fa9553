//! Quality of a KV cache: streaming, teacher-forced evaluation against an f16 cache
//! (SPEC.md section 5).
//!
//! The text is fed `step` tokens per decode call, so the cache fills as it would in
//! generation, with logits for every position. All configurations run in lockstep,
//! one context each, beside the f16 reference: every step's reference distribution is
//! compared exactly, over the full vocabulary, with each configuration's, and nothing
//! has to be stored between steps.

use std::time::Instant;

use crate::engine::{ContextConfig, EngineError, LoadedModel};
use crate::kvconfig::KvConfig;
use crate::llama::{Batch, Token};
use crate::progress::Progress;
use crate::session::Session;

/// The largest step: every position's logits are kept for a step (n_vocab floats each,
/// per configuration), and llama.cpp's micro-batch is the step.
pub const MAX_STEP: usize = 512;

#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Tokens of the text to feed (N).
    pub tokens: usize,
    /// Tokens per decode call (S).
    pub step: usize,
    /// Template for every context (cache types are set per configuration).
    pub context: ContextConfig,
}

/// One configuration's result. Positions scored: N - 1 (each predicts the next token).
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalRow {
    pub config: String,
    pub bits_per_value: f64,
    pub mean_kld: f64,
    pub p99_kld: f64,
    /// Share of positions whose argmax equals the reference's, in percent.
    pub top1_agreement: f64,
    pub perplexity: f64,
    /// Wall time of this configuration's decode calls (KLD arithmetic excluded).
    pub seconds: f64,
    pub positions: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalReport {
    pub tokens: usize,
    pub step: usize,
    pub reference: EvalRow,
    pub rows: Vec<EvalRow>,
}

/// Per-configuration accumulators.
struct Track<'m> {
    config: KvConfig,
    ctx: Session<'m>,
    klds: Vec<f64>,
    top1_hits: usize,
    nll: f64,
    seconds: f64,
}

impl Track<'_> {
    fn row(&self) -> EvalRow {
        let n = self.klds.len();
        EvalRow {
            config: self.config.to_string(),
            // The two-tier cache: every token's 2-bit copy, plus 16 bits for each token
            // at full precision at the end of the text (SPEC.md section 2 accounting).
            bits_per_value: match self.ctx.retention(0) {
                Some(r) => self.config.bits_with_overlay(r.n_full_precision() as f64, r.len() as f64),
                None => self.config.bits_per_value(),
            },
            mean_kld: if n > 0 { self.klds.iter().sum::<f64>() / n as f64 } else { 0.0 },
            p99_kld: quantile(&self.klds, 0.99),
            top1_agreement: if n > 0 { 100.0 * self.top1_hits as f64 / n as f64 } else { 0.0 },
            perplexity: if n > 0 { (self.nll / n as f64).exp() } else { f64::NAN },
            seconds: self.seconds,
            positions: n,
        }
    }
}

/// Tokenizes `text` and checks it is long enough.
pub fn text_tokens(model: &LoadedModel, text: &str, n: usize) -> Result<Vec<Token>, EngineError> {
    let mut tokens = model.model.tokenize(text, true)?;
    if tokens.len() < n {
        return Err(EngineError::Input(format!(
            "the text has {} tokens, fewer than the {n} asked for; use --tokens {} or a longer text",
            tokens.len(),
            tokens.len()
        )));
    }
    tokens.truncate(n);
    Ok(tokens)
}

pub fn evaluate(
    model: &LoadedModel,
    tokens: &[Token],
    configs: &[KvConfig],
    opts: &EvalOptions,
    progress: &mut Progress,
) -> Result<EvalReport, EngineError> {
    let n = tokens.len();
    if n < 2 {
        return Err(EngineError::Input("need at least 2 tokens to score".into()));
    }
    if opts.step == 0 || opts.step > MAX_STEP {
        return Err(EngineError::Input(format!("--step must be within 1..={MAX_STEP}, not {}", opts.step)));
    }
    let chunk = opts.context.two_tier_chunk;
    crate::engine::check_two_tier_chunk(chunk)?;
    if opts.step > chunk as usize && configs.iter().any(|c| c.policy.is_some()) {
        return Err(EngineError::Input(format!(
            "the two-tier cache takes at most {chunk} tokens of a sequence per decode (--lq-chunk); use --step {chunk} or less, or a wider --lq-chunk"
        )));
    }
    let make = |kv: KvConfig| -> Result<Track, EngineError> {
        let mut cfg = opts.context.clone();
        cfg.n_ctx = (n as u32).max(cfg.n_ctx);
        cfg.n_batch = opts.step as u32;
        cfg.n_ubatch = opts.step as u32;
        cfg.n_seq = 1;
        cfg.kv = kv;
        Ok(Track { config: kv, ctx: model.new_context(&cfg)?, klds: Vec::new(), top1_hits: 0, nll: 0.0, seconds: 0.0 })
    };
    // The f16 reference runs once; an f16 in the list is reported from it.
    let mut reference = make(KvConfig::F16)?;
    let mut tracks =
        configs.iter().filter(|&&c| c != KvConfig::F16).map(|&c| make(c)).collect::<Result<Vec<_>, _>>()?;

    let n_vocab = model.model.n_vocab();
    let mut batch = Batch::new(opts.step)?;
    let mut ref_logprobs = vec![0f32; opts.step * n_vocab];
    let mut scratch = vec![0f32; n_vocab];
    progress.set_label(format!("eval ({} configurations + f16 reference)", configs.len()));

    for start in (0..n).step_by(opts.step) {
        let end = (start + opts.step).min(n);
        batch.clear();
        for (pos, &tok) in tokens.iter().enumerate().take(end).skip(start) {
            batch.add(tok, pos as i32, 0, true)?;
        }
        // Rows that have a next token to score.
        let scored = (end - start).min(n - 1 - start);

        let t = Instant::now();
        reference.ctx.decode(&batch)?;
        reference.ctx.synchronize();
        reference.seconds += t.elapsed().as_secs_f64();
        for r in 0..scored {
            let lp = &mut ref_logprobs[r * n_vocab..(r + 1) * n_vocab];
            log_softmax(reference.ctx.logits(r)?, lp);
            let next = tokens[start + r + 1] as usize;
            reference.nll -= lp[next] as f64;
            reference.klds.push(0.0);
            reference.top1_hits += 1;
        }

        for track in &mut tracks {
            let t = Instant::now();
            track.ctx.decode(&batch)?;
            track.ctx.synchronize();
            track.seconds += t.elapsed().as_secs_f64();
            for r in 0..scored {
                let lp_ref = &ref_logprobs[r * n_vocab..(r + 1) * n_vocab];
                log_softmax(track.ctx.logits(r)?, &mut scratch);
                track.klds.push(kl_divergence(lp_ref, &scratch));
                track.top1_hits += (argmax(lp_ref) == argmax(&scratch)) as usize;
                track.nll -= scratch[tokens[start + r + 1] as usize] as f64;
            }
        }
        progress.advance(end - start);
    }
    progress.finish();
    Ok(EvalReport {
        tokens: n,
        step: opts.step,
        reference: reference.row(),
        rows: configs
            .iter()
            .map(|&c| {
                if c == KvConfig::F16 {
                    reference.row()
                } else {
                    tracks.iter().find(|t| t.config == c).unwrap().row()
                }
            })
            .collect(),
    })
}

/// out = log(softmax(logits)), computed in f64 where precision matters.
pub fn log_softmax(logits: &[f32], out: &mut [f32]) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    for (o, &x) in out.iter_mut().zip(logits) {
        *o = (x as f64 - lse) as f32;
    }
}

/// KL(P || Q) from log-probabilities, over the whole vocabulary.
pub fn kl_divergence(lp: &[f32], lq: &[f32]) -> f64 {
    // Terms with p = 0 contribute nothing (and would be 0 * NaN where q = 0 too).
    let kl: f64 = lp
        .iter()
        .zip(lq)
        .filter(|(&a, _)| a > f32::NEG_INFINITY)
        .map(|(&a, &b)| (a as f64).exp() * (a as f64 - b as f64))
        .sum();
    kl.max(0.0)
}

pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// The q-quantile by the nearest-rank method (0 for an empty slice).
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_normalises() {
        let mut out = vec![0f32; 3];
        log_softmax(&[1.0, 2.0, 3.0], &mut out);
        let total: f64 = out.iter().map(|&x| (x as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((out[2] - out[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn kl_is_zero_for_equal_and_positive_otherwise() {
        let mut p = vec![0f32; 4];
        let mut q = vec![0f32; 4];
        log_softmax(&[0.1, 0.5, -1.0, 2.0], &mut p);
        assert_eq!(kl_divergence(&p, &p), 0.0);
        log_softmax(&[0.3, 0.5, -1.0, 1.0], &mut q);
        let kl = kl_divergence(&p, &q);
        // Independent evaluation in plain f64.
        let pe: Vec<f64> = p.iter().map(|&x| (x as f64).exp()).collect();
        let qe: Vec<f64> = q.iter().map(|&x| (x as f64).exp()).collect();
        let expect: f64 = pe.iter().zip(&qe).map(|(a, b)| a * (a / b).ln()).sum();
        assert!(kl > 0.0 && (kl - expect).abs() < 1e-6, "{kl} vs {expect}");
    }

    #[test]
    fn quantile_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(|x| x as f64).collect();
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[5.0], 0.99), 5.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
