//! The CUDA kernels against the CPU ones, which are the reference (tests/two_tier.rs
//! checks those against an independent f64 implementation): the 2-bit quantizer that
//! set_rows runs for every token, the two-tier attention across head sizes, GQA
//! ratios, overlay fractions and query counts, and a model end to end with several
//! sequences in one context.
//!
//! They need a build with `--features cuda` and an NVIDIA GPU. In other builds they are
//! ignored with that reason, so `cargo nextest run` lists them as SKIP; a CUDA build
//! that finds no GPU fails them.

mod common;

use common::Rng;

use logquant::engine::{self, ContextConfig, LoadedModel};
use logquant::eval;
use logquant::gguf::f32_to_f16_bits;
use logquant::kvconfig::KvConfig;
use logquant::llama::two_tier_kernel::{self, Case};
use logquant::llama::{lq2_kernels, Batch, ModelParams};
use logquant::lq2::{self, Format};

const GPU: &str = "CUDA0";

/// Every test here holds this while it runs: some switch the op's paths through the
/// environment (LOGQUANT_CUDA_*), which the op reads with C's getenv at each launch.
/// Changing it while another test's op reads it is undefined behaviour, and would
/// send that test's shapes down a path it does not mean to test.
static GPU_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn hold_gpu() -> std::sync::MutexGuard<'static, ()> {
    GPU_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a build with --features cuda and an NVIDIA GPU")]
fn lq2_and_lq3_quantization_on_cuda_equals_the_cpu_bit_for_bit() {
    let _gpu = hold_gpu();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let n_per_row = 1024; // Llama 3 8B's n_embd_k_gqa
    let mut x = Vec::new();
    for row in 0..256 {
        let scale = [1e-3f32, 0.1, 1.0, 30.0, 4000.0][row % 5];
        for i in 0..n_per_row {
            x.push(match row % 7 {
                5 => 0.25,                                  // constant groups: d = 0
                6 if i % 64 == 7 => 70000.0 * rng.normal(), // beyond f16: clamped
                _ => scale * rng.normal() + if row % 3 == 0 { 0.3 * scale } else { 0.0 },
            });
        }
    }
    for format in [Format::Lq2, Format::Lq3] {
        let cpu = lq2_kernels::set_rows_as_on(format, &x, n_per_row, "CPU").unwrap();
        let gpu = lq2_kernels::set_rows_as_on(format, &x, n_per_row, GPU).unwrap();
        assert_eq!(cpu.len(), gpu.len());
        let bb = lq2_kernels::block_bytes_of(format);
        let differing: Vec<usize> =
            (0..cpu.len() / bb).filter(|&b| cpu[b * bb..(b + 1) * bb] != gpu[b * bb..(b + 1) * bb]).collect();
        assert!(
            differing.is_empty(),
            "{format:?}: {} of {} blocks differ, first {:?}",
            differing.len(),
            cpu.len() / bb,
            &differing[..differing.len().min(8)]
        );
    }
}

/// Runs `check` once with the environment variable `var` set to each of `values` (the op
/// reads its LOGQUANT_CUDA_* switches at each launch), then unsets it.
fn with_each_setting(var: &str, values: &[&str], mut check: impl FnMut()) {
    for value in values {
        std::env::set_var(var, value);
        check();
    }
    std::env::remove_var(var);
}

struct Problem {
    d: usize,
    n_head: usize,
    n_head_kv: usize,
    n_tokens: usize,
    n_kv: usize,
    frac: f32,
    q: Vec<f32>,
    k_store: Vec<u8>,
    v_store: Vec<u8>,
    k_overlay: Vec<u16>,
    v_overlay: Vec<u16>,
    slot_to_cell: Vec<i32>,
    mask: Vec<f32>,
    k_by_channel: Vec<bool>,
    k_format: Format,
    /// The keys the store was coded from (an lq3 store is coded from them again).
    k_values: Vec<f32>,
}

fn problem(seed: u64, d: usize, n_head: usize, n_head_kv: usize, n_tokens: usize, n_kv: usize, frac: f32) -> Problem {
    let mut rng = Rng(seed | 1);
    let values = n_kv * n_head_kv * d;
    let q: Vec<f32> = (0..n_tokens * n_head * d).map(|_| rng.normal()).collect();
    let k: Vec<f32> = (0..values).map(|_| rng.normal() * 2.0).collect();
    let v: Vec<f32> = (0..values).map(|_| rng.normal()).collect();
    let k_store = lq2_kernels::quantize(&k, false).unwrap();
    let v_store = lq2_kernels::quantize(&v, false).unwrap();
    // overlaid cells in shuffled slots, with free slots among them
    let mut slot_to_cell: Vec<i32> = (0..n_kv as i32).filter(|_| rng.uniform() < frac).collect();
    slot_to_cell.extend(std::iter::repeat_n(-1, 1 + (rng.next() % 40) as usize));
    for i in (1..slot_to_cell.len()).rev() {
        slot_to_cell.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    let row = n_head_kv * d;
    let mut k_overlay = vec![0u16; slot_to_cell.len() * row];
    let mut v_overlay = vec![0u16; slot_to_cell.len() * row];
    for (s, &c) in slot_to_cell.iter().enumerate().filter(|(_, &c)| c >= 0) {
        for j in 0..row {
            k_overlay[s * row + j] = f32_to_f16_bits(k[c as usize * row + j]);
            v_overlay[s * row + j] = f32_to_f16_bits(v[c as usize * row + j]);
        }
    }
    // a causal-looking mask with holes: the last cells hidden from early queries
    let mask: Vec<f32> = (0..n_tokens * n_kv)
        .map(|i| {
            let (t, c) = (i / n_kv, i % n_kv);
            if c + n_tokens > n_kv + t || rng.uniform() < 0.1 {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Problem {
        d,
        n_head,
        n_head_kv,
        n_tokens,
        n_kv,
        frac,
        q,
        k_store,
        v_store,
        k_overlay,
        v_overlay,
        slot_to_cell,
        mask,
        k_by_channel: Vec::new(),
        k_format: Format::Lq2,
        k_values: k,
    }
}

/// The same problem with a 3-bit K store (per token; with_keys_by_channel after it
/// codes its groups as lq3 too).
fn with_lq3_keys(mut p: Problem) -> Problem {
    p.k_store = lq2_kernels::quantize_as(Format::Lq3, &p.k_values, false).unwrap();
    p.k_format = Format::Lq3;
    p
}

/// The same problem with keys by channel in about half of its groups of 64 cells:
/// new keys there, with channels of their own offsets and scales (Qwen2's keys), coded
/// by channel (lq2.rs) into the store.
fn with_keys_by_channel(mut p: Problem, seed: u64) -> Problem {
    assert_eq!(p.n_kv % 64, 0);
    let mut rng = Rng(seed | 1);
    let row = p.n_head_kv * p.d;
    let (offset, scale): (Vec<f32>, Vec<f32>) =
        (0..row).map(|_| (rng.normal() * 4.0, 0.2 + 3.0 * rng.uniform())).unzip();
    p.k_by_channel = (0..p.n_kv / 64).map(|_| rng.uniform() < 0.5).collect();
    for g in 0..p.n_kv / 64 {
        if p.k_by_channel[g] {
            let rows: Vec<f32> = (0..64 * row).map(|i| offset[i % row] + scale[i % row] * rng.normal()).collect();
            let group = lq2::quantize_by_channel_as(p.k_format, &rows, row);
            p.k_store[g * group.len()..(g + 1) * group.len()].copy_from_slice(&group);
        }
    }
    p
}

impl Problem {
    /// The op on the CPU and on the GPU: the largest |cuda - cpu|, checked to be at most
    /// `tol` with every GPU output finite (the message names the shape).
    fn assert_cuda_matches_cpu(&self, tol: f32) -> f32 {
        let case = Case {
            head_dim: self.d,
            n_head: self.n_head,
            n_head_kv: self.n_head_kv,
            n_tokens: self.n_tokens,
            n_kv: self.n_kv,
            scale: 1.0 / (self.d as f32).sqrt(),
            q: &self.q,
            k_store: &self.k_store,
            v_store: &self.v_store,
            k_overlay: &self.k_overlay,
            v_overlay: &self.v_overlay,
            slot_to_cell: &self.slot_to_cell,
            mask: &self.mask,
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            k_by_channel: &self.k_by_channel,
            k_format: self.k_format,
        };
        let cpu = two_tier_kernel::run(&case).unwrap();
        let gpu = two_tier_kernel::run_on(&case, GPU).unwrap();
        let err = cpu.iter().zip(&gpu).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(
            err <= tol && gpu.iter().all(|x| x.is_finite()),
            "{:?} K{} d={} heads={}/{} tokens={} cells={} overlay={}: max |cuda - cpu| = {err}",
            self.k_format,
            if self.k_by_channel.is_empty() { "" } else { " by channel" },
            self.d,
            self.n_head,
            self.n_head_kv,
            self.n_tokens,
            self.n_kv,
            self.frac
        );
        err
    }
}

/// CUDA vs CPU over the shapes that matter. Tolerance: the CUDA store tier rounds the
/// query to int8 per 64 values (llama.cpp's vector kernels do the same for quantized
/// K), which moves scores by ~1e-3 here and outputs by ~1e-3; the CPU overlay tier
/// accumulates in f16 (~1e-3 over hundreds of cells). Outputs are O(1) and a wrong
/// cell, slot, mask or merge moves them by 0.05 or more.
#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a build with --features cuda and an NVIDIA GPU")]
fn two_tier_attention_on_cuda_equals_the_cpu() {
    let _gpu = hold_gpu();
    let mut worst = 0f32;
    let mut cases = 0;
    for (i, &d) in [64usize, 128, 256].iter().enumerate() {
        for (j, &gqa) in [1usize, 2, 4, 8].iter().enumerate() {
            for (l, &frac) in [0.0f32, 0.3, 0.7, 1.0].iter().enumerate() {
                let pick = i * 16 + j * 4 + l;
                let n_tokens = [1usize, 1, 3, 16, 1, 40][pick % 6];
                let n_kv = [37usize, 700, 2500, 9000, 20000][pick % 5];
                let n_head_kv = [1usize, 2, 8][pick % 3];
                if n_kv * n_head_kv * d > 1 << 24 {
                    continue;
                }
                let n_head = n_head_kv * gqa;
                let p = problem(pick as u64 * 7919 + 1, d, n_head, n_head_kv, n_tokens, n_kv, frac);
                let err = p.assert_cuda_matches_cpu(1e-2);
                worst = worst.max(err);
                cases += 1;
            }
        }
    }
    eprintln!("{cases} cases, worst max |cuda - cpu| = {worst:e}");
}

/// Keys by channel: groups held by channel read on CUDA cores beside the tensor cores'
/// per-token groups, in both kernel layouts, prefill and decode shapes.
#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a build with --features cuda and an NVIDIA GPU")]
fn keys_by_channel_on_cuda_equal_the_cpu() {
    let _gpu = hold_gpu();
    let mut cases = 0;
    for (i, &d) in [64usize, 128, 256].iter().enumerate() {
        for (j, &(n_head_kv, gqa, n_tokens)) in
            [(1usize, 1usize, 1usize), (4, 4, 1), (8, 1, 2), (2, 2, 16)].iter().enumerate()
        {
            for (l, &frac) in [0.0f32, 0.3].iter().enumerate() {
                let pick = (i * 4 + j) * 2 + l;
                let n_kv = [704usize, 4096, 9024][pick % 3];
                if n_kv * n_head_kv * d > 1 << 24 {
                    continue;
                }
                let p = problem(pick as u64 * 15485863 + 5, d, n_head_kv * gqa, n_head_kv, n_tokens, n_kv, frac);
                let p = with_keys_by_channel(p, pick as u64 + 11);
                with_each_setting("LOGQUANT_CUDA_GROUPED", &["1", "0"], || {
                    p.assert_cuda_matches_cpu(1e-2);
                });
                cases += 1;
            }
        }
    }
    eprintln!("{cases} keys-by-channel cases");
}

/// Prefill shapes (many queries per stream), where the op dequantizes the store to f16,
/// lays the overlay over it and runs llama.cpp's flash attention: each case on that path
/// (LOGQUANT_CUDA_DENSE_MIN=1) and on the tiled kernel (=0), both against the CPU.
#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a build with --features cuda and an NVIDIA GPU")]
fn prefill_shapes_on_cuda_equal_the_cpu() {
    let _gpu = hold_gpu();
    let mut cases = 0;
    for (i, &(d, n_head_kv, gqa, n_tokens)) in
        [(64usize, 1usize, 1usize, 64usize), (128, 2, 4, 64), (128, 8, 4, 16), (256, 1, 2, 40), (64, 4, 8, 128)]
            .iter()
            .enumerate()
    {
        for (l, &frac) in [0.0f32, 0.3, 1.0].iter().enumerate() {
            let pick = i * 3 + l;
            let n_kv = [300usize, 2048, 5000][pick % 3];
            let p = problem(pick as u64 * 6700417 + 9, d, n_head_kv * gqa, n_head_kv, n_tokens, n_kv, frac);
            with_each_setting("LOGQUANT_CUDA_DENSE_MIN", &["1", "0"], || {
                p.assert_cuda_matches_cpu(1e-2);
            });
            cases += 1;
        }
    }
    // More queries than cells: the mask hides every cell from the first 30 rows, where
    // the op's result is 0 (llama.cpp's CUDA flash attention alone would give NaN).
    let p = problem(77, 128, 8, 2, 80, 50, 0.3);
    with_each_setting("LOGQUANT_CUDA_DENSE_MIN", &["1", "0"], || {
        p.assert_cuda_matches_cpu(1e-2);
    });
    eprintln!("{} prefill cases", cases + 1);
}

/// An lq3 K store (3-bit keys, 2-bit values), per token and by channel, at decode and
/// prefill shapes: the op dequantizes the store to f16 for llama.cpp's flash attention
/// at every batch size (the tiled kernel reads lq2 K alone). Then 2-bit keys by channel
/// at prefill shapes through the same dense path (LOGQUANT_CUDA_DENSE_MIN=1) and the
/// tiled kernel (=0).
#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a build with --features cuda and an NVIDIA GPU")]
fn lq3_keys_and_dense_keys_by_channel_on_cuda_equal_the_cpu() {
    let _gpu = hold_gpu();
    let mut cases = 0;
    let shapes = [
        (64usize, 1usize, 1usize, 1usize),
        (128, 8, 4, 1),
        (128, 2, 7, 1),
        (256, 1, 2, 2),
        (128, 2, 4, 64),
        (64, 4, 8, 20),
    ];
    for (i, &(d, n_head_kv, gqa, n_tokens)) in shapes.iter().enumerate() {
        for (l, &frac) in [0.0f32, 0.3, 1.0].iter().enumerate() {
            let pick = i * 3 + l;
            let n_kv = [704usize, 4096, 2048][pick % 3];
            let p = problem(pick as u64 * 982451653 + 13, d, n_head_kv * gqa, n_head_kv, n_tokens, n_kv, frac);
            let p = with_lq3_keys(p);
            p.assert_cuda_matches_cpu(1e-2);
            let p = with_keys_by_channel(p, pick as u64 + 17);
            p.assert_cuda_matches_cpu(1e-2);
            cases += 2;
            if n_tokens * gqa >= 64 {
                let p = problem(pick as u64 * 15485863 + 7, d, n_head_kv * gqa, n_head_kv, n_tokens, n_kv, frac);
                let p = with_keys_by_channel(p, pick as u64 + 19);
                with_each_setting("LOGQUANT_CUDA_DENSE_MIN", &["1", "0"], || {
                    p.assert_cuda_matches_cpu(1e-2);
                });
                cases += 1;
            }
        }
    }
    eprintln!("{cases} lq3 and dense keys-by-channel cases");
}

/// The decode shapes of grouped-query models with 4 or 8 KV heads (Llama 3 8B: 8 of 128),
/// with one and two queries per head: the shapes where the kernel can give a block 4 KV
/// heads and stage their rows together; each case runs with and without that layout
/// (LOGQUANT_CUDA_GROUPED; by default it takes the op's size into account).
#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a build with --features cuda and an NVIDIA GPU")]
fn grouped_heads_on_cuda_equal_the_cpu() {
    let _gpu = hold_gpu();
    let mut cases = 0;
    for (i, &d) in [64usize, 128].iter().enumerate() {
        for (j, &n_head_kv) in [4usize, 8].iter().enumerate() {
            for (l, &(gqa, n_tokens)) in [(4usize, 1usize), (1, 1), (2, 2)].iter().enumerate() {
                for (m, &frac) in [0.0f32, 0.3, 1.0].iter().enumerate() {
                    let pick = ((i * 2 + j) * 3 + l) * 3 + m;
                    let n_kv = [700usize, 4100, 9000][pick % 3];
                    let n_head = n_head_kv * gqa;
                    let p = problem(pick as u64 * 104729 + 3, d, n_head, n_head_kv, n_tokens, n_kv, frac);
                    // both layouts of the kernel (grouped blocks where they can run, and not)
                    with_each_setting("LOGQUANT_CUDA_GROUPED", &["1", "0"], || {
                        p.assert_cuda_matches_cpu(1e-2);
                    });
                    cases += 1;
                }
            }
        }
    }
    eprintln!("{cases} grouped cases");
}

fn tokens(n: usize, n_vocab: usize, salt: usize) -> Vec<i32> {
    (0..n).map(|i| (3 + (i * 7919 + i * i * 31 + salt * 101) % (n_vocab - 3)) as i32).collect()
}

/// Three sequences of different lengths decoded together in steps (prefill chunks,
/// then single tokens), every position's logits.
fn run_three(model: &LoadedModel, kv: &str) -> Vec<Vec<f32>> {
    run_n(model, kv, 3, false)
}

/// With `wide`, as the server runs it: a call carries up to 48 tokens of every sequence
/// (`ContextConfig::two_tier_batch`), split into micro-batches of 48; else 48 tokens in all.
fn run_n(model: &LoadedModel, kv: &str, n_seq: usize, wide: bool) -> Vec<Vec<f32>> {
    let mut cfg = ContextConfig::new(1024);
    cfg.kv = KvConfig::parse(kv).unwrap();
    cfg.n_seq = n_seq as u32;
    cfg.n_batch = 48;
    cfg.n_ubatch = 48;
    cfg.two_tier_batch = if wide { 512 } else { 0 };
    let per_step = if wide { 48 } else { 16 };
    let mut ctx = model.new_context(&cfg).unwrap();
    let n_vocab = model.model.n_vocab();
    let seqs: Vec<Vec<i32>> = (0..n_seq).map(|s| tokens(200 + 30 * s, n_vocab, s)).collect();
    let mut batch = Batch::new(48 * n_seq).unwrap();
    let mut out = Vec::new();
    let mut pos = vec![0usize; n_seq];
    loop {
        batch.clear();
        for (s, toks) in seqs.iter().enumerate() {
            let step = if pos[s] < 120 { per_step } else { 1 };
            for _ in 0..step {
                if pos[s] < toks.len() {
                    batch.add(toks[pos[s]], pos[s] as i32, s as i32, true).unwrap();
                    pos[s] += 1;
                }
            }
        }
        if batch.is_empty() {
            return out;
        }
        ctx.decode(&batch).unwrap();
        for r in 0..batch.len() {
            out.push(ctx.logits(r).unwrap().to_vec());
        }
    }
}

/// The tiny model on the GPU (every layer offloaded, the cache there in both tiers)
/// against the CPU, for LogQuant with demotions under way and for f16 as a yardstick
/// of what moving to the GPU alone costs.
#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a build with --features cuda and an NVIDIA GPU")]
fn a_model_on_cuda_matches_the_cpu_with_several_sequences() {
    let _gpu = hold_gpu();
    let path = common::tiny_model();
    let cpu = engine::load_model(&path, &ModelParams { gpu_layers: 0, ..ModelParams::default() }).unwrap();
    let gpu = engine::load_model(&path, &ModelParams { gpu_layers: -1, ..ModelParams::default() }).unwrap();
    let kld = |a: &[Vec<f32>], b: &[Vec<f32>]| {
        let (mut pa, mut pb) = (vec![0f32; a[0].len()], vec![0f32; a[0].len()]);
        let all: Vec<f64> = a
            .iter()
            .zip(b)
            .map(|(x, y)| {
                eval::log_softmax(x, &mut pa);
                eval::log_softmax(y, &mut pb);
                eval::kl_divergence(&pa, &pb)
            })
            .collect();
        (all.iter().sum::<f64>() / all.len() as f64, all.iter().cloned().fold(0.0, f64::max))
    };
    let f16 = kld(&run_three(&cpu, "f16"), &run_three(&gpu, "f16"));
    eprintln!("CPU vs CUDA mean/max KLD: f16 {f16:?}");
    // Keys centered (the default), both centered (offsets added back to the output on
    // the GPU too), none, keys by channel (groups coded from the GPU's f16 copies), and
    // 3-bit keys per token and by channel (the op's dense path at every step).
    for kv in [
        "logquant:D=24",
        "logquant:D=24:center=kv",
        "logquant:D=24:center=none",
        "streaming:D=64:keys=channel",
        "logquant:D=24:k=lq3",
        "streaming:D=64:k=lq3:keys=channel",
    ] {
        // the dense path of lq3 with each stream in a group of its own (the streams
        // after the first read their own keys-by-channel flags)
        let one_stream_groups = kv.contains("keys=channel") && kv.contains("lq3");
        if one_stream_groups {
            std::env::set_var("LOGQUANT_CUDA_DENSE_SCRATCH", "1");
        }
        let on_gpu = run_three(&gpu, kv);
        std::env::remove_var("LOGQUANT_CUDA_DENSE_SCRATCH");
        let lq = kld(&run_three(&cpu, kv), &on_gpu);
        let q2_gap = kld(&run_three(&cpu, "f16"), &run_three(&cpu, kv));
        eprintln!("CPU vs CUDA mean/max KLD: {kv} {lq:?}; {kv} vs f16 on the CPU {q2_gap:?}");
        assert!(lq.0 < 1e-3 && lq.1 < 1e-2, "{kv} CPU vs CUDA: {lq:?}");
        assert!(lq.0 < q2_gap.0 / 10.0, "{kv}: CPU vs CUDA should be far below what the 2-bit cache itself costs");
    }
    // The server's wide calls (48 tokens of each of 3 sequences in one).
    let wide = kld(&run_n(&cpu, "logquant:D=24", 3, true), &run_n(&gpu, "logquant:D=24", 3, true));
    eprintln!("CPU vs CUDA mean/max KLD, wide micro-batches: {wide:?}");
    assert!(wide.0 < 1e-3 && wide.1 < 1e-2, "wide micro-batches, CPU vs CUDA: {wide:?}");
}

/// Greedy sampling inside the graph on the GPU (the server's greedy requests) picks the
/// token the host picks from the copied logits (common::greedy_in_graph_and_on_host).
#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a build with --features cuda and an NVIDIA GPU")]
fn greedy_sampling_in_the_graph_on_cuda_equals_the_host() {
    let _gpu = hold_gpu();
    let gpu =
        engine::load_model(&common::tiny_model(), &ModelParams { gpu_layers: -1, ..ModelParams::default() }).unwrap();
    for kv in ["f16", "logquant:D=24"] {
        let (in_graph, on_host) = common::greedy_in_graph_and_on_host(&gpu, kv);
        assert_eq!(in_graph, on_host, "{kv}: greedy in the graph vs on the host");
    }
}

/// Not a check: the attention op alone on the GPU at the decode shapes of Llama 3 8B
/// (head 128, 32 query heads on 8 KV heads, one query per sequence, D = 384 + 64 slots
/// per sequence), with the sequences of a batch laid side by side as KV heads (the same
/// work as one stream each). Prints time per call, the bytes it must read, and their
/// rate. Run with `--ignored` on a GPU machine.
#[test]
#[ignore = "a measurement: run with --ignored on a machine with an NVIDIA GPU"]
fn time_the_attention_kernel() {
    let _gpu = hold_gpu();
    let d = 128;
    // (logquant_attn_run_on takes up to 2^28 store values: 8 sequences at 32768)
    // TIME_CASE=i runs case i alone (for a profiler)
    let only: Option<usize> = std::env::var("TIME_CASE").ok().and_then(|v| v.parse().ok());
    let cases =
        [(8192usize, 1usize, 448i32), (8192, 8, 448), (32768, 1, 448), (32768, 2, 448), (32768, 2, 0), (32768, 8, 448)];
    for (i, &(depth, batch, slots)) in cases.iter().enumerate() {
        if only.is_some_and(|o| o != i) {
            continue;
        }
        let n_head_kv = 8 * batch;
        // slots: each row spans every KV head, the overlay bytes of `batch` sequences (0: the store alone)
        let mut rng = Rng(depth as u64 * 31 + batch as u64);
        let q: Vec<f32> = (0..4 * n_head_kv * d).map(|_| rng.normal()).collect();
        let k: Vec<f32> = (0..depth * n_head_kv * d).map(|_| rng.normal()).collect();
        let k_store = lq2_kernels::quantize(&k, false).unwrap();
        let v_store = k_store.clone();
        let slot_to_cell: Vec<i32> = (0..slots)
            .map(|s| (s * 73) % depth as i32)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let k_overlay = vec![0x3c00u16; slot_to_cell.len() * n_head_kv * d];
        let mask = vec![0f32; depth];
        let case = Case {
            head_dim: d,
            n_head: 4 * n_head_kv,
            n_head_kv,
            n_tokens: 1,
            n_kv: depth,
            scale: 1.0 / (d as f32).sqrt(),
            q: &q,
            k_store: &k_store,
            v_store: &v_store,
            k_overlay: &k_overlay,
            v_overlay: &k_overlay,
            slot_to_cell: &slot_to_cell,
            mask: &mask,
            threads: 1,
            k_by_channel: &[],
            k_format: lq2_kernels::Format::Lq2,
        };
        let ms = two_tier_kernel::time_on(&case, GPU, 50).unwrap();
        let bytes = 2 * k_store.len() + 2 * 2 * k_overlay.len() + 2 * depth;
        eprintln!(
            "depth {depth:5} batch {batch:2} slots {slots:3}: {:8.1} us per layer, {:7.1} MB read, {:6.0} GB/s; x32 layers {:.2} ms",
            ms * 1e3,
            bytes as f64 / 1e6,
            bytes as f64 / (ms * 1e-3) / 1e9,
            ms * 32.0
        );
    }
}
