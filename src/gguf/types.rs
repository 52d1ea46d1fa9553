//! The ggml tensor type table and the KV-cache types llama.cpp accepts.
//!
//! Ids follow `enum ggml_type` in `vendor/llama.cpp/ggml/include/ggml.h`; names, block
//! sizes and bytes per block follow the `type_traits` table in `ggml/src/ggml.c` and the
//! `block_*` structs (with their `static_assert`ed sizes) in `ggml/src/ggml-common.h`.
//! Ids that ggml.h lists as removed (4, 5: Q4_2/Q4_3; 31..=33: Q4_0_4_4/4_8/8_8;
//! 36..=38: IQ4_NL_4_4/4_8/8_8) have `blck_size == 0` in ggml.c and are treated as
//! unknown here, as is anything at or past `GGML_TYPE_COUNT` (45).

use std::fmt;

use super::reader::GgufError;

/// A ggml tensor element type (`enum ggml_type`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    Iq2Xxs,
    Iq2Xs,
    Iq3Xxs,
    Iq1S,
    Iq4Nl,
    Iq3S,
    Iq2S,
    Iq4Xs,
    I8,
    I16,
    I32,
    I64,
    F64,
    Iq1M,
    Bf16,
    Tq1_0,
    Tq2_0,
    Mxfp4,
    Nvfp4,
    Q1_0,
    Q2_0,
    /// logquant's 2-bit KV format (patches/files/ggml/src/ggml-lq2.h): groups of 64,
    /// f16 step and minimum, 2.5 bits per value. Exists only in the patched ggml.
    Lq2,
    /// 3-bit codes with a byte step and minimum, 3.25 bits per value.
    Lq3,
}

/// `QK_K` in ggml-common.h: the super-block size of the k-quants and i-quants.
const QK_K: u64 = 256;

impl GgmlType {
    /// Every type, in id order.
    pub const ALL: [GgmlType; 37] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::Q8K,
        GgmlType::Iq2Xxs,
        GgmlType::Iq2Xs,
        GgmlType::Iq3Xxs,
        GgmlType::Iq1S,
        GgmlType::Iq4Nl,
        GgmlType::Iq3S,
        GgmlType::Iq2S,
        GgmlType::Iq4Xs,
        GgmlType::I8,
        GgmlType::I16,
        GgmlType::I32,
        GgmlType::I64,
        GgmlType::F64,
        GgmlType::Iq1M,
        GgmlType::Bf16,
        GgmlType::Tq1_0,
        GgmlType::Tq2_0,
        GgmlType::Mxfp4,
        GgmlType::Nvfp4,
        GgmlType::Q1_0,
        GgmlType::Q2_0,
        GgmlType::Lq2,
        GgmlType::Lq3,
    ];

    /// The type with ggml id `id`, or `None` for ids that are removed or unknown.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.iter().copied().find(|t| t.id() == id)
    }

    /// The type whose ggml name (see [`GgmlType::name`]) is `name`, ignoring ASCII case.
    pub fn from_name(name: &str) -> Option<GgmlType> {
        GgmlType::ALL.iter().copied().find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// The id stored in GGUF tensor infos (`enum ggml_type`).
    pub fn id(self) -> u32 {
        self.traits().0
    }

    /// The name as ggml prints it (`type_traits[t].type_name`), e.g. `"q4_K"`, `"f16"`.
    pub fn name(self) -> &'static str {
        self.traits().1
    }

    /// Elements per block (`blck_size`).
    pub fn block_size(self) -> u64 {
        self.traits().2
    }

    /// Bytes per block (`type_size`, i.e. `sizeof(block_*)`).
    pub fn type_size(self) -> u64 {
        self.traits().3
    }

    /// Whether ggml marks the type `is_quantized`.
    pub fn is_quantized(self) -> bool {
        !matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::Bf16
                | GgmlType::F64
                | GgmlType::I8
                | GgmlType::I16
                | GgmlType::I32
                | GgmlType::I64
        )
    }

    /// Average storage bits per element.
    pub fn bits_per_element(self) -> f64 {
        self.type_size() as f64 * 8.0 / self.block_size() as f64
    }

    /// (id, name, block size, bytes per block).
    fn traits(self) -> (u32, &'static str, u64, u64) {
        use GgmlType::*;
        match self {
            F32 => (0, "f32", 1, 4),
            F16 => (1, "f16", 1, 2),
            // block_q4_0: ggml_half d + qs[QK4_0/2], QK4_0 = 32
            Q4_0 => (2, "q4_0", 32, 18),
            // block_q4_1: d, m + qs[16]
            Q4_1 => (3, "q4_1", 32, 20),
            // block_q5_0: d + qh[4] + qs[16]
            Q5_0 => (6, "q5_0", 32, 22),
            // block_q5_1: d, m + qh[4] + qs[16]
            Q5_1 => (7, "q5_1", 32, 24),
            // block_q8_0: d + qs[32]
            Q8_0 => (8, "q8_0", 32, 34),
            // block_q8_1: d, s + qs[32]
            Q8_1 => (9, "q8_1", 32, 36),
            // block_q2_K: scales[16] + qs[64] + d, dmin
            Q2K => (10, "q2_K", QK_K, 84),
            // block_q3_K: hmask[32] + qs[64] + scales[12] + d
            Q3K => (11, "q3_K", QK_K, 110),
            // block_q4_K: d, dmin + scales[12] + qs[128]
            Q4K => (12, "q4_K", QK_K, 144),
            // block_q5_K: d, dmin + scales[12] + qh[32] + qs[128]
            Q5K => (13, "q5_K", QK_K, 176),
            // block_q6_K: ql[128] + qh[64] + scales[16] + d
            Q6K => (14, "q6_K", QK_K, 210),
            // block_q8_K: float d + qs[256] + bsums[16] (int16)
            Q8K => (15, "q8_K", QK_K, 292),
            // block_iq2_xxs: d + qs[32] (uint16)
            Iq2Xxs => (16, "iq2_xxs", QK_K, 66),
            // block_iq2_xs: d + qs[32] (uint16) + scales[8]
            Iq2Xs => (17, "iq2_xs", QK_K, 74),
            // block_iq3_xxs: d + qs[96]
            Iq3Xxs => (18, "iq3_xxs", QK_K, 98),
            // block_iq1_s: d + qs[32] + qh[8] (uint16)
            Iq1S => (19, "iq1_s", QK_K, 50),
            // block_iq4_nl: d + qs[16], QK4_NL = 32
            Iq4Nl => (20, "iq4_nl", 32, 18),
            // block_iq3_s: d + qs[64] + qh[8] + signs[32] + scales[4]
            Iq3S => (21, "iq3_s", QK_K, 110),
            // block_iq2_s: d + qs[64] + qh[8] + scales[8]
            Iq2S => (22, "iq2_s", QK_K, 82),
            // block_iq4_xs: d + scales_h (uint16) + scales_l[4] + qs[128]
            Iq4Xs => (23, "iq4_xs", QK_K, 136),
            I8 => (24, "i8", 1, 1),
            I16 => (25, "i16", 1, 2),
            I32 => (26, "i32", 1, 4),
            I64 => (27, "i64", 1, 8),
            F64 => (28, "f64", 1, 8),
            // block_iq1_m: qs[32] + qh[16] + scales[8]
            Iq1M => (29, "iq1_m", QK_K, 56),
            Bf16 => (30, "bf16", 1, 2),
            // block_tq1_0: qs[48] + qh[4] + d
            Tq1_0 => (34, "tq1_0", QK_K, 54),
            // block_tq2_0: qs[64] + d
            Tq2_0 => (35, "tq2_0", QK_K, 66),
            // block_mxfp4: e (E8M0) + qs[16], QK_MXFP4 = 32
            Mxfp4 => (39, "mxfp4", 32, 17),
            // block_nvfp4: d[4] (UE4M3) + qs[32], QK_NVFP4 = 64
            Nvfp4 => (40, "nvfp4", 64, 36),
            // block_q1_0: d + qs[16], QK1_0 = 128
            Q1_0 => (41, "q1_0", 128, 18),
            // block_q2_0: d + qs[16], QK2_0 = 64
            Q2_0 => (42, "q2_0", 64, 18),
            Lq2 => (43, "lq2", 64, 20),
            Lq3 => (44, "lq3", 64, 26),
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Bytes of a row of `n` elements of type `ty` (ggml's `ggml_row_size`):
/// `n / block_size * type_size`. Errors when `n` is not a multiple of the block size
/// (ggml asserts on that) or the result does not fit in a `u64`.
pub fn row_bytes(ty: GgmlType, n: u64) -> Result<u64, GgufError> {
    let blck = ty.block_size();
    if n % blck != 0 {
        return Err(GgufError::RowSize { ggml_type: ty, n, block_size: blck });
    }
    (n / blck).checked_mul(ty.type_size()).ok_or(GgufError::RowSize { ggml_type: ty, n, block_size: blck })
}

/// A type llama.cpp accepts for `--cache-type-k` / `--cache-type-v`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum KvCacheType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
    Iq4Nl,
    Q5_0,
    Q5_1,
    /// logquant's 2-bit format (2.5 bits per value), only in this project's build.
    Lq2,
    /// logquant's 3-bit format (3.25 bits per value), only in this project's build.
    Lq3,
}

impl KvCacheType {
    /// Every accepted cache type: llama.cpp's, in the order it lists them, then lq2 and lq3.
    pub const ALL: [KvCacheType; 11] = [
        KvCacheType::F32,
        KvCacheType::F16,
        KvCacheType::Bf16,
        KvCacheType::Q8_0,
        KvCacheType::Q4_0,
        KvCacheType::Q4_1,
        KvCacheType::Iq4Nl,
        KvCacheType::Q5_0,
        KvCacheType::Q5_1,
        KvCacheType::Lq2,
        KvCacheType::Lq3,
    ];

    /// True for the types stock llama.cpp has (all but lq2 and lq3).
    pub fn is_stock(self) -> bool {
        !matches!(self, KvCacheType::Lq2 | KvCacheType::Lq3)
    }

    /// Parses a cache type as given on the command line (`"q8_0"`, `"f16"`, ...),
    /// ignoring ASCII case.
    pub fn from_name(name: &str) -> Option<KvCacheType> {
        KvCacheType::ALL.iter().copied().find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// The name llama.cpp uses for it (the ggml type name).
    pub fn name(self) -> &'static str {
        self.ggml_type().name()
    }

    /// The ggml type the cache tensors are created with.
    pub fn ggml_type(self) -> GgmlType {
        match self {
            KvCacheType::F32 => GgmlType::F32,
            KvCacheType::F16 => GgmlType::F16,
            KvCacheType::Bf16 => GgmlType::Bf16,
            KvCacheType::Q8_0 => GgmlType::Q8_0,
            KvCacheType::Q4_0 => GgmlType::Q4_0,
            KvCacheType::Q4_1 => GgmlType::Q4_1,
            KvCacheType::Iq4Nl => GgmlType::Iq4Nl,
            KvCacheType::Q5_0 => GgmlType::Q5_0,
            KvCacheType::Q5_1 => GgmlType::Q5_1,
            KvCacheType::Lq2 => GgmlType::Lq2,
            KvCacheType::Lq3 => GgmlType::Lq3,
        }
    }

    /// Average storage bits per cached value, block scales included
    /// (e.g. 16 for f16, 8.5 for q8_0, 4.5 for q4_0).
    pub fn bits_per_value(self) -> f64 {
        self.ggml_type().bits_per_element()
    }
}

impl fmt::Display for KvCacheType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl From<KvCacheType> for GgmlType {
    fn from(t: KvCacheType) -> GgmlType {
        t.ggml_type()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_removed_ids_are_unknown() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Some(t), "{t}");
            assert_eq!(GgmlType::from_name(t.name()), Some(t));
        }
        for removed in [4, 5, 31, 32, 33, 36, 37, 38, 45, 1000, u32::MAX] {
            assert_eq!(GgmlType::from_id(removed), None, "id {removed}");
        }
        // every id below GGML_TYPE_COUNT that is not removed is known
        let known = (0..45).filter(|&i| GgmlType::from_id(i).is_some()).count();
        assert_eq!(known, GgmlType::ALL.len());
    }

    #[test]
    fn sizes_match_ggml_common_h() {
        let expect = [
            (GgmlType::F32, "f32", 1, 4),
            (GgmlType::F16, "f16", 1, 2),
            (GgmlType::Bf16, "bf16", 1, 2),
            (GgmlType::Q4_0, "q4_0", 32, 18),
            (GgmlType::Q8_0, "q8_0", 32, 34),
            (GgmlType::Q4K, "q4_K", 256, 144),
            (GgmlType::Q6K, "q6_K", 256, 210),
            (GgmlType::Iq4Xs, "iq4_xs", 256, 136),
            (GgmlType::Tq1_0, "tq1_0", 256, 54),
            (GgmlType::Mxfp4, "mxfp4", 32, 17),
        ];
        for (t, name, blck, size) in expect {
            assert_eq!((t.name(), t.block_size(), t.type_size()), (name, blck, size));
        }
        assert_eq!(GgmlType::Q4K.bits_per_element(), 4.5);
        assert_eq!(GgmlType::Q6K.bits_per_element(), 6.5625);
        assert_eq!(GgmlType::Iq2Xxs.bits_per_element(), 2.0625);
    }

    #[test]
    fn row_bytes_checks_block_multiple() {
        assert_eq!(row_bytes(GgmlType::F16, 4096).unwrap(), 8192);
        assert_eq!(row_bytes(GgmlType::Q4_0, 4096).unwrap(), 128 * 18);
        assert_eq!(row_bytes(GgmlType::Q4K, 4096).unwrap(), 16 * 144);
        let err = row_bytes(GgmlType::Q4K, 4000).unwrap_err();
        assert!(matches!(err, GgufError::RowSize { .. }));
        assert!(err.to_string().contains("256"), "{err}");
        assert!(row_bytes(GgmlType::Q8K, u64::MAX - (u64::MAX % 256)).is_err());
    }

    #[test]
    fn kv_cache_types() {
        assert_eq!(KvCacheType::ALL.len(), 11);
        assert_eq!(KvCacheType::ALL.iter().filter(|t| t.is_stock()).count(), 9);
        assert_eq!(KvCacheType::Lq2.bits_per_value(), 2.5);
        assert_eq!(KvCacheType::Lq3.bits_per_value(), 3.25);
        for t in KvCacheType::ALL {
            assert_eq!(KvCacheType::from_name(t.name()), Some(t));
        }
        assert_eq!(KvCacheType::from_name("Q8_0"), Some(KvCacheType::Q8_0));
        assert_eq!(KvCacheType::from_name("iq4_nl"), Some(KvCacheType::Iq4Nl));
        assert_eq!(KvCacheType::from_name("q4_K"), None);
        assert_eq!(KvCacheType::F16.bits_per_value(), 16.0);
        assert_eq!(KvCacheType::Q8_0.bits_per_value(), 8.5);
        assert_eq!(KvCacheType::Q4_0.bits_per_value(), 4.5);
        assert_eq!(KvCacheType::Q5_1.bits_per_value(), 6.0);
        assert_eq!(GgmlType::from(KvCacheType::Bf16), GgmlType::Bf16);
    }
}
