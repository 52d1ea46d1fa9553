//! Synthetic llama models: random but deterministic weights in a GGUF that the
//! vendored llama.cpp loads as `general.architecture = "llama"`.
//!
//! What llama.cpp needs, from the vendored sources:
//! - hparams (src/llama-model.cpp `load_hparams`, src/models/llama.cpp): `llama.context_length`,
//!   `llama.embedding_length`, `llama.block_count` (required, u32),
//!   `llama.feed_forward_length`, `llama.attention.head_count`,
//!   `llama.attention.head_count_kv`, `llama.rope.dimension_count` (must equal the head
//!   size for llama), `llama.rope.freq_base` (f32), and
//!   `llama.attention.layer_norm_rms_epsilon` (f32, required). The loader checks types
//!   strictly (`GKV::get_kv`), so integers are written as u32 and floats as f32.
//! - tensors (src/models/llama.cpp `load_arch_tensors`, names from src/llama-arch.cpp),
//!   shapes in ggml order `[ne0 = in, ne1 = out]`: `token_embd.weight [n_embd, n_vocab]`,
//!   `output_norm.weight [n_embd]`, `output.weight [n_embd, n_vocab]`, and per layer
//!   `blk.N.attn_norm.weight [n_embd]`, `attn_q [n_embd, n_embd]`,
//!   `attn_k / attn_v [n_embd, n_head_kv * head_dim]`, `attn_output [n_embd, n_embd]`,
//!   `ffn_norm [n_embd]`, `ffn_gate / ffn_up [n_embd, n_ff]`, `ffn_down [n_ff, n_embd]`.
//!   `n_vocab` is the number of tokenizer tokens.
//! - vocabulary (src/llama-vocab.cpp): `tokenizer.ggml.model = "llama"` selects the
//!   SentencePiece tokenizer; `tokenizer.ggml.tokens` must be a string array,
//!   `tokenizer.ggml.scores` an f32 (or i32) array and `tokenizer.ggml.token_type` an
//!   i32 array, each at least as long as the tokens. The newline token is looked up as
//!   `"<0x0A>"` (`byte_to_token('\n')`), and byte fallback needs every `<0xXX>` token.
//!   Special ids are u32 keys; `add_bos_token` is a bool.

use std::io::{self, Write};
use std::path::Path;

use super::reader::GgufError;
use super::types::GgmlType;
use super::writer::GgufWriter;

/// SentencePiece token types (`enum llama_token_type` in include/llama.h).
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_BYTE: i32 = 6;

/// `<unk>`, `<s>`, `</s>` and the 256 byte tokens come before the normal tokens.
pub const N_BASE_TOKENS: u64 = 3 + 256;

/// Standard deviation of the random weights (a typical initialisation scale).
const WEIGHT_STD: f32 = 0.02;

/// Shape and contents of a synthetic llama model.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthSpec {
    pub n_layer: u32,
    pub n_embd: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub n_ff: u32,
    /// Normal tokens after `<unk>`, `<s>`, `</s>` and the 256 byte tokens.
    pub n_vocab_extra: u32,
    pub n_ctx_train: u32,
    /// Type of the 2-D weights: F32, F16, Q8_0 or Q4_0 (norms are always F32).
    pub weight_type: GgmlType,
    /// Seed of the weight generator; the same spec always gives the same file.
    pub seed: u64,
    /// `llama.rope.freq_base`.
    pub rope_freq_base: f32,
    /// `llama.attention.layer_norm_rms_epsilon`.
    pub rms_norm_eps: f32,
}

impl SynthSpec {
    /// A 2-layer model with 256-wide embeddings, 4 heads of 64 (2 KV heads), FFN 512, a
    /// 759-token vocabulary, 2048 training context and F32 weights: about 0.6 MB.
    pub fn tiny() -> SynthSpec {
        SynthSpec {
            n_layer: 2,
            // Head size 64: every quantized cache type (blocks of 32) and LogQuant's
            // 64-value groups fit a head; 4 query heads on 2 KV heads keep GQA in play.
            n_embd: 256,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 512,
            n_vocab_extra: 500,
            n_ctx_train: 2048,
            weight_type: GgmlType::F32,
            seed: 0x5eed,
            rope_freq_base: 10000.0,
            rms_norm_eps: 1e-5,
        }
    }

    /// The shape of Llama 3 8B: 32 layers, 4096 embeddings, 32 heads (8 KV heads),
    /// FFN 14336, 128256 tokens, 131072 training context, rope base 500000.
    pub fn llama3_8b(weight_type: GgmlType) -> SynthSpec {
        SynthSpec {
            n_layer: 32,
            n_embd: 4096,
            n_head: 32,
            n_head_kv: 8,
            n_ff: 14336,
            n_vocab_extra: (128_256 - N_BASE_TOKENS) as u32,
            n_ctx_train: 131_072,
            weight_type,
            seed: 0x11a3a,
            rope_freq_base: 500_000.0,
            rms_norm_eps: 1e-5,
        }
    }

    /// Total number of tokens.
    pub fn n_vocab(&self) -> u64 {
        N_BASE_TOKENS + u64::from(self.n_vocab_extra)
    }

    /// Size of one attention head (`n_embd / n_head`).
    pub fn head_dim(&self) -> u32 {
        self.n_embd.checked_div(self.n_head).unwrap_or(0)
    }

    /// Checks that the spec describes a model llama.cpp can load.
    pub fn validate(&self) -> Result<(), GgufError> {
        let bad = |m: String| Err(GgufError::InvalidSpec(m));
        match self.weight_type {
            GgmlType::F32 | GgmlType::F16 | GgmlType::Q8_0 | GgmlType::Q4_0 => {}
            t => return bad(format!("weight type {t} is not supported; use f32, f16, q8_0 or q4_0")),
        }
        if self.n_layer == 0 || self.n_layer > 512 {
            return bad(format!("n_layer {} must be 1..=512", self.n_layer));
        }
        if self.n_embd == 0 || self.n_head == 0 || self.n_ff == 0 || self.n_head_kv == 0 {
            return bad("n_embd, n_head, n_head_kv and n_ff must be positive".into());
        }
        if self.n_embd % self.n_head != 0 {
            return bad(format!("n_embd {} is not a multiple of n_head {}", self.n_embd, self.n_head));
        }
        if self.head_dim() % 2 != 0 {
            return bad(format!("head size {} must be even for RoPE", self.head_dim()));
        }
        if self.n_head % self.n_head_kv != 0 {
            return bad(format!("n_head {} is not a multiple of n_head_kv {}", self.n_head, self.n_head_kv));
        }
        let blck = self.weight_type.block_size();
        if u64::from(self.n_embd) % blck != 0 || u64::from(self.n_ff) % blck != 0 {
            return bad(format!(
                "n_embd {} and n_ff {} must be multiples of the {} block size {blck}",
                self.n_embd, self.n_ff, self.weight_type
            ));
        }
        if self.n_ctx_train == 0 {
            return bad("n_ctx_train must be positive".into());
        }
        if self.n_vocab() > i32::MAX as u64 {
            return bad("the vocabulary must have fewer than 2^31 tokens".into());
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_freq_base > 0.0) {
            return bad("rms_norm_eps and rope_freq_base must be positive".into());
        }
        Ok(())
    }
}

/// Writes a synthetic llama GGUF for `spec` to `path` (atomically) and returns its
/// size in bytes. Weight data is generated while writing, so memory use stays small
/// whatever the model size.
pub fn write_synthetic_llama(path: impl AsRef<Path>, spec: &SynthSpec) -> Result<u64, GgufError> {
    build_writer(spec)?.write_to_path(path)
}

/// The exact size in bytes [`write_synthetic_llama`] would write for `spec`, computed
/// without generating any weights.
pub fn planned_size(spec: &SynthSpec) -> Result<u64, GgufError> {
    Ok(build_writer(spec)?.planned_size())
}

/// The tokenizer arrays: tokens, scores and token types.
pub fn synth_vocab(n_vocab_extra: usize) -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let n = N_BASE_TOKENS as usize + n_vocab_extra;
    let mut tokens = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    tokens.push("<unk>".to_string());
    types.push(TOKEN_TYPE_UNKNOWN);
    tokens.push("<s>".to_string());
    types.push(TOKEN_TYPE_CONTROL);
    tokens.push("</s>".to_string());
    types.push(TOKEN_TYPE_CONTROL);
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(TOKEN_TYPE_BYTE);
    }
    let mut scores = vec![0.0f32; tokens.len()];
    for (i, piece) in normal_pieces().take(n_vocab_extra).enumerate() {
        tokens.push(piece);
        types.push(TOKEN_TYPE_NORMAL);
        // strictly decreasing, like SentencePiece log-probabilities
        scores.push(-((i + 1) as f32));
    }
    (tokens, scores, types)
}

const SPACE: &str = "\u{2581}";

const COMMON_WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he",
    "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they", "you", "were", "their",
    "one", "all", "we", "can", "her", "has", "there", "been", "if", "more", "when", "will", "would", "who", "so", "no",
    "she", "other", "its", "may", "these", "what", "them", "than", "some", "him", "time", "into", "only", "do",
    "could", "new", "about", "two", "first", "then", "also", "any", "like", "my", "now", "over", "such", "our", "man",
    "me", "even", "most", "made", "after", "many", "must", "years", "before", "through", "back", "where", "much",
    "your", "way", "well", "down", "should", "because", "each", "just", "those", "how", "too", "little", "state",
    "good", "very", "make", "world", "still", "own", "see", "men", "work", "long", "get", "here", "between", "both",
    "life", "being", "under", "never", "day", "same", "another", "know", "while", "last", "might", "us", "great",
    "old", "year", "off", "come", "since", "against", "go", "came", "right", "used", "take", "three", "people",
    "water", "number", "word", "part", "place", "sound", "think", "help", "line", "name", "small", "large", "house",
    "every", "found", "home", "point", "hand", "high", "light", "story", "city", "tree", "cross", "farm", "hard",
    "start", "earth", "eye", "school", "night", "question", "model", "data", "system", "value", "cache", "token",
    "layer", "memory", "context", "language", "Hello", "The", "In", "It", "This", "A", "I", "He", "She", "We", "They",
    "But", "And", "Once", "upon", "quick", "brown", "fox", "jumps", "lazy", "dog", "cat", "red", "blue", "green",
    "white", "black", "happy", "said", "asked", "went", "saw", "looked", "wanted", "loved", "played", "friend",
    "mother", "father", "girl", "boy", "sun", "moon", "sky", "sea", "river", "road", "car", "book", "food", "money",
    "family",
];

const SUBWORDS: &[&str] = &[
    "ing", "ed", "er", "ly", "es", "s", "tion", "ment", "ness", "able", "al", "ic", "ous", "ive", "est", "ity", "ers",
    "ion", "ent", "ant", "re", "un", "ful", "less", "ize", "ise", "ism", "ist", "ical", "ward", "th", "ch", "sh", "qu",
    "ou", "ea",
];

/// Normal tokens, deterministically and without duplicates: `"▁"`, printable ASCII,
/// `"▁"`-prefixed common words with all their prefixes (so SentencePiece merges can
/// reach them), sub-word pieces with their prefixes, then as many letter combinations
/// as needed.
fn normal_pieces() -> impl Iterator<Item = String> {
    let fixed = std::iter::once(SPACE.to_string())
        .chain((0x21u8..=0x7e).map(|b| (b as char).to_string()))
        .chain(COMMON_WORDS.iter().flat_map(|w| {
            let chars: Vec<char> = w.chars().collect();
            (1..=chars.len()).map(move |k| format!("{SPACE}{}", chars[..k].iter().collect::<String>()))
        }))
        .chain(SUBWORDS.iter().flat_map(|w| {
            let chars: Vec<char> = w.chars().collect();
            (2..=chars.len()).map(move |k| chars[..k].iter().collect::<String>())
        }));
    let fill = (2usize..).flat_map(|len| {
        let count = 26u64.checked_pow(len as u32).unwrap_or(u64::MAX);
        (0u64..count).flat_map(move |mut code| {
            let mut s = vec![b'a'; len];
            for c in s.iter_mut().rev() {
                *c = b'a' + (code % 26) as u8;
                code /= 26;
            }
            let s = String::from_utf8(s).unwrap_or_default();
            [format!("{SPACE}{s}"), s]
        })
    });
    let mut seen = std::collections::HashSet::new();
    fixed.chain(fill).filter(move |p| seen.insert(p.clone()))
}

fn file_type(t: GgmlType) -> u32 {
    // enum llama_ftype in include/llama.h
    match t {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        _ => 7, // Q8_0
    }
}

fn build_writer(spec: &SynthSpec) -> Result<GgufWriter<'static>, GgufError> {
    spec.validate()?;
    let mut w = GgufWriter::new();
    let arch = "llama";
    let k = |s: &str| format!("{arch}.{s}");
    let n_vocab = spec.n_vocab();
    w.add_string("general.architecture", arch)?;
    w.add_string("general.name", "logquant synthetic llama")?;
    w.add_u32("general.file_type", file_type(spec.weight_type))?;
    if spec.weight_type.is_quantized() {
        w.add_u32("general.quantization_version", 2)?;
    }
    w.add_u32(k("vocab_size"), n_vocab as u32)?;
    w.add_u32(k("context_length"), spec.n_ctx_train)?;
    w.add_u32(k("embedding_length"), spec.n_embd)?;
    w.add_u32(k("block_count"), spec.n_layer)?;
    w.add_u32(k("feed_forward_length"), spec.n_ff)?;
    w.add_u32(k("attention.head_count"), spec.n_head)?;
    w.add_u32(k("attention.head_count_kv"), spec.n_head_kv)?;
    w.add_u32(k("rope.dimension_count"), spec.head_dim())?;
    w.add_f32(k("rope.freq_base"), spec.rope_freq_base)?;
    w.add_f32(k("attention.layer_norm_rms_epsilon"), spec.rms_norm_eps)?;

    let (tokens, scores, types) = synth_vocab(spec.n_vocab_extra as usize);
    w.add_string("tokenizer.ggml.model", "llama")?;
    w.add_string_array("tokenizer.ggml.tokens", tokens)?;
    w.add_f32_array("tokenizer.ggml.scores", scores)?;
    w.add_i32_array("tokenizer.ggml.token_type", types)?;
    w.add_u32("tokenizer.ggml.bos_token_id", 1)?;
    w.add_u32("tokenizer.ggml.eos_token_id", 2)?;
    w.add_u32("tokenizer.ggml.unknown_token_id", 0)?;
    w.add_bool("tokenizer.ggml.add_bos_token", true)?;
    w.add_bool("tokenizer.ggml.add_eos_token", false)?;

    let e = u64::from(spec.n_embd);
    let kv = u64::from(spec.n_head_kv) * u64::from(spec.head_dim());
    let ff = u64::from(spec.n_ff);
    let wt = spec.weight_type;
    let mut index: u64 = 0;
    let mut seed_for = |name: &str| {
        index += 1;
        let mut h = spec.seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for b in name.bytes() {
            h = splitmix64(&mut h) ^ u64::from(b);
        }
        h
    };
    let mut weight = |w: &mut GgufWriter<'static>, name: String, shape: [u64; 2]| {
        let seed = seed_for(&name);
        let n = shape[0] * shape[1];
        w.add_tensor_with(name, &shape, wt, move |out| write_random(out, wt, n, seed)).map(|_| ())
    };
    let norm = |w: &mut GgufWriter<'static>, name: String| {
        w.add_tensor_with(name, &[e], GgmlType::F32, move |out| write_ones(out, e)).map(|_| ())
    };

    weight(&mut w, "token_embd.weight".into(), [e, n_vocab])?;
    for il in 0..spec.n_layer {
        let b = |s: &str| format!("blk.{il}.{s}.weight");
        norm(&mut w, b("attn_norm"))?;
        weight(&mut w, b("attn_q"), [e, e])?;
        weight(&mut w, b("attn_k"), [e, kv])?;
        weight(&mut w, b("attn_v"), [e, kv])?;
        weight(&mut w, b("attn_output"), [e, e])?;
        norm(&mut w, b("ffn_norm"))?;
        weight(&mut w, b("ffn_gate"), [e, ff])?;
        weight(&mut w, b("ffn_up"), [e, ff])?;
        weight(&mut w, b("ffn_down"), [ff, e])?;
    }
    norm(&mut w, "output_norm.weight".into())?;
    weight(&mut w, "output.weight".into(), [e, n_vocab])?;
    Ok(w)
}

/// splitmix64: a tiny, good-enough 64-bit generator.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform value in [-1, 1) from 24 random bits.
fn unit(bits: u64) -> f32 {
    ((bits & 0xff_ffff) as f32 / (1u32 << 23) as f32) - 1.0
}

const CHUNK: usize = 1 << 16;

fn write_ones(out: &mut dyn Write, n: u64) -> io::Result<()> {
    let one = 1.0f32.to_le_bytes();
    let buf: Vec<u8> = (0..CHUNK / 4).flat_map(|_| one).collect();
    let mut left = n * 4;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        out.write_all(&buf[..k])?;
        left -= k as u64;
    }
    Ok(())
}

/// Writes `n` random weights of type `ty` with standard deviation about 0.02.
fn write_random(out: &mut dyn Write, ty: GgmlType, n: u64, seed: u64) -> io::Result<()> {
    let mut state = seed;
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK + 64);
    // uniform on [-a, a] has std a / sqrt(3)
    let amp = WEIGHT_STD * 3f32.sqrt();
    let mut left = n;
    match ty {
        GgmlType::F32 | GgmlType::F16 => {
            while left > 0 {
                buf.clear();
                while buf.len() < CHUNK && left > 0 {
                    let r = splitmix64(&mut state);
                    for bits in [r, r >> 32] {
                        if left == 0 {
                            break;
                        }
                        let x = unit(bits) * amp;
                        if ty == GgmlType::F32 {
                            buf.extend_from_slice(&x.to_le_bytes());
                        } else {
                            buf.extend_from_slice(&f32_to_f16_bits(x).to_le_bytes());
                        }
                        left -= 1;
                    }
                }
                out.write_all(&buf)?;
            }
        }
        GgmlType::Q8_0 | GgmlType::Q4_0 => {
            // Q8_0: d (f16) + 32 int8, value = d * q, q ~ U[-128, 127], std(q) ~ 73.9.
            // Q4_0: d (f16) + 16 bytes of nibbles, value = d * (q - 8), std(q - 8) ~ 4.61.
            let (q_std, n_q_bytes) = if ty == GgmlType::Q8_0 { (73.9f32, 32) } else { (4.61f32, 16) };
            let mut blocks = n / 32;
            while blocks > 0 {
                buf.clear();
                while buf.len() < CHUNK && blocks > 0 {
                    let r = splitmix64(&mut state);
                    // scale jittered by +-25% around the target, with a random sign (as
                    // ggml's own quantizers produce) so the quants' offset averages out
                    let sign = if r >> 63 == 1 { -1.0 } else { 1.0 };
                    let d = sign * WEIGHT_STD / q_std * (1.0 + 0.25 * unit(r));
                    buf.extend_from_slice(&f32_to_f16_bits(d).to_le_bytes());
                    for _ in 0..n_q_bytes / 8 {
                        buf.extend_from_slice(&splitmix64(&mut state).to_le_bytes());
                    }
                    blocks -= 1;
                }
                out.write_all(&buf)?;
            }
        }
        other => return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("cannot generate {other} weights"))),
    }
    Ok(())
}

/// Converts an `f32` to IEEE 754 half-precision bits, rounding to nearest, ties to
/// even; overflow gives infinity, NaN stays NaN (quiet).
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return if man == 0 { sign | 0x7c00 } else { sign | 0x7e00 | (man >> 13) as u16 };
    }
    // exponent re-biased for half precision
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        // subnormal half (or zero): value = m24 * 2^(exp - 150) in units of 2^-24
        // is m24 >> (14 - e); below 2^-25 (and exactly 2^-25, a tie to even 0) it is 0.
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = m >> shift;
        let rem = m & ((1 << shift) - 1);
        let halfway = 1 << (shift - 1);
        let rounded = if rem > halfway || (rem == halfway && half & 1 == 1) { half + 1 } else { half };
        // a carry into bit 10 correctly yields the smallest normal number
        return sign | rounded as u16;
    }
    let mut h = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && h & 1 == 1) {
        // a carry may ripple into the exponent, up to infinity (0x7c00), as it should
        h += 1;
    }
    sign | h as u16
}

/// Converts IEEE 754 half-precision bits to `f32` (exact).
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // subnormal: m * 2^-24
            let mag = m as f32 * f32::from_bits(0x3380_0000);
            return if sign != 0 { -mag } else { mag };
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, m) => sign | 0x7fc0_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::super::info::ModelInfo;
    use super::super::reader::GgufFile;
    use super::super::types::KvCacheType;
    use super::*;

    #[test]
    fn f16_conversion_known_values() {
        let cases: [(f32, u16); 14] = [
            (0.0, 0x0000),
            (-0.0, 0x8000),
            (1.0, 0x3c00),
            (-2.0, 0xc000),
            (0.5, 0x3800),
            (65504.0, 0x7bff),
            (65519.0, 0x7bff),
            (65520.0, 0x7c00), // tie rounds to even: up to infinity
            (1e10, 0x7c00),
            (f32::INFINITY, 0x7c00),
            (6.103_515_6e-5, 0x0400), // smallest normal
            (5.960_464_5e-8, 0x0001), // smallest subnormal, 2^-24
            (2.980_232_2e-8, 0x0000), // 2^-25: tie to even -> 0
            (0.1, 0x2e66),
        ];
        for (x, h) in cases {
            assert_eq!(f32_to_f16_bits(x), h, "{x}");
        }
        // 3 * 2^-25 = 1.5 units: tie, rounds to even (2)
        assert_eq!(f32_to_f16_bits(3.0 * 2f32.powi(-25)), 0x0002);
        // 1 + 2^-11 is a tie between 1 and 1+2^-10: to even (1.0)
        assert_eq!(f32_to_f16_bits(1.0 + 2f32.powi(-11)), 0x3c00);
        assert_eq!(f32_to_f16_bits(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        assert!(f16_bits_to_f32(f32_to_f16_bits(f32::NAN)).is_nan());
    }

    #[test]
    fn f16_round_trips_every_value() {
        for h in 0..=u16::MAX {
            let x = f16_bits_to_f32(h);
            if x.is_nan() {
                assert!(f16_bits_to_f32(f32_to_f16_bits(x)).is_nan());
            } else {
                assert_eq!(f32_to_f16_bits(x), h, "{h:#06x} -> {x}");
            }
        }
    }

    #[test]
    fn f16_rounding_is_nearest() {
        // for values between consecutive halfs, the result is the nearer one
        let mut s = 12345u64;
        for _ in 0..100_000 {
            let x = f32::from_bits(splitmix64(&mut s) as u32);
            if !x.is_finite() || x.abs() > 65504.0 {
                continue;
            }
            let h = f32_to_f16_bits(x);
            let y = f64::from(f16_bits_to_f32(h));
            let up = f64::from(f16_bits_to_f32(h.wrapping_add(1)));
            let down = f64::from(f16_bits_to_f32(h.wrapping_sub(1)));
            let err = (y - f64::from(x)).abs();
            for n in [up, down] {
                if n.is_finite() && (n < 0.0) == (y < 0.0) {
                    assert!(err <= (n - f64::from(x)).abs(), "{x}: {y} vs {n}");
                }
            }
        }
    }

    #[test]
    fn vocab_layout() {
        let (tokens, scores, types) = synth_vocab(2000);
        assert_eq!(tokens.len(), 259 + 2000);
        assert_eq!((scores.len(), types.len()), (tokens.len(), tokens.len()));
        assert_eq!(&tokens[..3], ["<unk>", "<s>", "</s>"]);
        assert_eq!(&types[..4], [2, 3, 3, 6]);
        assert_eq!(tokens[3], "<0x00>");
        assert_eq!(tokens[3 + 10], "<0x0A>");
        assert_eq!(tokens[258], "<0xFF>");
        assert_eq!(tokens[259], "\u{2581}");
        assert!(tokens.contains(&"\u{2581}the".to_string()));
        assert!(tokens.contains(&"\u{2581}th".to_string()));
        assert!(tokens.contains(&"a".to_string()));
        let unique: std::collections::HashSet<_> = tokens.iter().collect();
        assert_eq!(unique.len(), tokens.len());
        assert!(types[259..].iter().all(|&t| t == 1));
        assert!(scores[259..].windows(2).all(|w| w[0] > w[1]));
        // deterministic
        assert_eq!(synth_vocab(2000).0, tokens);
    }

    #[test]
    fn llama3_sized_vocab_is_unique() {
        let (tokens, _, _) = synth_vocab(128_256 - 259);
        assert_eq!(tokens.len(), 128_256);
        let unique: std::collections::HashSet<_> = tokens.iter().collect();
        assert_eq!(unique.len(), tokens.len());
    }

    fn dequant_stats(f: &GgufFile, name: &str) -> (f64, f64) {
        let t = f.tensor(name).unwrap();
        let d = f.tensor_data(name).unwrap();
        let vals: Vec<f32> = match t.ggml_type {
            GgmlType::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            GgmlType::F16 => d.chunks_exact(2).map(|c| f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            GgmlType::Q8_0 => d
                .chunks_exact(34)
                .flat_map(|b| {
                    let s = f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
                    b[2..].iter().map(move |&q| s * f32::from(q as i8))
                })
                .collect(),
            GgmlType::Q4_0 => d
                .chunks_exact(18)
                .flat_map(|b| {
                    let s = f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
                    b[2..].iter().flat_map(move |&q| [q & 15, q >> 4]).map(move |q| s * (f32::from(q) - 8.0))
                })
                .collect(),
            other => panic!("unexpected {other}"),
        };
        assert_eq!(vals.len() as u64, t.n_elements);
        let n = vals.len() as f64;
        let mean = vals.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = vals.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    #[test]
    fn tiny_model_round_trips_for_every_weight_type() {
        let dir = tempfile::tempdir().unwrap();
        for wt in [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0] {
            let spec = SynthSpec { weight_type: wt, ..SynthSpec::tiny() };
            let path = dir.path().join(format!("tiny-{wt}.gguf"));
            let written = write_synthetic_llama(&path, &spec).unwrap();
            assert_eq!(written, planned_size(&spec).unwrap());
            let f = GgufFile::open(&path).unwrap();
            assert_eq!(f.file_size(), written);
            assert_eq!(f.architecture(), Some("llama"));
            assert_eq!(f.get_str("tokenizer.ggml.model"), Some("llama"));
            assert_eq!(f.get_u32("tokenizer.ggml.bos_token_id"), Some(1));
            assert_eq!(f.get_bool("tokenizer.ggml.add_bos_token"), Some(true));
            assert_eq!(f.get_u32("llama.rope.dimension_count"), Some(64));
            assert_eq!(f.tensors().len(), 3 + 9 * 2);

            let info = ModelInfo::from_gguf(&f).unwrap();
            assert_eq!(info.n_layer, 2);
            assert_eq!(info.n_embd, 256);
            assert_eq!(info.n_head, 4);
            assert_eq!(info.n_head_kv, vec![2, 2]);
            assert_eq!((info.head_dim_k, info.head_dim_v), (64, 64));
            assert_eq!(info.n_ctx_train, 2048);
            assert_eq!(info.n_vocab, 759);
            assert_eq!(info.n_swa_layers(), 0);
            // 2 layers * (2 heads * 64) * (K + V) * 2 bytes
            assert_eq!(info.kv_bytes_per_token(KvCacheType::F16, KvCacheType::F16).unwrap(), 2 * 128 * 2 * 2);
            let main = &info.tensor_types[0];
            assert_eq!(main.ggml_type, wt);
            let n_main = if wt == GgmlType::F32 { 21 } else { 16 };
            assert_eq!(main.n_tensors, n_main);
            let norms = info.tensor_types.iter().find(|s| s.ggml_type == GgmlType::F32).unwrap();
            assert!(norms.n_tensors >= 5);

            // shapes in ggml order
            let shape = |n: &str| f.tensor(n).unwrap().shape.clone();
            assert_eq!(shape("token_embd.weight"), vec![256, 759]);
            assert_eq!(shape("output.weight"), vec![256, 759]);
            assert_eq!(shape("blk.1.attn_k.weight"), vec![256, 128]);
            assert_eq!(shape("blk.0.ffn_down.weight"), vec![512, 256]);
            assert_eq!(shape("blk.0.ffn_up.weight"), vec![256, 512]);
            assert_eq!(shape("output_norm.weight"), vec![256]);

            // norms are ones, weights look like a 0.02-std initialisation
            let (m, s) = dequant_stats(&f, "blk.0.attn_norm.weight");
            assert_eq!((m, s), (1.0, 0.0));
            for name in ["token_embd.weight", "blk.1.ffn_down.weight"] {
                let (m, s) = dequant_stats(&f, name);
                assert!(m.abs() < 0.003, "{wt} {name} mean {m}");
                assert!((0.015..0.025).contains(&s), "{wt} {name} std {s}");
            }
        }
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let spec = SynthSpec { weight_type: GgmlType::Q4_0, ..SynthSpec::tiny() };
        let a = dir.path().join("a.gguf");
        let b = dir.path().join("b.gguf");
        let c = dir.path().join("c.gguf");
        write_synthetic_llama(&a, &spec).unwrap();
        write_synthetic_llama(&b, &spec).unwrap();
        write_synthetic_llama(&c, &SynthSpec { seed: 7, ..spec }).unwrap();
        let (a, b, c) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap(), std::fs::read(c).unwrap());
        assert_eq!(a, b);
        assert_eq!(a.len(), c.len());
        assert_ne!(a, c);
        // different tensors get different data
        let f = GgufFile::from_bytes("a", a).unwrap();
        assert_ne!(f.tensor_data("blk.0.attn_q.weight"), f.tensor_data("blk.0.attn_output.weight"));
    }

    #[test]
    fn llama3_8b_planned_sizes() {
        let q4 = planned_size(&SynthSpec::llama3_8b(GgmlType::Q4_0)).unwrap();
        assert!((4_300_000_000..4_700_000_000).contains(&q4), "{q4}");
        let q8 = planned_size(&SynthSpec::llama3_8b(GgmlType::Q8_0)).unwrap();
        assert!((8_400_000_000..8_700_000_000).contains(&q8), "{q8}");
        let f16 = planned_size(&SynthSpec::llama3_8b(GgmlType::F16)).unwrap();
        assert!((16_000_000_000..16_200_000_000).contains(&f16), "{f16}");
        // parameter count of Llama 3 8B: 8.03e9
        let spec = SynthSpec::llama3_8b(GgmlType::F32);
        let e = 4096u64;
        let params = 2 * e * 128_256 + 32 * (2 * e * e + 2 * e * 1024 + 3 * e * 14336 + 2 * e) + e;
        assert_eq!(params, 8_030_261_248);
        let f32_size = planned_size(&spec).unwrap();
        assert!(f32_size > params * 4 && f32_size < params * 4 + 10_000_000);
    }

    #[test]
    fn invalid_specs_are_rejected() {
        let tiny = SynthSpec::tiny();
        let cases = [
            SynthSpec { weight_type: GgmlType::Q4K, ..tiny.clone() },
            SynthSpec { n_head: 5, ..tiny.clone() },
            SynthSpec { n_head_kv: 3, ..tiny.clone() },
            SynthSpec { n_layer: 0, ..tiny.clone() },
            SynthSpec { n_ff: 100, weight_type: GgmlType::Q8_0, ..tiny.clone() },
            SynthSpec { n_ctx_train: 0, ..tiny.clone() },
            SynthSpec { n_embd: 0, ..tiny.clone() },
        ];
        let dir = tempfile::tempdir().unwrap();
        for spec in cases {
            let path = dir.path().join("x.gguf");
            let e = write_synthetic_llama(&path, &spec).unwrap_err();
            assert!(matches!(e, GgufError::InvalidSpec(_)), "{spec:?}: {e}");
            assert!(!path.exists());
            assert!(planned_size(&spec).is_err());
        }
        let e = SynthSpec { weight_type: GgmlType::Q4K, ..tiny }.validate().unwrap_err();
        assert!(e.to_string().contains("q4_K"), "{e}");
    }
}
