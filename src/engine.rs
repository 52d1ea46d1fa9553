//! The validated way into llama.cpp: everything llama.cpp would abort on, or fail on
//! with an unhelpful message, is checked here first, with an error that names the
//! problem and the fix.

use std::path::{Path, PathBuf};

use crate::gguf::{GgufError, GgufFile, KvCacheParams, KvCacheType, ModelInfo};
use crate::kvconfig::{Centering, KvConfig};
use crate::llama::{self, Context, ContextParams, FlashAttn, LlamaError, Model, ModelParams};
use crate::session::Session;

/// The default chunk of a two-tier context: the most tokens of one sequence per decode
/// call ([`ContextConfig::two_tier_chunk`]). Every token written needs an overlay slot
/// until the policy runs after the decode, so the overlay holds the budget plus one
/// chunk: 64 keeps that under 0.5 bits per value at 16384 tokens with the default
/// budget, at little cost to prompt speed on a CPU.
pub const TWO_TIER_CHUNK: u32 = 64;

/// The largest chunk a two-tier context takes (`--lq-chunk`): beyond it the overlay
/// outgrows a 2-bit store of most contexts.
pub const TWO_TIER_CHUNK_MAX: u32 = 2048;

/// The sizes of a two-tier context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TwoTierSizes {
    /// The most tokens of one sequence in one decode call (the policy runs after each):
    /// the micro-batch, within [`ContextConfig::two_tier_chunk`].
    pub per_seq: u32,
    /// Overlay slots per stream: the budget plus `per_seq`.
    pub slots: u32,
    /// llama.cpp's n_batch: `per_seq`, or one token per sequence if more; or, with
    /// [`ContextConfig::two_tier_batch`], up to `per_seq` tokens of every sequence within
    /// it (each stream's overlay still gets at most `per_seq` new tokens per call, and
    /// the policy runs after the call).
    pub n_batch: u32,
    /// llama.cpp's n_ubatch: `n_batch` (one micro-batch per call) unless a call may
    /// carry several sequences' chunks, which llama.cpp then splits into micro-batches
    /// of [`ContextConfig::n_ubatch`] (at least one token of every sequence: a decode
    /// step stays one micro-batch).
    pub n_ubatch: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model file {0} does not exist (fetch the default model with scripts/fetch-model.py, or pass -m PATH)")]
    ModelMissing(PathBuf),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Llama(#[from] LlamaError),
    #[error(
        "a context of {requested} tokens (per sequence) is larger than the {trained} this model was trained for; ask for {trained} or fewer"
    )]
    ContextTooLong { requested: u32, trained: u32 },
    #[error("a quantized V cache ({v}) needs flash attention; drop --flash-attn off, or use --cache-type-v f16")]
    QuantizedVNeedsFlashAttn { v: KvCacheType },
    #[error("the two-tier cache ({kv}) needs flash attention; drop --flash-attn off")]
    TwoTierNeedsFlashAttn { kv: KvConfig },
    #[error(
        "the KV cache needs {need_mib:.0} MiB but only {avail_mib:.0} MiB of {place} is available; lower -c, the batch, or use a smaller cache type (e.g. q4_0)"
    )]
    OutOfMemory { need_mib: f64, avail_mib: f64, place: &'static str },
    #[error("{0}")]
    Input(String),
}

/// A model loaded by llama.cpp, with the shape our own GGUF reader found in it.
pub struct LoadedModel {
    pub path: PathBuf,
    pub params: ModelParams,
    pub info: ModelInfo,
    pub model: Model,
}

/// Validates the file with the project's own GGUF reader, then loads it in llama.cpp.
pub fn load_model(path: &Path, params: &ModelParams) -> Result<LoadedModel, EngineError> {
    if !path.exists() {
        return Err(EngineError::ModelMissing(path.to_path_buf()));
    }
    let info = {
        let file = GgufFile::open(path)?;
        ModelInfo::from_gguf(&file)?
    };
    let model = Model::load(path, params)?;
    Ok(LoadedModel { path: path.to_path_buf(), params: params.clone(), info, model })
}

/// What a context is made of, as the user states it.
#[derive(Clone, Debug)]
pub struct ContextConfig {
    /// 0 = the model's training context.
    pub n_ctx: u32,
    pub n_batch: u32,
    pub n_ubatch: u32,
    pub n_seq: u32,
    pub threads: i32,
    pub kv: KvConfig,
    pub flash_attn: FlashAttn,
    /// Two-tier contexts: the most tokens one decode call may carry over all sequences
    /// (0: `per_seq`, or one per sequence), as a stock cache's n_batch. The server uses
    /// it so that prompts of many sequences prefill together, in micro-batches of
    /// `n_ubatch` as a stock cache's (the compute buffers follow `n_ubatch`, not this).
    pub two_tier_batch: u32,
    /// Two-tier contexts: the most tokens of one sequence per decode call (`--lq-chunk`,
    /// 1..=[`TWO_TIER_CHUNK_MAX`]). Each costs an f16 overlay slot in every sequence's
    /// stream, so a wider chunk prefills in fewer, wider calls in more memory.
    pub two_tier_chunk: u32,
    /// Every sequence starts with greedy sampling in llama.cpp's graph
    /// (`ContextParams::device_greedy`; the server's greedy requests).
    pub device_greedy: bool,
}

impl ContextConfig {
    /// The logical batch llama.cpp gets: what was asked, within the context, and at
    /// least one token per sequence (llama.cpp asserts on fewer).
    pub fn n_batch_for(cfg: &ContextConfig, n_ctx: u32) -> u32 {
        match LoadedModel::two_tier_sizes(cfg) {
            Some(t) => t.n_batch,
            None => cfg.n_batch.min(n_ctx).max(cfg.n_seq),
        }
    }

    /// The micro-batch llama.cpp will use for this configuration.
    pub fn n_ubatch_for(cfg: &ContextConfig) -> u32 {
        match LoadedModel::two_tier_sizes(cfg) {
            Some(t) => t.n_ubatch,
            None => cfg.n_ubatch.min(cfg.n_batch),
        }
    }

    pub fn new(n_ctx: u32) -> ContextConfig {
        ContextConfig {
            n_ctx,
            n_batch: 2048,
            n_ubatch: 512,
            n_seq: 1,
            threads: default_threads(),
            kv: KvConfig::F16,
            flash_attn: FlashAttn::Auto,
            two_tier_batch: 0,
            two_tier_chunk: TWO_TIER_CHUNK,
            device_greedy: false,
        }
    }
}

/// The logical CPUs the process may use, at most 16 (llama.cpp's kernels gain little
/// beyond; on machines with hyper-threading, -t with the physical core count may be faster).
pub fn default_threads() -> i32 {
    std::thread::available_parallelism().map(|n| n.get() as i32).unwrap_or(4).clamp(1, 16)
}

impl LoadedModel {
    /// A quantized cache type needs whole blocks per head: llama.cpp checks that only
    /// with flash attention on, and without it a block straddling two heads silently
    /// mixes them.
    fn check_block_sizes(&self, kv: KvConfig) -> Result<(), EngineError> {
        let i = &self.info;
        let heads = [
            ("K", kv.k, i.head_dim_k),
            ("V", kv.v, i.head_dim_v),
            ("K", kv.k, i.head_dim_k_swa),
            ("V", kv.v, i.head_dim_v_swa),
        ];
        for (what, t, head) in heads {
            let block = t.ggml_type().block_size();
            if head > 0 && u64::from(head) % block != 0 {
                return Err(EngineError::Input(format!(
                    "cache type {t} stores blocks of {block} values, which do not divide this model's {what} head size {head}; use a type with smaller blocks (e.g. f16 or q8_0)"
                )));
            }
        }
        Ok(())
    }

    /// How a two-tier context is sized (None for a single-tier cache).
    pub fn two_tier_sizes(cfg: &ContextConfig) -> Option<TwoTierSizes> {
        let policy = cfg.kv.policy?;
        let per_seq = cfg.n_ubatch.min(cfg.n_batch).clamp(1, cfg.two_tier_chunk.max(1));
        // D = 0 is q2 through the two-tier kernels: no slot, not even for new tokens.
        let budget = policy.dense_budget();
        let one = per_seq.max(cfg.n_seq);
        let n_batch = cfg.two_tier_batch.min(per_seq.saturating_mul(cfg.n_seq)).max(one);
        let n_ubatch = cfg.n_ubatch.max(one).min(n_batch);
        let slots = if budget == 0 { 0 } else { budget + per_seq };
        Some(TwoTierSizes { per_seq, slots, n_batch, n_ubatch })
    }

    /// Bytes of the KV cache this configuration allocates: the store, plus the overlay
    /// of a two-tier cache.
    pub fn kv_bytes(&self, cfg: &ContextConfig, n_ctx: u32) -> Result<u64, GgufError> {
        let n_ubatch = ContextConfig::n_ubatch_for(cfg);
        let store = self.info.kv_bytes(n_ctx, cfg.kv.k, cfg.kv.v, false, cfg.n_seq, n_ubatch)?;
        Ok(store + self.overlay_bytes(cfg, n_ctx)?)
    }

    /// Bytes of a two-tier configuration's f16 overlay (0 for a single-tier cache).
    pub fn overlay_bytes(&self, cfg: &ContextConfig, n_ctx: u32) -> Result<u64, GgufError> {
        let n_ubatch = ContextConfig::n_ubatch_for(cfg);
        let Some(TwoTierSizes { slots, .. }) = LoadedModel::two_tier_sizes(cfg) else {
            return Ok(0);
        };
        let params = KvCacheParams {
            n_ctx,
            n_seq_max: cfg.n_seq,
            n_batch: n_ubatch.max(2048),
            n_ubatch,
            kv_unified: false,
            swa_full: false,
            flash_attn: true,
        };
        self.info.overlay_bytes(&params, slots, cfg.kv.center != Centering::NONE)
    }

    /// GPU memory the two-tier cache's dense path borrows from ggml's CUDA pool
    /// (ggml-cuda/logquant-attn.cu, LQ_DENSE_SCRATCH): with many queries per sequence, and
    /// at every step for an lq3 K store, the store of the micro-batch's sequences is
    /// dequantized to f16 for flash attention, at most 256 MiB at a time but always one
    /// whole sequence (K and V of its widest layer). 0 for a single-tier cache.
    /// llama.cpp's memory breakdown cannot see it, so the memory plan adds it for a cache
    /// on the GPU.
    pub fn dense_path_scratch(&self, cfg: &ContextConfig, n_ctx: u32) -> u64 {
        // logquant-attn.cu's LQ_DENSE_SCRATCH and lq_attn_dense's grouping, mirrored
        const LQ_DENSE_SCRATCH: u64 = 256 << 20;
        if cfg.kv.policy.is_none() {
            return 0;
        }
        let widest = (0..self.info.n_layer as usize)
            .map(|il| self.info.n_embd_k_gqa(il).max(self.info.n_embd_v_gqa(il)))
            .max()
            .unwrap_or(0);
        // a stream's cells, as llama.cpp rounds them (a multiple of 256)
        let per_seq = u64::from(n_ctx / cfg.n_seq.max(1)).next_multiple_of(256);
        let one = 2 * per_seq * widest * 2; // K and V, f16
        let all = one * u64::from(cfg.n_seq.max(1));
        all.min(LQ_DENSE_SCRATCH).max(one)
    }

    /// Free memory of the GPU where offloaded layers keep their KV cache; None when
    /// the cache stays on the CPU (no layer offloaded, or no GPU this build sees).
    pub fn cache_gpu_free(&self) -> Option<u64> {
        if self.params.gpu_layers != 0 {
            llama::gpu_free_memory()
        } else {
            None
        }
    }

    /// Checks the configuration against the model and the machine, then creates the
    /// context (with its overlay and policies for a two-tier configuration).
    pub fn new_context(&self, cfg: &ContextConfig) -> Result<Session<'_>, EngineError> {
        let trained = self.info.n_ctx_train;
        let n_ctx = if cfg.n_ctx == 0 { trained } else { cfg.n_ctx };
        // Each sequence has its own stream of n_ctx / n_seq cells (kv_unified = false).
        let per_seq = n_ctx / cfg.n_seq.max(1);
        if trained > 0 && per_seq > trained {
            return Err(EngineError::ContextTooLong { requested: per_seq, trained });
        }
        if cfg.kv.policy.is_some() && cfg.flash_attn == FlashAttn::Off {
            return Err(EngineError::TwoTierNeedsFlashAttn { kv: cfg.kv });
        }
        if cfg.kv.v.ggml_type().is_quantized() && cfg.flash_attn == FlashAttn::Off {
            return Err(EngineError::QuantizedVNeedsFlashAttn { v: cfg.kv.v });
        }
        if !(1..=MAX_THREADS).contains(&cfg.threads) {
            return Err(EngineError::Input(format!("--threads must be within 1..={MAX_THREADS}, not {}", cfg.threads)));
        }
        self.check_block_sizes(cfg.kv)?;
        let gpu = self.cache_gpu_free();
        if !self.params.no_alloc {
            check_lq2_placement(cfg.kv, gpu.is_some())?;
        }
        if cfg.kv.policy.is_some() {
            check_two_tier_chunk(cfg.two_tier_chunk)?;
        }
        if cfg.n_batch == 0 || cfg.n_ubatch == 0 || cfg.n_seq == 0 {
            return Err(EngineError::Input(
                "--batch-size, --ubatch-size and the sequence count must be positive".into(),
            ));
        }
        let need = self.kv_bytes(cfg, n_ctx).map_err(EngineError::Gguf)?;
        // A no_alloc model only sizes buffers (see `crate::plan`): nothing to fit in memory.
        // Offloaded layers keep their cache on the GPU: that is the memory to fit.
        let (avail, place) = match gpu {
            Some(free) => (Some(free), "free GPU memory"),
            None => (available_memory(), "memory"),
        };
        if let Some(avail) = avail.filter(|_| !self.params.no_alloc) {
            if need > avail {
                return Err(EngineError::OutOfMemory {
                    need_mib: need as f64 / MIB,
                    avail_mib: avail as f64 / MIB,
                    place,
                });
            }
        }
        let mut p = ContextParams::new(n_ctx, cfg.threads);
        p.n_batch = ContextConfig::n_batch_for(cfg, n_ctx);
        p.n_ubatch = cfg.n_ubatch.min(p.n_batch);
        p.n_seq_max = cfg.n_seq;
        p.type_k = cfg.kv.k;
        p.type_v = cfg.kv.v;
        p.flash_attn = cfg.flash_attn;
        p.device_greedy = cfg.device_greedy;
        let Some(sizes) = LoadedModel::two_tier_sizes(cfg) else {
            return Ok(Session::plain(Context::new(&self.model, &p)?));
        };
        p.n_ubatch = sizes.n_ubatch;
        p.flash_attn = FlashAttn::On;
        let mut ctx = Context::new(&self.model, &p)?;
        // A no_alloc context only sizes buffers (crate::plan adds the overlay's bytes).
        if !self.params.no_alloc {
            ctx.enable_overlay(sizes.slots, cfg.kv.center, cfg.kv.keys_by_channel)?;
        }
        let policy = cfg.kv.policy.expect("two-tier sizes imply a policy");
        // swa=recent changes nothing on a model without sliding-window layers
        let swa_recent = cfg.kv.swa_recent && self.info.sliding_window > 0;
        Ok(Session::two_tier(ctx, policy, sizes.per_seq, swa_recent, cfg.kv.keys_by_channel))
    }
}

/// A two-tier chunk (`--lq-chunk`, ContextConfig::two_tier_chunk) within its range.
pub fn check_two_tier_chunk(chunk: u32) -> Result<(), EngineError> {
    if !(1..=TWO_TIER_CHUNK_MAX).contains(&chunk) {
        return Err(EngineError::Input(format!("--lq-chunk must be within 1..={TWO_TIER_CHUNK_MAX}, not {chunk}")));
    }
    Ok(())
}

/// lq2 or lq3 as a single-tier cache (`q2`, or lq2/lq3 for K or V) goes through
/// llama.cpp's own flash attention, which has their kernels on the CPU only: with the cache on a GPU
/// the scheduler would run every layer's attention on the CPU, copying the cache there
/// each step (13 tokens/s for q2 on an H200 where logquant runs 225). The same 2-bit
/// cache through logquant's GPU kernels is `logquant:D=0`.
pub fn check_lq2_placement(kv: KvConfig, on_gpu: bool) -> Result<(), EngineError> {
    let ours = !kv.k.is_stock() || !kv.v.is_stock(); // lq2 or lq3
    if on_gpu && ours && kv.policy.is_none() {
        return Err(EngineError::Input(format!(
            "the single-tier {kv} cache has no GPU attention kernel (llama.cpp's flash attention would run on the CPU, copying the cache every step); use logquant:D=0 (every token 2-bit, through logquant's GPU kernels), or keep the cache on the CPU with --ngl 0"
        )));
    }
    let gpu_store = matches!(kv.k, KvCacheType::Lq2 | KvCacheType::Lq3) && kv.v == KvCacheType::Lq2;
    if on_gpu && kv.policy.is_some() && !gpu_store {
        return Err(EngineError::Input(format!(
            "the two-tier {kv} cache has a {}/{} store, and logquant's GPU kernels run an lq2 or lq3 K store with an lq2 V store; keep the cache on the CPU with --ngl 0, or use k=lq2 or k=lq3 and drop v=",
            kv.k.name(),
            kv.v.name()
        )));
    }
    Ok(())
}

pub const MIB: f64 = 1024.0 * 1024.0;

/// ggml's GGML_MAX_N_THREADS: ggml aborts when it cannot start more.
pub const MAX_THREADS: i32 = 512;

/// Memory the system can still give (MemAvailable on Linux); None where unknown.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Which build this is: llama.cpp's CPU features and the logquant patch version.
pub fn build_description() -> String {
    format!(
        "logquant {} (patch series {}), CPU flags {}: {}",
        env!("CARGO_PKG_VERSION"),
        llama::patch_version(),
        env!("LOGQUANT_CPU_FLAGS"),
        llama::system_info().trim_end_matches([' ', '|'])
    )
}

/// Whether llama.cpp rotates quantized K/V by a Hadamard transform (its default);
/// `LLAMA_ATTN_ROT_DISABLE=1` turns it off, as llama.cpp reads it.
pub fn attention_rotation() -> bool {
    std::env::var("LLAMA_ATTN_ROT_DISABLE").ok().and_then(|v| v.trim().parse::<i64>().ok()).unwrap_or(0) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(kv: &str, n_seq: u32, two_tier_batch: u32, n_ubatch: u32) -> TwoTierSizes {
        let mut cfg = ContextConfig::new(0);
        cfg.kv = KvConfig::parse(kv).unwrap();
        cfg.n_seq = n_seq;
        cfg.two_tier_batch = two_tier_batch;
        cfg.n_ubatch = n_ubatch;
        LoadedModel::two_tier_sizes(&cfg).unwrap()
    }

    #[test]
    fn two_tier_calls_and_micro_batches() {
        // (sequences, two_tier_batch, n_ubatch) -> (n_batch, n_ubatch), D=384: chunks of 64
        for (n_seq, batch, ubatch, want) in [
            (1, 0, 512, (64, 64)),         // one sequence: a chunk per call, one micro-batch
            (1000, 0, 512, (1000, 1000)),  // a decode step of every sequence: one micro-batch
            (146, 2048, 512, (2048, 512)), // the server's: calls of n_batch, micro-batches of n_ubatch
            (4, 2048, 64, (256, 64)),      // no wider than a chunk of every sequence
            (4, 2048, 512, (256, 256)),
        ] {
            let got = sizes("logquant", n_seq, batch, ubatch);
            assert_eq!((got.per_seq, got.slots), (64, 448));
            assert_eq!((got.n_batch, got.n_ubatch), want, "{n_seq} sequences, batch {batch}, ubatch {ubatch}");
        }
        // a budget of 0 needs no slot
        assert_eq!(sizes("logquant:D=0", 2, 0, 512).slots, 0);
        assert!(LoadedModel::two_tier_sizes(&ContextConfig::new(0)).is_none());
    }
}
