//! logquant: GGUF models on a patched llama.cpp, measured side by side with
//! llama.cpp's own KV cache types.
//!
//! - [`gguf`]: the project's own GGUF reader and writer, model shapes, KV sizing;
//! - [`llama`]: the safe wrapper over llama.cpp (the only `unsafe` code);
//! - [`engine`]: validation before anything reaches llama.cpp;
//! - [`generate`], [`eval`], [`tasks`], [`bench`], [`plan`]: what the commands do;
//! - [`kvconfig`]: names of KV cache configurations;
//! - [`retention`]: which tokens stay at full precision (LogQuant and its baselines);
//! - [`session`]: a context plus the retention policy of each sequence;
//! - `serve` (feature `serve`, on by default): the OpenAI-compatible server.

pub mod bench;
pub mod engine;
pub mod eval;
pub mod generate;
pub mod gguf;
pub mod kvconfig;
pub mod llama;
pub mod lq2;
pub mod plan;
pub mod progress;
pub mod report;
pub mod retention;
#[cfg(feature = "serve")]
pub mod serve;
pub mod session;
pub mod tasks;

mod sys {
    pub(crate) mod ffi;
}
