//! GGUF support: a validating reader over a memory map, a streaming writer, the ggml
//! type table, a model-shape summary (with KV-cache sizing that mirrors llama.cpp) and
//! a synthetic llama model generator for tests and benchmarks.
//!
//! The only `unsafe` is the `memmap2::Mmap::map` call in [`reader::GgufFile::open`];
//! `deny(unsafe_code)` keeps it that way.

#![deny(unsafe_code)]

pub mod info;
pub mod reader;
pub mod synth;
pub mod types;
pub mod writer;

pub use info::{kv_cells, KvCacheParams, KvCells, ModelInfo, TypeShare};

pub use reader::{
    Array, GgufError, GgufFile, TensorInfo, Value, ValueType, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION,
};

pub use synth::{f16_bits_to_f32, f32_to_f16_bits, planned_size, write_synthetic_llama, SynthSpec};
pub use types::{row_bytes, GgmlType, KvCacheType};
pub use writer::{tensor_n_bytes, GgufWriter, TensorGenerator};
