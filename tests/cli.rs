//! Bad input through the binary: each case is a one-line error naming the problem,
//! exit code 1, no panic and no abort inside llama.cpp.

mod common;

use std::fs;

use common::{assert_clean_failure, logquant, stdout};

fn scratch(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-inputs");
    fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    p
}

fn run_on(model: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let m = model.to_str().unwrap();
    let mut args = vec!["run", "-m", m, "-p", "hello", "-n", "4", "--temp", "0"];
    args.extend_from_slice(extra);
    logquant(&args)
}

#[test]
fn missing_model_file() {
    let out = logquant(&["run", "-m", "/nonexistent/model.gguf", "-p", "hi"]);
    assert_clean_failure(&out, "does not exist");
    let out = logquant(&["inspect", "/nonexistent/model.gguf"]);
    assert_clean_failure(&out, "does not exist");
}

#[test]
fn a_file_that_is_not_gguf() {
    let p = scratch("not-gguf.gguf", b"this is plain text, not a model at all");
    assert_clean_failure(&run_on(&p, &[]), "not a GGUF");
    assert_clean_failure(&logquant(&["inspect", p.to_str().unwrap()]), "not a GGUF");
}

#[test]
fn truncated_and_corrupt_gguf() {
    let good = fs::read(common::tiny_model()).unwrap();
    // Cut inside the tensor data: offsets point past the end.
    let cut = scratch("truncated.gguf", &good[..good.len() - 1000]);
    let out = run_on(&cut, &[]);
    assert_clean_failure(&out, "truncated");
    // Cut inside the header.
    let short = scratch("short.gguf", &good[..12]);
    assert_clean_failure(&run_on(&short, &[]), "truncated");
    // Bad magic.
    let mut bad = good.clone();
    bad[0] = b'X';
    assert_clean_failure(&run_on(&scratch("badmagic.gguf", &bad), &[]), "not a GGUF");
    // Absurd metadata count (bytes 16..24 hold n_kv in GGUF v3).
    let mut bad = good.clone();
    bad[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let out = run_on(&scratch("badcount.gguf", &bad), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!common::stderr(&out).contains("panicked"));
}

#[test]
fn unknown_cache_type() {
    let out = run_on(&common::tiny_model(), &["--cache-type-k", "q3_0"]);
    assert_eq!(out.status.code(), Some(2), "clap's usage error");
    let err = common::stderr(&out);
    assert!(err.contains("unknown cache type 'q3_0'") && err.contains("q8_0"), "{err}");
}

#[test]
fn context_larger_than_the_model_supports() {
    let out = run_on(&common::tiny_model(), &["-c", "1000000"]);
    assert_clean_failure(&out, "larger than the");
}

#[test]
fn prompt_longer_than_the_context() {
    let m = common::tiny_model();
    let long = "word ".repeat(400);
    let out = logquant(&["run", "-m", m.to_str().unwrap(), "-c", "256", "-p", &long, "-n", "4"]);
    assert_clean_failure(&out, "raise -c or shorten the prompt");
}

#[test]
fn too_many_threads() {
    let out = run_on(&common::tiny_model(), &["-t", "100000"]);
    assert_clean_failure(&out, "--threads must be within 1..=512");
}

/// lq2 stores blocks of 64 values: on a model with heads of 32 it would straddle two
/// heads (llama.cpp checks this only with flash attention on).
#[test]
fn cache_blocks_must_divide_the_head_size() {
    use logquant::gguf::{write_synthetic_llama, SynthSpec};
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("head32.gguf");
    if !path.exists() {
        let spec = SynthSpec { n_embd: 128, n_head: 4, n_head_kv: 2, n_ff: 256, ..SynthSpec::tiny() };
        write_synthetic_llama(&path, &spec).unwrap();
    }
    for fa in ["on", "off"] {
        let out = run_on(&path, &["--cache-type-k", "lq2", "--flash-attn", fa]);
        assert_clean_failure(&out, "do not divide this model's K head size 32");
    }
    let out = run_on(&path, &["--cache-type-k", "q8_0"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
}

#[test]
fn quantized_v_without_flash_attention() {
    let out = run_on(&common::tiny_model(), &["--cache-type-v", "q4_0", "--flash-attn", "off"]);
    assert_clean_failure(&out, "needs flash attention");
}

#[test]
fn run_prints_text_and_a_summary() {
    let m = common::tiny_model();
    let out = logquant(&["run", "-m", m.to_str().unwrap(), "-p", "hello", "-n", "8", "--temp", "0"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let err = common::stderr(&out);
    assert!(err.contains("prompt: ") && err.contains("generated: 8 tokens") && err.contains("KV cache: f16"), "{err}");
    assert!(!stdout(&out).trim().is_empty());
}

#[test]
fn inspect_prints_a_table_and_json() {
    let m = common::tiny_model();
    let out = logquant(&["inspect", m.to_str().unwrap()]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("llama") && text.contains("q4_0"), "{text}");
    let out = logquant(&["inspect", m.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["n_layer"], 2);
}

/// llama.cpp's one-dash spellings (`-ngl 99`, `-fa on`) reach the same options: the
/// failure is about the model, not about the flags.
#[test]
fn llama_cpp_spellings_of_options_are_accepted() {
    let out = logquant(&["bench", "-m", "/nonexistent/model.gguf", "-ngl", "99", "-fa", "on"]);
    assert_clean_failure(&out, "does not exist");
}
