//! GGUF v3 writer.
//!
//! Metadata and tensor infos are kept in memory; tensor data is either given as bytes
//! or produced by a generator closure at write time, so multi-gigabyte files stream
//! through a small buffer. The file is written to a temporary file in the destination's
//! directory and renamed into place only once complete, so an error never leaves a
//! half-written model behind. The layout matches `gguf_write_out` in
//! `ggml/src/gguf.cpp`: header, metadata, tensor infos, zero padding to the alignment,
//! then each tensor's data followed by zero padding to the alignment.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::reader::{
    align_up, Array, GgufError, Value, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, KEY_ALIGNMENT,
    MAX_ARRAY_DEPTH, MAX_DIMS,
};
use super::types::GgmlType;

/// Longest tensor name llama.cpp accepts (`GGML_MAX_NAME` is 64, including the NUL).
pub const MAX_TENSOR_NAME: usize = 63;

/// Produces a tensor's bytes into the sink; must write exactly the tensor's size.
pub type TensorGenerator<'a> = Box<dyn FnOnce(&mut dyn Write) -> io::Result<()> + 'a>;

enum TensorSource<'a> {
    Bytes(Vec<u8>),
    Generator(TensorGenerator<'a>),
}

struct PendingTensor<'a> {
    name: String,
    shape: Vec<u64>,
    ggml_type: GgmlType,
    n_bytes: u64,
    source: TensorSource<'a>,
}

/// Builds a GGUF file: add metadata and tensors, then [`GgufWriter::write_to_path`].
pub struct GgufWriter<'a> {
    metadata: Vec<(String, Value)>,
    keys: HashSet<String>,
    tensors: Vec<PendingTensor<'a>>,
    names: HashSet<String>,
    alignment: u64,
}

impl Default for GgufWriter<'_> {
    fn default() -> Self {
        Self::new()
    }
}

/// Bytes of a tensor of `shape` and type `ty`, checking the shape the way the reader
/// (and ggml) do: 1 to 4 dimensions, none zero, rows a whole number of blocks, and the
/// element count within `i64`.
pub fn tensor_n_bytes(shape: &[u64], ty: GgmlType) -> Result<u64, String> {
    if shape.is_empty() || shape.len() > MAX_DIMS {
        return Err(format!("has {} dimensions; 1 to {MAX_DIMS} are allowed", shape.len()));
    }
    let mut n: u64 = 1;
    for (d, &ne) in shape.iter().enumerate() {
        if ne == 0 {
            return Err(format!("has size 0 in dimension {d}"));
        }
        n = n
            .checked_mul(ne)
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| "has more than 2^63 elements".to_string())?;
    }
    let blck = ty.block_size();
    if shape[0] % blck != 0 {
        return Err(format!("has rows of {} values, not a multiple of the {ty} block size {blck}", shape[0]));
    }
    (n / blck).checked_mul(ty.type_size()).ok_or_else(|| "is larger than 2^64 bytes".to_string())
}

impl<'a> GgufWriter<'a> {
    /// An empty GGUF v3 file with the default alignment (32).
    pub fn new() -> Self {
        GgufWriter {
            metadata: Vec::new(),
            keys: HashSet::new(),
            tensors: Vec::new(),
            names: HashSet::new(),
            alignment: GGUF_DEFAULT_ALIGNMENT,
        }
    }

    /// Data alignment: 32, or the value given for `general.alignment`.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Adds a metadata entry. Keys must be unique and non-empty; `general.alignment`
    /// must be a `u32` power of two and then sets the alignment of the data.
    pub fn add(&mut self, key: impl Into<String>, value: Value) -> Result<&mut Self, GgufError> {
        let key = key.into();
        let bad = |what: String| GgufError::InvalidMetadata { key: key.clone(), what };
        if key.is_empty() {
            return Err(bad("keys must not be empty".into()));
        }
        if self.keys.contains(&key) {
            return Err(bad("added twice".into()));
        }
        if let Value::Array(a) = &value {
            if array_depth(a) > MAX_ARRAY_DEPTH {
                return Err(bad(format!("arrays may nest at most {MAX_ARRAY_DEPTH} deep")));
            }
        }
        if key == KEY_ALIGNMENT {
            match value {
                Value::U32(a) if a != 0 && a.is_power_of_two() => self.alignment = u64::from(a),
                _ => return Err(bad("must be a u32 power of two".into())),
            }
        }
        self.keys.insert(key.clone());
        self.metadata.push((key, value));
        Ok(self)
    }

    /// Adds a `u8` entry.
    pub fn add_u8(&mut self, key: impl Into<String>, v: u8) -> Result<&mut Self, GgufError> {
        self.add(key, Value::U8(v))
    }
    /// Adds an `i8` entry.
    pub fn add_i8(&mut self, key: impl Into<String>, v: i8) -> Result<&mut Self, GgufError> {
        self.add(key, Value::I8(v))
    }
    /// Adds a `u16` entry.
    pub fn add_u16(&mut self, key: impl Into<String>, v: u16) -> Result<&mut Self, GgufError> {
        self.add(key, Value::U16(v))
    }
    /// Adds an `i16` entry.
    pub fn add_i16(&mut self, key: impl Into<String>, v: i16) -> Result<&mut Self, GgufError> {
        self.add(key, Value::I16(v))
    }
    /// Adds a `u32` entry.
    pub fn add_u32(&mut self, key: impl Into<String>, v: u32) -> Result<&mut Self, GgufError> {
        self.add(key, Value::U32(v))
    }
    /// Adds an `i32` entry.
    pub fn add_i32(&mut self, key: impl Into<String>, v: i32) -> Result<&mut Self, GgufError> {
        self.add(key, Value::I32(v))
    }
    /// Adds a `u64` entry.
    pub fn add_u64(&mut self, key: impl Into<String>, v: u64) -> Result<&mut Self, GgufError> {
        self.add(key, Value::U64(v))
    }
    /// Adds an `i64` entry.
    pub fn add_i64(&mut self, key: impl Into<String>, v: i64) -> Result<&mut Self, GgufError> {
        self.add(key, Value::I64(v))
    }
    /// Adds an `f32` entry.
    pub fn add_f32(&mut self, key: impl Into<String>, v: f32) -> Result<&mut Self, GgufError> {
        self.add(key, Value::F32(v))
    }
    /// Adds an `f64` entry.
    pub fn add_f64(&mut self, key: impl Into<String>, v: f64) -> Result<&mut Self, GgufError> {
        self.add(key, Value::F64(v))
    }
    /// Adds a bool entry.
    pub fn add_bool(&mut self, key: impl Into<String>, v: bool) -> Result<&mut Self, GgufError> {
        self.add(key, Value::Bool(v))
    }
    /// Adds a string entry.
    pub fn add_string(&mut self, key: impl Into<String>, v: impl Into<String>) -> Result<&mut Self, GgufError> {
        self.add(key, Value::String(v.into()))
    }
    /// Adds an array entry of any element type.
    pub fn add_array(&mut self, key: impl Into<String>, a: Array) -> Result<&mut Self, GgufError> {
        self.add(key, Value::Array(a))
    }
    /// Adds an array of strings.
    pub fn add_string_array<I, S>(&mut self, key: impl Into<String>, items: I) -> Result<&mut Self, GgufError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.add_array(key, Array::String(items.into_iter().map(Into::into).collect()))
    }
    /// Adds an array of `f32`.
    pub fn add_f32_array(&mut self, key: impl Into<String>, v: Vec<f32>) -> Result<&mut Self, GgufError> {
        self.add_array(key, Array::F32(v))
    }
    /// Adds an array of `i32`.
    pub fn add_i32_array(&mut self, key: impl Into<String>, v: Vec<i32>) -> Result<&mut Self, GgufError> {
        self.add_array(key, Array::I32(v))
    }
    /// Adds an array of `u32`.
    pub fn add_u32_array(&mut self, key: impl Into<String>, v: Vec<u32>) -> Result<&mut Self, GgufError> {
        self.add_array(key, Array::U32(v))
    }
    /// Adds an array of bools.
    pub fn add_bool_array(&mut self, key: impl Into<String>, v: Vec<bool>) -> Result<&mut Self, GgufError> {
        self.add_array(key, Array::Bool(v))
    }

    fn check_tensor(&self, name: &str, shape: &[u64], ty: GgmlType) -> Result<u64, GgufError> {
        let bad = |what: String| GgufError::InvalidTensor { name: name.to_string(), what };
        if name.is_empty() {
            return Err(bad("tensor names must not be empty".into()));
        }
        if name.len() > MAX_TENSOR_NAME {
            return Err(bad(format!("the name is {} bytes; llama.cpp accepts at most {MAX_TENSOR_NAME}", name.len())));
        }
        if self.names.contains(name) {
            return Err(bad("added twice".into()));
        }
        tensor_n_bytes(shape, ty).map_err(bad)
    }

    /// Adds a tensor whose data is `data` (`shape` in ggml order, ne0 first).
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        shape: &[u64],
        ggml_type: GgmlType,
        data: Vec<u8>,
    ) -> Result<&mut Self, GgufError> {
        let name = name.into();
        let n_bytes = self.check_tensor(&name, shape, ggml_type)?;
        if data.len() as u64 != n_bytes {
            return Err(GgufError::InvalidTensor {
                name,
                what: format!(
                    "{} bytes of data given but a {ggml_type} tensor of shape {shape:?} holds \
                     {n_bytes}",
                    data.len()
                ),
            });
        }
        self.push(name, shape, ggml_type, n_bytes, TensorSource::Bytes(data));
        Ok(self)
    }

    /// Adds a tensor whose data `generator` writes at write time. The generator must
    /// write exactly the tensor's size in bytes ([`tensor_n_bytes`]); writing more fails
    /// the write, and so does writing less.
    pub fn add_tensor_with(
        &mut self,
        name: impl Into<String>,
        shape: &[u64],
        ggml_type: GgmlType,
        generator: impl FnOnce(&mut dyn Write) -> io::Result<()> + 'a,
    ) -> Result<&mut Self, GgufError> {
        let name = name.into();
        let n_bytes = self.check_tensor(&name, shape, ggml_type)?;
        self.push(name, shape, ggml_type, n_bytes, TensorSource::Generator(Box::new(generator)));
        Ok(self)
    }

    fn push(&mut self, name: String, shape: &[u64], ggml_type: GgmlType, n_bytes: u64, source: TensorSource<'a>) {
        self.names.insert(name.clone());
        self.tensors.push(PendingTensor { name, shape: shape.to_vec(), ggml_type, n_bytes, source });
    }

    /// Number of tensors added so far.
    pub fn n_tensors(&self) -> usize {
        self.tensors.len()
    }

    /// Offsets of each tensor within the data section, and the section's total size.
    fn layout(&self) -> (Vec<u64>, u64) {
        let mut offsets = Vec::with_capacity(self.tensors.len());
        let mut at: u64 = 0;
        for t in &self.tensors {
            offsets.push(at);
            at = align_up(at.saturating_add(t.n_bytes), self.alignment).unwrap_or(u64::MAX);
        }
        (offsets, at)
    }

    /// The header, metadata and tensor infos, exactly as they will be written (before
    /// the padding that aligns the data section).
    pub fn encode_metadata(&self) -> Vec<u8> {
        let (offsets, _) = self.layout();
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&GGUF_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&v.value_type().id().to_le_bytes());
            put_value(&mut out, v);
        }
        for (t, off) in self.tensors.iter().zip(offsets) {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for &ne in &t.shape {
                out.extend_from_slice(&ne.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.id().to_le_bytes());
            out.extend_from_slice(&off.to_le_bytes());
        }
        out
    }

    /// The exact size in bytes of the file [`GgufWriter::write_to_path`] would write.
    pub fn planned_size(&self) -> u64 {
        let meta = self.encode_metadata().len() as u64;
        self.planned_size_with_meta(meta)
    }

    fn planned_size_with_meta(&self, meta_len: u64) -> u64 {
        let (_, data) = self.layout();
        align_up(meta_len, self.alignment).unwrap_or(u64::MAX).saturating_add(data)
    }

    /// Writes the file to `path` atomically (temp file in the same directory, then
    /// rename) and returns its size in bytes. On any error the temp file is removed and
    /// an existing file at `path` is left untouched.
    pub fn write_to_path(self, path: impl AsRef<Path>) -> Result<u64, GgufError> {
        let path = path.as_ref();
        let io_err = |op: &'static str, source: io::Error| GgufError::Io { path: path.to_path_buf(), op, source };
        let file_name = path.file_name().ok_or_else(|| {
            io_err("cannot write", io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))
        })?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp_path = dir.join(temp_name(file_name));
        let file = OpenOptions::new().write(true).create_new(true).open(&tmp_path).map_err(|e| GgufError::Io {
            path: tmp_path.clone(),
            op: "cannot create temporary file",
            source: e,
        })?;
        let mut guard = TempGuard(Some(tmp_path.clone()));

        let mut out = BufWriter::with_capacity(1 << 20, file);
        let written = match self.write_body(&mut out) {
            Ok(n) => n,
            Err(WriteFailure::Io(e)) => return Err(io_err("write failed", e)),
            Err(WriteFailure::Tensor { name, what }) => return Err(GgufError::InvalidTensor { name, what }),
        };
        let file: File = out.into_inner().map_err(|e| io_err("write failed", e.into_error()))?;
        file.sync_all().map_err(|e| io_err("cannot flush to disk", e))?;
        drop(file);
        fs::rename(&tmp_path, path).map_err(|e| io_err("cannot move the finished file into place", e))?;
        guard.0 = None;
        Ok(written)
    }

    /// Writes the file to any sink (no atomicity) and returns the bytes written.
    pub fn write_to(self, out: &mut dyn Write) -> Result<u64, GgufError> {
        self.write_body(out).map_err(|e| match e {
            WriteFailure::Io(source) => GgufError::Io { path: PathBuf::from("<stream>"), op: "write failed", source },
            WriteFailure::Tensor { name, what } => GgufError::InvalidTensor { name, what },
        })
    }

    fn write_body(self, out: &mut dyn Write) -> Result<u64, WriteFailure> {
        let meta = self.encode_metadata();
        let alignment = self.alignment;
        out.write_all(&meta)?;
        let mut written = meta.len() as u64;
        written = pad(out, written, alignment)?;
        for t in self.tensors {
            match t.source {
                TensorSource::Bytes(data) => out.write_all(&data)?,
                TensorSource::Generator(generate) => {
                    let mut sink = Limited { inner: &mut *out, remaining: t.n_bytes, overflowed: false };
                    let result = generate(&mut sink);
                    let (remaining, overflowed) = (sink.remaining, sink.overflowed);
                    if overflowed {
                        return Err(WriteFailure::Tensor {
                            name: t.name,
                            what: format!("the generator wrote more than the tensor's {} bytes", t.n_bytes),
                        });
                    }
                    result?;
                    if remaining != 0 {
                        return Err(WriteFailure::Tensor {
                            name: t.name,
                            what: format!(
                                "the generator wrote {} bytes but the tensor holds {}",
                                t.n_bytes - remaining,
                                t.n_bytes
                            ),
                        });
                    }
                }
            }
            written += t.n_bytes;
            written = pad(out, written, alignment)?;
        }
        out.flush()?;
        Ok(written)
    }
}

enum WriteFailure {
    Io(io::Error),
    Tensor { name: String, what: String },
}

impl From<io::Error> for WriteFailure {
    fn from(e: io::Error) -> Self {
        WriteFailure::Io(e)
    }
}

/// Passes bytes through while counting them down; refuses to go past the tensor size.
struct Limited<'w> {
    inner: &'w mut dyn Write,
    remaining: u64,
    overflowed: bool,
}

impl Write for Limited<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() as u64 > self.remaining {
            self.overflowed = true;
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "tensor generator wrote past the end of the tensor",
            ));
        }
        let n = self.inner.write(buf)?;
        self.remaining -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Removes the temporary file unless the write completed.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

fn temp_name(file_name: &std::ffi::OsStr) -> std::ffi::OsString {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let mut name = std::ffi::OsString::from(".");
    name.push(file_name);
    name.push(format!(".{}.{}.{}.tmp", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed), nanos));
    name
}

fn pad(out: &mut dyn Write, written: u64, alignment: u64) -> io::Result<u64> {
    const ZEROS: [u8; 256] = [0; 256];
    let target = align_up(written, alignment).unwrap_or(written);
    let mut n = target - written;
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        out.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(target)
}

fn array_depth(a: &Array) -> usize {
    match a {
        Array::Array(items) => 1 + items.iter().map(array_depth).max().unwrap_or(0),
        _ => 1,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(b) => out.push(u8::from(*b)),
        Value::String(s) => put_str(out, s),
        Value::Array(a) => put_array(out, a),
    }
}

fn put_array(out: &mut Vec<u8>, a: &Array) {
    out.extend_from_slice(&a.elem_type().id().to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        Array::U8(v) => out.extend_from_slice(v),
        Array::I8(v) => each!(v),
        Array::U16(v) => each!(v),
        Array::I16(v) => each!(v),
        Array::U32(v) => each!(v),
        Array::I32(v) => each!(v),
        Array::F32(v) => each!(v),
        Array::U64(v) => each!(v),
        Array::I64(v) => each!(v),
        Array::F64(v) => each!(v),
        Array::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        Array::String(v) => {
            for s in v {
                put_str(out, s);
            }
        }
        Array::Array(v) => {
            for inner in v {
                put_array(out, inner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::reader::GgufFile;
    use super::*;

    fn every_value() -> Vec<(&'static str, Value)> {
        vec![
            ("v.u8", Value::U8(200)),
            ("v.i8", Value::I8(-100)),
            ("v.u16", Value::U16(60000)),
            ("v.i16", Value::I16(-30000)),
            ("v.u32", Value::U32(4_000_000_000)),
            ("v.i32", Value::I32(-2_000_000_000)),
            ("v.f32", Value::F32(-1.25e-3)),
            ("v.bool_t", Value::Bool(true)),
            ("v.bool_f", Value::Bool(false)),
            ("v.str", Value::String("héllo ▁world".into())),
            ("v.str_empty", Value::String(String::new())),
            ("v.u64", Value::U64(u64::MAX)),
            ("v.i64", Value::I64(i64::MIN)),
            ("v.f64", Value::F64(std::f64::consts::PI)),
            ("a.u8", Value::Array(Array::U8(vec![0, 1, 255]))),
            ("a.i8", Value::Array(Array::I8(vec![-128, 0, 127]))),
            ("a.u16", Value::Array(Array::U16(vec![1, 65535]))),
            ("a.i16", Value::Array(Array::I16(vec![-1, 1]))),
            ("a.u32", Value::Array(Array::U32(vec![7; 5]))),
            ("a.i32", Value::Array(Array::I32(vec![-7, 0, 7]))),
            ("a.f32", Value::Array(Array::F32(vec![0.5, -0.0, f32::INFINITY]))),
            ("a.bool", Value::Array(Array::Bool(vec![true, false, true]))),
            ("a.str", Value::Array(Array::String(vec!["<s>".into(), "".into(), "▁the".into()]))),
            ("a.u64", Value::Array(Array::U64(vec![u64::MAX, 0]))),
            ("a.i64", Value::Array(Array::I64(vec![i64::MIN, i64::MAX]))),
            ("a.f64", Value::Array(Array::F64(vec![1e300, -1e-300]))),
            ("a.empty", Value::Array(Array::F32(vec![]))),
            (
                "a.nested",
                Value::Array(Array::Array(vec![
                    Array::I32(vec![1, 2]),
                    Array::String(vec!["x".into()]),
                    Array::Array(vec![Array::Bool(vec![true])]),
                ])),
            ),
        ]
    }

    #[test]
    fn round_trip_every_value_type_and_tensor_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rt.gguf");
        let mut w = GgufWriter::new();
        for (k, v) in every_value() {
            w.add(k, v).unwrap();
        }
        w.add_string_array("a.str2", ["a", "b"]).unwrap();
        w.add_f32_array("a.f32b", vec![1.0, 2.0]).unwrap();
        w.add_i32_array("a.i32b", vec![3, 4]).unwrap();
        w.add_bool("flag", true).unwrap();

        let f32_data: Vec<u8> = (0..12u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let q8_data: Vec<u8> = (0..(34 * 4)).map(|i| (i % 251) as u8).collect();
        w.add_tensor("f32.tensor", &[3, 4], GgmlType::F32, f32_data.clone()).unwrap();
        w.add_tensor("q8.tensor", &[64, 2], GgmlType::Q8_0, q8_data.clone()).unwrap();
        w.add_tensor_with("gen.tensor", &[5], GgmlType::F16, |out| out.write_all(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]))
            .unwrap();
        let planned = w.planned_size();
        let written = w.write_to_path(&path).unwrap();
        assert_eq!(planned, written);

        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.file_size(), written);
        assert_eq!(f.version(), 3);
        for (k, v) in every_value() {
            assert_eq!(f.get(k), Some(&v), "{k}");
        }
        assert_eq!(f.get_array("a.str2").unwrap().as_strings().unwrap(), ["a".to_string(), "b".to_string()]);
        assert_eq!(f.get_bool("flag"), Some(true));
        assert_eq!(f.get_arr_len("a.f32b"), Some(2));
        assert_eq!(f.tensor_data("f32.tensor").unwrap(), &f32_data[..]);
        assert_eq!(f.tensor_data("q8.tensor").unwrap(), &q8_data[..]);
        assert_eq!(f.tensor_data("gen.tensor").unwrap(), &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        let t = f.tensor("q8.tensor").unwrap();
        assert_eq!((t.shape.as_slice(), t.ggml_type), (&[64u64, 2][..], GgmlType::Q8_0));
        for t in f.tensors() {
            assert_eq!(t.file_offset % 32, 0, "{}", t.name);
        }
        let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["f32.tensor", "q8.tensor", "gen.tensor"]);
        // nothing but the final file is left in the directory
        let entries: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(entries.len(), 1);
    }

    #[test]
    fn custom_alignment_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a64.gguf");
        let mut w = GgufWriter::new();
        w.add_u32("general.alignment", 64).unwrap();
        w.add_tensor("a", &[3], GgmlType::F32, vec![0; 12]).unwrap();
        w.add_tensor("b", &[1], GgmlType::F32, vec![1; 4]).unwrap();
        assert_eq!(w.alignment(), 64);
        w.write_to_path(&path).unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.alignment(), 64);
        assert_eq!(f.tensor("b").unwrap().offset, 64);
        assert_eq!(f.tensor_data("b").unwrap(), &[1, 1, 1, 1]);
    }

    #[test]
    fn metadata_only_file_round_trips() {
        let mut buf = Vec::new();
        let mut w = GgufWriter::new();
        w.add_string("general.architecture", "llama").unwrap();
        let planned = w.planned_size();
        let n = w.write_to(&mut buf).unwrap();
        assert_eq!(n, planned);
        assert_eq!(buf.len() as u64, n);
        let f = GgufFile::from_bytes("mem", buf).unwrap();
        assert_eq!(f.architecture(), Some("llama"));
        assert!(f.tensors().is_empty());
    }

    #[test]
    fn rejects_bad_input() {
        let mut w = GgufWriter::new();
        w.add_u32("k", 1).unwrap();
        assert!(matches!(w.add_u32("k", 2), Err(GgufError::InvalidMetadata { .. })));
        assert!(w.add_u32("", 2).is_err());
        assert!(w.add_u64("general.alignment", 32).is_err());
        assert!(w.add_u32("general.alignment", 48).is_err());
        let mut deep = Array::U8(vec![]);
        for _ in 0..MAX_ARRAY_DEPTH {
            deep = Array::Array(vec![deep]);
        }
        assert!(w.add_array("deep", deep).is_err());

        w.add_tensor("t", &[4], GgmlType::F32, vec![0; 16]).unwrap();
        let dup = w.add_tensor("t", &[4], GgmlType::F32, vec![0; 16]);
        assert!(matches!(dup, Err(GgufError::InvalidTensor { .. })));
        let long_name = "x".repeat(64);
        let cases: Vec<(&str, Vec<u64>, GgmlType, usize)> = vec![
            ("wrong_len", vec![4], GgmlType::F32, 15),
            ("zero_dim", vec![4, 0], GgmlType::F32, 0),
            ("five_dims", vec![1, 1, 1, 1, 1], GgmlType::F32, 4),
            ("no_dims", vec![], GgmlType::F32, 4),
            ("not_block", vec![31], GgmlType::Q8_0, 34),
            ("", vec![1], GgmlType::F32, 4),
            (&long_name, vec![1], GgmlType::F32, 4),
        ];
        for (name, shape, ty, len) in cases {
            let r = w.add_tensor(name, &shape, ty, vec![0; len]);
            assert!(matches!(r, Err(GgufError::InvalidTensor { .. })), "{name} {shape:?}");
        }
        assert_eq!(w.n_tensors(), 1);
    }

    #[test]
    fn generator_size_mismatch_fails_and_leaves_nothing() {
        for (len, needle) in [(7usize, "wrote 7 bytes"), (9, "more than")] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("bad.gguf");
            std::fs::write(&path, b"previous contents").unwrap();
            let mut w = GgufWriter::new();
            w.add_tensor_with("g", &[2], GgmlType::F32, move |out| out.write_all(&vec![0u8; len])).unwrap();
            let e = w.write_to_path(&path).unwrap_err();
            assert!(matches!(e, GgufError::InvalidTensor { .. }), "{e}");
            assert!(e.to_string().contains(needle), "{e}");
            // the old file is intact and no temp file is left behind
            assert_eq!(std::fs::read(&path).unwrap(), b"previous contents");
            assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        }
    }

    #[test]
    fn generator_error_propagates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("err.gguf");
        let mut w = GgufWriter::new();
        w.add_tensor_with("g", &[2], GgmlType::F32, |_| Err(io::Error::other("source went away"))).unwrap();
        let e = w.write_to_path(&path).unwrap_err();
        assert!(matches!(e, GgufError::Io { .. }), "{e}");
        assert!(e.to_string().contains("source went away"), "{e}");
        assert!(!path.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn unwritable_destination_is_an_io_error() {
        let e = GgufWriter::new().write_to_path("/nonexistent-dir/x.gguf").unwrap_err();
        assert!(matches!(e, GgufError::Io { .. }), "{e}");
        assert!(e.to_string().contains("nonexistent-dir"), "{e}");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn arb_scalar() -> impl Strategy<Value = Value> {
            prop_oneof![
                any::<u8>().prop_map(Value::U8),
                any::<i8>().prop_map(Value::I8),
                any::<u16>().prop_map(Value::U16),
                any::<i16>().prop_map(Value::I16),
                any::<u32>().prop_map(Value::U32),
                any::<i32>().prop_map(Value::I32),
                any::<u64>().prop_map(Value::U64),
                any::<i64>().prop_map(Value::I64),
                any::<bool>().prop_map(Value::Bool),
                (-1e30f32..1e30).prop_map(Value::F32),
                (-1e300f64..1e300).prop_map(Value::F64),
                ".{0,20}".prop_map(Value::String),
                proptest::collection::vec(any::<i16>(), 0..10).prop_map(|v| Value::Array(Array::I16(v))),
                proptest::collection::vec(".{0,6}", 0..10).prop_map(|v| Value::Array(Array::String(v))),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            #[test]
            fn metadata_round_trips(values in proptest::collection::vec(arb_scalar(), 0..12),
                                    n_rows in 1u64..4) {
                let mut w = GgufWriter::new();
                for (i, v) in values.iter().enumerate() {
                    w.add(format!("key.{i}"), v.clone()).unwrap();
                }
                let data: Vec<u8> = (0..n_rows * 34).map(|i| i as u8).collect();
                w.add_tensor("t", &[32, n_rows], GgmlType::Q8_0, data.clone()).unwrap();
                let mut buf = Vec::new();
                let planned = w.planned_size();
                prop_assert_eq!(w.write_to(&mut buf).unwrap(), planned);
                let f = GgufFile::from_bytes("mem", buf).unwrap();
                for (i, v) in values.iter().enumerate() {
                    prop_assert_eq!(f.get(&format!("key.{i}")), Some(v));
                }
                prop_assert_eq!(f.tensor_data("t").unwrap(), &data[..]);
            }
        }
    }
}
