//! Fitting a memory budget: the largest batch at a context size, and the longest
//! context at batch 1, for each cache configuration.
//!
//! Every probe is a real llama.cpp context created on a model loaded with
//! `no_alloc`: llama.cpp sizes the weights, the KV cache and the compute buffers as
//! it would for real and reports them, without allocating. So the figures are
//! llama.cpp's own accounting, not an estimate of ours.

use crate::engine::{ContextConfig, EngineError, LoadedModel};
use crate::gguf::info::LLAMA_MAX_SEQ;
use crate::kvconfig::KvConfig;
use crate::llama::MemoryBreakdown;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Fit {
    /// The value found (batch or context).
    pub value: u64,
    /// True when the search stopped at its upper limit rather than at the budget.
    pub limited_by_search: bool,
    /// Bytes at that value: weights + KV + compute buffers + the logits buffer.
    pub bytes: u64,
    pub memory: MemoryBreakdown,
    /// The KV bytes our own GGUF reader predicts for the same context (a cross-check
    /// of `memory.context_*`, filled in by `plan`).
    pub kv_bytes_reader: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PlanRow {
    pub config: String,
    pub bits_per_value: f64,
    /// Largest batch (sequences of `ctx` tokens each) within the budget; None if even one does not fit.
    pub max_batch: Option<Fit>,
    /// Longest context at batch 1; None if even the smallest does not fit.
    pub max_ctx: Option<Fit>,
}

pub struct PlanOptions {
    pub budget: u64,
    pub ctx: u64,
    pub max_batch_limit: u64,
    pub template: ContextConfig,
}

fn total(m: &MemoryBreakdown) -> u64 {
    m.total() as u64
}

/// llama.cpp's output buffer, which its memory breakdown leaves out: n_vocab floats
/// per output, and decoding a batch outputs one token per sequence (more with a
/// larger prompt batch: llama.cpp grows the buffer then). With sampling in the graph
/// (`ContextConfig::device_greedy`) it also holds, per output, the sampler's logits and
/// probabilities, its candidates and the sampled token: 4 n_vocab + 1 values.
fn output_bytes(model: &LoadedModel, cfg: &ContextConfig, n_seq: u64) -> u64 {
    let per_output = if cfg.device_greedy { 4 * model.info.n_vocab + 1 } else { model.info.n_vocab };
    per_output * 4 * n_seq.max(1)
}

/// Memory llama.cpp would allocate for `n_seq` sequences of `ctx` tokens.
fn probe(
    model: &LoadedModel,
    opts: &PlanOptions,
    kv: KvConfig,
    ctx: u64,
    n_seq: u64,
) -> Result<MemoryBreakdown, EngineError> {
    let mut cfg = opts.template.clone();
    cfg.kv = kv;
    cfg.n_seq = n_seq as u32;
    cfg.n_ctx = u32::try_from(ctx * n_seq)
        .map_err(|_| EngineError::Input(format!("{n_seq} sequences of {ctx} tokens exceed llama.cpp's 2^32 cells")))?;
    let n_ctx = cfg.n_ctx;
    let ctx = model.new_context(&cfg)?;
    let mut m = ctx.memory();
    m.compute_host += output_bytes(model, &cfg, n_seq) as usize;
    // A sizing context allocates no overlay: add what the two-tier cache would.
    m.context_host += model.overlay_bytes(&cfg, n_ctx)? as usize;
    if m.context_device > 0 {
        m.compute_device += model.dense_path_scratch(&cfg, n_ctx) as usize;
    }
    Ok(m)
}

/// Largest x in [1, hi] with fits(x), assuming fits is monotone; None if !fits(1).
fn search(
    hi: u64,
    mut fits: impl FnMut(u64) -> Result<Option<MemoryBreakdown>, EngineError>,
) -> Result<Option<Fit>, EngineError> {
    let Some(m1) = fits(1)? else { return Ok(None) };
    let (mut lo, mut lo_mem) = (1u64, m1);
    if let Some(m) = fits(hi)? {
        return Ok(Some(Fit { value: hi, limited_by_search: true, bytes: total(&m), memory: m, kv_bytes_reader: 0 }));
    }
    let mut hi = hi; // !fits(hi)
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        match fits(mid)? {
            Some(m) => (lo, lo_mem) = (mid, m),
            None => hi = mid,
        }
    }
    Ok(Some(Fit { value: lo, limited_by_search: false, bytes: total(&lo_mem), memory: lo_mem, kv_bytes_reader: 0 }))
}

pub fn plan(model: &LoadedModel, configs: &[KvConfig], opts: &PlanOptions) -> Result<Vec<PlanRow>, EngineError> {
    let trained = model.info.n_ctx_train as u64;
    if opts.ctx == 0 {
        return Err(EngineError::Input("--ctx must be at least 1".into()));
    }
    if opts.ctx > trained && trained > 0 {
        return Err(EngineError::Input(format!(
            "--ctx {} is larger than the model's training context {trained}",
            opts.ctx
        )));
    }
    let weights = model.model.size();
    if weights >= opts.budget {
        return Err(EngineError::Input(format!(
            "the budget ({:.2} GiB) does not even hold the weights ({:.2} GiB)",
            opts.budget as f64 / GIB,
            weights as f64 / GIB
        )));
    }
    let mut rows = Vec::new();
    for &kv in configs {
        let within = |m: MemoryBreakdown| if total(&m) <= opts.budget { Some(m) } else { None };
        // llama.cpp holds at most LLAMA_MAX_SEQ sequences in one context.
        let batch_limit = opts.max_batch_limit.clamp(1, LLAMA_MAX_SEQ as u64);
        let reader = |ctx: u64, n_seq: u64| {
            let mut cfg = opts.template.clone();
            cfg.kv = kv;
            cfg.n_seq = n_seq as u32;
            model.kv_bytes(&cfg, (ctx * n_seq) as u32)
        };
        let mut max_batch = search(batch_limit, |b| Ok(within(probe(model, opts, kv, opts.ctx, b)?)))?;
        if let Some(f) = max_batch.as_mut() {
            f.kv_bytes_reader = reader(opts.ctx, f.value)?;
        }
        // Contexts in steps of 256 cells, llama.cpp's padding (1 for models trained
        // on fewer than 256 tokens).
        let unit = if trained >= 256 { 256 } else { 1 };
        let mut max_ctx = search(trained.max(1) / unit, |c| Ok(within(probe(model, opts, kv, c * unit, 1)?)))?
            .map(|f| Fit { value: f.value * unit, ..f });
        if let Some(f) = max_ctx.as_mut() {
            f.kv_bytes_reader = reader(f.value, 1)?;
        }
        let bits_per_value = {
            let mut cfg = opts.template.clone();
            cfg.kv = kv;
            let n = opts.ctx as u32;
            kv.allocated_bits_per_value(model.kv_bytes(&cfg, n)?, model.overlay_bytes(&cfg, n)?)
        };
        rows.push(PlanRow { config: kv.to_string(), bits_per_value, max_batch, max_ctx });
    }
    Ok(rows)
}

pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Parses "24GiB", "24G", "512MiB", "1.5TB", or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("'{text}' is not a size (e.g. 24GiB, 512MiB)"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => GIB,
        "gb" => 1e9,
        "t" | "tib" => GIB * 1024.0,
        "tb" => 1e12,
        other => {
            return Err(format!("unknown size unit '{other}' in '{text}' (use KiB, MiB, GiB, TiB, or KB, MB, GB, TB)"))
        }
    };
    Ok((value * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("24GiB").unwrap(), 24 * (1 << 30));
        assert_eq!(parse_size("1.5G").unwrap(), 3 * (1 << 29));
        assert_eq!(parse_size("100").unwrap(), 100);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }

    #[test]
    fn search_finds_the_boundary() {
        let m = MemoryBreakdown::default();
        let f = search(1000, |x| Ok(if x <= 37 { Some(m) } else { None })).unwrap().unwrap();
        assert_eq!((f.value, f.limited_by_search), (37, false));
        let f = search(1000, |_| Ok(Some(m))).unwrap().unwrap();
        assert_eq!((f.value, f.limited_by_search), (1000, true));
        assert!(search(1000, |_| Ok(None)).unwrap().is_none());
    }
}
