//! With llama.cpp's Hadamard rotation off (LLAMA_ATTN_ROT_DISABLE=1, read when a
//! context is created) the overlay holds exactly the f16 values an f16 cache holds, and
//! the two-tier kernel's overlay tier runs the arithmetic of llama.cpp's CPU flash
//! attention over f16: keeping every token gives the f16 cache's logits bit for bit.
//! In its own test binary because it sets the environment of the whole process.
//!
//! Scope of "bit for bit": llama.cpp's CPU flash attention switches to tiled and
//! split-KV variants from 64 queries per micro-batch or 512 cells on; those round
//! differently (the two-tier kernel always runs the per-row variant), so this test
//! stays below both, and tests/two_tier.rs bounds the difference elsewhere.

mod common;

use logquant::engine::{self, ContextConfig};
use logquant::eval;
use logquant::kvconfig::KvConfig;
use logquant::llama::{Batch, ModelParams};
use logquant::progress::Progress;

#[test]
fn keeping_every_token_is_the_f16_cache_bit_for_bit_without_rotation() {
    std::env::set_var("LLAMA_ATTN_ROT_DISABLE", "1");
    let model = engine::load_model(&common::tiny_model(), &ModelParams::default()).unwrap();
    let n_vocab = model.model.n_vocab();
    let tokens: Vec<i32> = (0..240).map(|i| (3 + (i * 7919 + i * i * 31) % (n_vocab - 3)) as i32).collect();
    let make = |kv: &str| {
        let mut cfg = ContextConfig::new(256);
        cfg.kv = KvConfig::parse(kv).unwrap();
        cfg.n_batch = 16;
        cfg.n_ubatch = 16;
        model.new_context(&cfg).unwrap()
    };
    let (mut f16, mut all) = (make("f16"), make("logquant:D=300:center=none"));
    let mut batch = Batch::new(16).unwrap();
    for start in (0..tokens.len()).step_by(16) {
        batch.clear();
        for (p, &t) in tokens.iter().enumerate().skip(start).take(16) {
            batch.add(t, p as i32, 0, true).unwrap();
        }
        f16.decode(&batch).unwrap();
        all.decode(&batch).unwrap();
        for r in 0..batch.len() {
            let (a, b) = (f16.logits(r).unwrap(), all.logits(r).unwrap());
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "position {}", start + r);
        }
    }
    assert_eq!(all.full_precision(0).unwrap().len(), 240, "every token stayed in the overlay");

    // The same on the real model, whose sliding-window layers have a cache (and an
    // overlay) of their own: 640 tokens through both, every one kept.
    let Some(path) = common::real_model() else { return };
    let real = engine::load_model(&path, &ModelParams::default()).unwrap();
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let tokens = real.model.tokenize(&text, true).unwrap()[..640].to_vec();
    let kv = KvConfig::parse_list("logquant:D=800:center=none").unwrap();
    let opts = eval::EvalOptions { tokens: tokens.len(), step: 16, context: ContextConfig::new(0) };
    let r = eval::evaluate(&real, &tokens, &kv, &opts, &mut Progress::hidden()).unwrap();
    assert_eq!((r.rows[0].mean_kld, r.rows[0].top1_agreement), (0.0, 100.0));
    assert_eq!(r.rows[0].perplexity, r.reference.perplexity);
}
