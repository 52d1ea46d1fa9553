//! The `logquant` command line: a thin layer over the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use logquant::engine::{self, ContextConfig, MIB};
use logquant::generate::{generate, GenerateParams};
use logquant::gguf::{planned_size, write_synthetic_llama, GgmlType, GgufFile, KvCacheType, ModelInfo, SynthSpec};
use logquant::kvconfig::KvConfig;
use logquant::llama::{self, FlashAttn, ModelParams, SamplerParams};
use logquant::progress::Progress;
use logquant::report::{self, mib, Table};
use logquant::{bench, eval, plan, tasks};

/// Context size when -c is not given (capped by the model's training context).
const DEFAULT_CTX: u32 = 4096;

#[derive(Parser)]
#[command(name = "logquant", version, about = "GGUF models on llama.cpp with a LogQuant KV cache")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Run(RunArgs),
    /// Describe a GGUF model (read by logquant's own GGUF reader, not llama.cpp).
    Inspect(InspectArgs),
    /// Quality of KV caches against an f16 cache: KL divergence, top-1, perplexity.
    Eval(EvalArgs),
    /// Speed and memory of KV caches: prefill and decode at depth, batches of sequences.
    Bench(BenchArgs),
    /// The largest batch and the longest context that fit a memory budget.
    Plan(PlanArgs),
    /// Write a llama-architecture GGUF with random weights (tests; speed and memory runs).
    Synth(SynthArgs),
    /// Serve the model over HTTP with an OpenAI-compatible API (continuous batching).
    #[cfg(feature = "serve")]
    Serve(ServeArgs),
    /// Print the build: llama.cpp version, CPU features, patch series.
    Info,
}

#[cfg(feature = "serve")]
#[derive(Args)]
struct ServeArgs {
    /// Path to a GGUF model.
    #[arg(short = 'm', long = "model")]
    model: PathBuf,
    /// The model id clients name (default: the file name without .gguf).
    #[arg(long = "alias")]
    alias: Option<String>,
    /// KV cache configuration: f16, q8_0, q4_0/q8_0, logquant[:D=384], kivi, streaming, ...
    #[arg(long = "kv", default_value = "logquant", value_parser = parse_kv_one)]
    kv: KvConfig,
    /// Tokens per sequence, prompt and answer (default: 4096, or the training context if smaller).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 0)]
    ctx_size: u32,
    /// Sequences served at once.
    #[arg(long = "parallel", visible_alias = "np", conflicts_with = "memory")]
    parallel: Option<u32>,
    /// Instead of --parallel: as many sequences as fit this memory (weights, KV, buffers), e.g. 4GiB.
    #[arg(long = "memory", value_parser = logquant::plan::parse_size)]
    memory: Option<u64>,
    /// Requests that may wait for a free sequence; more get 503 with Retry-After.
    #[arg(long = "queue", default_value_t = 64)]
    queue: usize,
    /// Address to bind (only this machine by default).
    #[arg(long = "host", default_value = "127.0.0.1")]
    host: String,
    #[arg(long = "port", default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every /v1 request.
    #[arg(long = "api-key", env = "LOGQUANT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Threads for decoding (default: the machine's cores, at most 16).
    #[arg(short = 't', long = "threads")]
    threads: Option<i32>,
    /// Flash attention: on, off or auto.
    #[arg(long = "flash-attn", visible_alias = "fa", value_enum, default_value_t = FlashAttnArg::Auto)]
    flash_attn: FlashAttnArg,
    /// Layers to offload to the GPU (-1 = all); ignored by a CPU-only build.
    #[arg(long = "gpu-layers", visible_alias = "ngl", default_value_t = -1, allow_negative_numbers = true)]
    gpu_layers: i32,
    /// Tokens per decode call (llama.cpp's n_batch): one token of every generating
    /// sequence plus prompt chunks, split into micro-batches of --ubatch-size.
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048)]
    batch_size: u32,
    /// Tokens per micro-batch: larger prefills faster, smaller leaves memory for more sequences.
    #[arg(long = "ubatch-size", visible_alias = "ub", default_value_t = 512)]
    ubatch_size: u32,
    #[command(flatten)]
    chunk: ChunkArg,
    /// Sample every request on the host from its copied logits. By default requests at
    /// temperature 0 are sampled greedily inside llama.cpp's compute graph, one argmax
    /// over all rows of a step, and no logits row is copied out for them (on an H100
    /// 6-11% more tokens/s for f16, q4_0 and logquant alike: BENCHMARKS.md).
    #[arg(long = "host-sampling")]
    host_sampling: bool,
    /// Show llama.cpp's own log on stderr.
    #[arg(short = 'v', long = "verbose")]
    verbose: bool,
}

#[derive(Args)]
struct SynthArgs {
    /// Output file (written to a temporary file, then renamed into place).
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
    /// Shape: tiny (2 layers, width 256) or llama3-8b (32 layers, 32 heads, 8 KV heads, head 128).
    #[arg(long = "shape", value_enum, default_value_t = SynthShape::Tiny)]
    shape: SynthShape,
    /// Weight type: f32, f16, q8_0 or q4_0.
    #[arg(long = "weights", default_value = "f16")]
    weights: String,
    /// Seed of the random weights.
    #[arg(long = "seed")]
    seed: Option<u64>,
}

#[derive(Clone, Copy, ValueEnum)]
enum SynthShape {
    Tiny,
    #[value(name = "llama3-8b")]
    Llama3_8b,
}

/// `--lq-chunk`, shared by every command that creates a two-tier context.
#[derive(Args, Clone)]
struct ChunkArg {
    /// Two-tier caches: the most tokens of one sequence per decode call (at most the
    /// micro-batch, --ubatch-size). Each costs an f16 overlay slot per sequence: wider
    /// prefills in fewer calls, in more memory.
    #[arg(long = "lq-chunk", default_value_t = engine::TWO_TIER_CHUNK)]
    lq_chunk: u32,
}

/// Flags of the measuring commands, which create their own contexts.
#[derive(Args, Clone)]
struct MeasureArgs {
    /// Path to a GGUF model.
    #[arg(short = 'm', long = "model")]
    model: PathBuf,
    /// Cache configurations, comma-separated: f16, q8_0, q4_0/q8_0 (K/V), ...
    #[arg(long = "kv", default_value = "f16,q8_0,q4_0", value_parser = parse_kv_list)]
    kv: Vec<Vec<KvConfig>>,
    /// Threads (default: the machine's cores, at most 16).
    #[arg(short = 't', long = "threads")]
    threads: Option<i32>,
    /// Flash attention: on, off or auto.
    #[arg(long = "flash-attn", visible_alias = "fa", value_enum, default_value_t = FlashAttnArg::Auto)]
    flash_attn: FlashAttnArg,
    /// Layers to offload to the GPU (-1 = all); ignored by a CPU-only build.
    #[arg(long = "gpu-layers", visible_alias = "ngl", default_value_t = -1, allow_negative_numbers = true)]
    gpu_layers: i32,
    #[command(flatten)]
    chunk: ChunkArg,
    /// Also write the results as JSON to FILE ("-" for stdout, replacing the table).
    #[arg(long = "json")]
    json: Option<PathBuf>,
    /// Show llama.cpp's own log on stderr.
    #[arg(short = 'v', long = "verbose")]
    verbose: bool,
}

fn parse_kv_list(s: &str) -> Result<Vec<KvConfig>, String> {
    let list = KvConfig::parse_list(s).map_err(|e| e.to_string())?;
    if list.is_empty() {
        return Err("give at least one cache configuration".into());
    }
    Ok(list)
}

impl MeasureArgs {
    fn context_template(&self) -> ContextConfig {
        let mut cfg = ContextConfig::new(0);
        cfg.threads = self.threads.unwrap_or_else(engine::default_threads);
        cfg.flash_attn = flash_attn(self.flash_attn);
        cfg.two_tier_chunk = self.chunk.lq_chunk;
        cfg
    }

    fn configs(&self) -> Vec<KvConfig> {
        self.kv.iter().flatten().copied().collect()
    }

    /// Writes `value` to the --json destination, if any; true when it replaced the table.
    fn write_json(&self, value: &impl serde::Serialize) -> Result<bool> {
        let Some(path) = &self.json else { return Ok(false) };
        let text = serde_json::to_string_pretty(value)?;
        if path.as_os_str() == "-" {
            println!("{text}");
            return Ok(true);
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text + "\n").with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(false)
    }
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    common: MeasureArgs,
    /// Text to evaluate on.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Tokens of the text to feed (N).
    #[arg(long = "tokens", default_value_t = 4096)]
    tokens: usize,
    /// Tokens per decode call (S); 1 is token-by-token.
    #[arg(long = "step", default_value_t = 16)]
    step: usize,
    /// What to measure: kld (against f16, on the text), passkey (filler from -f) or
    /// lines (next line of the source file -f).
    #[arg(long = "task", value_enum, default_value_t = TaskArg::Kld)]
    task: TaskArg,
    /// passkey: prompt lengths in tokens, comma-separated.
    #[arg(long = "contexts", value_delimiter = ',', default_value = "4096,8192,16384")]
    contexts: Vec<usize>,
    /// passkey: where the key sits, percent of the filler, comma-separated.
    #[arg(long = "depths", value_delimiter = ',', default_value = "10,50,90")]
    depths: Vec<u32>,
    /// passkey: trials per context and depth.
    #[arg(long = "trials", default_value_t = 20)]
    trials: usize,
    /// passkey: seed of the keys.
    #[arg(long = "seed", default_value_t = 1)]
    seed: u64,
    /// lines: lines to score.
    #[arg(long = "lines", default_value_t = 100)]
    lines: usize,
    /// lines: tokens of the file before the first scored line, at least.
    #[arg(long = "prefix", default_value_t = 1024)]
    prefix: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TaskArg {
    Kld,
    Passkey,
    Lines,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    common: MeasureArgs,
    /// Context depths to decode at, comma-separated.
    #[arg(long = "depth", value_delimiter = ',', default_value = "4096")]
    depth: Vec<usize>,
    /// Sequences decoding together, comma-separated.
    #[arg(long = "batch", value_delimiter = ',', default_value = "1")]
    batch: Vec<usize>,
    /// Decode steps per repetition.
    #[arg(long = "gen", default_value_t = 64)]
    gen: usize,
    /// Tokens of the prefill measurement.
    #[arg(long = "prefill", default_value_t = 512)]
    prefill: usize,
    /// Also prefill this many sequences of --prefill tokens at once, as `serve` feeds
    /// prompts (calls of up to -b tokens, each sequence a chunk).
    #[arg(long = "prefill-seqs", default_value_t = 1)]
    prefill_seqs: usize,
    /// Timed repetitions (after one warm-up).
    #[arg(long = "reps", default_value_t = 3)]
    reps: usize,
    /// Logical batch size for filling the context.
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048)]
    batch_size: u32,
    /// Physical batch size.
    #[arg(long = "ubatch-size", visible_alias = "ub", default_value_t = 512)]
    ubatch_size: u32,
}

#[derive(Args)]
struct PlanArgs {
    #[command(flatten)]
    common: MeasureArgs,
    /// Memory budget: weights + KV cache + compute buffers (e.g. 24GiB).
    #[arg(long = "memory", value_parser = logquant::plan::parse_size)]
    memory: u64,
    /// Context per sequence for the largest-batch search.
    #[arg(long = "ctx", default_value_t = 32768)]
    ctx: u64,
    /// Upper end of the batch search (llama.cpp allows at most 256 sequences per context).
    #[arg(long = "max-batch", default_value_t = 256)]
    max_batch: u64,
}

/// Flags shared by every command that creates a llama.cpp context.
#[derive(Args, Clone)]
struct ContextArgs {
    /// Path to a GGUF model.
    #[arg(short = 'm', long = "model")]
    model: PathBuf,
    /// Context size in tokens (default: 4096, or the model's training context if smaller;
    /// 0 = the model's training context).
    #[arg(short = 'c', long = "ctx-size")]
    ctx_size: Option<u32>,
    /// Threads for decoding and prompt processing (default: the machine's cores, at most 16).
    #[arg(short = 't', long = "threads")]
    threads: Option<i32>,
    /// Logical batch size: the most tokens handed to llama.cpp per decode call.
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048)]
    batch_size: u32,
    /// Physical batch size: the most tokens computed at once.
    #[arg(long = "ubatch-size", visible_alias = "ub", default_value_t = 512)]
    ubatch_size: u32,
    #[command(flatten)]
    chunk: ChunkArg,
    /// KV cache type for K (one of f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1, lq2, lq3).
    #[arg(long = "cache-type-k", visible_alias = "ctk", default_value = "f16", value_parser = parse_cache_type)]
    cache_type_k: KvCacheType,
    /// KV cache type for V (quantized V needs flash attention).
    #[arg(long = "cache-type-v", visible_alias = "ctv", default_value = "f16", value_parser = parse_cache_type)]
    cache_type_v: KvCacheType,
    /// Flash attention: on, off or auto (llama.cpp decides).
    #[arg(long = "flash-attn", visible_alias = "fa", value_enum, default_value_t = FlashAttnArg::Auto)]
    flash_attn: FlashAttnArg,
    /// Layers to offload to the GPU (-1 = all); ignored by a CPU-only build.
    #[arg(long = "gpu-layers", visible_alias = "ngl", default_value_t = -1, allow_negative_numbers = true)]
    gpu_layers: i32,
    /// Show llama.cpp's own log on stderr.
    #[arg(short = 'v', long = "verbose")]
    verbose: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum FlashAttnArg {
    On,
    Off,
    Auto,
}

fn flash_attn(arg: FlashAttnArg) -> FlashAttn {
    match arg {
        FlashAttnArg::On => FlashAttn::On,
        FlashAttnArg::Off => FlashAttn::Off,
        FlashAttnArg::Auto => FlashAttn::Auto,
    }
}

fn parse_cache_type(s: &str) -> Result<KvCacheType, String> {
    KvCacheType::from_name(s).ok_or_else(|| {
        format!("unknown cache type '{s}'; use one of {}", logquant::kvconfig::cache_type_names().join(", "))
    })
}

impl ContextArgs {
    fn context_config(&self, model: &engine::LoadedModel) -> ContextConfig {
        let mut cfg = ContextConfig::new(self.ctx_size.unwrap_or(DEFAULT_CTX.min(model.info.n_ctx_train)));
        cfg.n_batch = self.batch_size;
        cfg.n_ubatch = self.ubatch_size;
        cfg.two_tier_chunk = self.chunk.lq_chunk;
        cfg.threads = self.threads.unwrap_or_else(engine::default_threads);
        cfg.kv = KvConfig::new(self.cache_type_k, self.cache_type_v);
        cfg.flash_attn = flash_attn(self.flash_attn);
        cfg
    }

    fn model_params(&self) -> ModelParams {
        ModelParams { gpu_layers: self.gpu_layers, ..ModelParams::default() }
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    ctx: ContextArgs,
    /// The prompt.
    #[arg(short = 'p', long = "prompt", conflicts_with = "file")]
    prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// Tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    n_predict: usize,
    /// Sampling seed (default: random).
    #[arg(short = 's', long = "seed")]
    seed: Option<u32>,
    /// Temperature; 0 = greedy (deterministic).
    #[arg(long = "temp", default_value_t = 0.8)]
    temp: f32,
    #[arg(long = "top-k", default_value_t = 40)]
    top_k: i32,
    #[arg(long = "top-p", default_value_t = 0.95)]
    top_p: f32,
    /// KV cache configuration, overriding -ctk/-ctv: a cache type, K/V types, q2, or the
    /// two-tier cache logquant[:D=384], kivi[:D=N], streaming[:D=N].
    #[arg(long = "kv", value_parser = parse_kv_one)]
    kv: Option<KvConfig>,
    /// Print one JSON object (text and statistics) on stdout instead of streaming.
    #[arg(long = "json")]
    json: bool,
}

fn parse_kv_one(s: &str) -> Result<KvConfig, String> {
    KvConfig::parse(s).map_err(|e| e.to_string())
}

#[derive(Args)]
struct InspectArgs {
    /// Path to a GGUF model.
    model: PathBuf,
    /// Context size for the KV totals.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    ctx_size: u64,
    /// Print JSON instead of a table.
    #[arg(long = "json")]
    json: bool,
}

/// llama.cpp's tools spell some long options with one dash (`-ngl 99`, `-fa on`,
/// `-ctk q4_0`): accept those spellings of our aliases too.
fn llama_style_args(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.map(|a| match a.to_str() {
        Some(flag @ ("-ngl" | "-fa" | "-ub" | "-ctk" | "-ctv")) => format!("-{flag}").into(),
        _ => a,
    })
    .collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(llama_style_args(std::env::args_os()));
    let result = match cli.command {
        Command::Run(args) => cmd_run(args),
        Command::Inspect(args) => cmd_inspect(args),
        Command::Eval(args) => cmd_eval(args),
        Command::Bench(args) => cmd_bench(args),
        Command::Plan(args) => cmd_plan(args),
        Command::Synth(args) => cmd_synth(args),
        #[cfg(feature = "serve")]
        Command::Serve(args) => cmd_serve(args),
        Command::Info => {
            llama::init(false);
            println!("{}", engine::build_description());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", report::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "serve")]
fn cmd_serve(args: ServeArgs) -> Result<()> {
    use logquant::serve::{self, Capacity, ServeOptions};
    llama::init(args.verbose);
    let opts = ServeOptions {
        model: args.model,
        alias: args.alias,
        kv: args.kv,
        ctx_per_seq: args.ctx_size,
        capacity: match (args.parallel, args.memory) {
            (_, Some(m)) => Capacity::Memory(m),
            (Some(n), None) => Capacity::Parallel(n),
            (None, None) => Capacity::Parallel(4),
        },
        queue: args.queue,
        host: args.host,
        port: args.port,
        api_key: args.api_key,
        gpu_layers: args.gpu_layers,
        threads: args.threads.unwrap_or_else(engine::default_threads),
        flash_attn: flash_attn(args.flash_attn),
        batch: args.batch_size,
        ubatch: args.ubatch_size,
        chunk: args.chunk.lq_chunk,
        device_greedy: !args.host_sampling,
    };
    serve::serve(&opts, |s| {
        eprintln!(
            "logquant serve: listening on {} | {} sequences of {} tokens ({})",
            s.address, s.parallel, s.ctx_per_seq, s.why
        );
    })?;
    eprintln!("logquant serve: stopped");
    Ok(())
}

fn cmd_run(args: RunArgs) -> Result<()> {
    llama::init(args.ctx.verbose);
    let prompt = match (&args.prompt, &args.file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("cannot read prompt file {}", f.display()))?
        }
        (None, None) => anyhow::bail!("give a prompt with -p TEXT or -f FILE"),
    };
    if !(0.0..=1.0).contains(&args.top_p) {
        anyhow::bail!("--top-p must be within 0..1, not {}", args.top_p);
    }
    let loaded = engine::load_model(&args.ctx.model, &args.ctx.model_params())?;
    let mut cfg = args.ctx.context_config(&loaded);
    if let Some(kv) = args.kv {
        cfg.kv = kv;
    }
    let mut ctx = loaded.new_context(&cfg)?;
    let tokens = loaded.model.tokenize(&prompt, true)?;
    let params = GenerateParams {
        n_predict: args.n_predict,
        sampler: SamplerParams {
            temperature: args.temp,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed.unwrap_or_else(rand_seed),
        },
    };
    let mut text = String::new();
    let stdout = std::io::stdout();
    let (_, stats) = generate(&mut ctx, &tokens, &params, |piece| {
        if args.json {
            text.push_str(piece);
        } else {
            let mut out = stdout.lock();
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
    })?;
    let kv_bytes = ctx.memory().kv_bytes();
    if args.json {
        let obj = serde_json::json!({
            "model": loaded.path,
            "text": text,
            "kv_cache": { "type": cfg.kv.to_string(), "bytes": kv_bytes },
            "two_tier": ctx.retention(0).map(|r| serde_json::json!({
                "full_precision_positions": r.full_precision(),
                "overlay": ctx.overlay().map(|o| serde_json::json!({
                    "slots_per_stream": o.slots_per_stream,
                    "slots_used": o.slots_used,
                    "misses": o.misses,
                    "bytes": o.bytes,
                })),
            })),
            "n_ctx": ctx.n_ctx(),
            "stats": stats,
            "prompt_tokens_per_second": stats.prompt_tokens_per_second(),
            "generated_tokens_per_second": stats.generated_tokens_per_second(),
        });
        println!("{}", serde_json::to_string_pretty(&obj)?);
    } else {
        println!();
    }
    if stats.hit_context_limit {
        eprintln!("note: generation stopped at the end of the context ({} tokens); raise -c for more", ctx.n_ctx());
    }
    eprintln!(
        "prompt: {} tokens, {:.1} tok/s | generated: {} tokens, {:.1} tok/s | KV cache: {} ({}), {:.2} MiB",
        stats.prompt_tokens,
        stats.prompt_tokens_per_second(),
        stats.generated_tokens,
        stats.generated_tokens_per_second(),
        cfg.kv,
        ctx.n_ctx(),
        kv_bytes as f64 / MIB
    );
    if let Some(r) = ctx.retention(0) {
        eprintln!("two-tier cache: {} of {} tokens at full precision", r.n_full_precision(), r.len());
    }
    Ok(())
}

/// A seed from the clock, as llama.cpp draws one when none is given.
fn rand_seed() -> u32 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (nanos ^ (nanos >> 32)) as u32
}

fn cmd_inspect(args: InspectArgs) -> Result<()> {
    if !args.model.exists() {
        anyhow::bail!("model file {} does not exist", args.model.display());
    }
    let file = GgufFile::open(&args.model)?;
    let info = ModelInfo::from_gguf(&file)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report::inspect_json(&file, &info, args.ctx_size)?)?);
    } else {
        print!("{}", report::inspect_text(&file, &info, args.ctx_size)?);
    }
    Ok(())
}

fn cmd_eval(args: EvalArgs) -> Result<()> {
    let common = &args.common;
    llama::init(common.verbose);
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read text file {}", args.file.display()))?;
    let model =
        engine::load_model(&common.model, &ModelParams { gpu_layers: common.gpu_layers, ..Default::default() })?;
    match args.task {
        TaskArg::Kld => {}
        TaskArg::Passkey => return cmd_passkey(&args, &model, &text),
        TaskArg::Lines => return cmd_lines(&args, &model, &text),
    }
    let tokens = eval::text_tokens(&model, &text, args.tokens)?;
    let opts = eval::EvalOptions { tokens: args.tokens, step: args.step, context: common.context_template() };
    let mut progress = Progress::new("eval", tokens.len());
    let report = eval::evaluate(&model, &tokens, &common.configs(), &opts, &mut progress)?;
    let rotation = engine::attention_rotation();
    let json = serde_json::json!({
        "machine": bench::machine_description(common.gpu_layers),
        "build": engine::build_description(),
        "model": model.path,
        "text": args.file,
        "attention_rotation": rotation,
        "report": report,
    });
    if common.write_json(&json)? {
        return Ok(());
    }
    println!(
        "eval: {} ({}), {} tokens of {}, step {}, reference f16; Hadamard rotation of quantized K/V: {}",
        model.model.description(),
        model.path.display(),
        report.tokens,
        args.file.display(),
        report.step,
        if rotation { "on" } else { "off (LLAMA_ATTN_ROT_DISABLE)" }
    );
    let mut t = Table::new(&["cache", "bits/value", "mean KLD", "p99 KLD", "top-1 %", "PPL", "seconds"]);
    // The reference is a row of its own unless f16 was listed (then it is that row).
    let listed_f16 = report.rows.iter().any(|r| r.config == "f16");
    let reference = (!listed_f16).then_some(&report.reference);
    for r in reference.into_iter().chain(&report.rows) {
        t.row(vec![
            r.config.clone(),
            format!("{:.2}", r.bits_per_value),
            format!("{:.6}", r.mean_kld),
            format!("{:.6}", r.p99_kld),
            format!("{:.2}", r.top1_agreement),
            format!("{:.4}", r.perplexity),
            format!("{:.1}", r.seconds),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

fn task_json(
    args: &EvalArgs,
    model: &engine::LoadedModel,
    task: &str,
    results: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "machine": bench::machine_description(args.common.gpu_layers),
        "build": engine::build_description(),
        "model": model.path,
        "text": args.file,
        "task": task,
        "attention_rotation": engine::attention_rotation(),
        "results": results,
    })
}

fn cmd_passkey(args: &EvalArgs, model: &engine::LoadedModel, filler: &str) -> Result<()> {
    let common = &args.common;
    let configs = common.configs();
    let opts = tasks::PasskeyOptions {
        contexts: args.contexts.clone(),
        depths: args.depths.clone(),
        trials: args.trials,
        seed: args.seed,
        context: common.context_template(),
    };
    let mut progress = Progress::new("passkey", tasks::passkey_tokens(&opts) * configs.len());
    let cells = tasks::passkey_task(model, filler, &configs, &opts, &mut progress)?;
    if common.write_json(&task_json(args, model, "passkey", serde_json::to_value(&cells)?))? {
        return Ok(());
    }
    println!(
        "passkey: {} ({}), filler from {}, {} trials per cell, greedy, exact match; percent correct",
        model.model.description(),
        model.path.display(),
        args.file.display(),
        args.trials
    );
    let mut headers = vec!["cache".to_string()];
    for c in &args.contexts {
        for d in &args.depths {
            headers.push(format!("{c} @{d}%"));
        }
    }
    let mut t = Table::new(&headers.iter().map(String::as_str).collect::<Vec<_>>());
    for kv in &configs {
        let name = kv.to_string();
        let mut row = vec![name.clone()];
        row.extend(cells.iter().filter(|c| c.config == name).map(|c| format!("{:.0}", c.accuracy)));
        t.row(row);
    }
    print!("{}", t.render());
    Ok(())
}

fn cmd_lines(args: &EvalArgs, model: &engine::LoadedModel, text: &str) -> Result<()> {
    let common = &args.common;
    let configs = common.configs();
    let opts = tasks::LinesOptions { lines: args.lines, min_prefix: args.prefix, context: common.context_template() };
    let mut progress = Progress::new("lines", args.lines * configs.len());
    let rows = tasks::lines_task(model, text, &configs, &opts, &mut progress)?;
    if common.write_json(&task_json(args, model, "lines", serde_json::to_value(&rows)?))? {
        return Ok(());
    }
    println!(
        "lines: {} ({}), next line of {} after {}..{} tokens, greedy, exact match",
        model.model.description(),
        model.path.display(),
        args.file.display(),
        rows.first().map_or(0, |r| r.first_prefix_tokens),
        rows.first().map_or(0, |r| r.last_prefix_tokens)
    );
    let mut t = Table::new(&["cache", "lines", "exact", "exact %", "seconds"]);
    for r in &rows {
        t.row(vec![
            r.config.clone(),
            r.lines.to_string(),
            r.exact.to_string(),
            format!("{:.1}", r.accuracy),
            format!("{:.1}", r.seconds),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

fn cmd_bench(args: BenchArgs) -> Result<()> {
    let common = &args.common;
    llama::init(common.verbose);
    let model =
        engine::load_model(&common.model, &ModelParams { gpu_layers: common.gpu_layers, ..Default::default() })?;
    let mut template = common.context_template();
    template.n_batch = args.batch_size;
    template.n_ubatch = args.ubatch_size;
    let opts = bench::BenchOptions {
        configs: common.configs(),
        depths: args.depth.clone(),
        batches: args.batch.clone(),
        gen: args.gen,
        prefill: args.prefill,
        prefill_seqs: args.prefill_seqs,
        reps: args.reps,
        context: template.clone(),
    };
    let mut progress = Progress::new("bench", opts.configs.len() * opts.depths.len() * opts.batches.len());
    let rows = bench::run(&model, &opts, &mut progress)?;
    let report = bench::BenchReport {
        machine: bench::machine_description(common.gpu_layers),
        build: engine::build_description(),
        model: model.model.description(),
        threads: template.threads,
        gen: args.gen,
        prefill: args.prefill,
        reps: args.reps,
        rows,
    };
    if common.write_json(&report)? {
        return Ok(());
    }
    println!("bench: {} ({}), {} threads", report.model, model.path.display(), report.threads);
    println!("machine: {}", report.machine);
    println!(
        "decode: {} steps x {} reps (median [min-max]); prefill: {} tokens from empty; ratios against f16 and the first listed ({})",
        args.gen, args.reps, args.prefill, report.rows[0].config
    );
    // the prefill of several sequences at once: a column after "prefill tok/s", only
    // when measured
    const TOGETHER: usize = 4;
    let together = format!("prefill x{} tok/s", args.prefill_seqs);
    let many = args.prefill_seqs > 1;
    let mut headers = vec![
        "cache",
        "depth",
        "batch",
        "prefill tok/s",
        "decode tok/s",
        "per seq tok/s",
        "ms/step",
        "KV MiB",
        "KV B/token",
        "bits/value",
        "decode vs f16",
        "decode vs first",
        "KV vs f16",
    ];
    if many {
        headers.insert(TOGETHER, &together);
    }
    let mut t = Table::new(&headers);
    for r in &report.rows {
        let same = |c: &str| report.rows.iter().find(|o| o.config == c && o.depth == r.depth && o.batch == r.batch);
        let ratio = |other: Option<&bench::BenchRow>, f: &dyn Fn(&bench::BenchRow) -> f64| {
            other.map(|o| format!("{:.2}x", f(r) / f(o))).unwrap_or_else(|| "n/a".into())
        };
        let decode = |x: &bench::BenchRow| x.decode_tps.median;
        let kvb = |x: &bench::BenchRow| x.kv_bytes as f64;
        let mut row = vec![
            r.config.clone(),
            r.depth.to_string(),
            r.batch.to_string(),
            format!("{:.1}", r.prefill_tps.median),
            format!("{:.1} [{:.1}-{:.1}]", r.decode_tps.median, r.decode_tps.min, r.decode_tps.max),
            format!("{:.1}", r.decode_tps_per_seq.median),
            format!("{:.2}", r.ms_per_step.median),
            mib(r.kv_bytes as u64),
            format!("{:.0}", r.kv_bytes_per_token()),
            format!("{:.2}", r.bits_per_value),
            ratio(same("f16"), &decode),
            ratio(same(&report.rows[0].config), &decode),
            ratio(same("f16"), &kvb),
        ];
        if many {
            row.insert(TOGETHER, r.prefill_seqs_tps.map_or_else(|| "-".into(), |p| format!("{:.1}", p.median)));
        }
        t.row(row);
    }
    print!("{}", t.render());
    Ok(())
}

fn cmd_plan(args: PlanArgs) -> Result<()> {
    let common = &args.common;
    llama::init(common.verbose);
    let params = ModelParams { gpu_layers: common.gpu_layers, no_alloc: true, ..Default::default() };
    let model = engine::load_model(&common.model, &params)?;
    let opts = plan::PlanOptions {
        budget: args.memory,
        ctx: args.ctx,
        max_batch_limit: args.max_batch,
        template: common.context_template(),
    };
    let rows = plan::plan(&model, &common.configs(), &opts)?;
    let json = serde_json::json!({
        "model": model.path,
        "budget_bytes": args.memory,
        "ctx": args.ctx,
        "method": "llama.cpp contexts created with no_alloc: its own sizes for weights, KV and compute buffers",
        "rows": rows,
    });
    if common.write_json(&json)? {
        return Ok(());
    }
    println!(
        "plan: {} in {:.2} GiB (weights {:.2} GiB); sizes from llama.cpp contexts created without allocating",
        model.model.description(),
        args.memory as f64 / plan::GIB,
        model.model.size() as f64 / plan::GIB
    );
    let show = |f: &Option<plan::Fit>, limit: &str| match f {
        None => "does not fit".to_string(),
        Some(f) if f.limited_by_search => format!(">= {} ({limit})", f.value),
        Some(f) => f.value.to_string(),
    };
    let gib =
        |f: &Option<plan::Fit>| f.as_ref().map(|f| format!("{:.2}", f.bytes as f64 / plan::GIB)).unwrap_or_default();
    let kv = |f: &Option<plan::Fit>| {
        f.as_ref()
            .map(|f| {
                format!("{:.2} / {:.2}", f.memory.kv_bytes() as f64 / plan::GIB, f.kv_bytes_reader as f64 / plan::GIB)
            })
            .unwrap_or_default()
    };
    let mut t = Table::new(&[
        "cache",
        "bits/value",
        &format!("max batch at {}", args.ctx),
        "GiB used",
        "KV GiB (llama.cpp / reader)",
        "max ctx at batch 1",
        "GiB used",
    ]);
    for r in &rows {
        t.row(vec![
            r.config.clone(),
            format!("{:.2}", r.bits_per_value),
            show(&r.max_batch, "search limit"),
            gib(&r.max_batch),
            kv(&r.max_batch),
            show(&r.max_ctx, "training context"),
            gib(&r.max_ctx),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

fn cmd_synth(args: SynthArgs) -> Result<()> {
    let weights = GgmlType::from_name(&args.weights)
        .filter(|t| matches!(t, GgmlType::F32 | GgmlType::F16 | GgmlType::Q8_0 | GgmlType::Q4_0))
        .ok_or_else(|| anyhow::anyhow!("--weights must be f32, f16, q8_0 or q4_0, not '{}'", args.weights))?;
    let mut spec = match args.shape {
        SynthShape::Tiny => SynthSpec { weight_type: weights, ..SynthSpec::tiny() },
        SynthShape::Llama3_8b => SynthSpec::llama3_8b(weights),
    };
    if let Some(seed) = args.seed {
        spec.seed = seed;
    }
    let size = planned_size(&spec)?;
    eprintln!("writing {} ({:.2} GiB) ...", args.output.display(), size as f64 / plan::GIB);
    let written = write_synthetic_llama(&args.output, &spec)?;
    eprintln!("wrote {} bytes", written);
    Ok(())
}
