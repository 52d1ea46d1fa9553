//! Safe, RAII wrappers over the patched llama.cpp. This is the only module with
//! `unsafe`: every raw pointer (model, context, batch, sampler) is owned by one type
//! here and freed in its `Drop`. Callers validate their input before it gets here
//! where llama.cpp would abort on it (see `crate::engine`); this module checks what
//! it can itself (bounds, null returns) and turns every failure into a `LlamaError`.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

use crate::gguf::KvCacheType;
use crate::kvconfig::Centering;
use crate::sys::ffi;

/// A token id of the model's vocabulary.
pub type Token = i32;

#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    #[error("llama.cpp could not load model {path}: {reason}")]
    ModelLoad { path: PathBuf, reason: String },
    #[error("llama.cpp could not create a context: {reason}")]
    ContextCreate { reason: String },
    #[error("tokenization failed: {0}")]
    Tokenize(String),
    #[error("decode failed: {0}")]
    Decode(String),
    #[error("the batch holds {capacity} tokens; cannot add more")]
    BatchFull { capacity: usize },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("the two-tier cache: {0}")]
    Overlay(String),
}

// ---------------------------------------------------------------------------------
// Process-wide setup and logging
// ---------------------------------------------------------------------------------

static INIT: Once = Once::new();
static VERBOSE: AtomicBool = AtomicBool::new(false);
/// The last error and warning lines llama.cpp logged, to explain a failure to the user.
static RECENT: Mutex<Vec<String>> = Mutex::new(Vec::new());
const RECENT_MAX: usize = 16;

/// Route llama.cpp's and ggml's log through Rust: quiet unless `verbose`, but the
/// latest warnings and errors are kept to name the cause when a call fails.
pub fn init(verbose: bool) {
    VERBOSE.store(verbose, Ordering::SeqCst);
    INIT.call_once(|| unsafe {
        ffi::llama_log_set(Some(log_callback), std::ptr::null_mut());
        ffi::llama_backend_init();
    });
}

unsafe extern "C" fn log_callback(level: ffi::ggml_log_level, text: *const c_char, _user: *mut c_void) {
    if text.is_null() {
        return;
    }
    let line = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    if VERBOSE.load(Ordering::Relaxed) {
        eprint!("{line}");
    }
    if level == ffi::ggml_log_level_GGML_LOG_LEVEL_ERROR || level == ffi::ggml_log_level_GGML_LOG_LEVEL_WARN {
        let trimmed = line.trim();
        if !trimmed.is_empty() {
            let mut recent = RECENT.lock().unwrap_or_else(|e| e.into_inner());
            if recent.len() == RECENT_MAX {
                recent.remove(0);
            }
            recent.push(trimmed.to_string());
        }
    }
}

/// Takes the warnings and errors logged since the last call, joined for a message.
fn take_recent_log() -> String {
    let mut recent = RECENT.lock().unwrap_or_else(|e| e.into_inner());
    let text = recent.join("; ");
    recent.clear();
    if text.is_empty() {
        "no reason given (run with -v to see llama.cpp's log)".into()
    } else {
        text
    }
}

/// llama.cpp's description of the build (CPU features, backends, the logquant patch).
pub fn system_info() -> String {
    init(VERBOSE.load(Ordering::Relaxed));
    // llama_print_system_info rebuilds one static string on every call.
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    unsafe { CStr::from_ptr(ffi::llama_print_system_info()) }.to_string_lossy().into_owned()
}

/// The GPU devices this build's ggml backends see, with their free and total bytes.
fn gpus() -> impl Iterator<Item = (ffi::ggml_backend_dev_t, usize, usize)> {
    init(VERBOSE.load(Ordering::Relaxed));
    (0..unsafe { ffi::ggml_backend_dev_count() })
        .map(|i| unsafe { ffi::ggml_backend_dev_get(i) })
        .filter(|&dev| unsafe { ffi::ggml_backend_dev_type(dev) } == ffi::ggml_backend_dev_type_GGML_BACKEND_DEVICE_TYPE_GPU)
        .map(|dev| {
            let (mut free, mut total) = (0usize, 0usize);
            unsafe { ffi::ggml_backend_dev_memory(dev, &mut free, &mut total) };
            (dev, free, total)
        })
}

/// The accelerators this build's ggml backends see, as "name (description, N GiB)";
/// empty in a CPU-only build or on a machine without one.
pub fn gpu_devices() -> Vec<String> {
    let text = |p: *const std::ffi::c_char| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    gpus()
        .map(|(dev, _, total)| {
            format!(
                "{} ({}, {:.0} GiB)",
                text(unsafe { ffi::ggml_backend_dev_name(dev) }),
                text(unsafe { ffi::ggml_backend_dev_description(dev) }),
                total as f64 / (1u64 << 30) as f64
            )
        })
        .collect()
}

/// Free memory of the first GPU this build's backends see; None without one.
pub fn gpu_free_memory() -> Option<u64> {
    gpus().next().map(|(_, free, _)| free as u64)
}

/// The version of the logquant patch series compiled into llama.cpp.
pub fn patch_version() -> String {
    unsafe { CStr::from_ptr(ffi::logquant_patch_version()) }.to_string_lossy().into_owned()
}

// ---------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct ModelParams {
    /// Layers to offload to a GPU backend; -1 = all. Ignored by a CPU-only build.
    pub gpu_layers: i32,
    pub use_mmap: bool,
    /// Load only metadata: llama.cpp sizes every buffer (weights, KV, compute) as it
    /// would for real and reports the sizes, but allocates nothing and cannot decode.
    pub no_alloc: bool,
}

impl Default for ModelParams {
    fn default() -> Self {
        ModelParams { gpu_layers: -1, use_mmap: true, no_alloc: false }
    }
}

pub struct Model {
    ptr: NonNull<ffi::llama_model>,
}

// llama.cpp's model is immutable after loading and documented as shareable between
// contexts on several threads.
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

impl Model {
    /// Loads a GGUF file. The caller should have validated the file with the project's
    /// own reader first (`crate::gguf`): llama.cpp's loader may abort on some corrupt files.
    pub fn load(path: &Path, params: &ModelParams) -> Result<Model, LlamaError> {
        init(VERBOSE.load(Ordering::Relaxed));
        let c_path = CString::new(path.to_string_lossy().as_bytes())
            .map_err(|_| LlamaError::InvalidArgument(format!("path {} contains a NUL byte", path.display())))?;
        let mut mp = unsafe { ffi::llama_model_default_params() };
        mp.n_gpu_layers = params.gpu_layers;
        mp.no_alloc = params.no_alloc;
        // llama.cpp asserts that a no_alloc model is not memory-mapped.
        if !params.use_mmap || params.no_alloc {
            mp.load_mode = ffi::llama_load_mode_LLAMA_LOAD_MODE_NONE;
        }
        take_recent_log();
        let ptr = unsafe { ffi::llama_model_load_from_file(c_path.as_ptr(), mp) };
        NonNull::new(ptr)
            .map(|ptr| Model { ptr })
            .ok_or_else(|| LlamaError::ModelLoad { path: path.to_path_buf(), reason: take_recent_log() })
    }

    fn vocab(&self) -> *const ffi::llama_vocab {
        unsafe { ffi::llama_model_get_vocab(self.ptr.as_ptr()) }
    }

    pub fn n_ctx_train(&self) -> u32 {
        unsafe { ffi::llama_model_n_ctx_train(self.ptr.as_ptr()) }.max(0) as u32
    }

    pub fn n_layer(&self) -> u32 {
        unsafe { ffi::llama_model_n_layer(self.ptr.as_ptr()) }.max(0) as u32
    }

    pub fn n_vocab(&self) -> usize {
        unsafe { ffi::llama_vocab_n_tokens(self.vocab()) }.max(0) as usize
    }

    /// Size of the weights in bytes.
    pub fn size(&self) -> u64 {
        unsafe { ffi::llama_model_size(self.ptr.as_ptr()) }
    }

    pub fn n_params(&self) -> u64 {
        unsafe { ffi::llama_model_n_params(self.ptr.as_ptr()) }
    }

    /// llama.cpp's one-line description, e.g. "gemma3 270M Q4_K - Medium".
    pub fn description(&self) -> String {
        let mut buf = vec![0u8; 256];
        let n = unsafe { ffi::llama_model_desc(self.ptr.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        buf.truncate(n.clamp(0, 255) as usize);
        String::from_utf8_lossy(&buf).into_owned()
    }

    pub fn bos(&self) -> Token {
        unsafe { ffi::llama_vocab_bos(self.vocab()) }
    }

    /// True for end-of-generation tokens (EOS, EOT, ...).
    pub fn is_eog(&self, token: Token) -> bool {
        unsafe { ffi::llama_vocab_is_eog(self.vocab(), token) }
    }

    /// Text to tokens. `add_special` adds BOS (or what the model is configured with).
    /// Special-token text (`<start_of_turn>`) is tokenized as plain text.
    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<Token>, LlamaError> {
        self.tokenize_with(text, add_special, false)
    }

    /// Like [`Model::tokenize`], but special-token text becomes the special token: for
    /// prompts built by a chat template.
    pub fn tokenize_special(&self, text: &str, add_special: bool) -> Result<Vec<Token>, LlamaError> {
        self.tokenize_with(text, add_special, true)
    }

    fn tokenize_with(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<Token>, LlamaError> {
        let len = i32::try_from(text.len()).map_err(|_| LlamaError::Tokenize("text longer than 2 GiB".into()))?;
        let call = |tokens: &mut Vec<Token>| unsafe {
            ffi::llama_tokenize(
                self.vocab(),
                text.as_ptr().cast(),
                len,
                tokens.as_mut_ptr(),
                tokens.len() as i32,
                add_special,
                parse_special,
            )
        };
        let mut tokens = vec![0 as Token; text.len() + 2];
        let mut n = call(&mut tokens);
        // A negative count is the size needed (i32::MIN: more than i32 can count).
        if n < 0 && n != i32::MIN {
            tokens.resize((-n) as usize, 0);
            n = call(&mut tokens);
        }
        if n < 0 {
            return Err(LlamaError::Tokenize(format!("llama_tokenize returned {n}")));
        }
        tokens.truncate(n as usize);
        Ok(tokens)
    }

    /// The chat template stored in the GGUF (`tokenizer.chat_template`), if any.
    pub fn chat_template(&self) -> Option<String> {
        let p = unsafe { ffi::llama_model_chat_template(self.ptr.as_ptr(), std::ptr::null()) };
        if p.is_null() {
            return None;
        }
        Some(unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }

    /// The bytes of one token (may be part of a UTF-8 character). Special tokens render empty.
    pub fn token_bytes(&self, token: Token) -> Result<Vec<u8>, LlamaError> {
        self.check_token(token)?;
        let mut buf = vec![0u8; 64];
        let mut n = unsafe {
            ffi::llama_token_to_piece(self.vocab(), token, buf.as_mut_ptr().cast(), buf.len() as i32, 0, false)
        };
        if n < 0 {
            buf.resize((-n) as usize, 0);
            n = unsafe {
                ffi::llama_token_to_piece(self.vocab(), token, buf.as_mut_ptr().cast(), buf.len() as i32, 0, false)
            };
        }
        if n < 0 {
            return Err(LlamaError::Tokenize(format!("llama_token_to_piece returned {n} for token {token}")));
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    /// Tokens to text (inverse of `tokenize`, without special tokens).
    pub fn detokenize(&self, tokens: &[Token]) -> Result<String, LlamaError> {
        for &t in tokens {
            self.check_token(t)?;
        }
        let mut buf = vec![0u8; tokens.len() * 8 + 16];
        let call = |buf: &mut Vec<u8>| unsafe {
            ffi::llama_detokenize(
                self.vocab(),
                tokens.as_ptr(),
                tokens.len() as i32,
                buf.as_mut_ptr().cast(),
                buf.len() as i32,
                true,
                false,
            )
        };
        let mut n = call(&mut buf);
        if n < 0 {
            buf.resize((-n) as usize, 0);
            n = call(&mut buf);
        }
        if n < 0 {
            return Err(LlamaError::Tokenize(format!("llama_detokenize returned {n}")));
        }
        buf.truncate(n as usize);
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    fn check_token(&self, token: Token) -> Result<(), LlamaError> {
        if token < 0 || token as usize >= self.n_vocab() {
            return Err(LlamaError::InvalidArgument(format!(
                "token {token} is outside the vocabulary (0..{})",
                self.n_vocab()
            )));
        }
        Ok(())
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        unsafe { ffi::llama_model_free(self.ptr.as_ptr()) }
    }
}

/// A conversation rendered by llama.cpp's chat-template code (`llama_chat_apply_template`:
/// the built-in templates it recognises, by name such as "chatml" or by the template text
/// of a GGUF), ending with the assistant's turn opened when `add_assistant`. Messages are
/// (role, content) pairs. Errors when llama.cpp does not know the template.
pub fn apply_chat_template(
    template: &str,
    messages: &[(String, String)],
    add_assistant: bool,
) -> Result<String, LlamaError> {
    let nul = |what: &str| LlamaError::InvalidArgument(format!("the {what} contains a NUL byte"));
    let tmpl = CString::new(template).map_err(|_| nul("chat template"))?;
    let owned: Vec<(CString, CString)> = messages
        .iter()
        .map(|(r, c)| {
            Ok((
                CString::new(r.as_str()).map_err(|_| nul("role"))?,
                CString::new(c.as_str()).map_err(|_| nul("message content"))?,
            ))
        })
        .collect::<Result<_, LlamaError>>()?;
    let chat: Vec<ffi::llama_chat_message> =
        owned.iter().map(|(r, c)| ffi::llama_chat_message { role: r.as_ptr(), content: c.as_ptr() }).collect();
    let total: usize = messages.iter().map(|(r, c)| r.len() + c.len()).sum();
    let mut buf = vec![0u8; (total * 2 + 256).min(i32::MAX as usize)];
    let call = |buf: &mut Vec<u8>| unsafe {
        ffi::llama_chat_apply_template(
            tmpl.as_ptr(),
            chat.as_ptr(),
            chat.len(),
            add_assistant,
            buf.as_mut_ptr().cast(),
            buf.len() as i32,
        )
    };
    let mut n = call(&mut buf);
    if n > buf.len() as i32 {
        buf.resize(n as usize, 0);
        n = call(&mut buf);
    }
    if n < 0 {
        return Err(LlamaError::InvalidArgument(
            "llama.cpp does not know this chat template (its built-in ones: chatml, llama3, gemma, ...)".into(),
        ));
    }
    buf.truncate(n as usize);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

// ---------------------------------------------------------------------------------
// Context
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashAttn {
    Auto,
    On,
    Off,
}

#[derive(Clone, Debug)]
pub struct ContextParams {
    pub n_ctx: u32,
    pub n_batch: u32,
    pub n_ubatch: u32,
    pub n_seq_max: u32,
    pub n_threads: i32,
    pub n_threads_batch: i32,
    pub type_k: KvCacheType,
    pub type_v: KvCacheType,
    pub flash_attn: FlashAttn,
    /// Full-size cache for sliding-window layers. llama.cpp's tools use false; so do we.
    pub swa_full: bool,
    /// One KV buffer shared by all sequences (true) or one stream per sequence.
    pub kv_unified: bool,
    /// Compute logits for every token of a batch that asks for them (always true here).
    pub offload_kqv: bool,
    /// Every sequence starts with greedy sampling in the compute graph (llama.cpp's
    /// backend sampling): a decode then returns each output's token and copies no
    /// logits for it ([`Context::sampled_tokens`]; [`Context::set_device_greedy`] turns
    /// it off for a sequence that samples on the host). At most one output per
    /// sequence per call then.
    pub device_greedy: bool,
}

impl ContextParams {
    pub fn new(n_ctx: u32, n_threads: i32) -> ContextParams {
        ContextParams {
            n_ctx,
            n_batch: 2048.min(n_ctx.max(1)),
            n_ubatch: 512.min(n_ctx.max(1)),
            n_seq_max: 1,
            n_threads,
            n_threads_batch: n_threads,
            type_k: KvCacheType::F16,
            type_v: KvCacheType::F16,
            flash_attn: FlashAttn::Auto,
            swa_full: false,
            kv_unified: false,
            offload_kqv: true,
            device_greedy: false,
        }
    }
}

/// Bytes llama.cpp allocated, read from its buffers (see logquant.h).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemoryBreakdown {
    pub model_host: usize,
    pub model_device: usize,
    /// The KV cache.
    pub context_host: usize,
    pub context_device: usize,
    pub compute_host: usize,
    pub compute_device: usize,
}

impl MemoryBreakdown {
    /// Weights + KV cache + compute buffers, host and device.
    pub fn total(&self) -> usize {
        self.model_host + self.model_device + self.kv_bytes() + self.compute_host + self.compute_device
    }

    pub fn kv_bytes(&self) -> usize {
        self.context_host + self.context_device
    }
}

pub struct Context<'m> {
    ptr: NonNull<ffi::llama_context>,
    model: &'m Model,
    n_ctx: u32,
    n_batch: u32,
    n_seq_max: u32,
    /// Which positions of the last decoded batch produced logits (llama.cpp asserts
    /// when asked for logits it does not have).
    last_outputs: Vec<bool>,
    /// Per sequence, the greedy sampler chain llama.cpp runs in the graph for it (see
    /// [`ContextParams::device_greedy`]); the context only borrows them, so they are
    /// freed after it.
    device_greedy: Vec<Option<NonNull<ffi::llama_sampler>>>,
}

/// A sampler chain of one greedy sampler (what llama.cpp's backend sampling takes).
fn greedy_chain() -> NonNull<ffi::llama_sampler> {
    unsafe {
        let chain = ffi::llama_sampler_chain_init(ffi::llama_sampler_chain_default_params());
        ffi::llama_sampler_chain_add(chain, ffi::llama_sampler_init_greedy());
        NonNull::new(chain).expect("llama_sampler_chain_init returned NULL")
    }
}

impl<'m> Context<'m> {
    pub fn new(model: &'m Model, params: &ContextParams) -> Result<Context<'m>, LlamaError> {
        if params.n_ctx == 0 || params.n_batch == 0 || params.n_ubatch == 0 || params.n_seq_max == 0 {
            return Err(LlamaError::InvalidArgument(
                "context size, batch size, micro-batch size and sequence count must be positive".into(),
            ));
        }
        let mut cp = unsafe { ffi::llama_context_default_params() };
        cp.n_ctx = params.n_ctx;
        cp.n_batch = params.n_batch;
        cp.n_ubatch = params.n_ubatch.min(params.n_batch);
        cp.n_seq_max = params.n_seq_max;
        cp.n_threads = params.n_threads;
        cp.n_threads_batch = params.n_threads_batch;
        cp.type_k = params.type_k.ggml_type().id();
        cp.type_v = params.type_v.ggml_type().id();
        cp.flash_attn_type = match params.flash_attn {
            FlashAttn::Auto => ffi::llama_flash_attn_type_LLAMA_FLASH_ATTN_TYPE_AUTO,
            FlashAttn::On => ffi::llama_flash_attn_type_LLAMA_FLASH_ATTN_TYPE_ENABLED,
            FlashAttn::Off => ffi::llama_flash_attn_type_LLAMA_FLASH_ATTN_TYPE_DISABLED,
        };
        cp.swa_full = params.swa_full;
        cp.kv_unified = params.kv_unified;
        cp.offload_kqv = params.offload_kqv;
        cp.no_perf = true;
        // Given at creation, the samplers are in the graphs llama.cpp reserves its
        // buffers for (set later, each change makes it reserve again). llama.cpp only
        // logs a sampler it refuses here (with a tensor-split model, which logquant
        // never makes; a greedy chain is otherwise always taken), and cannot be asked
        // again (a second backend_init of one chain aborts).
        let device_greedy: Vec<Option<NonNull<ffi::llama_sampler>>> =
            (0..params.n_seq_max).map(|_| params.device_greedy.then(greedy_chain)).collect();
        let mut configs: Vec<ffi::llama_sampler_seq_config> = device_greedy
            .iter()
            .enumerate()
            .filter_map(|(seq, c)| c.map(|c| ffi::llama_sampler_seq_config { seq_id: seq as i32, sampler: c.as_ptr() }))
            .collect();
        if params.device_greedy {
            cp.samplers = configs.as_mut_ptr();
            cp.n_samplers = configs.len();
            cp.n_outputs_max_per_seq = 1;
        }
        take_recent_log();
        let ptr = unsafe { ffi::llama_init_from_model(model.ptr.as_ptr(), cp) };
        let Some(ptr) = NonNull::new(ptr) else {
            let reason = take_recent_log();
            device_greedy.into_iter().flatten().for_each(|c| unsafe { ffi::llama_sampler_free(c.as_ptr()) });
            return Err(LlamaError::ContextCreate { reason });
        };
        let (n_ctx, n_batch) = unsafe { (ffi::llama_n_ctx(ptr.as_ptr()), ffi::llama_n_batch(ptr.as_ptr())) };
        let n_seq_max = params.n_seq_max;
        Ok(Context { ptr, model, n_ctx, n_batch, n_seq_max, last_outputs: Vec::new(), device_greedy })
    }

    /// Turns the in-graph greedy sampling of `seq` on or off (see
    /// [`ContextParams::device_greedy`]); false if llama.cpp cannot run it on this
    /// backend (the sequence's logits are then copied out as usual). A change makes
    /// llama.cpp reserve its compute buffers again at the next decode.
    pub fn set_device_greedy(&mut self, seq: i32, on: bool) -> Result<bool, LlamaError> {
        self.check_seq(seq)?;
        let slot = &mut self.device_greedy[seq as usize];
        if slot.is_some() == on {
            return Ok(true);
        }
        if on {
            let chain = greedy_chain();
            if unsafe { ffi::llama_set_sampler(self.ptr.as_ptr(), seq, chain.as_ptr()) } {
                *slot = Some(chain);
                Ok(true)
            } else {
                unsafe { ffi::llama_sampler_free(chain.as_ptr()) };
                Ok(false)
            }
        } else {
            unsafe { ffi::llama_set_sampler(self.ptr.as_ptr(), seq, std::ptr::null_mut()) };
            let chain = slot.take().expect("checked above");
            unsafe { ffi::llama_sampler_free(chain.as_ptr()) };
            Ok(true)
        }
    }

    /// The tokens llama.cpp's in-graph greedy samplers chose for positions `rows` of
    /// the last decoded batch (each of a sequence that samples on the device, and each
    /// asked for logits). Waits for the backend once.
    pub fn sampled_tokens(&mut self, rows: &[usize]) -> Vec<Result<Token, LlamaError>> {
        self.synchronize();
        rows.iter()
            .map(|&i| {
                self.check_output(i)?;
                match unsafe { ffi::llama_get_sampled_token_ith(self.ptr.as_ptr(), i as i32) } {
                    ffi::LLAMA_TOKEN_NULL => Err(LlamaError::InvalidArgument(format!(
                        "no token was sampled on the device for batch position {i}"
                    ))),
                    token => Ok(token),
                }
            })
            .collect()
    }

    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// The context size llama.cpp settled on (it may round up).
    pub fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    pub fn n_batch(&self) -> u32 {
        self.n_batch
    }

    /// The micro-batch: the most tokens llama.cpp computes at once.
    pub fn n_ubatch(&self) -> u32 {
        unsafe { ffi::llama_n_ubatch(self.ptr.as_ptr()) }
    }

    pub fn n_seq_max(&self) -> u32 {
        self.n_seq_max
    }

    /// Runs the model over `batch`, appending its tokens to the KV cache.
    pub fn decode(&mut self, batch: &Batch) -> Result<(), LlamaError> {
        if batch.is_empty() {
            return Err(LlamaError::Decode("empty batch".into()));
        }
        if batch.len() > self.n_batch as usize {
            return Err(LlamaError::Decode(format!(
                "batch of {} tokens exceeds the batch size {} (raise -b)",
                batch.len(),
                self.n_batch
            )));
        }
        for i in 0..batch.len() {
            let seq = batch.seq_of(i);
            if seq < 0 || seq as u32 >= self.n_seq_max {
                return Err(LlamaError::Decode(format!(
                    "sequence id {seq} outside 0..{} of this context",
                    self.n_seq_max
                )));
            }
            self.model.check_token(batch.token_of(i)).map_err(|e| LlamaError::Decode(e.to_string()))?;
        }
        take_recent_log();
        self.last_outputs.clear();
        let rc = unsafe { ffi::llama_decode(self.ptr.as_ptr(), batch.raw) };
        match rc {
            0 => {
                self.last_outputs = (0..batch.len()).map(|i| batch.wants_logits(i)).collect();
                Ok(())
            }
            1 => Err(LlamaError::Decode(
                "the KV cache is full: no slot for the batch (raise -c or shorten the input)".into(),
            )),
            2 => Err(LlamaError::Decode("aborted".into())),
            -1 => Err(LlamaError::Decode(format!("invalid batch: {}", take_recent_log()))),
            rc => Err(LlamaError::Decode(format!("llama_decode failed ({rc}): {}", take_recent_log()))),
        }
    }

    /// Logits of the i-th token of the last decoded batch (which must have asked for them).
    pub fn logits(&self, i: usize) -> Result<&[f32], LlamaError> {
        self.check_output(i)?;
        let ptr = unsafe { ffi::llama_get_logits_ith(self.ptr.as_ptr(), i as i32) };
        if ptr.is_null() {
            return Err(LlamaError::InvalidArgument(format!("no logits for batch position {i}")));
        }
        Ok(unsafe { std::slice::from_raw_parts(ptr, self.model.n_vocab()) })
    }

    fn check_output(&self, i: usize) -> Result<(), LlamaError> {
        if !self.last_outputs.get(i).copied().unwrap_or(false) {
            return Err(LlamaError::InvalidArgument(format!(
                "position {i} of the last decoded batch produced no logits"
            )));
        }
        Ok(())
    }

    /// Waits until the backend has finished the last decode (GPU backends run
    /// asynchronously; a timer must stop after this, not after `decode`).
    pub fn synchronize(&mut self) {
        unsafe { ffi::llama_synchronize(self.ptr.as_ptr()) }
    }

    fn check_seq(&self, seq: i32) -> Result<(), LlamaError> {
        if seq < 0 || seq as u32 >= self.n_seq_max {
            return Err(LlamaError::InvalidArgument(format!("sequence {seq} outside 0..{}", self.n_seq_max)));
        }
        Ok(())
    }

    /// Forgets every token of every sequence.
    pub fn clear(&mut self) {
        unsafe { ffi::llama_memory_clear(ffi::llama_get_memory(self.ptr.as_ptr()), true) }
    }

    /// Removes positions [p0, p1) of a sequence (p1 < 0: to the end).
    pub fn remove(&mut self, seq: i32, p0: i32, p1: i32) -> Result<bool, LlamaError> {
        self.check_seq(seq)?;
        Ok(unsafe { ffi::llama_memory_seq_rm(ffi::llama_get_memory(self.ptr.as_ptr()), seq, p0, p1) })
    }

    /// Copies every token of sequence `src` to `dst` (whole sequences only: llama.cpp
    /// asserts on partial copies between KV streams). The data moves at the next decode.
    pub fn copy_sequence(&mut self, src: i32, dst: i32) -> Result<(), LlamaError> {
        self.check_seq(src)?;
        self.check_seq(dst)?;
        unsafe { ffi::llama_memory_seq_cp(ffi::llama_get_memory(self.ptr.as_ptr()), src, dst, -1, -1) };
        Ok(())
    }

    /// Adds LogQuant's f16 overlay of `n_slots` tokens per KV stream (logquant.h), with
    /// K and/or V centered per stream as `center` says, and keys by channel if asked. Only on a fresh context with
    /// flash attention on.
    pub fn enable_overlay(&mut self, n_slots: u32, center: Centering, keys_by_channel: bool) -> Result<(), LlamaError> {
        let flags = if center.k { ffi::LOGQUANT_CENTER_K } else { 0 }
            | if center.v { ffi::LOGQUANT_CENTER_V } else { 0 }
            | if keys_by_channel { ffi::LOGQUANT_KEYS_BY_CHANNEL } else { 0 };
        overlay_result(unsafe { ffi::logquant_overlay_enable_flags(self.ptr.as_ptr(), n_slots, flags) }.into())
            .map(|_| ())
    }

    /// Keeps only `positions` (ascending) of `seq` at full precision; demotes the rest.
    pub fn set_full_precision(&mut self, seq: i32, positions: &[i32]) -> Result<(), LlamaError> {
        self.set_full_precision_in(seq, positions, CacheLayers::All)
    }

    /// The same in the caches of `layers` only (a model without sliding-window layers
    /// has only the global cache).
    pub fn set_full_precision_in(
        &mut self,
        seq: i32,
        positions: &[i32],
        layers: CacheLayers,
    ) -> Result<(), LlamaError> {
        self.check_seq(seq)?;
        if !positions.windows(2).all(|w| w[0] < w[1]) {
            return Err(LlamaError::InvalidArgument("full-precision positions must be strictly ascending".into()));
        }
        let layers = match layers {
            CacheLayers::All => ffi::LOGQUANT_LAYERS_ALL,
            CacheLayers::Global => ffi::LOGQUANT_LAYERS_GLOBAL,
            CacheLayers::SlidingWindow => ffi::LOGQUANT_LAYERS_SWA,
        };
        let rc = unsafe {
            ffi::logquant_seq_set_full_precision_in(self.ptr.as_ptr(), seq, positions.as_ptr(), positions.len(), layers)
        };
        overlay_result(rc.into()).map(|_| ())
    }

    /// The positions of `seq` the cache holds at full precision, ascending (read back
    /// from the C side: what the kernels really use).
    pub fn full_precision(&mut self, seq: i32) -> Result<Vec<i32>, LlamaError> {
        self.check_seq(seq)?;
        let mut out = vec![0i32; 64];
        loop {
            let n = overlay_result(unsafe {
                ffi::logquant_seq_full_precision(self.ptr.as_ptr(), seq, out.as_mut_ptr(), out.len())
            })? as usize;
            if n <= out.len() {
                out.truncate(n);
                return Ok(out);
            }
            out.resize(n, 0);
        }
    }

    /// The key of `seq`'s token at `pos` in model layer `layer`, as attention reads it:
    /// from the 2-bit store (`from_store`; by channel where its group is held so) or
    /// from the overlay's f16 copy. For tests of what the cache holds.
    pub fn read_key(&mut self, seq: i32, layer: i32, pos: i32, from_store: bool) -> Result<Vec<f32>, LlamaError> {
        self.check_seq(seq)?;
        let mut out = vec![0f32; 1 << 16];
        let n = overlay_result(unsafe {
            ffi::logquant_seq_read_key(self.ptr.as_ptr(), seq, layer, pos, from_store, out.as_mut_ptr(), out.len())
        })? as usize;
        out.truncate(n);
        Ok(out)
    }

    /// The overlay's capacity, use and misses; None when the context has no overlay.
    pub fn overlay_stats(&self) -> Option<OverlayStats> {
        let mut s = ffi::logquant_overlay_stats {
            enabled: false,
            slots_per_stream: 0,
            slots_used: 0,
            misses: 0,
            bytes_host: 0,
            bytes_device: 0,
        };
        unsafe { ffi::logquant_overlay_get_stats(self.ptr.as_ptr(), &mut s) };
        s.enabled.then_some(OverlayStats {
            slots_per_stream: s.slots_per_stream,
            slots_used: s.slots_used,
            misses: s.misses,
            bytes: s.bytes_host + s.bytes_device,
        })
    }

    /// Allocation sizes read from llama.cpp's buffers.
    pub fn memory(&self) -> MemoryBreakdown {
        let mut m = ffi::logquant_memory {
            model_host: 0,
            model_device: 0,
            context_host: 0,
            context_device: 0,
            compute_host: 0,
            compute_device: 0,
        };
        unsafe { ffi::logquant_memory_breakdown(self.ptr.as_ptr(), &mut m) };
        MemoryBreakdown {
            model_host: m.model_host,
            model_device: m.model_device,
            context_host: m.context_host,
            context_device: m.context_device,
            compute_host: m.compute_host,
            compute_device: m.compute_device,
        }
    }
}

/// Which KV caches of a context a call addresses: a model with sliding-window layers
/// has one for its global layers and one for those.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheLayers {
    All,
    Global,
    SlidingWindow,
}

/// The state of LogQuant's overlay in one context (all caches and streams).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverlayStats {
    pub slots_per_stream: u32,
    pub slots_used: u64,
    /// Tokens written while every slot was taken (they stayed 2-bit only).
    pub misses: u64,
    pub bytes: usize,
}

/// A logquant.h return code: non-negative is a result, negative an error whose text
/// logquant_last_error() holds.
fn overlay_result(rc: i64) -> Result<i64, LlamaError> {
    if rc >= 0 {
        return Ok(rc);
    }
    Err(last_logquant_error())
}

/// A ggml backend's name as C wants it.
fn backend_name(backend: &str) -> Result<std::ffi::CString, LlamaError> {
    std::ffi::CString::new(backend).map_err(|_| LlamaError::InvalidArgument(format!("backend name {backend:?}")))
}

/// The error logquant_last_error() holds.
fn last_logquant_error() -> LlamaError {
    LlamaError::Overlay(unsafe { CStr::from_ptr(ffi::logquant_last_error()) }.to_string_lossy().into_owned())
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        unsafe { ffi::llama_free(self.ptr.as_ptr()) }
        for chain in self.device_greedy.drain(..).flatten() {
            unsafe { ffi::llama_sampler_free(chain.as_ptr()) }
        }
    }
}

// ---------------------------------------------------------------------------------
// Batch
// ---------------------------------------------------------------------------------

/// Tokens to decode together, each with its position, sequence and whether its
/// logits are wanted. One sequence id per token.
pub struct Batch {
    raw: ffi::llama_batch,
    capacity: usize,
}

impl Batch {
    pub fn new(capacity: usize) -> Result<Batch, LlamaError> {
        let capacity = capacity.max(1);
        let n = i32::try_from(capacity)
            .map_err(|_| LlamaError::InvalidArgument(format!("a batch of {capacity} tokens is too large")))?;
        let raw = unsafe { ffi::llama_batch_init(n, 0, 1) };
        let mut b = Batch { raw, capacity };
        // llama_batch_init leaves NULL arrays when malloc fails; Drop frees what exists.
        let allocated = !raw.token.is_null()
            && !raw.pos.is_null()
            && !raw.n_seq_id.is_null()
            && !raw.seq_id.is_null()
            && !raw.logits.is_null()
            && (0..capacity).all(|i| unsafe { !(*raw.seq_id.add(i)).is_null() });
        if !allocated {
            return Err(LlamaError::InvalidArgument(format!("cannot allocate a batch of {capacity} tokens")));
        }
        b.clear();
        Ok(b)
    }

    pub fn clear(&mut self) {
        self.raw.n_tokens = 0;
    }

    pub fn len(&self) -> usize {
        self.raw.n_tokens as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn add(&mut self, token: Token, pos: i32, seq: i32, logits: bool) -> Result<(), LlamaError> {
        let i = self.len();
        if i >= self.capacity {
            return Err(LlamaError::BatchFull { capacity: self.capacity });
        }
        unsafe {
            *self.raw.token.add(i) = token;
            *self.raw.pos.add(i) = pos;
            *self.raw.n_seq_id.add(i) = 1;
            *(*self.raw.seq_id.add(i)) = seq;
            *self.raw.logits.add(i) = logits as i8;
        }
        self.raw.n_tokens += 1;
        Ok(())
    }

    fn token_of(&self, i: usize) -> Token {
        assert!(i < self.len());
        unsafe { *self.raw.token.add(i) }
    }

    /// The sequence of token `i` (panics beyond `len()`).
    pub fn seq_of(&self, i: usize) -> i32 {
        assert!(i < self.len());
        unsafe { *(*self.raw.seq_id.add(i)) }
    }

    /// The position of token `i` (panics beyond `len()`).
    pub fn pos_of(&self, i: usize) -> i32 {
        assert!(i < self.len());
        unsafe { *self.raw.pos.add(i) }
    }

    pub fn wants_logits(&self, i: usize) -> bool {
        i < self.len() && unsafe { *self.raw.logits.add(i) } != 0
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        unsafe { ffi::llama_batch_free(self.raw) }
    }
}

// ---------------------------------------------------------------------------------
// Sampler
// ---------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct SamplerParams {
    /// 0 = greedy (argmax).
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub seed: u32,
}

pub struct Sampler {
    ptr: NonNull<ffi::llama_sampler>,
    greedy: bool,
    /// The candidates (every token with its logit) the chain works on, kept between calls.
    candidates: Vec<ffi::llama_token_data>,
}

// A sampler chain is an object of its own (its state: the dist sampler's generator),
// touched only through &mut self: it may move to another thread.
unsafe impl Send for Sampler {}

impl Sampler {
    pub fn new(p: &SamplerParams) -> Sampler {
        unsafe {
            let chain = ffi::llama_sampler_chain_init(ffi::llama_sampler_chain_default_params());
            if p.temperature <= 0.0 {
                ffi::llama_sampler_chain_add(chain, ffi::llama_sampler_init_greedy());
            } else {
                if p.top_k > 0 {
                    ffi::llama_sampler_chain_add(chain, ffi::llama_sampler_init_top_k(p.top_k));
                }
                if p.top_p < 1.0 {
                    ffi::llama_sampler_chain_add(chain, ffi::llama_sampler_init_top_p(p.top_p, 1));
                }
                ffi::llama_sampler_chain_add(chain, ffi::llama_sampler_init_temp(p.temperature));
                ffi::llama_sampler_chain_add(chain, ffi::llama_sampler_init_dist(p.seed));
            }
            Sampler {
                ptr: NonNull::new(chain).expect("llama_sampler_chain_init returned NULL"),
                greedy: p.temperature <= 0.0,
                candidates: Vec::new(),
            }
        }
    }

    /// Samples from the logits of batch position `i` of the last decode, and accepts it.
    pub fn sample(&mut self, ctx: &mut Context, i: usize) -> Result<Token, LlamaError> {
        let logits = ctx.logits(i)?;
        self.sample_logits(logits)
    }

    /// The same through llama.cpp's own entry point, `llama_sampler_sample`, which reads
    /// the context (tests hold [`Sampler::sample_logits`] to it).
    pub fn sample_through_llama(&mut self, ctx: &mut Context, i: usize) -> Result<Token, LlamaError> {
        ctx.check_output(i)?;
        Ok(unsafe { ffi::llama_sampler_sample(self.ptr.as_ptr(), ctx.ptr.as_ptr(), i as i32) })
    }

    /// Samples from one row of logits (every token's) and accepts the token: the steps
    /// of llama.cpp's `llama_sampler_sample` without the context, so that a server can
    /// sample its sequences on several threads. Greedy takes the first largest logit,
    /// as llama.cpp's greedy sampler does, without building the candidates.
    pub fn sample_logits(&mut self, logits: &[f32]) -> Result<Token, LlamaError> {
        if logits.is_empty() {
            return Err(LlamaError::InvalidArgument("no logits to sample from".into()));
        }
        let token = if self.greedy {
            first_largest(logits) as Token
        } else {
            self.candidates.clear();
            self.candidates.extend(logits.iter().enumerate().map(|(i, &logit)| ffi::llama_token_data {
                id: i as Token,
                logit,
                p: 0.0,
            }));
            let mut cur = ffi::llama_token_data_array {
                data: self.candidates.as_mut_ptr(),
                size: self.candidates.len(),
                selected: -1,
                sorted: false,
            };
            unsafe { ffi::llama_sampler_apply(self.ptr.as_ptr(), &mut cur) };
            if cur.selected < 0 || cur.selected as usize >= cur.size {
                return Err(LlamaError::InvalidArgument("the sampler chain selected no token".into()));
            }
            // The chain may have sorted or shrunk the candidates in place.
            unsafe { (*cur.data.add(cur.selected as usize)).id }
        };
        unsafe { ffi::llama_sampler_accept(self.ptr.as_ptr(), token) };
        Ok(token)
    }
}

/// The index of the first largest value (NaN never largest; 0 when the first value is
/// NaN or all are): what a scan with `>` from index 0 returns, as llama.cpp's greedy
/// sampler scans. In two vector-friendly passes (the maximum over 8 lanes, then the
/// first index holding it): a scan's dependence on the best so far kept it scalar,
/// ~2 ms a step for 128 sequences of a 128k vocabulary on 8 threads.
fn first_largest(values: &[f32]) -> usize {
    if values.is_empty() || values[0].is_nan() {
        return 0;
    }
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            // (a NaN v leaves m: `v > m` is false)
            *m = if v > *m { v } else { *m };
        }
    }
    let max = lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    values.iter().position(|&v| v == max).unwrap_or(0)
}

impl Drop for Sampler {
    fn drop(&mut self) {
        unsafe { ffi::llama_sampler_free(self.ptr.as_ptr()) }
    }
}

// ---------------------------------------------------------------------------------
// The 2-bit KV format's kernels (for tests against crate::lq2)
// ---------------------------------------------------------------------------------

/// Tokens a stream holds when a centering cache freezes its offsets (after the decode
/// that reaches that many): each channel's mean over them, position 0 left out.
pub const CENTER_TOKENS: u32 = ffi::LOGQUANT_CENTER_TOKENS;

/// The C kernels of the lq2 and lq3 formats, exactly as the KV cache runs them. The
/// functions without `_as` are lq2's.
pub mod lq2_kernels {
    use super::{ffi, LlamaError};
    pub use crate::lq2::Format;

    fn check(n: usize) -> Result<(), LlamaError> {
        if n == 0 || n % 64 != 0 {
            return Err(LlamaError::InvalidArgument(format!("lq2/lq3 need a positive multiple of 64 values, not {n}")));
        }
        Ok(())
    }

    pub fn block_bytes() -> usize {
        block_bytes_of(Format::Lq2)
    }

    /// Bytes of a block as the patched ggml has it.
    pub fn block_bytes_of(format: Format) -> usize {
        unsafe { ffi::logquant_lq_block_bytes(format.ggml_type()) }
    }

    /// `reference`: ggml's from_float_ref; else the CPU backend's from_float (set_rows).
    pub fn quantize(x: &[f32], reference: bool) -> Result<Vec<u8>, LlamaError> {
        quantize_as(Format::Lq2, x, reference)
    }

    pub fn quantize_as(format: Format, x: &[f32], reference: bool) -> Result<Vec<u8>, LlamaError> {
        check(x.len())?;
        let mut out = vec![0u16; x.len() / 64 * block_bytes_of(format) / 2];
        let ok = unsafe {
            ffi::logquant_lq_quantize(
                format.ggml_type(),
                x.as_ptr(),
                out.as_mut_ptr().cast(),
                x.len() as i64,
                reference,
            )
        };
        let bytes = out.iter().flat_map(|v| v.to_ne_bytes()).collect();
        ok.then_some(bytes).ok_or_else(|| LlamaError::InvalidArgument("logquant_lq_quantize refused".into()))
    }

    /// The blocks copied into 2-byte-aligned storage: the blocks hold u16 fields, and
    /// a `&[u8]` may start anywhere.
    fn aligned(blocks: &[u8]) -> Vec<u16> {
        blocks.chunks(2).map(|c| u16::from_ne_bytes([c[0], *c.get(1).unwrap_or(&0)])).collect()
    }

    pub fn dequantize(blocks: &[u8]) -> Result<Vec<f32>, LlamaError> {
        dequantize_as(Format::Lq2, blocks)
    }

    pub fn dequantize_as(format: Format, blocks: &[u8]) -> Result<Vec<f32>, LlamaError> {
        let bb = block_bytes_of(format);
        if blocks.is_empty() || blocks.len() % bb != 0 {
            return Err(LlamaError::InvalidArgument(format!("{} bytes is not a whole number of blocks", blocks.len())));
        }
        let n = blocks.len() / bb * 64;
        let mut out = vec![0f32; n];
        let blocks = aligned(blocks);
        let ok = unsafe {
            ffi::logquant_lq_dequantize(format.ggml_type(), blocks.as_ptr().cast(), out.as_mut_ptr(), n as i64)
        };
        ok.then_some(out).ok_or_else(|| LlamaError::InvalidArgument("logquant_lq_dequantize refused".into()))
    }

    /// Quantization as the cache writes tokens: ggml_set_rows of rows of `n_per_row`
    /// values into an lq2 tensor on the ggml backend `backend` ("CPU", "CUDA0", ...).
    pub fn set_rows_on(x: &[f32], n_per_row: usize, backend: &str) -> Result<Vec<u8>, LlamaError> {
        set_rows_as_on(Format::Lq2, x, n_per_row, backend)
    }

    pub fn set_rows_as_on(format: Format, x: &[f32], n_per_row: usize, backend: &str) -> Result<Vec<u8>, LlamaError> {
        check(n_per_row)?;
        if x.is_empty() || x.len() % n_per_row != 0 {
            return Err(LlamaError::InvalidArgument("x is not a whole number of rows".into()));
        }
        let name = super::backend_name(backend)?;
        let mut out = vec![0u16; x.len() / 64 * block_bytes_of(format) / 2];
        let rows = (x.len() / n_per_row) as i64;
        let ok = unsafe {
            ffi::logquant_lq_set_rows_run(
                format.ggml_type(),
                x.as_ptr(),
                rows,
                n_per_row as i64,
                out.as_mut_ptr().cast(),
                name.as_ptr(),
            )
        };
        if !ok {
            return Err(super::last_logquant_error());
        }
        Ok(out.iter().flat_map(|v| v.to_ne_bytes()).collect())
    }

    /// The CPU dot product of attention's K.q: dequant(blocks) . y.
    pub fn dot(blocks: &[u8], y: &[f32]) -> Result<f32, LlamaError> {
        dot_as(Format::Lq2, blocks, y)
    }

    pub fn dot_as(format: Format, blocks: &[u8], y: &[f32]) -> Result<f32, LlamaError> {
        check(y.len())?;
        if blocks.len() != y.len() / 64 * block_bytes_of(format) {
            return Err(LlamaError::InvalidArgument("blocks and y differ in length".into()));
        }
        let mut out = 0f32;
        let blocks = aligned(blocks);
        let ok = unsafe {
            ffi::logquant_lq_dot(format.ggml_type(), blocks.as_ptr().cast(), y.as_ptr(), y.len() as i64, &mut out)
        };
        ok.then_some(out).ok_or_else(|| LlamaError::InvalidArgument("logquant_lq_dot refused".into()))
    }
}

/// The CPU two-tier attention kernel, run on caller-provided buffers (logquant.h's
/// `logquant_attn_run`), for tests against an independent implementation.
pub mod two_tier_kernel {
    use super::{ffi, LlamaError};

    /// One attention problem. Layouts: `q` [tokens][heads][dim]; `k_store`/`v_store`
    /// lq2 rows [cells][kv heads] of `dim` values; overlays [slots][kv heads][dim] as
    /// f16 bits; `mask` [tokens][cells] of 0 or -inf.
    pub struct Case<'a> {
        pub head_dim: usize,
        pub n_head: usize,
        pub n_head_kv: usize,
        pub n_tokens: usize,
        pub n_kv: usize,
        pub scale: f32,
        pub q: &'a [f32],
        pub k_store: &'a [u8],
        pub v_store: &'a [u8],
        pub k_overlay: &'a [u16],
        pub v_overlay: &'a [u16],
        pub slot_to_cell: &'a [i32],
        pub mask: &'a [f32],
        pub threads: usize,
        /// Keys by channel: per group of 64 cells, whether `k_store` holds it by
        /// channel (lq2::quantize_by_channel's layout); empty: none.
        pub k_by_channel: &'a [bool],
        /// The K store's format (the V store is lq2).
        pub k_format: super::lq2_kernels::Format,
    }

    /// The attention output [tokens][heads][dim], from the CPU kernel.
    pub fn run(c: &Case) -> Result<Vec<f32>, LlamaError> {
        run_on(c, "CPU")
    }

    /// The same from the kernels of the ggml backend `backend` ("CPU", "CUDA0", ...).
    pub fn run_on(c: &Case, backend: &str) -> Result<Vec<f32>, LlamaError> {
        let mut out = vec![0f32; c.q.len()];
        let raw = raw_case(c, &mut out)?;
        let name = super::backend_name(backend)?;
        if !unsafe { ffi::logquant_attn_run_on(&raw, name.as_ptr()) } {
            return Err(super::last_logquant_error());
        }
        Ok(out)
    }

    /// Mean milliseconds of one run of the op on `backend`, over `reps` runs after a warm-up.
    pub fn time_on(c: &Case, backend: &str, reps: u32) -> Result<f64, LlamaError> {
        let mut out = vec![0f32; c.q.len()];
        let raw = raw_case(c, &mut out)?;
        let name = super::backend_name(backend)?;
        let reps = i32::try_from(reps.max(1)).unwrap_or(i32::MAX);
        let ms = unsafe { ffi::logquant_attn_time_on(&raw, name.as_ptr(), reps) };
        if ms < 0.0 {
            return Err(super::last_logquant_error());
        }
        Ok(ms)
    }

    fn raw_case(c: &Case, out: &mut [f32]) -> Result<ffi::logquant_attn_case, LlamaError> {
        let bad = |what: &str| Err(LlamaError::InvalidArgument(format!("two-tier attention case: {what}")));
        let row = c.head_dim / 64 * super::lq2_kernels::block_bytes();
        let k_row = c.head_dim / 64 * super::lq2_kernels::block_bytes_of(c.k_format);
        let n_slots = c.slot_to_cell.len();
        if c.q.len() != c.n_tokens * c.n_head * c.head_dim || c.mask.len() != c.n_tokens * c.n_kv {
            return bad("q or mask has the wrong length");
        }
        if c.k_store.len() != c.n_kv * c.n_head_kv * k_row || c.v_store.len() != c.n_kv * c.n_head_kv * row {
            return bad("store has the wrong length");
        }
        let ov = n_slots * c.n_head_kv * c.head_dim;
        if c.k_overlay.len() != ov || c.v_overlay.len() != ov {
            return bad("overlay has the wrong length");
        }
        if out.len() != c.q.len() {
            return bad("output has the wrong length");
        }
        if !c.k_by_channel.is_empty() && (c.n_kv % 64 != 0 || c.k_by_channel.len() != c.n_kv / 64) {
            return bad("k_by_channel needs one flag per 64 cells");
        }
        let i32_of = |n: usize| i32::try_from(n).map_err(|_| LlamaError::InvalidArgument(format!("{n} is too large")));
        Ok(ffi::logquant_attn_case {
            head_dim: i32_of(c.head_dim)?,
            n_head: i32_of(c.n_head)?,
            n_head_kv: i32_of(c.n_head_kv)?,
            n_tokens: i32_of(c.n_tokens)?,
            n_kv: i32_of(c.n_kv)?,
            n_slots: i32_of(n_slots)?,
            scale: c.scale,
            q: c.q.as_ptr(),
            k_store: c.k_store.as_ptr().cast(),
            v_store: c.v_store.as_ptr().cast(),
            k_overlay: c.k_overlay.as_ptr(),
            v_overlay: c.v_overlay.as_ptr(),
            slot_to_cell: c.slot_to_cell.as_ptr(),
            mask: c.mask.as_ptr(),
            n_threads: i32_of(c.threads.max(1))?,
            out: out.as_mut_ptr(),
            // bool is one byte of 0 or 1 in Rust, what the C side reads as uint8_t
            k_by_channel: if c.k_by_channel.is_empty() { std::ptr::null() } else { c.k_by_channel.as_ptr().cast() },
            k_type: c.k_format.ggml_type(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::first_largest;

    /// The scan the greedy sampler stands for: the first index whose value beats every
    /// earlier best.
    fn scan(values: &[f32]) -> usize {
        let mut best = 0;
        for (i, &v) in values.iter().enumerate().skip(1) {
            if v > values[best] {
                best = i;
            }
        }
        best
    }

    #[test]
    fn first_largest_is_the_scans_answer() {
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for n in [1usize, 2, 7, 8, 9, 31, 64, 1000] {
            for _ in 0..200 {
                // few distinct values, so ties are common; some NaN and infinities
                let v: Vec<f32> = (0..n)
                    .map(|_| match next() % 20 {
                        0 => f32::NAN,
                        1 => f32::NEG_INFINITY,
                        2 => f32::INFINITY,
                        r => (r % 6) as f32 - 2.5,
                    })
                    .collect();
                assert_eq!(first_largest(&v), scan(&v), "{v:?}");
            }
        }
        assert_eq!(first_largest(&[]), 0);
        assert_eq!(first_largest(&[f32::NEG_INFINITY; 9]), 0);
    }
}
