//! `logquant serve`: an OpenAI-compatible HTTP server over one context that holds
//! several sequences, with continuous batching (see [`scheduler`]).
//!
//! - [`api`]: request bodies, their checks, the error body;
//! - [`http`]: routes, the API key, JSON and server-sent-event answers;
//! - [`scheduler`]: the engine thread that owns the llama.cpp context;
//! - [`text`]: tokens to text, stop strings;
//! - [`metrics`]: counters and their Prometheus text.

pub mod api;
pub mod http;
pub mod metrics;
pub mod scheduler;
pub mod text;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crate::engine::{self, ContextConfig, EngineError, LoadedModel};
use crate::gguf::info::LLAMA_MAX_SEQ;
use crate::kvconfig::{Centering, KvConfig};
use crate::llama::{self, FlashAttn, ModelParams};
use crate::plan::{self, PlanOptions, GIB};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot listen on {addr}: {source} (is another server on that port? choose another with --port)")]
    Bind { addr: String, source: std::io::Error },
    #[error("{0}")]
    Setup(String),
}

/// How sequences are counted: given, or as many as fit a memory budget.
#[derive(Clone, Copy, Debug)]
pub enum Capacity {
    Parallel(u32),
    Memory(u64),
}

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub model: PathBuf,
    /// The id /v1/models reports and requests name (default: the file's stem).
    pub alias: Option<String>,
    pub kv: KvConfig,
    /// Tokens per sequence (prompt + answer); 0 = 4096 or the training context if smaller.
    pub ctx_per_seq: u32,
    pub capacity: Capacity,
    /// Requests that may wait for a free sequence; beyond that, 503.
    pub queue: usize,
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    pub gpu_layers: i32,
    pub threads: i32,
    pub flash_attn: FlashAttn,
    /// Tokens per decode call (llama.cpp's n_batch; at least `ubatch`).
    pub batch: u32,
    /// Tokens per micro-batch (llama.cpp's n_ubatch; for the two-tier cache, over all
    /// sequences, at most `chunk` of each): larger prefills faster, smaller leaves more memory
    /// for sequences (the compute buffers grow with it).
    pub ubatch: u32,
    /// Two-tier caches: the most prompt tokens of one sequence per decode call
    /// (`ContextConfig::two_tier_chunk`).
    pub chunk: u32,
    /// Greedy requests are sampled in llama.cpp's graph (the default; off with
    /// `--host-sampling`; `ContextConfig::device_greedy`).
    pub device_greedy: bool,
}

/// What the server found at startup (the line it prints says it too).
pub struct Startup {
    pub address: String,
    pub parallel: u32,
    pub ctx_per_seq: u32,
    pub why: String,
}

/// Loads the model, sizes the context, serves until SIGINT or SIGTERM, and returns
/// once in-flight requests have ended.
pub fn serve(opts: &ServeOptions, on_start: impl FnOnce(&Startup)) -> Result<(), ServeError> {
    if opts.queue == 0 {
        return Err(ServeError::Setup("--queue must be at least 1".into()));
    }
    let params = ModelParams { gpu_layers: opts.gpu_layers, ..ModelParams::default() };
    let loaded = Arc::new(engine::load_model(&opts.model, &params)?);
    let trained = loaded.info.n_ctx_train;
    let ctx_per_seq = match opts.ctx_per_seq {
        0 if trained > 0 => trained.min(4096),
        0 => 4096,
        c => c,
    };
    let mut cfg = ContextConfig::new(0);
    cfg.kv = opts.kv;
    cfg.threads = opts.threads;
    cfg.flash_attn = opts.flash_attn;
    if opts.ubatch == 0 || opts.batch == 0 {
        return Err(ServeError::Setup("--batch-size and --ubatch-size must be at least 1".into()));
    }
    cfg.n_ubatch = opts.ubatch;
    cfg.n_batch = opts.batch.max(opts.ubatch);
    // two-tier calls as wide as a stock cache's (n_batch), split by llama.cpp into
    // micro-batches of --ubatch-size: fewer calls, so fewer policy runs and fewer
    // micro-batches of one token per generating sequence while prompts prefill
    cfg.two_tier_batch = cfg.n_batch;
    cfg.device_greedy = opts.device_greedy;
    cfg.two_tier_chunk = opts.chunk;
    let (parallel, why) = match opts.capacity {
        Capacity::Parallel(n) if n == 0 || n > LLAMA_MAX_SEQ => {
            return Err(ServeError::Setup(format!("--parallel must be within 1..={LLAMA_MAX_SEQ}, not {n}")));
        }
        Capacity::Parallel(n) => (n, "--parallel".to_string()),
        Capacity::Memory(budget) => fit(opts, &cfg, ctx_per_seq, budget)?,
    };
    cfg.n_seq = parallel;
    cfg.n_ctx = ctx_per_seq.checked_mul(parallel).ok_or_else(|| {
        ServeError::Setup(format!("{parallel} sequences of {ctx_per_seq} tokens exceed llama.cpp's 2^32 cells"))
    })?;

    let (chat_template, template_source) = pick_template(&loaded)?;
    let metrics = Arc::new(metrics::Metrics::default());
    metrics.parallel.store(u64::from(parallel), Relaxed);
    let (jobs_tx, jobs_rx) = tokio::sync::mpsc::channel(opts.queue);

    // The engine thread creates the context itself (it borrows the model there) and
    // reports whether that worked before the server listens.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(u64, u64), EngineError>>();
    let engine_model = loaded.clone();
    let engine_metrics = metrics.clone();
    // A cache that centers freezes a sequence's offsets after the decode that gives it
    // LOGQUANT_CENTER_TOKENS tokens, requantizing on the host every token it holds by
    // then: a first chunk of that many keeps that work to 16 tokens (not a whole
    // chunk of 64 or more) and the offsets those of a prompt's first 16 tokens, as `eval`
    // takes them.
    // (a two-tier sequence takes at most its chunk per call: a wider --lq-chunk widens it)
    let prefill_chunk = 512.max(opts.chunk as usize);
    let centering = cfg.kv.policy.is_some() && cfg.kv.center != Centering::NONE;
    let layout = scheduler::Layout {
        parallel: parallel as usize,
        ctx_per_seq: ctx_per_seq as usize,
        prefill_chunk,
        first_chunk: if centering { llama::CENTER_TOKENS as usize } else { prefill_chunk },
        device_greedy: opts.device_greedy,
    };
    let engine_cfg = cfg.clone();
    let engine = std::thread::Builder::new()
        .name("logquant-engine".into())
        .spawn(move || {
            let model = &*engine_model;
            let session = match model.new_context(&engine_cfg) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let kv = session.memory().kv_bytes() as u64;
            let overlay = model.overlay_bytes(&engine_cfg, engine_cfg.n_ctx).unwrap_or(0);
            let _ = ready_tx.send(Ok((kv, overlay)));
            scheduler::run(model, session, layout, jobs_rx, engine_metrics);
        })
        .map_err(|e| ServeError::Setup(format!("cannot start the engine thread: {e}")))?;
    let (kv, overlay) = match ready_rx.recv() {
        Ok(Ok(sizes)) => sizes,
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => return Err(ServeError::Setup("the engine thread ended while creating the context".into())),
    };
    metrics.kv_store_bytes.store(kv - overlay.min(kv), Relaxed);
    metrics.kv_overlay_bytes.store(overlay, Relaxed);

    let model_id = opts.alias.clone().unwrap_or_else(|| {
        opts.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
    });
    let app = Arc::new(http::App {
        model: loaded.clone(),
        model_id: model_id.clone(),
        chat_template,
        ctx_per_seq: ctx_per_seq as usize,
        api_key: opts.api_key.clone(),
        jobs: jobs_tx,
        metrics,
        next_id: AtomicU64::new(1),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| ServeError::Setup(format!("cannot start the async runtime: {e}")))?;
    let result = runtime.block_on(async {
        let addr = format!("{}:{}", opts.host, opts.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| ServeError::Bind { addr: addr.clone(), source })?;
        let local = listener.local_addr().map_err(|source| ServeError::Bind { addr: addr.clone(), source })?;
        let why = format!(
            "{why}; KV {:.1} MiB ({} store {:.1} MiB, overlay {:.1} MiB), model {model_id} ({}), {template_source}",
            kv as f64 / engine::MIB,
            opts.kv,
            (kv - overlay.min(kv)) as f64 / engine::MIB,
            overlay as f64 / engine::MIB,
            loaded.model.description()
        );
        on_start(&Startup { address: format!("http://{local}"), parallel, ctx_per_seq, why });
        axum::serve(listener, http::router(app))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(|e| ServeError::Setup(format!("the server stopped: {e}")))
    });
    // The router (and with it the job sender) is gone: the engine ends its requests and returns.
    let _ = engine.join();
    result
}

/// The most sequences of `ctx_per_seq` tokens within `budget` (weights + KV + compute
/// buffers), from the memory plan (see `crate::plan`).
fn fit(opts: &ServeOptions, cfg: &ContextConfig, ctx_per_seq: u32, budget: u64) -> Result<(u32, String), ServeError> {
    let sizing = ModelParams { gpu_layers: opts.gpu_layers, no_alloc: true, ..ModelParams::default() };
    let model = engine::load_model(&opts.model, &sizing)?;
    let plan_opts = PlanOptions {
        budget,
        ctx: u64::from(ctx_per_seq),
        max_batch_limit: u64::from(LLAMA_MAX_SEQ),
        template: cfg.clone(),
    };
    let rows = plan::plan(&model, &[opts.kv], &plan_opts)?;
    let Some(fit) = rows.first().and_then(|r| r.max_batch.clone()) else {
        return Err(ServeError::Setup(format!(
            "not even one sequence of {ctx_per_seq} tokens fits in {:.2} GiB with the {} cache: raise --memory or lower -c",
            budget as f64 / GIB,
            opts.kv
        )));
    };
    let why = format!(
        "the memory plan fits {} sequences of {ctx_per_seq} tokens in {:.2} GiB ({:.2} GiB used){}",
        fit.value,
        budget as f64 / GIB,
        fit.bytes as f64 / GIB,
        if fit.limited_by_search { ", llama.cpp's most sequences" } else { "" }
    );
    Ok((fit.value as u32, why))
}

/// The GGUF's chat template when llama.cpp knows it; for a GGUF without one, the
/// built-in template of its model family (Gemma's turn markers for gemma*), else ChatML
/// as llama-server does. Returns the template and where it came from.
fn pick_template(loaded: &LoadedModel) -> Result<(String, String), ServeError> {
    let probe = [("user".to_string(), "hi".to_string())];
    if let Some(t) = loaded.model.chat_template() {
        if llama::apply_chat_template(&t, &probe, true).is_ok() {
            return Ok((t, "the GGUF's chat template".into()));
        }
    }
    let name = if loaded.info.architecture.starts_with("gemma") { "gemma" } else { "chatml" };
    llama::apply_chat_template(name, &probe, true).map_err(|e| ServeError::Setup(e.to_string()))?;
    Ok((name.to_string(), format!("chat template {name} (the GGUF has none that llama.cpp knows)")))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("logquant serve: shutting down; in-flight requests finish first");
}
