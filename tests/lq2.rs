//! logquant's 2-bit KV format: the C kernels (what the KV cache runs) against the
//! independent Rust implementation in src/lq2.rs, and the format's error bound.

use logquant::llama::lq2_kernels as c;
use logquant::lq2::{self, Format};
use proptest::prelude::*;

fn groups() -> impl Strategy<Value = Vec<f32>> {
    let value = prop_oneof![-4.0f32..4.0, -1e-3f32..1e-3, -2000.0f32..2000.0, Just(0.0f32), Just(1.5f32),];
    (1usize..5).prop_flat_map(move |n| prop::collection::vec(value.clone(), n * 64))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn c_kernels_match_the_rust_reference_bit_for_bit(x in groups()) {
        let reference = lq2::quantize(&x);
        prop_assert_eq!(&c::quantize(&x, true).unwrap(), &reference, "from_float_ref");
        prop_assert_eq!(&c::quantize(&x, false).unwrap(), &reference, "CPU from_float");
        prop_assert_eq!(c::dequantize(&reference).unwrap(), lq2::dequantize(&reference));
    }

    #[test]
    fn round_trip_error_is_within_the_bound(x in groups()) {
        let blocks = c::quantize(&x, false).unwrap();
        let y = lq2::dequantize(&blocks);
        for (g, (xs, ys)) in x.chunks(64).zip(y.chunks(64)).enumerate() {
            let (m, d) = lq2::block_params(&blocks[g * lq2::BLOCK_BYTES..]);
            for (&a, &b) in xs.iter().zip(ys) {
                let bound = lq2::error_bound(a, m, d);
                prop_assert!((a.clamp(-65504.0, 65504.0) - b).abs() <= bound, "group {}: {} -> {} exceeds {}", g, a, b, bound);
            }
        }
    }

    /// The least-squares fit never does worse than plain min/max scaling (Lloyd rounds
    /// do not increase the error; the f16 rounding of m and d is allowed for).
    #[test]
    fn the_fit_beats_min_max_scaling(x in groups()) {
        let y = lq2::dequantize(&c::quantize(&x, false).unwrap());
        for (xs, ys) in x.chunks(64).zip(y.chunks(64)) {
            let lo = xs.iter().copied().fold(f32::INFINITY, f32::min) as f64;
            let hi = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let d = (hi - lo) / 3.0;
            let minmax: f64 = xs.iter().map(|&v| {
                let q = if d > 0.0 { ((v as f64 - lo) / d).round().clamp(0.0, 3.0) } else { 0.0 };
                (v as f64 - (lo + d * q)).powi(2)
            }).sum();
            let fit: f64 = xs.iter().zip(ys).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
            let scale: f64 = xs.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
            prop_assert!(fit <= minmax * 1.01 + 1e-5 * scale, "fit {} vs min/max {}", fit, minmax);
        }
    }

    #[test]
    fn dot_product_equals_the_dequantized_dot(x in groups(), seed in 0u32..1000) {
        let blocks = c::quantize(&x, false).unwrap();
        let y: Vec<f32> = (0..x.len()).map(|i| (((i as u32 * 2654435761u32) ^ seed) % 2001) as f32 / 1000.0 - 1.0).collect();
        let deq = lq2::dequantize(&blocks);
        let expect: f64 = deq.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
        let scale: f64 = deq.iter().zip(&y).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum::<f64>() + 1e-6;
        let got = c::dot(&blocks, &y).unwrap() as f64;
        prop_assert!((got - expect).abs() <= 1e-5 * scale, "{} vs {}", got, expect);
    }
}

#[test]
fn dot_of_ones() {
    let x: Vec<f32> = (0..64).map(|i| (i % 4) as f32).collect();
    let blocks = c::quantize(&x, false).unwrap();
    let y = vec![1.0f32; 64];
    assert_eq!(c::dot(&blocks, &y).unwrap(), 96.0);
}

#[test]
fn edge_cases() {
    // A constant group decodes exactly to its f16 value.
    let x = vec![-7.25f32; 64];
    assert_eq!(lq2::dequantize(&c::quantize(&x, false).unwrap()), x);
    // Zeros stay zeros.
    assert!(lq2::dequantize(&c::quantize(&[0.0; 128], false).unwrap()).iter().all(|&v| v == 0.0));
    // Huge values saturate at the f16 range instead of becoming inf.
    let mut x = vec![1.0f32; 64];
    x[3] = 1e9;
    x[7] = -1e9;
    let y = lq2::dequantize(&c::quantize(&x, false).unwrap());
    assert!(y.iter().all(|v| v.is_finite()));
    assert!(y.iter().all(|v| v.abs() <= 65504.0 + 32.0), "{y:?}");
    // NaN takes level 0 (the group minimum) and does not disturb the others.
    let mut x: Vec<f32> = (0..64).map(|i| (i % 4) as f32).collect();
    x[10] = f32::NAN;
    let blocks = c::quantize(&x, false).unwrap();
    assert_eq!(blocks, lq2::quantize(&x));
    let y = lq2::dequantize(&blocks);
    assert_eq!(y[10], 0.0);
    assert_eq!(y[11], 3.0);
    // Block size and bad lengths.
    assert_eq!(c::block_bytes(), lq2::BLOCK_BYTES);
    assert!(c::quantize(&[1.0; 63], false).is_err());
    assert!(c::dot(&[0u8; 20], &[1.0; 128]).is_err());
}

// The 3-bit format (lq3): the same checks, with 8 levels.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn lq3_c_kernels_match_the_rust_reference_bit_for_bit(x in groups()) {
        let reference = lq2::quantize_as(Format::Lq3, &x);
        prop_assert_eq!(&c::quantize_as(Format::Lq3, &x, true).unwrap(), &reference, "from_float_ref");
        prop_assert_eq!(&c::quantize_as(Format::Lq3, &x, false).unwrap(), &reference, "CPU from_float");
        prop_assert_eq!(c::dequantize_as(Format::Lq3, &reference).unwrap(), lq2::dequantize_as(Format::Lq3, &reference));
        prop_assert_eq!(&c::set_rows_as_on(Format::Lq3, &x, 64, "CPU").unwrap(), &reference, "set_rows");
    }

    #[test]
    fn lq3_round_trip_error_is_within_the_bound(x in groups()) {
        let blocks = c::quantize_as(Format::Lq3, &x, false).unwrap();
        let y = lq2::dequantize_as(Format::Lq3, &blocks);
        for (g, (xs, ys)) in x.chunks(64).zip(y.chunks(64)).enumerate() {
            let (m, d) = lq2::block_params_as(Format::Lq3, &blocks[g * Format::Lq3.block_bytes()..]);
            for (&a, &b) in xs.iter().zip(ys) {
                let bound = lq2::error_bound_as(Format::Lq3, a, m, d);
                prop_assert!((a.clamp(-65504.0, 65504.0) - b).abs() <= bound, "group {}: {} -> {} exceeds {}", g, a, b, bound);
            }
        }
    }

    #[test]
    fn lq3_dot_product_equals_the_dequantized_dot(x in groups(), seed in 0u32..1000) {
        let blocks = c::quantize_as(Format::Lq3, &x, false).unwrap();
        let y: Vec<f32> = (0..x.len()).map(|i| (((i as u32 * 2654435761u32) ^ seed) % 2001) as f32 / 1000.0 - 1.0).collect();
        let deq = lq2::dequantize_as(Format::Lq3, &blocks);
        let expect: f64 = deq.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
        let scale: f64 = deq.iter().zip(&y).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum::<f64>() + 1e-6;
        let got = c::dot_as(Format::Lq3, &blocks, &y).unwrap() as f64;
        prop_assert!((got - expect).abs() <= 1e-5 * scale, "{} vs {}", got, expect);
    }
}

#[test]
fn lq3_levels_and_edge_cases() {
    assert_eq!(c::block_bytes_of(Format::Lq3), 26);
    // every level 0..7 once per 8 values: exact, and the dot with ones is 64 * 3.5
    let x: Vec<f32> = (0..64).map(|i| (i % 8) as f32).collect();
    let blocks = c::quantize_as(Format::Lq3, &x, false).unwrap();
    assert_eq!(lq2::dequantize_as(Format::Lq3, &blocks), x);
    assert_eq!(c::dot_as(Format::Lq3, &blocks, &[1.0f32; 64]).unwrap(), 224.0);
    // NaN takes level 0, huge values saturate
    let mut x = x.clone();
    x[9] = f32::NAN;
    x[20] = 1e9;
    let blocks = c::quantize_as(Format::Lq3, &x, false).unwrap();
    assert_eq!(blocks, lq2::quantize_as(Format::Lq3, &x));
    let y = lq2::dequantize_as(Format::Lq3, &blocks);
    assert!(y.iter().all(|v| v.is_finite() && v.abs() <= 65504.0 + 64.0), "{y:?}");
    assert!(c::dequantize_as(Format::Lq3, &[0u8; 20]).is_err(), "20 bytes is not an lq3 block");
}

#[test]
fn lq3_error_is_a_quarter_of_lq2s_on_gaussian_data() {
    // twice the levels per step: about a quarter of the squared error
    let mut state = 0x2545f4914f6cdd1du64;
    let mut uniform = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let x: Vec<f32> = (0..64 * 64)
        .map(|_| ((-2.0 * uniform().max(1e-12).ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos()) as f32)
        .collect();
    let sq = |y: Vec<f32>| x.iter().zip(&y).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>();
    let e2 = sq(lq2::dequantize(&c::quantize(&x, false).unwrap()));
    let e3 = sq(lq2::dequantize_as(Format::Lq3, &c::quantize_as(Format::Lq3, &x, false).unwrap()));
    // (below 0.3 while lq3 kept an f16 step and minimum; its byte step and half-step
    // minimum put it at 0.30 on this data)
    assert!(e3 < 0.32 * e2, "lq3 {e3} vs lq2 {e2}");
}
