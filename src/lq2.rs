//! An independent Rust implementation of logquant's 2-bit KV format (`lq2`), written
//! from its definition (patches/files/ggml/src/ggml-lq2.h) to check the C kernels:
//!
//! x ~= m + d * q, q in {0..3}, per group of 64 values, d = (max - min) / 3, m = min,
//! d and m stored as f16 (20 bytes per 64 values: 2.5 bits per value).

use crate::gguf::{f16_bits_to_f32, f32_to_f16_bits};

pub const BLOCK_VALUES: usize = 64;
pub const BLOCK_BYTES: usize = 20;
const F16_MAX: f32 = 65504.0;

/// Quantizes `x` (a multiple of 64 values) into blocks.
pub fn quantize(x: &[f32]) -> Vec<u8> {
    assert_eq!(x.len() % BLOCK_VALUES, 0, "lq2 works on groups of 64 values");
    let mut out = Vec::with_capacity(x.len() / BLOCK_VALUES * BLOCK_BYTES);
    for group in x.chunks(BLOCK_VALUES) {
        let finite_or_inf = group.iter().copied().filter(|v| !v.is_nan());
        let (lo, hi) = finite_or_inf.fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
        let (lo, hi) = if lo > hi { (0.0, 0.0) } else { (lo.clamp(-F16_MAX, F16_MAX), hi.clamp(-F16_MAX, F16_MAX)) };
        let m_bits = f32_to_f16_bits(lo);
        let d_bits = f32_to_f16_bits((hi - lo) / 3.0);
        let (m, d) = (f16_bits_to_f32(m_bits), f16_bits_to_f32(d_bits));
        out.extend(d_bits.to_le_bytes());
        out.extend(m_bits.to_le_bytes());
        let mut packed = [0u8; BLOCK_VALUES / 4];
        for (j, &v) in group.iter().enumerate() {
            let t = if d > 0.0 { (v - m) * (1.0 / d) } else { 0.0 };
            // Round half up onto 0..=3; NaN (t is NaN) goes to level 0.
            let q = if t.is_nan() || t <= 0.0 {
                0
            } else if t >= 3.0 {
                3
            } else {
                (t + 0.5) as u8
            };
            packed[j / 4] |= q << (2 * (j % 4));
        }
        out.extend(packed);
    }
    out
}

/// The value of level `q` in a block: m + d * q.
pub fn dequantize(blocks: &[u8]) -> Vec<f32> {
    assert_eq!(blocks.len() % BLOCK_BYTES, 0);
    let mut out = Vec::with_capacity(blocks.len() / BLOCK_BYTES * BLOCK_VALUES);
    for b in blocks.chunks(BLOCK_BYTES) {
        let d = f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
        let m = f16_bits_to_f32(u16::from_le_bytes([b[2], b[3]]));
        for j in 0..BLOCK_VALUES {
            let q = (b[4 + j / 4] >> (2 * (j % 4))) & 3;
            out.push(m + d * q as f32);
        }
    }
    out
}

/// The largest error the format allows for one finite group: half a step, plus the
/// f16 rounding of the stored minimum and step (relative 2^-11 each, the step's
/// counted three times for the top level), plus any clamping to the f16 range.
pub fn error_bound(group: &[f32]) -> f32 {
    let lo = group.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = group.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let clamp_loss = (lo.abs() - F16_MAX).max(0.0).max((hi.abs() - F16_MAX).max(0.0));
    let (lo, hi) = (lo.clamp(-F16_MAX, F16_MAX), hi.clamp(-F16_MAX, F16_MAX));
    let d = (hi - lo) / 3.0;
    let eps = 2f32.powi(-11);
    0.5 * d * (1.0 + eps) + eps * lo.abs() + 3.0 * eps * d + clamp_loss + 1e-30
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_levels_round_trip_exactly() {
        // min 0, step 1: every value is a level.
        let x: Vec<f32> = (0..64).map(|i| (i % 4) as f32).collect();
        assert_eq!(dequantize(&quantize(&x)), x);
        assert_eq!(quantize(&x).len(), BLOCK_BYTES);
    }

    #[test]
    fn constant_and_zero_groups() {
        let x = vec![0.3f32; 64];
        let y = dequantize(&quantize(&x));
        assert!(y.iter().all(|&v| v == f16_bits_to_f32(f32_to_f16_bits(0.3))));
        assert!(dequantize(&quantize(&[0.0; 64])).iter().all(|&v| v == 0.0));
    }
}
