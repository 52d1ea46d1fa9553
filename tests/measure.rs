//! The measuring commands (eval, bench, plan) on the synthetic model: their figures
//! are checked against independent computations and against llama.cpp's allocations.

mod common;

use common::{assert_clean_failure, logquant};
use logquant::bench::{self, BenchOptions};
use logquant::engine::{self, ContextConfig};
use logquant::eval::{self, EvalOptions};
use logquant::generate::{generate, GenerateParams};
use logquant::gguf::{KvCacheParams, KvCacheType};
use logquant::kvconfig::KvConfig;
use logquant::llama::SamplerParams;
use logquant::llama::{Batch, ModelParams};
use logquant::plan::{self, PlanOptions};
use logquant::progress::Progress;
use logquant::tasks;

fn kv(names: &str) -> Vec<KvConfig> {
    KvConfig::parse_list(names).unwrap()
}

/// Deterministic pseudo-text: token ids spread over the synthetic vocabulary.
fn some_tokens(n: usize, n_vocab: usize) -> Vec<i32> {
    (0..n).map(|i| (3 + (i * 7919 + i * i * 31) % (n_vocab - 3)) as i32).collect()
}

fn eval_opts(n: usize, step: usize) -> EvalOptions {
    EvalOptions { tokens: n, step, context: ContextConfig::new(0) }
}

#[test]
fn eval_of_f16_against_itself_is_exact_and_quantized_caches_diverge_in_order() {
    let model = engine::load_model(&common::tiny_model(), &ModelParams::default()).unwrap();
    let tokens = some_tokens(200, model.model.n_vocab());
    let report =
        eval::evaluate(&model, &tokens, &kv("f16,q8_0,q4_0,q2"), &eval_opts(200, 16), &mut Progress::hidden()).unwrap();
    let [f16, q8, q4, q2] = &report.rows[..] else { panic!("four rows") };
    // The f16 reference runs once: a listed f16 is reported from it.
    assert_eq!(f16.positions, 199);
    assert_eq!((f16.mean_kld, f16.p99_kld, f16.top1_agreement), (0.0, 0.0, 100.0));
    assert_eq!(f16.perplexity, report.reference.perplexity);
    assert!(q8.mean_kld > 0.0, "q8_0 rounds the cache, so it must move the logits");
    assert!(q4.mean_kld > q8.mean_kld, "q4_0 {} vs q8_0 {}", q4.mean_kld, q8.mean_kld);
    assert!(q4.p99_kld >= q4.mean_kld);
    assert!(q2.mean_kld > q4.mean_kld, "2-bit q2 {} vs q4_0 {}", q2.mean_kld, q4.mean_kld);
    assert_eq!(q2.bits_per_value, 2.5);
}

/// What makes a single reference run enough: two f16 contexts fed the same steps give
/// the same logits, bit for bit, so f16 against itself is KLD 0 and 100% top-1.
#[test]
fn two_f16_contexts_agree_bit_for_bit() {
    let model = engine::load_model(&common::tiny_model(), &ModelParams::default()).unwrap();
    let tokens = some_tokens(48, model.model.n_vocab());
    let mut cfg = ContextConfig::new(64);
    cfg.n_batch = 16;
    cfg.n_ubatch = 16;
    let mut a = model.new_context(&cfg).unwrap();
    let mut b = model.new_context(&cfg).unwrap();
    let mut batch = Batch::new(16).unwrap();
    for start in (0..48).step_by(16) {
        batch.clear();
        for (p, &t) in tokens.iter().enumerate().skip(start).take(16) {
            batch.add(t, p as i32, 0, true).unwrap();
        }
        a.decode(&batch).unwrap();
        b.decode(&batch).unwrap();
        for r in 0..16 {
            let (la, lb) = (a.logits(r).unwrap(), b.logits(r).unwrap());
            assert!(la.iter().zip(lb).all(|(x, y)| x.to_bits() == y.to_bits()), "position {}", start + r);
            let (mut pa, mut pb) = (vec![0f32; la.len()], vec![0f32; lb.len()]);
            eval::log_softmax(la, &mut pa);
            eval::log_softmax(lb, &mut pb);
            assert_eq!(eval::kl_divergence(&pa, &pb), 0.0);
            assert_eq!(eval::argmax(&pa), eval::argmax(&pb));
        }
    }
}

#[test]
fn eval_step_does_not_change_an_f16_reference_much_and_step_1_works() {
    let model = engine::load_model(&common::tiny_model(), &ModelParams::default()).unwrap();
    let tokens = some_tokens(40, model.model.n_vocab());
    let a = eval::evaluate(&model, &tokens, &kv("q8_0"), &eval_opts(40, 1), &mut Progress::hidden()).unwrap();
    let b = eval::evaluate(&model, &tokens, &kv("q8_0"), &eval_opts(40, 16), &mut Progress::hidden()).unwrap();
    assert_eq!(a.rows[0].positions, 39);
    let rel = (a.reference.perplexity - b.reference.perplexity).abs() / b.reference.perplexity;
    assert!(rel < 1e-3, "f16 perplexity with step 1 vs 16: {} vs {}", a.reference.perplexity, b.reference.perplexity);
}

#[test]
fn eval_perplexity_matches_one_computed_from_the_logits() {
    let model = engine::load_model(&common::tiny_model(), &ModelParams::default()).unwrap();
    let n = 64;
    let tokens = some_tokens(n, model.model.n_vocab());
    let report = eval::evaluate(&model, &tokens, &kv("q4_0"), &eval_opts(n, 8), &mut Progress::hidden()).unwrap();

    // Independently: one q4_0 context, the same steps, softmax in f64 by hand.
    let mut cfg = ContextConfig::new(n as u32);
    cfg.kv = KvConfig::parse("q4_0").unwrap();
    cfg.n_batch = 8;
    cfg.n_ubatch = 8;
    let mut ctx = model.new_context(&cfg).unwrap();
    let mut batch = Batch::new(8).unwrap();
    let mut nll = 0.0f64;
    for start in (0..n).step_by(8) {
        batch.clear();
        for (p, &t) in tokens.iter().enumerate().skip(start).take(8) {
            batch.add(t, p as i32, 0, true).unwrap();
        }
        ctx.decode(&batch).unwrap();
        for r in 0..8 {
            let p = start + r;
            if p + 1 >= n {
                break;
            }
            let logits = ctx.logits(r).unwrap();
            let max = logits.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let z: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
            nll -= logits[tokens[p + 1] as usize] as f64 - max - z.ln();
        }
    }
    let ppl = (nll / (n - 1) as f64).exp();
    let got = report.rows[0].perplexity;
    assert!((got - ppl).abs() / ppl < 1e-5, "eval says {got}, by hand {ppl}");
}

#[test]
fn bench_reports_the_kv_bytes_llama_cpp_allocates() {
    let model = engine::load_model(&common::tiny_model(), &ModelParams::default()).unwrap();
    let opts = BenchOptions {
        configs: kv("f16,q4_0"),
        depths: vec![256],
        batches: vec![1, 2],
        gen: 4,
        prefill: 64,
        prefill_seqs: 1,
        reps: 2,
        context: ContextConfig::new(0),
    };
    let rows = bench::run(&model, &opts, &mut Progress::hidden()).unwrap();
    assert_eq!(rows.len(), 4);
    for r in &rows {
        let t = KvCacheType::from_name(&r.config).unwrap();
        let mut p = KvCacheParams::new(r.kv_cells as u32);
        p.n_seq_max = 2;
        // The context asked for 2 sequences of depth + gen + 1 tokens.
        p.n_ctx = 2 * (256 + 4 + 1);
        let predicted = model.info.kv_bytes_with(&p, t, t).unwrap();
        assert_eq!(r.kv_bytes as u64, predicted, "{}", r.config);
        assert!(r.decode_tps.min > 0.0 && r.decode_tps.min <= r.decode_tps.median);
        assert!(r.decode_tps.median <= r.decode_tps.max);
        assert!(r.prefill_tps.median > 0.0);
    }
    let f16 = rows.iter().find(|r| r.config == "f16").unwrap();
    let q4 = rows.iter().find(|r| r.config == "q4_0").unwrap();
    assert!(q4.kv_bytes * 3 < f16.kv_bytes, "q4_0 stores 4.5 bits against 16");
}

#[test]
fn plan_finds_the_boundary_of_the_budget() {
    let params = ModelParams { no_alloc: true, ..ModelParams::default() };
    let model = engine::load_model(&common::tiny_model(), &params).unwrap();
    let weights = model.model.size();
    let budget = weights + 64 * 1024 * 1024;
    let opts = PlanOptions { budget, ctx: 2048, max_batch_limit: 256, template: ContextConfig::new(0) };
    let rows = plan::plan(&model, &kv("f16,q4_0"), &opts).unwrap();
    let f16 = rows[0].max_batch.as_ref().expect("one f16 sequence fits");
    let q4 = rows[1].max_batch.as_ref().expect("one q4_0 sequence fits");
    assert!(f16.bytes <= budget && q4.bytes <= budget);
    assert!(q4.value > f16.value, "q4_0 fits more sequences ({} vs {})", q4.value, f16.value);
    // llama.cpp's KV allocation and our reader's prediction agree.
    for fit in [f16, q4] {
        assert_eq!(fit.kv_bytes_reader, fit.memory.kv_bytes() as u64);
    }
    // One more sequence must not fit (unless the search hit its limit).
    if !f16.limited_by_search {
        let mut cfg = ContextConfig::new(2048 * (f16.value as u32 + 1));
        cfg.n_seq = f16.value as u32 + 1;
        let over = model.new_context(&cfg).unwrap().memory();
        let total = over.model_host + over.context_host + over.compute_host;
        assert!(total as u64 > budget);
    }
}

#[test]
fn measuring_commands_reject_bad_input() {
    let m = common::tiny_model();
    let m = m.to_str().unwrap();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let short = dir.join("short.txt");
    std::fs::write(&short, "just a few words").unwrap();
    let out = logquant(&["eval", "-m", m, "-f", short.to_str().unwrap(), "--tokens", "100"]);
    assert_clean_failure(&out, "fewer than the 100 asked for");

    let long = dir.join("long.txt");
    std::fs::write(&long, "the quick brown fox jumps over the lazy dog ".repeat(2000)).unwrap();
    let out = logquant(&["eval", "-m", m, "-f", long.to_str().unwrap(), "--tokens", "4000"]);
    assert_clean_failure(&out, "larger than the 2048");

    let out = logquant(&["eval", "-m", m, "-f", long.to_str().unwrap(), "--kv", "f16,q9_9"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(common::stderr(&out).contains("'q9_9' is not a cache type"));

    let out = logquant(&["bench", "-m", m, "--depth", "5000"]);
    assert_clean_failure(&out, "within the model's 2048-token context");

    let out = logquant(&["plan", "-m", m, "--memory", "1MiB", "--ctx", "1024"]);
    assert_clean_failure(&out, "does not even hold the weights");

    let out = logquant(&["plan", "-m", m, "--memory", "lots"]);
    assert_eq!(out.status.code(), Some(2));

    let out = logquant(&["plan", "-m", m, "--memory", "4GiB", "--ctx", "0"]);
    assert_clean_failure(&out, "--ctx must be at least 1");

    let out = logquant(&["eval", "-m", m, "-f", long.to_str().unwrap(), "--tokens", "600", "--step", "600"]);
    assert_clean_failure(&out, "--step must be within 1..=512");

    let out = logquant(&["bench", "-m", m, "--depth", "0"]);
    assert_clean_failure(&out, "must be positive");
}

/// A Python-like text for the lines task: varied, non-blank lines.
fn source_text(n_funcs: usize) -> String {
    (0..n_funcs).map(|i| format!("def f{i}(x, y):\n    z = x * {} + y\n    return z - {i}\n\n", i * 7 % 13)).collect()
}

#[test]
fn lines_task_scores_lines_after_the_prefix_deterministically() {
    let model = engine::load_model(&common::tiny_model(), &ModelParams::default()).unwrap();
    let text = source_text(30);
    let (tokens, targets) = tasks::line_targets(&model, &text, 8, 200).unwrap();
    assert_eq!(targets.len(), 8);
    let mut last = 0;
    for t in &targets {
        assert!(t.prefix_tokens >= 200 && t.prefix_tokens > last, "{t:?}");
        assert!(!t.line.trim().is_empty() && text.lines().any(|l| l == t.line), "{t:?}");
        assert!(tokens.len() > t.prefix_tokens);
        last = t.prefix_tokens;
    }
    let opts = tasks::LinesOptions { lines: 8, min_prefix: 200, context: ContextConfig::new(0) };
    let configs = kv("f16,logquant:D=48");
    let rows = tasks::lines_task(&model, &text, &configs, &opts, &mut Progress::hidden()).unwrap();
    assert_eq!(rows.len(), 2);
    for (row, &config) in rows.iter().zip(&configs) {
        assert_eq!((row.lines, row.answers.len(), row.first_prefix_tokens), (8, 8, targets[0].prefix_tokens));
        let exact = row.answers.iter().zip(&targets).filter(|(a, t)| **a == t.line).count();
        assert_eq!(row.exact, exact);
        // The first line's answer (a copy of the reading sequence, continued from its
        // last logits) equals greedy generation on a fresh context fed the same chunks.
        let mut cfg = ContextConfig::new(1024);
        cfg.kv = config;
        (cfg.n_batch, cfg.n_ubatch) = (512, 512);
        let mut ctx = model.new_context(&cfg).unwrap();
        let params = GenerateParams {
            n_predict: 64,
            sampler: SamplerParams { temperature: 0.0, top_k: 40, top_p: 0.95, seed: 0 },
        };
        let mut text_out = String::new();
        generate(&mut ctx, &tokens[..targets[0].prefix_tokens], &params, |t| text_out.push_str(t)).unwrap();
        let first = text_out.split('\n').next().unwrap();
        assert_eq!(row.answers[0], first, "{config}");
    }

    let err = tasks::line_targets(&model, &text, 1000, 200).unwrap_err().to_string();
    assert!(err.contains("fewer than the 1000 asked for"), "{err}");
}

#[test]
fn passkey_task_runs_and_checks_its_input() {
    let model = engine::load_model(&common::tiny_model(), &ModelParams::default()).unwrap();
    let filler = "the grass is green and the sky is blue and the sun is bright. ".repeat(100);
    let mut opts = tasks::PasskeyOptions {
        contexts: vec![300],
        depths: vec![10, 90],
        trials: 2,
        seed: 1,
        context: ContextConfig::new(0),
    };
    let cells = tasks::passkey_task(&model, &filler, &kv("f16,logquant:D=48"), &opts, &mut Progress::hidden()).unwrap();
    assert_eq!(cells.len(), 4);
    assert!(cells.iter().all(|c| c.trials == 2 && c.correct <= 2 && c.context == 300));
    opts.depths = vec![150];
    let err = tasks::passkey_task(&model, &filler, &kv("f16"), &opts, &mut Progress::hidden()).unwrap_err();
    assert!(err.to_string().contains("percentages"), "{err}");
    opts.depths = vec![50];
    opts.contexts = vec![40];
    let err = tasks::passkey_task(&model, &filler, &kv("f16"), &opts, &mut Progress::hidden()).unwrap_err();
    assert!(err.to_string().contains("too short"), "{err}");
    let err = tasks::passkey_task(&model, "too short", &kv("f16"), &opts, &mut Progress::hidden()).unwrap_err();
    assert!(err.to_string().contains("filler"), "{err}");

    // From the command line: a context beyond the model's is a clean error.
    let m = common::tiny_model();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let f = dir.join("filler.txt");
    std::fs::write(&f, &filler).unwrap();
    let out = logquant(&[
        "eval",
        "--task",
        "passkey",
        "-m",
        m.to_str().unwrap(),
        "-f",
        f.to_str().unwrap(),
        "--contexts",
        "4096",
    ]);
    assert_clean_failure(&out, "larger than the 2048");
}

#[test]
fn bench_prefills_several_sequences_together_when_asked() {
    let model = engine::load_model(&common::tiny_model(), &ModelParams::default()).unwrap();
    let mut opts = BenchOptions {
        configs: kv("f16,logquant:D=32"),
        depths: vec![200],
        batches: vec![1],
        gen: 2,
        prefill: 150,
        prefill_seqs: 3,
        reps: 1,
        context: ContextConfig::new(0),
    };
    let rows = bench::run(&model, &opts, &mut Progress::hidden()).unwrap();
    for r in &rows {
        let p = r.prefill_seqs_tps.expect("measured");
        assert!(p.median > 0.0, "{}", r.config);
        // three sequences of 200 + 2 + 1 tokens
        assert!(r.kv_cells >= 3 * 203, "{}: {} cells", r.config, r.kv_cells);
    }
    opts.prefill_seqs = 1;
    assert!(bench::run(&model, &opts, &mut Progress::hidden()).unwrap().iter().all(|r| r.prefill_seqs_tps.is_none()));
    opts.prefill_seqs = 0;
    assert!(bench::run(&model, &opts, &mut Progress::hidden()).is_err());
}
