//! Model-shape summary of a GGUF file and KV-cache sizing that mirrors llama.cpp.
//!
//! Hyperparameters are read the way `llama_model::load_hparams` (src/llama-model.cpp)
//! reads them: `{arch}.block_count`, `{arch}.embedding_length`,
//! `{arch}.context_length`, `{arch}.attention.head_count[_kv]` (a scalar or one value
//! per layer; `head_count_kv` defaults to `head_count`), `{arch}.attention.key_length` /
//! `value_length` (default `n_embd / n_head`), and their `_swa` variants for
//! sliding-window layers (default: the full-attention values).
//!
//! Which layers use sliding-window attention (SWA) follows the per-architecture
//! `load_arch_hparams` in src/models/*.cpp, `llama_model_base::load_swa_pattern` in
//! src/llama-model.cpp and `llama_hparams::set_swa_pattern` in src/llama-hparams.cpp;
//! see [`ModelInfo::swa_layers`].
//!
//! KV-cache sizes follow `llama_context::llama_context` (n_ctx padding, src/llama-
//! context.cpp), `llama_kv_cache_iswa::llama_kv_cache_iswa` (SWA cache size, src/llama-
//! kv-cache-iswa.cpp) and `llama_kv_cache::llama_kv_cache` (one K and one V tensor of
//! `[n_embd_{k,v}_gqa(il), kv_size, n_stream]` per layer, src/llama-kv-cache.cpp).
//! Only plain attention caches are modelled: recurrent/hybrid state (Mamba, RWKV, ...)
//! and MLA's compressed cache (DeepSeek-style `kv_lora_rank`) are not.

use std::collections::BTreeMap;

use super::reader::{GgufError, GgufFile, Value};
use super::types::{row_bytes, GgmlType, KvCacheType};

/// `LLAMA_MAX_LAYERS` (src/llama-hparams.h): llama.cpp refuses models with more layers.
pub const LLAMA_MAX_LAYERS: u32 = 512;
/// `LLAMA_MAX_SEQ` (src/llama-cparams.h): the most parallel sequences a context can have.
pub const LLAMA_MAX_SEQ: u32 = 256;
/// llama.cpp pads the context size, the per-sequence context size and the SWA cache
/// size to multiples of 256 cells.
pub const KV_CELL_PAD: u64 = 256;

/// Tensors of one ggml type in a file.
#[derive(Clone, Debug, PartialEq)]
pub struct TypeShare {
    pub ggml_type: GgmlType,
    /// Number of tensors of this type.
    pub n_tensors: usize,
    /// Bytes of tensor data of this type.
    pub n_bytes: u64,
    /// `n_bytes` as a fraction of the file size (0..=1).
    pub share: f64,
}

/// The shape of a model, as far as memory planning needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    /// `general.architecture`, e.g. `"llama"`.
    pub architecture: String,
    /// `general.name`, if present.
    pub name: Option<String>,
    /// `{arch}.block_count` (all layers, including any next-token-prediction layers).
    pub n_layer: u32,
    /// `{arch}.embedding_length`.
    pub n_embd: u32,
    /// Attention heads of layer 0 (llama.cpp's `n_head()`); 0 for attention-free models.
    pub n_head: u32,
    /// Attention heads per layer.
    pub n_head_per_layer: Vec<u32>,
    /// KV heads per layer (`{arch}.attention.head_count_kv`, scalar or array; defaults
    /// to the head count).
    pub n_head_kv: Vec<u32>,
    /// K head size of full-attention layers (`{arch}.attention.key_length`, default
    /// `n_embd / n_head`).
    pub head_dim_k: u32,
    /// V head size of full-attention layers (`{arch}.attention.value_length`, default
    /// `n_embd / n_head`).
    pub head_dim_v: u32,
    /// K head size of SWA layers (`{arch}.attention.key_length_swa`, default
    /// `head_dim_k`).
    pub head_dim_k_swa: u32,
    /// V head size of SWA layers (`{arch}.attention.value_length_swa`, default
    /// `head_dim_v`).
    pub head_dim_v_swa: u32,
    /// `{arch}.context_length`.
    pub n_ctx_train: u32,
    /// Number of tokens: length of `tokenizer.ggml.tokens`, else `{arch}.vocab_size`,
    /// else 0.
    pub n_vocab: u64,
    /// `{arch}.nextn_predict_layers` (multi-token-prediction layers at the end, which
    /// a normal context gives no KV cache).
    pub n_layer_nextn: u32,
    /// The sliding window llama.cpp uses, in tokens; 0 when no layer uses SWA. This is
    /// `{arch}.attention.sliding_window` except where an architecture overrides it
    /// (gemma2 defaults to 4096, llama4 always uses 8192 chunks, smallthinker 4096,
    /// phi3 disables SWA).
    pub sliding_window: u32,
    /// `{arch}.attention.sliding_window` as stored in the file.
    pub sliding_window_key: Option<u32>,
    /// Per layer: does it use sliding-window attention? From an explicit
    /// `{arch}.attention.sliding_window_pattern` (array of bools or integers, or an
    /// integer period), else from the architecture's default period.
    pub swa_layers: Vec<bool>,
    /// False when the file declares a sliding window but neither it nor the
    /// architecture says which layers use it; `swa_layers` is then all false, which
    /// makes KV estimates an upper bound.
    pub swa_pattern_known: bool,
    /// Per layer: does it own a KV cache? False for next-token-prediction layers and
    /// for layers that reuse an earlier layer's cache (gemma3n: from layer 20; gemma4:
    /// the last `{arch}.attention.shared_kv_layers`).
    pub kv_layers: Vec<bool>,
    /// Total number of weights (elements of all tensors).
    pub n_params: u64,
    /// Size of the file in bytes.
    pub file_size: u64,
    /// Tensor data per ggml type, largest first.
    pub tensor_types: Vec<TypeShare>,
}

/// How llama.cpp would be asked to build the context; the defaults are those of
/// `llama_context_default_params` except `swa_full` (the C API defaults it to true, the
/// llama.cpp command-line tools to false) and `flash_attn` (auto in llama.cpp).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct KvCacheParams {
    /// Requested context size in tokens (`n_ctx`); 0 means the training context.
    pub n_ctx: u32,
    /// Parallel sequences (`n_seq_max`, `--parallel`).
    pub n_seq_max: u32,
    /// Logical batch size (`n_batch`).
    pub n_batch: u32,
    /// Physical batch size (`n_ubatch`).
    pub n_ubatch: u32,
    /// One KV buffer shared by all sequences (`kv_unified`) instead of one per sequence.
    pub kv_unified: bool,
    /// Give SWA layers a full-size cache (`swa_full`).
    pub swa_full: bool,
    /// Flash attention on. With it off, llama.cpp stores V transposed and sizes every
    /// layer's V rows for the largest layer (`n_embd_v_gqa_max`).
    pub flash_attn: bool,
}

impl KvCacheParams {
    /// One sequence, `n_batch` 2048, `n_ubatch` 512, not unified, SWA cache not full,
    /// flash attention on.
    pub fn new(n_ctx: u32) -> Self {
        KvCacheParams {
            n_ctx,
            n_seq_max: 1,
            n_batch: 2048,
            n_ubatch: 512,
            kv_unified: false,
            swa_full: false,
            flash_attn: true,
        }
    }
}

/// The KV-cache geometry llama.cpp would allocate.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct KvCells {
    /// Context size after padding (`cparams.n_ctx`).
    pub n_ctx: u32,
    /// Context size per sequence (`cparams.n_ctx_seq`); the non-SWA cache size.
    pub n_ctx_seq: u32,
    /// Number of KV streams (1 when unified, else `n_seq_max`); every layer's cache
    /// tensor holds this many streams of `cells` (or `cells_swa`) cells.
    pub n_stream: u32,
    /// Effective physical batch size (`cparams.n_ubatch`).
    pub n_ubatch: u32,
    /// Cells per stream of a full-attention layer.
    pub cells: u32,
    /// Cells per stream of a sliding-window layer.
    pub cells_swa: u32,
}

fn pad(x: u64, n: u64) -> u64 {
    x.div_ceil(n).saturating_mul(n)
}

/// Mirrors how llama.cpp sizes the KV cache for a context.
///
/// From `llama_context::llama_context` (src/llama-context.cpp):
/// ```text
/// cparams.n_ctx    = params.n_ctx == 0 ? hparams.n_ctx_train : params.n_ctx;
/// cparams.n_batch  = cparams.causal_attn ? std::min(cparams.n_ctx, params.n_batch) : params.n_batch;
/// cparams.n_ubatch = std::min(cparams.n_batch, params.n_ubatch == 0 ? params.n_batch : params.n_ubatch);
/// cparams.n_ctx = GGML_PAD(cparams.n_ctx, 256);
/// if (cparams.kv_unified) {
///     cparams.n_ctx_seq = cparams.n_ctx;
/// } else {
///     cparams.n_ctx_seq = cparams.n_ctx / cparams.n_seq_max;
///     cparams.n_ctx_seq = GGML_PAD(cparams.n_ctx_seq, 256);
///     ... cparams.n_ctx = cparams.n_ctx_seq * cparams.n_seq_max;
/// }
/// ```
/// `llama_model::create_memory` passes `cparams.n_ctx_seq` as the cache size, and from
/// `llama_kv_cache_iswa::llama_kv_cache_iswa` (src/llama-kv-cache-iswa.cpp):
/// ```text
/// const uint32_t size_base = kv_size;
/// uint32_t size_swa = GGML_PAD(std::min(size_base, hparams.n_swa*(unified ? n_seq_max : 1) + n_ubatch), 256);
/// if (swa_full) { size_swa = size_base; }
/// ```
/// Each `llama_kv_cache` has `n_stream = unified ? 1 : n_seq_max` streams of that many
/// cells. A causal model is assumed (for non-causal ones `n_batch` is not clamped to
/// `n_ctx`). The arithmetic is done in 64 bits; where llama.cpp's 32-bit arithmetic
/// would wrap, an error is returned instead.
pub fn kv_cells(p: &KvCacheParams, n_ctx_train: u32, n_swa: u32) -> Result<KvCells, GgufError> {
    let bad = |m: String| Err(GgufError::InvalidKvParams(m));
    let n_seq_max = u64::from(p.n_seq_max.max(1));
    if n_seq_max > u64::from(LLAMA_MAX_SEQ) {
        return bad(format!("n_seq_max {n_seq_max} is more than llama.cpp allows ({LLAMA_MAX_SEQ})"));
    }
    let n_ctx = u64::from(if p.n_ctx == 0 { n_ctx_train } else { p.n_ctx });
    if n_ctx == 0 {
        return bad("n_ctx is 0 and the model has no training context length".into());
    }
    let n_batch = n_ctx.min(u64::from(p.n_batch));
    let n_ubatch = n_batch.min(if p.n_ubatch == 0 { n_batch } else { u64::from(p.n_ubatch) });
    let mut n_ctx = pad(n_ctx, KV_CELL_PAD);
    let n_ctx_seq = if p.kv_unified {
        n_ctx
    } else {
        let per_seq = pad(n_ctx / n_seq_max, KV_CELL_PAD);
        if per_seq == 0 {
            return bad(format!("n_ctx {n_ctx} is too small for {n_seq_max} sequences (n_ctx_seq == 0)"));
        }
        n_ctx = per_seq * n_seq_max;
        per_seq
    };
    let window = u64::from(n_swa) * if p.kv_unified { n_seq_max } else { 1 } + n_ubatch;
    let cells_swa = if p.swa_full { n_ctx_seq } else { pad(n_ctx_seq.min(window), KV_CELL_PAD) };
    let to_u32 = |v: u64, what: &str| {
        u32::try_from(v).map_err(|_| GgufError::InvalidKvParams(format!("{what} {v} does not fit in 32 bits")))
    };
    Ok(KvCells {
        n_ctx: to_u32(n_ctx, "n_ctx")?,
        n_ctx_seq: to_u32(n_ctx_seq, "n_ctx_seq")?,
        n_stream: to_u32(if p.kv_unified { 1 } else { n_seq_max }, "n_stream")?,
        n_ubatch: to_u32(n_ubatch, "n_ubatch")?,
        cells: to_u32(n_ctx_seq, "cache size")?,
        cells_swa: to_u32(cells_swa, "SWA cache size")?,
    })
}

/// How an architecture decides its SWA layers.
#[derive(Debug, PartialEq)]
enum ArchSwa {
    /// The architecture does not use SWA with this metadata.
    NotUsed,
    /// `load_swa_pattern(ml, n_pattern, dense_first)` with window `n_swa`.
    Pattern { n_swa: u32, n_pattern: u32, dense_first: bool },
    /// The architecture requires an explicit per-layer pattern array.
    ArrayOnly { n_swa: u32 },
    /// Not an architecture whose SWA rules were checked against the vendored source.
    Unknown,
}

/// Per-architecture SWA rules, each checked against the architecture's
/// `load_arch_hparams` in vendor/llama.cpp/src/models/<file>.cpp. `window` is
/// `{arch}.attention.sliding_window`; `n_layer` is `hparams.n_layer()` (block count
/// minus next-token-prediction layers).
fn arch_swa(arch: &str, window: Option<u32>, n_layer: u32) -> ArchSwa {
    use ArchSwa::*;
    let pattern = |n_swa, n_pattern, dense_first| Pattern { n_swa, n_pattern, dense_first };
    // the window key is required by llama.cpp for these; without it the model does not load
    let required = |n_pattern, dense_first| match window {
        Some(w) => pattern(w, n_pattern, dense_first),
        None => Unknown,
    };
    // SWA only when the window key is present and > 0
    let if_positive = |n_pattern, dense_first| match window {
        Some(w) if w > 0 => pattern(w, n_pattern, dense_first),
        _ => NotUsed,
    };
    match arch {
        // gemma2.cpp: n_swa = 4096 default, key optional; load_swa_pattern(ml, 2)
        "gemma2" => pattern(window.unwrap_or(4096), 2, false),
        // gemma3.cpp: if (found_swa && n_swa > 0) load_swa_pattern(ml, 6)
        "gemma3" => if_positive(6, false),
        // gemma-embedding.cpp: load_swa_pattern(ml, 6); key required
        "gemma-embedding" => required(6, false),
        // gemma3n.cpp: load_swa_pattern(ml, 5); key required
        "gemma3n" => required(5, false),
        // cohere2.cpp: load_swa_pattern(ml, 4); key required
        "cohere2" => required(4, false),
        // cohere2moe.cpp: load_swa_pattern(ml, 4, true); key required
        "cohere2moe" => required(4, true),
        // openai-moe.cpp (arch name "gpt-oss"): load_swa_pattern(ml, 2); key required
        "gpt-oss" => required(2, false),
        // exaone-moe.cpp: n_swa = 128 then the (required) key; load_swa_pattern(ml, 4)
        "exaone-moe" => required(4, false),
        // muse-glimmer.cpp: load_swa_pattern(ml, 4); key required
        "muse-glimmer" => required(4, false),
        // llama4.cpp: key present and 0 -> no SWA; otherwise chunked attention with
        // n_swa = 8192 (the key's value is overwritten) and load_swa_pattern(ml, 4)
        "llama4" => match window {
            Some(0) => NotUsed,
            _ => pattern(8192, 4, false),
        },
        // exaone4.cpp: only the 64-layer (32B) model: n_swa = 4096, load_swa_pattern(ml, 4),
        // then the optional key overrides n_swa
        "exaone4" => {
            if n_layer == 64 {
                pattern(window.unwrap_or(4096), 4, false)
            } else {
                NotUsed
            }
        }
        // olmo2.cpp, mellum.cpp, afmoe.cpp: if n_swa > 0, load_swa_pattern(ml, 4)
        "olmo2" | "mellum" | "afmoe" => if_positive(4, false),
        // plamo3.cpp: if (found_swa && n_swa > 0) load_swa_pattern(ml, 8)
        "plamo3" => if_positive(8, false),
        // laguna.cpp: if n_swa > 0, load_swa_pattern(ml, 4, /*dense_first=*/true)
        "laguna" => if_positive(4, true),
        // smallthinker.cpp: if (found_swa && n_swa > 0) { n_swa = 4096; load_swa_pattern(ml, 4, true) }
        "smallthinker" => match window {
            Some(w) if w > 0 => pattern(4096, 4, true),
            _ => NotUsed,
        },
        // phi3.cpp: "Phi SWA is currently disabled": n_swa = 0, set_swa_pattern(1)
        "phi3" => NotUsed,
        // gemma4.cpp, granite-swa.cpp, mimo2.cpp, step35.cpp, spark2-5.cpp, maple.cpp:
        // ml.get_arr(LLM_KV_ATTENTION_SLIDING_WINDOW_PATTERN, hparams.is_swa_impl) (required)
        "gemma4" | "granite_swa" | "mimo2" | "step35" | "spark2_5" | "maple" => match window {
            Some(w) => ArrayOnly { n_swa: w },
            None => Unknown,
        },
        _ => Unknown,
    }
}

/// `llama_hparams::set_swa_pattern` (src/llama-hparams.cpp) over `n_layer_main` layers;
/// layers past it (next-token-prediction layers) are never SWA.
fn set_swa_pattern(n_pattern: u32, dense_first: bool, n_layer_main: u32, n_layer: u32) -> Vec<bool> {
    (0..n_layer)
        .map(|il| {
            if il >= n_layer_main {
                false
            } else if dense_first {
                n_pattern == 0 || il % n_pattern != 0
            } else {
                n_pattern == 0 || il % n_pattern < n_pattern - 1
            }
        })
        .collect()
}

impl ModelInfo {
    /// Reads the model shape from a parsed GGUF file.
    pub fn from_gguf(f: &GgufFile) -> Result<ModelInfo, GgufError> {
        let path = f.path();
        let invalid =
            |key: &str, what: String| GgufError::InvalidValue { path: path.to_path_buf(), key: key.to_string(), what };
        let architecture = f.require_str("general.architecture")?.to_string();
        let key = |s: &str| format!("{architecture}.{s}");
        // cosmetic: a name of the wrong type is ignored rather than an error
        let name = f.get_str("general.name").map(str::to_string);

        let k_layers = key("block_count");
        let n_layer = f.require_u32(&k_layers)?;
        if n_layer == 0 || n_layer > LLAMA_MAX_LAYERS {
            return Err(invalid(&k_layers, format!("{n_layer} layers; llama.cpp supports 1 to {LLAMA_MAX_LAYERS}")));
        }
        let n = n_layer as usize;
        let n_embd = f.require_u32(&key("embedding_length"))?;
        let n_ctx_train = f.require_u32(&key("context_length"))?;
        let k_nextn = key("nextn_predict_layers");
        let n_layer_nextn = f.try_get_u32(&k_nextn)?.unwrap_or(0);
        if n_layer_nextn > n_layer {
            return Err(invalid(&k_nextn, format!("{n_layer_nextn} prediction layers but only {n_layer} layers")));
        }
        let n_layer_main = n_layer - n_layer_nextn;

        let n_head_per_layer = per_layer(f, &key("attention.head_count"), n)?.unwrap_or_else(|| vec![0; n]);
        let n_head_kv = per_layer(f, &key("attention.head_count_kv"), n)?.unwrap_or_else(|| n_head_per_layer.clone());
        let n_head = n_head_per_layer.first().copied().unwrap_or(0);

        // attention-free models (n_head == 0) have no head size, whatever the keys say
        let (head_dim_k, head_dim_v) = match n_embd.checked_div(n_head) {
            Some(default) => (
                f.try_get_u32(&key("attention.key_length"))?.unwrap_or(default),
                f.try_get_u32(&key("attention.value_length"))?.unwrap_or(default),
            ),
            None => (0, 0),
        };
        let head_dim_k_swa = f.try_get_u32(&key("attention.key_length_swa"))?.unwrap_or(head_dim_k);
        let head_dim_v_swa = f.try_get_u32(&key("attention.value_length_swa"))?.unwrap_or(head_dim_v);

        let n_vocab = match f.get_arr_len("tokenizer.ggml.tokens") {
            Some(len) => len as u64,
            None => f.try_get_u32(&key("vocab_size"))?.map_or(0, u64::from),
        };

        // sliding window
        let k_window = key("attention.sliding_window");
        let k_pattern = key("attention.sliding_window_pattern");
        let sliding_window_key = f.try_get_u32(&k_window)?;
        let pattern = f.get(&k_pattern);
        let from_array = |v: &Value| -> Result<Vec<bool>, GgufError> {
            let wrong = || GgufError::WrongType {
                path: path.to_path_buf(),
                key: k_pattern.clone(),
                expected: "an array of bools or integers, or an integer period",
                found: v.type_description(),
            };
            let a = v.as_array().ok_or_else(wrong)?;
            let flags: Vec<bool> = match a {
                super::reader::Array::Bool(b) => b.clone(),
                _ => (0..a.len()).map(|i| a.int_at(i).map(|x| x != 0)).collect::<Option<_>>().ok_or_else(wrong)?,
            };
            Ok((0..n).map(|il| flags.get(il).copied().unwrap_or(false)).collect())
        };
        let from_period = |v: &Value, dense_first: bool| -> Result<Vec<bool>, GgufError> {
            let p = v.as_u32().ok_or_else(|| GgufError::WrongType {
                path: path.to_path_buf(),
                key: k_pattern.clone(),
                expected: "an array of bools or integers, or an integer period",
                found: v.type_description(),
            })?;
            Ok(set_swa_pattern(p, dense_first, n_layer_main, n_layer))
        };
        let explicit = |v: &Value, dense_first: bool| match v {
            Value::Array(_) => from_array(v),
            _ => from_period(v, dense_first),
        };
        let none = vec![false; n];
        let (sliding_window, swa_layers, swa_pattern_known) =
            match arch_swa(&architecture, sliding_window_key, n_layer_main) {
                ArchSwa::NotUsed => (0, none, true),
                ArchSwa::Pattern { n_swa, n_pattern, dense_first } => {
                    let layers = match pattern {
                        Some(v) => explicit(v, dense_first)?,
                        None => set_swa_pattern(n_pattern, dense_first, n_layer_main, n_layer),
                    };
                    (n_swa, layers, true)
                }
                ArchSwa::ArrayOnly { n_swa } => match pattern {
                    Some(v @ Value::Array(_)) => (n_swa, from_array(v)?, true),
                    _ => (n_swa, none, false),
                },
                ArchSwa::Unknown => match (sliding_window_key.filter(|&w| w > 0), pattern) {
                    (None, _) => (0, none, true),
                    (Some(w), Some(v)) => (w, explicit(v, false)?, true),
                    (Some(w), None) => (w, none, false),
                },
            };

        // which layers own a KV cache (llama_hparams::has_kv + the nextn filter in
        // llama_model::create_memory)
        let mut kv_from_start = n_layer;
        match architecture.as_str() {
            // gemma3n.cpp: hparams.n_layer_kv_from_start = 20
            "gemma3n" => kv_from_start = kv_from_start.min(20),
            // gemma4.cpp: n_layer_kv_from_start = n_layer_all - shared_kv_layers
            "gemma4" => {
                let shared = f.try_get_u32(&key("attention.shared_kv_layers"))?.unwrap_or(0);
                kv_from_start = n_layer.saturating_sub(shared);
            }
            _ => {}
        }
        let kv_layers = (0..n_layer)
            .map(|il| il < kv_from_start && !(n_layer_nextn > 0 && n_layer_main > 0 && il >= n_layer_main))
            .collect();

        // tensors
        let file_size = f.file_size();
        let mut by_type: BTreeMap<GgmlType, (usize, u64)> = BTreeMap::new();
        let mut n_params: u64 = 0;
        for t in f.tensors() {
            let e = by_type.entry(t.ggml_type).or_default();
            e.0 += 1;
            e.1 = e.1.saturating_add(t.n_bytes);
            n_params = n_params.saturating_add(t.n_elements);
        }
        let mut tensor_types: Vec<TypeShare> = by_type
            .into_iter()
            .map(|(ggml_type, (n_tensors, n_bytes))| TypeShare {
                ggml_type,
                n_tensors,
                n_bytes,
                share: if file_size == 0 { 0.0 } else { n_bytes as f64 / file_size as f64 },
            })
            .collect();
        tensor_types.sort_by(|a, b| b.n_bytes.cmp(&a.n_bytes).then(a.ggml_type.cmp(&b.ggml_type)));

        Ok(ModelInfo {
            architecture,
            name,
            n_layer,
            n_embd,
            n_head,
            n_head_per_layer,
            n_head_kv,
            head_dim_k,
            head_dim_v,
            head_dim_k_swa,
            head_dim_v_swa,
            n_ctx_train,
            n_vocab,
            n_layer_nextn,
            sliding_window,
            sliding_window_key,
            swa_layers,
            swa_pattern_known,
            kv_layers,
            n_params,
            file_size,
            tensor_types,
        })
    }

    /// Whether layer `il` uses sliding-window attention.
    pub fn is_swa(&self, il: usize) -> bool {
        self.swa_layers.get(il).copied().unwrap_or(false)
    }

    /// Number of layers that use sliding-window attention.
    pub fn n_swa_layers(&self) -> usize {
        self.swa_layers.iter().filter(|&&s| s).count()
    }

    /// Values per token of layer `il`'s K cache row: `n_head_kv(il) * head_dim_k(il)`
    /// (llama.cpp's `n_embd_k_gqa(il)`).
    pub fn n_embd_k_gqa(&self, il: usize) -> u64 {
        let hd = if self.is_swa(il) { self.head_dim_k_swa } else { self.head_dim_k };
        u64::from(self.n_head_kv.get(il).copied().unwrap_or(0)) * u64::from(hd)
    }

    /// Values per token of layer `il`'s V cache row (`n_embd_v_gqa(il)`).
    pub fn n_embd_v_gqa(&self, il: usize) -> u64 {
        let hd = if self.is_swa(il) { self.head_dim_v_swa } else { self.head_dim_v };
        u64::from(self.n_head_kv.get(il).copied().unwrap_or(0)) * u64::from(hd)
    }

    fn n_embd_v_gqa_max(&self) -> u64 {
        (0..self.n_layer as usize).map(|il| self.n_embd_v_gqa(il)).max().unwrap_or(0)
    }

    /// KV-cache bytes one token occupies across all layers that own a cache:
    /// the sum over layers of `row_bytes(k, n_embd_k_gqa(il)) + row_bytes(v,
    /// n_embd_v_gqa(il))`. Errors when a row is not a whole number of blocks of the
    /// cache type (llama.cpp would refuse that cache type for this model).
    pub fn kv_bytes_per_token(&self, cache_k: KvCacheType, cache_v: KvCacheType) -> Result<u64, GgufError> {
        let mut total: u64 = 0;
        for il in 0..self.n_layer as usize {
            if !self.kv_layers.get(il).copied().unwrap_or(false) {
                continue;
            }
            let k = row_bytes(cache_k.ggml_type(), self.n_embd_k_gqa(il))?;
            let v = row_bytes(cache_v.ggml_type(), self.n_embd_v_gqa(il))?;
            total = total.saturating_add(k).saturating_add(v);
        }
        Ok(total)
    }

    /// The cache geometry llama.cpp would allocate for this model (see [`kv_cells`]).
    pub fn kv_cells(&self, params: &KvCacheParams) -> Result<KvCells, GgufError> {
        kv_cells(params, self.n_ctx_train, self.sliding_window)
    }

    /// Total KV-cache bytes for `n_ctx` tokens with `n_seq` sequences and physical
    /// batch `n_ubatch`, not unified, flash attention on (see [`ModelInfo::kv_bytes_with`]).
    /// `n_batch` is taken as `max(2048, n_ubatch)` so that `n_ubatch` is used as given
    /// (it is still clamped to the requested `n_ctx`, as llama.cpp does).
    pub fn kv_bytes(
        &self,
        n_ctx: u32,
        cache_k: KvCacheType,
        cache_v: KvCacheType,
        swa_full: bool,
        n_seq: u32,
        n_ubatch: u32,
    ) -> Result<u64, GgufError> {
        let params = KvCacheParams {
            n_ctx,
            n_seq_max: n_seq,
            n_batch: n_ubatch.max(2048),
            n_ubatch,
            kv_unified: false,
            swa_full,
            flash_attn: true,
        };
        self.kv_bytes_with(&params, cache_k, cache_v)
    }

    /// Total bytes of the K and V cache tensors llama.cpp would allocate: for each layer
    /// that owns a cache, `(row_bytes(k, n_embd_k_gqa) + row_bytes(v, n_embd_v_gqa)) *
    /// cells * n_stream`, where `cells` is [`KvCells::cells_swa`] for sliding-window
    /// layers and [`KvCells::cells`] otherwise. With flash attention off, V rows are
    /// sized for the widest layer, as llama.cpp does for its transposed V cache.
    pub fn kv_bytes_with(
        &self,
        params: &KvCacheParams,
        cache_k: KvCacheType,
        cache_v: KvCacheType,
    ) -> Result<u64, GgufError> {
        let cells = self.kv_cells(params)?;
        let v_max = self.n_embd_v_gqa_max();
        let mut total: u128 = 0;
        for il in 0..self.n_layer as usize {
            if !self.kv_layers.get(il).copied().unwrap_or(false) {
                continue;
            }
            let v_row = if params.flash_attn { self.n_embd_v_gqa(il) } else { v_max };
            let row = u128::from(row_bytes(cache_k.ggml_type(), self.n_embd_k_gqa(il))?)
                + u128::from(row_bytes(cache_v.ggml_type(), v_row)?);
            let n_cells = if self.is_swa(il) { cells.cells_swa } else { cells.cells };
            total += row * u128::from(n_cells) * u128::from(cells.n_stream);
        }
        Ok(u64::try_from(total).unwrap_or(u64::MAX))
    }

    /// Bytes of LogQuant's f16 overlay with `slots` per stream (logquant-overlay.cpp):
    /// per layer that owns a cache, `min(slots, cells)` rows (at least one) of f16 K
    /// and V per stream, where `cells` is that layer's cache size; with centering, one
    /// f32 row of K offsets and one of V offsets per stream too.
    pub fn overlay_bytes(&self, params: &KvCacheParams, slots: u32, centered: bool) -> Result<u64, GgufError> {
        let cells = self.kv_cells(params)?;
        let mut total: u128 = 0;
        for il in 0..self.n_layer as usize {
            if !self.kv_layers.get(il).copied().unwrap_or(false) {
                continue;
            }
            let n_cells = if self.is_swa(il) { cells.cells_swa } else { cells.cells };
            let rows = u128::from(slots.min(n_cells).max(1)) * u128::from(cells.n_stream);
            let offsets = if centered { u128::from(cells.n_stream) * 4 } else { 0 };
            total += (rows * 2 + offsets) * (u128::from(self.n_embd_k_gqa(il)) + u128::from(self.n_embd_v_gqa(il)));
        }
        Ok(u64::try_from(total).unwrap_or(u64::MAX))
    }
}

/// A per-layer integer hyperparameter: a scalar (repeated for every layer) or an array
/// of exactly one value per layer (`llama_model_loader::get_key_or_arr`).
fn per_layer(f: &GgufFile, key: &str, n: usize) -> Result<Option<Vec<u32>>, GgufError> {
    let Some(v) = f.get(key) else {
        return Ok(None);
    };
    let wrong = || GgufError::WrongType {
        path: f.path().to_path_buf(),
        key: key.to_string(),
        expected: "an unsigned 32-bit integer or an array of them (one per layer)",
        found: v.type_description(),
    };
    match v {
        Value::Array(a) => {
            let vals = a.to_u32_vec().ok_or_else(wrong)?;
            if vals.len() != n {
                return Err(GgufError::InvalidValue {
                    path: f.path().to_path_buf(),
                    key: key.to_string(),
                    what: format!("has {} per-layer values but the model has {n} layers", vals.len()),
                });
            }
            Ok(Some(vals))
        }
        _ => Ok(Some(vec![v.as_u32().ok_or_else(wrong)?; n])),
    }
}

#[cfg(test)]
mod tests {
    use super::super::reader::Array;
    use super::super::writer::GgufWriter;
    use super::*;

    /// Builds an in-memory GGUF with the given metadata (plus the required basics for
    /// `arch`) and parses it.
    fn model(arch: &str, n_layer: u32, extra: &[(&str, Value)]) -> ModelInfo {
        try_model(arch, n_layer, extra).unwrap()
    }

    fn try_model(arch: &str, n_layer: u32, extra: &[(&str, Value)]) -> Result<ModelInfo, GgufError> {
        let mut w = GgufWriter::new();
        w.add_string("general.architecture", arch).unwrap();
        w.add_u32(format!("{arch}.block_count"), n_layer).unwrap();
        w.add_u32(format!("{arch}.embedding_length"), 2048).unwrap();
        w.add_u32(format!("{arch}.context_length"), 8192).unwrap();
        w.add_u32(format!("{arch}.attention.head_count"), 16).unwrap();
        for (k, v) in extra {
            w.add(k.replace("{arch}", arch), v.clone()).unwrap();
        }
        let mut buf = Vec::new();
        w.write_to(&mut buf).unwrap();
        ModelInfo::from_gguf(&GgufFile::from_bytes("m.gguf", buf)?)
    }

    fn swa_indices(m: &ModelInfo) -> Vec<usize> {
        (0..m.n_layer as usize).filter(|&il| m.is_swa(il)).collect()
    }

    #[test]
    fn basic_llama_shape_and_kv_per_token() {
        let m = model(
            "llama",
            4,
            &[
                ("{arch}.attention.head_count_kv", Value::U32(4)),
                ("general.name", Value::String("tiny".into())),
                ("tokenizer.ggml.tokens", Value::Array(Array::String(vec!["a".into(); 300]))),
            ],
        );
        assert_eq!(m.architecture, "llama");
        assert_eq!(m.name.as_deref(), Some("tiny"));
        assert_eq!((m.n_layer, m.n_embd, m.n_head), (4, 2048, 16));
        assert_eq!(m.n_head_kv, vec![4; 4]);
        assert_eq!((m.head_dim_k, m.head_dim_v), (128, 128));
        assert_eq!(m.n_ctx_train, 8192);
        assert_eq!(m.n_vocab, 300);
        assert_eq!(m.sliding_window, 0);
        assert!(m.swa_pattern_known && m.n_swa_layers() == 0);
        // 4 layers * (4*128 K + 4*128 V) values * 2 bytes
        assert_eq!(m.kv_bytes_per_token(KvCacheType::F16, KvCacheType::F16).unwrap(), 4 * 1024 * 2);
        // q8_0: 512 values = 16 blocks of 34 bytes
        assert_eq!(m.kv_bytes_per_token(KvCacheType::Q8_0, KvCacheType::Q4_0).unwrap(), 4 * (16 * 34 + 16 * 18));
        // n_ctx 1000 -> 1024 cells
        assert_eq!(m.kv_bytes(1000, KvCacheType::F16, KvCacheType::F16, false, 1, 512).unwrap(), 4 * 1024 * 2 * 1024);
    }

    #[test]
    fn per_layer_kv_heads_and_head_dims() {
        let m = model(
            "llama",
            3,
            &[
                ("{arch}.attention.head_count_kv", Value::Array(Array::I32(vec![8, 2, 0]))),
                ("{arch}.attention.key_length", Value::U32(192)),
                ("{arch}.attention.value_length", Value::U16(128)),
            ],
        );
        assert_eq!(m.n_head_kv, vec![8, 2, 0]);
        assert_eq!((m.head_dim_k, m.head_dim_v), (192, 128));
        assert_eq!(m.kv_bytes_per_token(KvCacheType::F32, KvCacheType::F32).unwrap(), (8 + 2) * (192 + 128) * 4);
        // wrong array length
        let e = try_model("llama", 3, &[("{arch}.attention.head_count_kv", Value::Array(Array::U32(vec![8, 2])))])
            .unwrap_err();
        assert!(matches!(e, GgufError::InvalidValue { .. }), "{e}");
        assert!(e.to_string().contains("3 layers"), "{e}");
    }

    #[test]
    fn gemma3_default_pattern_is_period_6() {
        let m = model("gemma3", 12, &[("{arch}.attention.sliding_window", Value::U32(1024))]);
        assert_eq!(m.sliding_window, 1024);
        assert!(m.swa_pattern_known);
        // il % 6 < 5 is SWA: layers 5 and 11 are full attention
        let full: Vec<usize> = (0..12).filter(|&il| !m.is_swa(il)).collect();
        assert_eq!(full, vec![5, 11]);
        // no window -> no SWA (gemma3.cpp only enables it when the key is > 0)
        let m = model("gemma3", 12, &[]);
        assert_eq!((m.sliding_window, m.n_swa_layers()), (0, 0));
        assert!(m.swa_pattern_known);
    }

    #[test]
    fn gemma2_defaults_window_and_period_2() {
        let m = model("gemma2", 6, &[]);
        assert_eq!(m.sliding_window, 4096);
        assert_eq!(swa_indices(&m), vec![0, 2, 4]);
    }

    #[test]
    fn explicit_patterns_override_defaults() {
        let w = ("{arch}.attention.sliding_window", Value::U32(512));
        let m = model(
            "gemma3",
            4,
            &[
                w.clone(),
                ("{arch}.attention.sliding_window_pattern", Value::Array(Array::Bool(vec![false, true, true]))),
            ],
        );
        assert_eq!(swa_indices(&m), vec![1, 2]); // shorter array: rest are dense
        let m = model("gemma3", 8, &[w.clone(), ("{arch}.attention.sliding_window_pattern", Value::U32(4))]);
        assert_eq!(swa_indices(&m), vec![0, 1, 2, 4, 5, 6]);
        // dense_first architectures use il % n != 0
        let m = model("cohere2moe", 8, std::slice::from_ref(&w));
        assert_eq!(swa_indices(&m), vec![1, 2, 3, 5, 6, 7]);
        // u32 arrays (as llama-model-saver writes them) work too
        let m = model(
            "gemma4",
            3,
            &[w.clone(), ("{arch}.attention.sliding_window_pattern", Value::Array(Array::U32(vec![1, 1, 0])))],
        );
        assert_eq!(swa_indices(&m), vec![0, 1]);
        // a pattern of the wrong type is an error naming the key
        let e = try_model("gemma3", 4, &[w, ("{arch}.attention.sliding_window_pattern", Value::String("x".into()))])
            .unwrap_err();
        assert!(e.to_string().contains("sliding_window_pattern"), "{e}");
    }

    #[test]
    fn architecture_specific_rules() {
        let w = |v| ("{arch}.attention.sliding_window", Value::U32(v));
        // llama4 forces 8192-token chunks unless the key is 0
        let m = model("llama4", 8, &[w(4096)]);
        assert_eq!(m.sliding_window, 8192);
        assert_eq!(swa_indices(&m), vec![0, 1, 2, 4, 5, 6]);
        let m = model("llama4", 8, &[w(0)]);
        assert_eq!(m.n_swa_layers(), 0);
        // phi3 disables SWA
        let m = model("phi3", 4, &[w(2047)]);
        assert_eq!((m.sliding_window, m.n_swa_layers()), (0, 0));
        assert_eq!(m.sliding_window_key, Some(2047));
        // exaone4 only for 64 layers
        assert_eq!(model("exaone4", 32, &[w(4096)]).n_swa_layers(), 0);
        assert_eq!(model("exaone4", 64, &[]).n_swa_layers(), 48);
        // gpt-oss period 2
        assert_eq!(swa_indices(&model("gpt-oss", 4, &[w(128)])), vec![0, 2]);
        // gemma4 without a pattern array: unknown
        let m = model("gemma4", 4, &[w(512)]);
        assert!(!m.swa_pattern_known);
    }

    #[test]
    fn unknown_architecture_with_window_but_no_pattern() {
        let m = model("mistral9", 4, &[("{arch}.attention.sliding_window", Value::U32(4096))]);
        assert!(!m.swa_pattern_known);
        assert_eq!(m.n_swa_layers(), 0);
        assert_eq!(m.sliding_window, 4096);
        // ... but an explicit integer pattern is used
        let m = model(
            "mistral9",
            4,
            &[
                ("{arch}.attention.sliding_window", Value::U32(4096)),
                ("{arch}.attention.sliding_window_pattern", Value::U32(2)),
            ],
        );
        assert!(m.swa_pattern_known);
        assert_eq!(swa_indices(&m), vec![0, 2]);
    }

    #[test]
    fn kv_layers_for_shared_caches_and_nextn() {
        let m = model("gemma3n", 30, &[("{arch}.attention.sliding_window", Value::U32(512))]);
        assert_eq!(m.kv_layers.iter().filter(|&&k| k).count(), 20);
        let m = model(
            "gemma4",
            10,
            &[
                ("{arch}.attention.sliding_window", Value::U32(512)),
                ("{arch}.attention.shared_kv_layers", Value::U32(4)),
                ("{arch}.attention.sliding_window_pattern", Value::Array(Array::Bool(vec![true; 10]))),
            ],
        );
        assert_eq!(m.kv_layers.iter().filter(|&&k| k).count(), 6);
        let m = model("glm4moe", 5, &[("{arch}.nextn_predict_layers", Value::U32(1))]);
        assert_eq!(m.kv_layers, vec![true, true, true, true, false]);
        assert_eq!(m.n_layer_nextn, 1);
    }

    #[test]
    fn kv_cells_mirror_llama_cpp() {
        let p = KvCacheParams::new(5000);
        let c = kv_cells(&p, 8192, 1024).unwrap();
        assert_eq!((c.n_ctx, c.n_ctx_seq, c.n_stream), (5120, 5120, 1));
        assert_eq!(c.cells, 5120);
        // GGML_PAD(min(5120, 1024*1 + 512), 256)
        assert_eq!(c.cells_swa, 1536);
        let c = kv_cells(&KvCacheParams { swa_full: true, ..p }, 8192, 1024).unwrap();
        assert_eq!(c.cells_swa, 5120);
        // 4 sequences, one stream each: n_ctx_seq = GGML_PAD(5120 / 4, 256) = 1280
        let c = kv_cells(&KvCacheParams { n_seq_max: 4, ..p }, 8192, 1024).unwrap();
        assert_eq!((c.n_ctx, c.n_ctx_seq, c.n_stream), (5120, 1280, 4));
        assert_eq!(c.cells_swa, 1280);
        // 3 sequences: 5120/3 = 1706 -> 1792 per sequence, n_ctx becomes 5376
        let c = kv_cells(&KvCacheParams { n_seq_max: 3, ..p }, 8192, 0).unwrap();
        assert_eq!((c.n_ctx, c.n_ctx_seq), (5376, 1792));
        // unified: one stream, window scaled by n_seq: GGML_PAD(min(5120, 4096 + 512), 256)
        let c = kv_cells(&KvCacheParams { n_seq_max: 4, kv_unified: true, ..p }, 8192, 1024).unwrap();
        assert_eq!((c.n_ctx_seq, c.n_stream, c.cells_swa), (5120, 1, 4608));
        // n_ctx 0 = training context; n_ubatch clamped by n_ctx
        let c = kv_cells(&KvCacheParams::new(0), 4000, 10).unwrap();
        assert_eq!(c.n_ctx, 4096);
        let c = kv_cells(&KvCacheParams::new(100), 4000, 10).unwrap();
        assert_eq!((c.n_ctx, c.n_ubatch, c.cells_swa), (256, 100, 256));
        // window of 100 + ubatch 512 = 612 -> 768
        let c = kv_cells(&KvCacheParams::new(4096), 4000, 100).unwrap();
        assert_eq!(c.cells_swa, 768);
        // errors
        assert!(kv_cells(&KvCacheParams::new(0), 0, 0).is_err());
        assert!(kv_cells(&KvCacheParams { n_seq_max: 257, ..p }, 8192, 0).is_err());
        assert!(kv_cells(&KvCacheParams::new(u32::MAX), 0, 0).is_err());
    }

    #[test]
    fn kv_bytes_with_swa_layers() {
        // gemma3-like: 12 layers, 2 full, 10 SWA, window 1024, 8 kv heads of 128
        let m = model(
            "gemma3",
            12,
            &[("{arch}.attention.sliding_window", Value::U32(1024)), ("{arch}.attention.head_count_kv", Value::U32(8))],
        );
        let row_f16 = 8 * 128 * 2 * 2; // K + V per token per layer
        let full = m.kv_bytes(32768, KvCacheType::F16, KvCacheType::F16, false, 1, 512).unwrap();
        assert_eq!(full, row_f16 * (2 * 32768 + 10 * 1536));
        let swa_full = m.kv_bytes(32768, KvCacheType::F16, KvCacheType::F16, true, 1, 512).unwrap();
        assert_eq!(swa_full, row_f16 * 12 * 32768);
        // two sequences, separate streams of 16384 cells
        let two = m.kv_bytes(32768, KvCacheType::F16, KvCacheType::F16, false, 2, 512).unwrap();
        assert_eq!(two, row_f16 * 2 * (2 * 16384 + 10 * 1536));
    }

    #[test]
    fn v_rows_without_flash_attention_use_the_widest_layer() {
        let m = model(
            "gemma4",
            2,
            &[
                ("{arch}.attention.sliding_window", Value::U32(512)),
                ("{arch}.attention.sliding_window_pattern", Value::Array(Array::Bool(vec![true, false]))),
                ("{arch}.attention.head_count_kv", Value::U32(1)),
                ("{arch}.attention.key_length", Value::U32(512)),
                ("{arch}.attention.value_length", Value::U32(512)),
                ("{arch}.attention.key_length_swa", Value::U32(256)),
                ("{arch}.attention.value_length_swa", Value::U32(256)),
            ],
        );
        assert_eq!((m.n_embd_k_gqa(0), m.n_embd_k_gqa(1)), (256, 512));
        let mut p = KvCacheParams::new(1024);
        let fa = m.kv_bytes_with(&p, KvCacheType::F16, KvCacheType::F16).unwrap();
        // SWA layer: pad(min(1024, 512 + 512)) = 1024 cells as well
        assert_eq!(fa, (256 + 256) * 2 * 1024 + (512 + 512) * 2 * 1024);
        p.flash_attn = false;
        let no_fa = m.kv_bytes_with(&p, KvCacheType::F16, KvCacheType::F16).unwrap();
        assert_eq!(no_fa, (256 + 512) * 2 * 1024 + (512 + 512) * 2 * 1024);
    }

    #[test]
    fn quantized_cache_rows_must_be_whole_blocks() {
        let m = model(
            "llama",
            1,
            &[("{arch}.attention.head_count_kv", Value::U32(1)), ("{arch}.attention.key_length", Value::U32(80))],
        );
        assert!(matches!(m.kv_bytes_per_token(KvCacheType::Q8_0, KvCacheType::F16), Err(GgufError::RowSize { .. })));
        assert!(m.kv_bytes_per_token(KvCacheType::F16, KvCacheType::Q8_0).is_ok());
    }

    #[test]
    fn missing_and_invalid_keys() {
        let mut w = GgufWriter::new();
        w.add_u32("llama.block_count", 2).unwrap();
        let mut buf = Vec::new();
        w.write_to(&mut buf).unwrap();
        let f = GgufFile::from_bytes("nokey.gguf", buf).unwrap();
        let e = ModelInfo::from_gguf(&f).unwrap_err();
        assert!(matches!(e, GgufError::MissingKey { .. }), "{e}");
        assert!(e.to_string().contains("general.architecture"), "{e}");
        assert!(e.to_string().contains("nokey.gguf"), "{e}");

        assert!(matches!(try_model("llama", 0, &[]), Err(GgufError::InvalidValue { .. })));
        assert!(matches!(try_model("llama", 100_000, &[]), Err(GgufError::InvalidValue { .. })));
        let e = try_model("llama", 2, &[("{arch}.attention.head_count_kv", Value::F32(2.0))]).unwrap_err();
        assert!(matches!(e, GgufError::WrongType { .. }), "{e}");
    }

    #[test]
    fn tensor_type_shares() {
        let mut w = GgufWriter::new();
        w.add_string("general.architecture", "llama").unwrap();
        w.add_u32("llama.block_count", 1).unwrap();
        w.add_u32("llama.embedding_length", 64).unwrap();
        w.add_u32("llama.context_length", 128).unwrap();
        w.add_tensor("a", &[64, 4], GgmlType::Q8_0, vec![0; 2 * 4 * 34]).unwrap();
        w.add_tensor("b", &[64, 2], GgmlType::Q8_0, vec![0; 2 * 2 * 34]).unwrap();
        w.add_tensor("n", &[64], GgmlType::F32, vec![0; 256]).unwrap();
        let mut buf = Vec::new();
        w.write_to(&mut buf).unwrap();
        let size = buf.len() as f64;
        let m = ModelInfo::from_gguf(&GgufFile::from_bytes("t", buf).unwrap()).unwrap();
        assert_eq!(m.n_params, 64 * 4 + 64 * 2 + 64);
        assert_eq!(m.tensor_types.len(), 2);
        let q = &m.tensor_types[0];
        assert_eq!((q.ggml_type, q.n_tensors, q.n_bytes), (GgmlType::Q8_0, 2, 408));
        assert!((q.share - 408.0 / size).abs() < 1e-12);
        let f = &m.tensor_types[1];
        assert_eq!((f.ggml_type, f.n_tensors, f.n_bytes), (GgmlType::F32, 1, 256));
        // attention-free: no heads, so head dims are 0
        assert_eq!((m.n_head, m.head_dim_k), (0, 0));
    }
}
