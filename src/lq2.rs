//! An independent Rust implementation of logquant's 2- and 3-bit KV formats (`lq2`,
//! `lq3`), written from their definition (patches/files/ggml/src/ggml-lq2.h) to check
//! the C kernels:
//!
//! x ~= m + d * q, q in {0..qmax} (qmax 3 for lq2, 7 for lq3), per group of 64 values.
//! m and d start at min and (max - min) / qmax and are refined by least squares (a few
//! Lloyd rounds on the uniform grid), which halves the squared error on Gaussian-like
//! data at the price of clipping extremes. lq2 stores d and m as f16 (20 bytes per 64
//! values, 2.5 bits); lq3 as a byte each, d as an 8-bit float and m in half steps (26
//! bytes, 3.25 bits: [`lq3_step`], [`lq3_scale`]).

use crate::gguf::{f16_bits_to_f32, f32_to_f16_bits};

pub const BLOCK_VALUES: usize = 64;
/// Bytes of an lq2 block.
pub const BLOCK_BYTES: usize = 20;

/// One of logquant's block formats.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Format {
    /// 2 bits a value: d, m, 16 bytes of codes (20 bytes).
    Lq2,
    /// 3 bits a value: d and m a byte each, the low 2 bits as in lq2, then 8 bytes of
    /// high bits (26 bytes).
    Lq3,
}

impl Format {
    /// The largest level.
    pub fn qmax(self) -> u8 {
        match self {
            Format::Lq2 => 3,
            Format::Lq3 => 7,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            Format::Lq2 => BLOCK_BYTES,
            Format::Lq3 => 26,
        }
    }

    /// Bytes before the codes: the step and minimum (f16 each in lq2, a byte each in lq3).
    pub fn header_bytes(self) -> usize {
        match self {
            Format::Lq2 => 4,
            Format::Lq3 => 2,
        }
    }

    /// The ggml type id (`GGML_TYPE_LQ2` / `GGML_TYPE_LQ3` of the patched ggml.h).
    pub fn ggml_type(self) -> i32 {
        match self {
            Format::Lq2 => 43,
            Format::Lq3 => 44,
        }
    }
}
const F16_MAX: f32 = 65504.0;

/// Least-squares rounds (ggml-lq2.c's LQ2_FIT_ROUNDS).
const FIT_ROUNDS: usize = 4;

/// The level of `x` for minimum `m` and inverse step `id`: round half up onto
/// 0..=qmax, NaN to 0.
fn level(x: f32, m: f32, id: f32, qmax: u8) -> u8 {
    let t = (x - m) * id;
    if t.is_nan() || t <= 0.0 {
        0
    } else if t >= qmax as f32 {
        qmax
    } else {
        (t + 0.5) as u8
    }
}

/// Lloyd rounds on the uniform grid, in f64 with the same fused products as the C code.
fn fit(group: &[f32], m0: f32, d0: f32, qmax: u8) -> (f32, f32) {
    let (mut m, mut d) = (m0 as f64, d0 as f64);
    for _ in 0..FIT_ROUNDS {
        if d.is_nan() || d <= 0.0 {
            break;
        }
        let (mf, idf) = (m as f32, 1.0 / d as f32);
        let (mut n, mut sq, mut sqq, mut sx, mut sqx) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for &x in group.iter().filter(|x| !x.is_nan()) {
            let v = x.clamp(-F16_MAX, F16_MAX) as f64;
            let q = level(v as f32, mf, idf, qmax) as f64;
            n += 1.0;
            sq += q;
            sqq = q.mul_add(q, sqq);
            sx += v;
            sqx = q.mul_add(v, sqx);
        }
        let det = n.mul_add(sqq, -(sq * sq));
        if det.is_nan() || det <= 0.0 {
            break;
        }
        let d2 = n.mul_add(sqx, -(sq * sx)) / det;
        let m2 = (-d2).mul_add(sq, sx) / n;
        if d2.is_nan() || d2 <= 0.0 || !m2.is_finite() {
            break;
        }
        (m, d) = (m2, d2);
    }
    ((m as f32).clamp(-F16_MAX, F16_MAX), (d as f32).clamp(-F16_MAX, F16_MAX))
}

/// lq3's byte step `c`: (16 + c % 16) 2^(c / 16 - 12), 2^-8 .. 248 (exact in f32).
pub fn lq3_step(c: u8) -> f32 {
    (16 + (c & 15)) as f32 * f32::from_bits(((c >> 4) as u32 + 127 - 12) << 23)
}

/// lq3's step and minimum bytes for the fitted minimum `m0` and step `d0`: the nearest
/// byte step (the first of two equally near), raised until 63.5 steps reach |m0|, and
/// m0 in half steps of it, rounded to nearest (halves away from zero), within ±127.
pub fn lq3_scale(m0: f32, d0: f32) -> (u8, i8) {
    let mut best = 0u8;
    let mut err = (lq3_step(0) - d0).abs();
    for c in 1..=255u8 {
        let e = (lq3_step(c) - d0).abs();
        if e < err {
            (err, best) = (e, c);
        }
    }
    while best < 255 && lq3_step(best) * 63.5 < m0.abs() {
        best += 1;
    }
    let k = (2.0 * m0 / lq3_step(best)).round().clamp(-127.0, 127.0);
    (best, k as i8)
}

/// Quantizes `x` (a multiple of 64 values) into lq2 blocks.
pub fn quantize(x: &[f32]) -> Vec<u8> {
    quantize_as(Format::Lq2, x)
}

/// Quantizes `x` (a multiple of 64 values) into blocks of `format`.
pub fn quantize_as(format: Format, x: &[f32]) -> Vec<u8> {
    assert_eq!(x.len() % BLOCK_VALUES, 0, "lq2/lq3 work on groups of 64 values");
    let qmax = format.qmax();
    let mut out = Vec::with_capacity(x.len() / BLOCK_VALUES * format.block_bytes());
    for group in x.chunks(BLOCK_VALUES) {
        let finite_or_inf = group.iter().copied().filter(|v| !v.is_nan());
        let (lo, hi) = finite_or_inf.fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
        let (lo, hi) = if lo > hi { (0.0, 0.0) } else { (lo.clamp(-F16_MAX, F16_MAX), hi.clamp(-F16_MAX, F16_MAX)) };
        let (m0, d0) = fit(group, lo, (hi - lo) / qmax as f32, qmax);
        // the header as stored, then the (m, d) it decodes to: the codes are chosen
        // against the values the block really holds
        let header_at = out.len();
        if format == Format::Lq3 {
            let (d8, m8) = lq3_scale(m0, d0);
            out.extend([d8, m8 as u8]);
        } else {
            out.extend(f32_to_f16_bits(d0).to_le_bytes());
            out.extend(f32_to_f16_bits(m0).to_le_bytes());
        }
        let (m, d) = block_params_as(format, &out[header_at..]);
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut low = [0u8; BLOCK_VALUES / 4];
        let mut high = [0u8; BLOCK_VALUES / 8];
        for (j, &v) in group.iter().enumerate() {
            let q = level(v, m, id, qmax);
            low[j / 4] |= (q & 3) << (2 * (j % 4));
            high[j / 8] |= (q >> 2) << (j % 8);
        }
        out.extend(low);
        if format == Format::Lq3 {
            out.extend(high);
        }
    }
    out
}

/// The value of level `q` in an lq2 block: m + d * q.
pub fn dequantize(blocks: &[u8]) -> Vec<f32> {
    dequantize_as(Format::Lq2, blocks)
}

/// The values blocks of `format` hold.
pub fn dequantize_as(format: Format, blocks: &[u8]) -> Vec<f32> {
    let bb = format.block_bytes();
    assert_eq!(blocks.len() % bb, 0);
    let mut out = Vec::with_capacity(blocks.len() / bb * BLOCK_VALUES);
    for b in blocks.chunks(bb) {
        let (m, d) = block_params_as(format, b);
        let codes = format.header_bytes();
        for j in 0..BLOCK_VALUES {
            let mut q = (b[codes + j / 4] >> (2 * (j % 4))) & 3;
            if format == Format::Lq3 {
                q |= ((b[codes + 16 + j / 8] >> (j % 8)) & 1) << 2;
            }
            out.push(m + d * q as f32);
        }
    }
    out
}

/// Keys by channel (ggml-lq2.h): 64 rows of `n` values (row-major) as one group of
/// `n` blocks, block j holding channel j of the 64 rows (value t = row t).
pub fn quantize_by_channel(rows: &[f32], n: usize) -> Vec<u8> {
    quantize_by_channel_as(Format::Lq2, rows, n)
}

/// The same in blocks of `format`.
pub fn quantize_by_channel_as(format: Format, rows: &[f32], n: usize) -> Vec<u8> {
    assert_eq!(rows.len(), BLOCK_VALUES * n, "a group is 64 rows");
    let columns: Vec<f32> = (0..n).flat_map(|j| (0..BLOCK_VALUES).map(move |t| rows[t * n + j])).collect();
    quantize_as(format, &columns)
}

/// The 64 rows of `n` values (row-major) an lq2 group held by channel decodes to.
pub fn dequantize_by_channel(group: &[u8], n: usize) -> Vec<f32> {
    dequantize_by_channel_as(Format::Lq2, group, n)
}

/// The same for a group in blocks of `format`.
pub fn dequantize_by_channel_as(format: Format, group: &[u8], n: usize) -> Vec<f32> {
    let columns = dequantize_as(format, group);
    assert_eq!(columns.len(), BLOCK_VALUES * n, "a group is n blocks");
    (0..BLOCK_VALUES).flat_map(|t| (0..n).map(|j| columns[j * BLOCK_VALUES + t]).collect::<Vec<_>>()).collect()
}

/// The largest error lq2 allows for one value `x` of a block holding minimum `m` and
/// step `d` (as dequantized): half a step inside the levels' range [m, m + 3d], the
/// distance to the range outside it (the least-squares fit clips extremes), plus the
/// f16 rounding of the quantization point and the f16 range's clamp.
pub fn error_bound(x: f32, m: f32, d: f32) -> f32 {
    error_bound_as(Format::Lq2, x, m, d)
}

/// The same for `format` (levels' range [m, m + qmax d]).
pub fn error_bound_as(format: Format, x: f32, m: f32, d: f32) -> f32 {
    let x = x.clamp(-F16_MAX, F16_MAX);
    let top = format.qmax() as f32 * d;
    let (lo, hi) = (m, m + top);
    let outside = (lo - x).max(x - hi).max(0.0);
    let eps = 2f32.powi(-11);
    (0.5 * d).max(outside) * (1.0 + eps) + eps * (m.abs() + top) + 1e-30
}

/// The minimum and step an lq2 block stores.
pub fn block_params(block: &[u8]) -> (f32, f32) {
    block_params_as(Format::Lq2, block)
}

/// The minimum and step a block of `format` stores.
pub fn block_params_as(format: Format, block: &[u8]) -> (f32, f32) {
    match format {
        Format::Lq2 => (
            f16_bits_to_f32(u16::from_le_bytes([block[2], block[3]])),
            f16_bits_to_f32(u16::from_le_bytes([block[0], block[1]])),
        ),
        Format::Lq3 => {
            let d = lq3_step(block[0]);
            (0.5 * d * block[1] as i8 as f32, d)
        }
    }
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
    fn by_channel_transposes_the_group() {
        // every channel constant over the 64 rows, the channels far apart: by channel
        // each block is constant and decodes to the f16 value exactly (by row, each
        // block would span the channels' whole range)
        let n = 128;
        let rows: Vec<f32> = (0..64 * n).map(|i| (i % n) as f32 * 0.37 - 20.0).collect();
        let group = quantize_by_channel(&rows, n);
        assert_eq!(group.len(), n * BLOCK_BYTES);
        let back = dequantize_by_channel(&group, n);
        for (a, b) in rows.iter().zip(&back) {
            assert_eq!(*b, f16_bits_to_f32(f32_to_f16_bits(*a)));
        }
    }

    #[test]
    fn eight_levels_round_trip_exactly_in_lq3() {
        let x: Vec<f32> = (0..64).map(|i| (i % 8) as f32 * 0.5 - 1.0).collect();
        let blocks = quantize_as(Format::Lq3, &x);
        assert_eq!(blocks.len(), 26);
        assert_eq!(dequantize_as(Format::Lq3, &blocks), x);
        // step 0.5 (byte 112: 16 * 2^-5), minimum -1 = -4 half steps
        assert_eq!((blocks[0], blocks[1] as i8), (112, -4));
        // the low bits are lq2's layout
        assert_eq!(blocks[2] & 3, 0);
        assert_eq!(blocks[18], 0b1111_0000);
    }

    #[test]
    fn constant_and_zero_groups() {
        let x = vec![0.3f32; 64];
        let y = dequantize(&quantize(&x));
        assert!(y.iter().all(|&v| v == f16_bits_to_f32(f32_to_f16_bits(0.3))));
        assert!(dequantize(&quantize(&[0.0; 64])).iter().all(|&v| v == 0.0));
    }
}
