//! Raw bindings to the patched llama.cpp (generated; see scripts/gen-bindings.sh).
//! Only `crate::llama` may use these.
#![allow(non_upper_case_globals, non_camel_case_types, non_snake_case, dead_code, clippy::all)]
include!("bindings.rs");
