//! Speed and memory of KV caches, side by side in one run (SPEC.md section 6).
//!
//! For each cache configuration and depth, one context holds as many sequences as the
//! largest batch asked for (one KV stream each, `kv_unified = false`). Sequence 0 is
//! filled to the depth once and copied into the others; each timed repetition then
//! decodes `gen` steps (one token for each of `B` sequences per step) and removes those
//! tokens again, so repetitions do not refill the context. The untimed warm-up decode
//! also performs the pending stream copies. Prefill is timed separately from empty.

use std::time::Instant;

use crate::engine::{ContextConfig, EngineError, LoadedModel};
use crate::kvconfig::KvConfig;
use crate::llama::{Batch, Token};
use crate::progress::Progress;
use crate::session::Session;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub configs: Vec<KvConfig>,
    pub depths: Vec<usize>,
    pub batches: Vec<usize>,
    /// Decode steps per repetition.
    pub gen: usize,
    /// Tokens of the prefill measurement.
    pub prefill: usize,
    /// Sequences of the second prefill measurement (fed together, as a server feeds
    /// prompts); 1: none.
    pub prefill_seqs: usize,
    /// Timed repetitions (after one untimed warm-up).
    pub reps: usize,
    pub context: ContextConfig,
}

/// Median, minimum and maximum of repeated measurements.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    pub fn of(values: &[f64]) -> Stat {
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let median = if v.is_empty() {
            f64::NAN
        } else if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        Stat { median, min: *v.first().unwrap_or(&f64::NAN), max: *v.last().unwrap_or(&f64::NAN) }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchRow {
    pub config: String,
    pub depth: usize,
    pub batch: usize,
    /// Prompt processing, tokens per second.
    pub prefill_tps: Stat,
    /// Prompt processing of `prefill_seqs` sequences at once, tokens per second summed
    /// over them (None without that measurement).
    pub prefill_seqs_tps: Option<Stat>,
    /// Decode, tokens per second summed over the batch.
    pub decode_tps: Stat,
    /// Decode, tokens per second of one sequence.
    pub decode_tps_per_seq: Stat,
    /// Milliseconds per decode step (one token for each sequence).
    pub ms_per_step: Stat,
    /// The KV cache llama.cpp allocated for this context, all sequences.
    pub kv_bytes: usize,
    /// Context cells (tokens) that allocation holds, all sequences.
    pub kv_cells: usize,
    pub bits_per_value: f64,
}

impl BenchRow {
    pub fn kv_bytes_per_token(&self) -> f64 {
        self.kv_bytes as f64 / self.kv_cells.max(1) as f64
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub machine: String,
    pub build: String,
    pub model: String,
    pub threads: i32,
    pub gen: usize,
    pub prefill: usize,
    pub reps: usize,
    pub rows: Vec<BenchRow>,
}

/// Deterministic token ids spread over the vocabulary: speed does not depend on them.
fn filler_tokens(n: usize, n_vocab: usize, seed: u64) -> Vec<Token> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Stay clear of the first ids, where vocabularies keep control tokens.
            let skip = if n_vocab > 32 { 16 } else { 0 };
            (skip + x % (n_vocab as u64 - skip).max(1)) as Token
        })
        .collect()
}

/// Feeds `tokens` to sequence `seq` from position `start`, `n_batch` at a time.
fn fill(ctx: &mut Session, batch: &mut Batch, tokens: &[Token], seq: i32, start: usize) -> Result<(), EngineError> {
    let n_batch = batch.capacity();
    for (c, chunk) in tokens.chunks(n_batch).enumerate() {
        batch.clear();
        for (j, &t) in chunk.iter().enumerate() {
            let pos = start + c * n_batch + j;
            batch.add(t, pos as i32, seq, pos + 1 == start + tokens.len())?;
        }
        ctx.decode(batch)?;
    }
    Ok(())
}

/// Prefill of sequences 0..n, each `tokens` from empty, fed together as the server
/// feeds prompts: calls of at most n_batch tokens (llama.cpp splits them into
/// micro-batches), each sequence a chunk of at most the context's tokens per sequence
/// per call (the two-tier cache's chunk; a stock cache takes a whole prompt). Tokens
/// per second over all of them, per timed repetition (after a warm-up); leaves the
/// context empty.
fn prefill_together(ctx: &mut Session, tokens: &[Token], n: usize, reps: usize) -> Result<Vec<f64>, EngineError> {
    let call = ctx.n_batch() as usize;
    let chunk = ctx.max_tokens_per_sequence().min(call);
    let mut batch = Batch::new(call)?;
    let mut rates = Vec::new();
    for rep in 0..=reps {
        ctx.clear();
        let mut fed = vec![0usize; n];
        let t = Instant::now();
        while fed.iter().any(|&f| f < tokens.len()) {
            batch.clear();
            for (s, f) in fed.iter_mut().enumerate() {
                let take = (tokens.len() - *f).min(chunk);
                if take == 0 || batch.len() + take > call {
                    continue;
                }
                for pos in *f..*f + take {
                    batch.add(tokens[pos], pos as i32, s as i32, pos + 1 == tokens.len())?;
                }
                *f += take;
            }
            ctx.decode(&batch)?;
        }
        ctx.synchronize();
        if rep > 0 {
            rates.push((tokens.len() * n) as f64 / t.elapsed().as_secs_f64());
        }
    }
    ctx.clear();
    Ok(rates)
}

pub fn run(model: &LoadedModel, opts: &BenchOptions, progress: &mut Progress) -> Result<Vec<BenchRow>, EngineError> {
    if opts.configs.is_empty() || opts.depths.is_empty() || opts.batches.is_empty() {
        return Err(EngineError::Input("give at least one --kv, --depth and --batch".into()));
    }
    if opts.gen == 0 || opts.reps == 0 || opts.prefill_seqs == 0 || opts.batches.contains(&0) {
        return Err(EngineError::Input("--gen, --reps, --prefill-seqs and every --batch must be at least 1".into()));
    }
    // refused configurations fail before any is measured
    let on_gpu = model.cache_gpu_free().is_some();
    for &kv in &opts.configs {
        crate::engine::check_lq2_placement(kv, on_gpu)?;
    }
    let n_vocab = model.model.n_vocab();
    let max_batch = *opts.batches.iter().max().unwrap();
    let mut rows = Vec::new();
    for &kv in &opts.configs {
        for &depth in &opts.depths {
            progress.set_label(format!("bench {kv} depth {depth}"));
            let per_seq = depth + opts.gen + 1;
            let trained = model.info.n_ctx_train as usize;
            if depth == 0 || (trained > 0 && per_seq > trained) {
                return Err(EngineError::Input(format!(
                    "--depth {depth} + {} generated tokens must be positive and within the model's {trained}-token context",
                    opts.gen
                )));
            }
            let mut cfg = opts.context.clone();
            cfg.kv = kv;
            let n_seq = max_batch.max(opts.prefill_seqs);
            cfg.n_seq = n_seq as u32;
            if opts.prefill_seqs > 1 {
                // as the server: a two-tier call may carry a chunk of several sequences
                cfg.two_tier_batch = cfg.n_batch;
            }
            cfg.n_ctx = u32::try_from(per_seq * n_seq)
                .map_err(|_| EngineError::Input(format!("{n_seq} sequences of {per_seq} tokens are too many cells")))?;
            let mut ctx = model.new_context(&cfg)?;
            let kv_bytes = ctx.memory().kv_bytes();
            let overlay_bytes = ctx.overlay().map_or(0, |o| o.bytes);
            let kv_cells = ctx.n_ctx() as usize;
            let mut batch = Batch::new(ctx.max_tokens_per_sequence())?;

            // Prefill speed, from an empty sequence 0.
            let prefill_tokens = filler_tokens(opts.prefill.min(depth.max(1)), n_vocab, 1);
            let mut prefill = Vec::new();
            for rep in 0..=opts.reps {
                ctx.remove(0, 0, -1)?;
                let t = Instant::now();
                fill(&mut ctx, &mut batch, &prefill_tokens, 0, 0)?;
                ctx.synchronize();
                let secs = t.elapsed().as_secs_f64();
                if rep > 0 {
                    prefill.push(prefill_tokens.len() as f64 / secs);
                }
            }
            ctx.clear();
            let prefill_seqs = if opts.prefill_seqs > 1 {
                Some(Stat::of(&prefill_together(&mut ctx, &prefill_tokens, opts.prefill_seqs, opts.reps)?))
            } else {
                None
            };

            // Fill sequence 0 to the depth and copy it into the others (the copy moves
            // the cache data at the next decode; speed does not depend on the tokens).
            fill(&mut ctx, &mut batch, &filler_tokens(depth, n_vocab, 100), 0, 0)?;
            for s in 1..max_batch {
                ctx.copy_sequence(0, s as i32)?;
            }

            for &b in &opts.batches {
                let mut step_batch = Batch::new(b)?;
                let mut ms_per_step = Vec::new();
                let mut tps = Vec::new();
                for rep in 0..=opts.reps {
                    let steps = if rep == 0 { opts.gen.min(4) } else { opts.gen };
                    let toks = filler_tokens(steps * b, n_vocab, 1000 + rep as u64);
                    let t = Instant::now();
                    for i in 0..steps {
                        step_batch.clear();
                        for s in 0..b {
                            step_batch.add(toks[i * b + s], (depth + i) as i32, s as i32, true)?;
                        }
                        ctx.decode(&step_batch)?;
                    }
                    ctx.synchronize();
                    let secs = t.elapsed().as_secs_f64();
                    for s in 0..b {
                        ctx.remove(s as i32, depth as i32, -1)?;
                    }
                    if rep > 0 {
                        ms_per_step.push(1e3 * secs / steps as f64);
                        tps.push((steps * b) as f64 / secs);
                    }
                }
                let per_seq: Vec<f64> = tps.iter().map(|t| t / b as f64).collect();
                rows.push(BenchRow {
                    config: kv.to_string(),
                    depth,
                    batch: b,
                    prefill_tps: Stat::of(&prefill),
                    prefill_seqs_tps: prefill_seqs,
                    decode_tps: Stat::of(&tps),
                    decode_tps_per_seq: Stat::of(&per_seq),
                    ms_per_step: Stat::of(&ms_per_step),
                    kv_bytes,
                    kv_cells,
                    bits_per_value: kv.allocated_bits_per_value(kv_bytes as u64, overlay_bytes as u64),
                });
                progress.advance(1);
            }
        }
    }
    progress.finish();
    Ok(rows)
}

/// The CPU (see cpu_description) and, when layers are offloaded, the GPUs.
pub fn machine_description(gpu_layers: i32) -> String {
    let gpus = if gpu_layers != 0 { crate::llama::gpu_devices() } else { Vec::new() };
    if gpus.is_empty() {
        cpu_description()
    } else {
        format!("{}; CPU {}", gpus.join(", "), cpu_description())
    }
}

/// "model name" of the first CPU and the core count, e.g. "Intel Xeon ..., 2 cores".
pub fn cpu_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("{cpu}, {cores} cores, {} {}", std::env::consts::OS, std::env::consts::ARCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_median_min_max() {
        let s = Stat::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Stat::of(&[1.0, 2.0, 3.0, 10.0]).median, 2.5);
    }

    #[test]
    fn filler_tokens_stay_in_vocabulary_and_repeat() {
        let a = filler_tokens(1000, 300, 7);
        assert!(a.iter().all(|&t| (16..300).contains(&t)));
        assert_eq!(a, filler_tokens(1000, 300, 7));
        assert_ne!(a, filler_tokens(1000, 300, 8));
    }
}
