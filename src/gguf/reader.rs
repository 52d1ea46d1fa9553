//! GGUF reader over a read-only memory map.
//!
//! The layout (see `vendor/llama.cpp/ggml/include/gguf.h`) is: magic `"GGUF"`, `u32`
//! version, `i64` tensor count, `i64` metadata count, the metadata key/value pairs, the
//! tensor infos (name, `u32` n_dims, `i64` dims, `i32` ggml type, `u64` offset), zero
//! padding up to `general.alignment` (default 32), then the tensor data. Every integer
//! is little-endian. Everything read from the file is validated before it is used, so
//! a damaged or hostile file yields a [`GgufError`], never a panic or a huge allocation.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::types::GgmlType;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// The GGUF version the writer produces (and the newest the reader accepts).
pub const GGUF_VERSION: u32 = 3;
/// Data alignment used when `general.alignment` is absent (`GGUF_DEFAULT_ALIGNMENT`).
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that overrides the data alignment.
pub const KEY_ALIGNMENT: &str = "general.alignment";
/// Most dimensions a tensor may have (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of arrays inside arrays the reader accepts. ggml itself rejects any
/// nested array; the GGUF spec allows them, so a little nesting is read, but the depth
/// is bounded so that a crafted file cannot exhaust the stack.
pub const MAX_ARRAY_DEPTH: usize = 8;

/// Above this, a count in the header is treated as corruption rather than truncation:
/// no real model has four billion metadata entries or tensors.
const ABSURD_COUNT: u64 = u32::MAX as u64;

/// Everything that can go wrong reading, checking or writing GGUF data. Each message
/// names the file (where there is one), says what is wrong and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The operating system refused an operation on the file.
    #[error("{}: {op}: {source}", .path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// The file does not start with the GGUF magic.
    #[error(
        "{}: not a GGUF file: it starts with {found} instead of \"GGUF\"; pass a .gguf model \
         (Hugging Face safetensors or PyTorch checkpoints must first be converted with \
         llama.cpp's convert_hf_to_gguf.py)",
        .path.display()
    )]
    NotGguf { path: PathBuf, found: String },

    /// The GGUF version is one this reader cannot parse.
    #[error("{}: unsupported GGUF version {version}: {hint}", .path.display())]
    UnsupportedVersion { path: PathBuf, version: u32, hint: String },

    /// The file ends before the data its header promises.
    #[error(
        "{}: file is truncated: {what}; the download or copy was probably interrupted, \
         re-download the model",
        .path.display()
    )]
    Truncated { path: PathBuf, what: String },

    /// The file is structurally invalid.
    #[error(
        "{}: corrupt GGUF file: {what}; the file is damaged or was written by a broken \
         converter, re-download or re-convert the model",
        .path.display()
    )]
    Corrupt { path: PathBuf, what: String },

    /// A metadata value has a type id outside `enum gguf_type`.
    #[error(
        "{}: corrupt GGUF file: {what} has unknown value type {type_id} (valid GGUF value \
         types are 0..=12); re-download or re-convert the model",
        .path.display()
    )]
    UnknownValueType { path: PathBuf, what: String, type_id: u32 },

    /// A tensor has a ggml type id this build does not know.
    #[error(
        "{}: tensor '{tensor}' has unknown ggml type id {type_id}: it is a type removed \
         from ggml (ids 4, 5, 31-33, 36-38) or one newer than this build; re-quantize the \
         model to a supported type or update logquant",
        .path.display()
    )]
    UnknownTensorType { path: PathBuf, tensor: String, type_id: u32 },

    /// A metadata key the caller needs is absent.
    #[error(
        "{}: metadata key '{key}' is missing; the file is not a complete llama.cpp model \
         (re-convert it with a current convert_hf_to_gguf.py)",
        .path.display()
    )]
    MissingKey { path: PathBuf, key: String },

    /// A metadata key has a type the caller cannot use.
    #[error(
        "{}: metadata key '{key}' has type {found} but {expected} was expected; re-convert \
         the model with a current convert_hf_to_gguf.py",
        .path.display()
    )]
    WrongType { path: PathBuf, key: String, expected: &'static str, found: String },

    /// A metadata value is present and well-typed but makes no sense.
    #[error(
        "{}: metadata key '{key}' is invalid: {what}; re-convert the model with a current \
         convert_hf_to_gguf.py",
        .path.display()
    )]
    InvalidValue { path: PathBuf, key: String, what: String },

    /// A row length is not a whole number of blocks of a block-quantized type.
    #[error(
        "a row of {n} {ggml_type} values is not a whole number of {block_size}-value blocks \
         (or is too large); pick a type whose block size divides the row"
    )]
    RowSize { ggml_type: GgmlType, n: u64, block_size: u64 },

    /// A tensor handed to the writer is inconsistent.
    #[error("tensor '{name}': {what}")]
    InvalidTensor { name: String, what: String },

    /// A metadata entry handed to the writer is invalid.
    #[error("metadata key '{key}': {what}")]
    InvalidMetadata { key: String, what: String },

    /// A synthetic-model spec cannot be turned into a loadable model.
    #[error("invalid synthetic model spec: {0}")]
    InvalidSpec(String),

    /// KV-cache sizing parameters that llama.cpp would reject.
    #[error("invalid KV cache parameters: {0}")]
    InvalidKvParams(String),
}

/// The type of a metadata value (`enum gguf_type`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    /// The type with GGUF id `id` (0..=12).
    pub fn from_id(id: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The GGUF id.
    pub fn id(self) -> u32 {
        use ValueType::*;
        match self {
            U8 => 0,
            I8 => 1,
            U16 => 2,
            I16 => 3,
            U32 => 4,
            I32 => 5,
            F32 => 6,
            Bool => 7,
            String => 8,
            Array => 9,
            U64 => 10,
            I64 => 11,
            F64 => 12,
        }
    }

    /// The name `gguf_type_name` gives it (`"u32"`, `"str"`, `"arr"`, ...).
    pub fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "str",
            Array => "arr",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }

    /// Fewest bytes one value of this type occupies in a file: its fixed size, the
    /// length prefix of a string, or the type and length prefix of an array.
    fn min_encoded_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    /// GGUF strings are UTF-8; invalid sequences are replaced by U+FFFD when read.
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array: every element has the same type. Arrays of arrays hold inner
/// arrays that may each have their own element type.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<Array>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl Value {
    /// The value's GGUF type.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// A readable name of the type, with the element type for arrays (`"arr[str]"`).
    pub fn type_description(&self) -> String {
        match self {
            Value::Array(a) => format!("arr[{}]", a.elem_type()),
            v => v.value_type().name().to_string(),
        }
    }

    /// The value as a signed 128-bit integer, for any integer type.
    pub fn as_int(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// Any integer value that fits in a `u32`.
    pub fn as_u32(&self) -> Option<u32> {
        self.as_int().and_then(|v| u32::try_from(v).ok())
    }

    /// Any integer value that fits in a `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_int().and_then(|v| u64::try_from(v).ok())
    }

    /// Any integer value that fits in an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_int().and_then(|v| i64::try_from(v).ok())
    }

    /// A float (f32 or f64) or integer value as `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_int().map(|v| v as f64),
        }
    }

    /// A float or integer value as `f32`.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            _ => self.as_f64().map(|v| v as f32),
        }
    }

    /// A bool value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// A string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// An array value.
    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl Array {
    /// The element type.
    pub fn elem_type(&self) -> ValueType {
        match self {
            Array::U8(_) => ValueType::U8,
            Array::I8(_) => ValueType::I8,
            Array::U16(_) => ValueType::U16,
            Array::I16(_) => ValueType::I16,
            Array::U32(_) => ValueType::U32,
            Array::I32(_) => ValueType::I32,
            Array::F32(_) => ValueType::F32,
            Array::Bool(_) => ValueType::Bool,
            Array::String(_) => ValueType::String,
            Array::Array(_) => ValueType::Array,
            Array::U64(_) => ValueType::U64,
            Array::I64(_) => ValueType::I64,
            Array::F64(_) => ValueType::F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` of an integer array, widened.
    pub fn int_at(&self, i: usize) -> Option<i128> {
        Some(match self {
            Array::U8(v) => (*v.get(i)?).into(),
            Array::I8(v) => (*v.get(i)?).into(),
            Array::U16(v) => (*v.get(i)?).into(),
            Array::I16(v) => (*v.get(i)?).into(),
            Array::U32(v) => (*v.get(i)?).into(),
            Array::I32(v) => (*v.get(i)?).into(),
            Array::U64(v) => (*v.get(i)?).into(),
            Array::I64(v) => (*v.get(i)?).into(),
            _ => return None,
        })
    }

    /// All elements of an integer array as `u32`, or `None` if the array is not of an
    /// integer type or an element does not fit.
    pub fn to_u32_vec(&self) -> Option<Vec<u32>> {
        (0..self.len()).map(|i| self.int_at(i).and_then(|v| u32::try_from(v).ok())).collect()
    }

    /// The elements of a string array.
    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            Array::String(v) => Some(v),
            _ => None,
        }
    }
}

/// Where a tensor lives in the file and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `"blk.0.attn_q.weight"`.
    pub name: String,
    /// Dimensions in ggml order: `shape[0]` (ne0) is the contiguous one, i.e. the input
    /// features of a weight matrix.
    pub shape: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section, as stored in the file.
    pub offset: u64,
    /// Offset of the data from the start of the file.
    pub file_offset: u64,
    /// Number of elements (product of the dimensions).
    pub n_elements: u64,
    /// Bytes of data.
    pub n_bytes: u64,
}

enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed, validated GGUF file. Tensor data is read lazily from the memory map.
pub struct GgufFile {
    path: PathBuf,
    storage: Storage,
    version: u32,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("file_size", &self.file_size())
            .field("n_kv", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`, validating the header, every metadata entry and
    /// every tensor info, and checking that all tensor data lies inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io_err = |op, source| GgufError::Io { path: path.clone(), op, source };
        let file = File::open(&path).map_err(|e| io_err("cannot open file", e))?;
        let meta = file.metadata().map_err(|e| io_err("cannot read file metadata", e))?;
        if !meta.is_file() {
            return Err(io_err(
                "not a regular file",
                io::Error::new(io::ErrorKind::InvalidInput, "expected a .gguf file"),
            ));
        }
        let storage = if meta.len() == 0 {
            // Mapping zero bytes is an error on some systems; nothing to map anyway.
            Storage::Owned(Vec::new())
        } else {
            // SAFETY (the only `unsafe` in this module tree): `Mmap::map` is unsafe because
            // the mapping aliases the file: if another process modifies or truncates the file
            // while it is mapped, the bytes behind our `&[u8]` change (or reads fault). The
            // file is opened read-only and nothing in this program writes to it (the writer
            // replaces files by renaming a new one into place, which leaves existing
            // mappings intact); model files are not edited in place in normal use. All
            // offsets are validated against the length seen here before any slice is taken.
            // That is the usual, accepted contract for memory-mapping model files (llama.cpp
            // does the same).
            #[allow(unsafe_code)]
            let map = unsafe { Mmap::map(&file) };
            let map = map.map_err(|e| io_err("cannot memory-map file", e))?;
            Storage::Mapped(map)
        };
        Self::parse(path, storage)
    }

    /// Parses a GGUF image held in memory; `name` is used in error messages only.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        Self::parse(name.into(), Storage::Owned(bytes))
    }

    fn parse(path: PathBuf, storage: Storage) -> Result<GgufFile, GgufError> {
        let parsed = Parser::new(&path, storage.bytes()).parse()?;
        Ok(GgufFile {
            path,
            storage,
            version: parsed.version,
            metadata: parsed.metadata,
            key_index: parsed.key_index,
            tensors: parsed.tensors,
            tensor_index: parsed.tensor_index,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Size of the file in bytes.
    pub fn file_size(&self) -> u64 {
        self.storage.bytes().len() as u64
    }

    /// Data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// File offset where the tensor data section starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// All metadata entries in file order.
    pub fn metadata(&self) -> impl ExactSizeIterator<Item = (&str, &Value)> + '_ {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of metadata entries.
    pub fn n_kv(&self) -> usize {
        self.metadata.len()
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).and_then(|&i| self.metadata.get(i)).map(|(_, v)| v)
    }

    /// `key` as a `u32`, from any integer type whose value fits.
    pub fn get_u32(&self, key: &str) -> Option<u32> {
        self.get(key)?.as_u32()
    }

    /// `key` as a `u64`, from any integer type whose value fits.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    /// `key` as an `i64`, from any integer type whose value fits.
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        self.get(key)?.as_i64()
    }

    /// `key` as an `f32`, from an f32, f64 or integer value.
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key)?.as_f32()
    }

    /// `key` as a bool.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }

    /// `key` as a string.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    /// `key` as an array.
    pub fn get_array(&self, key: &str) -> Option<&Array> {
        self.get(key)?.as_array()
    }

    /// Number of elements of the array `key`.
    pub fn get_arr_len(&self, key: &str) -> Option<usize> {
        Some(self.get_array(key)?.len())
    }

    /// `key` as a `u32`: `Ok(None)` when absent, an error naming the key when present
    /// with a non-integer type or a value that does not fit.
    pub fn try_get_u32(&self, key: &str) -> Result<Option<u32>, GgufError> {
        self.try_get(key, "an unsigned 32-bit integer", Value::as_u32)
    }

    /// `key` as a string: `Ok(None)` when absent, an error when it is not a string.
    pub fn try_get_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.try_get(key, "a string", Value::as_str)
    }

    /// `key` as a `u32`, which must be present.
    pub fn require_u32(&self, key: &str) -> Result<u32, GgufError> {
        self.try_get_u32(key)?.ok_or_else(|| self.missing(key))
    }

    /// `key` as a string, which must be present.
    pub fn require_str(&self, key: &str) -> Result<&str, GgufError> {
        self.try_get_str(key)?.ok_or_else(|| self.missing(key))
    }

    fn try_get<'s, T>(
        &'s self,
        key: &str,
        expected: &'static str,
        conv: impl Fn(&'s Value) -> Option<T>,
    ) -> Result<Option<T>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => conv(v).map(Some).ok_or_else(|| GgufError::WrongType {
                path: self.path.clone(),
                key: key.to_string(),
                expected,
                found: describe_value(v),
            }),
        }
    }

    fn missing(&self, key: &str) -> GgufError {
        GgufError::MissingKey { path: self.path.clone(), key: key.to_string() }
    }

    /// `general.architecture`, if present and a string.
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    /// All tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of the tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// The raw bytes of the tensor `name` (validated to lie inside the file at open).
    pub fn tensor_data(&self, name: &str) -> Option<&[u8]> {
        let t = self.tensor(name)?;
        let start = usize::try_from(t.file_offset).ok()?;
        let len = usize::try_from(t.n_bytes).ok()?;
        self.storage.bytes().get(start..start.checked_add(len)?)
    }

    /// The whole file image.
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }
}

/// A short description of a value for error messages: its type, and the value itself
/// when it is a scalar.
fn describe_value(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("arr[{}] of {} elements", a.elem_type(), a.len()),
        Value::String(s) => {
            let short: String = s.chars().take(40).collect();
            format!("str (\"{short}\")")
        }
        Value::F32(x) => format!("f32 ({x})"),
        Value::F64(x) => format!("f64 ({x})"),
        Value::Bool(b) => format!("bool ({b})"),
        other => match other.as_int() {
            Some(i) => format!("{} ({i})", other.value_type()),
            None => other.value_type().to_string(),
        },
    }
}

/// Where a read ran out of bytes.
#[derive(Copy, Clone, Debug)]
struct Short {
    at: u64,
    need: u64,
}

struct Parsed {
    version: u32,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

struct Parser<'a> {
    path: &'a Path,
    data: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(path: &'a Path, data: &'a [u8]) -> Self {
        Parser { path, data, pos: 0 }
    }

    fn len(&self) -> u64 {
        self.data.len() as u64
    }

    fn remaining(&self) -> u64 {
        (self.data.len() - self.pos.min(self.data.len())) as u64
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], Short> {
        let short = Short { at: self.pos as u64, need: n };
        if n > self.remaining() {
            return Err(short);
        }
        let n = usize::try_from(n).map_err(|_| short)?;
        let end = self.pos.checked_add(n).ok_or(short)?;
        let s = self.data.get(self.pos..end).ok_or(short)?;
        self.pos = end;
        Ok(s)
    }

    fn array_of<const N: usize>(&mut self) -> Result<[u8; N], Short> {
        let s = self.take(N as u64)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, Short> {
        Ok(u32::from_le_bytes(self.array_of()?))
    }

    fn u64(&mut self) -> Result<u64, Short> {
        Ok(u64::from_le_bytes(self.array_of()?))
    }

    fn truncated(&self, short: Short, what: impl fmt::Display) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_path_buf(),
            what: format!(
                "{what} needs bytes {}..{} but the file has only {} bytes",
                short.at,
                short.at.saturating_add(short.need),
                self.len()
            ),
        }
    }

    fn corrupt(&self, what: impl Into<String>) -> GgufError {
        GgufError::Corrupt { path: self.path.to_path_buf(), what: what.into() }
    }

    /// Checks that `count` items of at least `min_size` bytes each can fit in what is
    /// left of the file, before anything is allocated for them.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<usize, GgufError> {
        let need = count.checked_mul(min_size);
        let fits = matches!(need, Some(n) if n <= self.remaining());
        if fits {
            if let Ok(n) = usize::try_from(count) {
                return Ok(n);
            }
        }
        let need = need.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string());
        let msg = format!(
            "{what}: the file claims {count} of them, which need at least {need} bytes, but only \
             {} bytes remain after byte {}",
            self.remaining(),
            self.pos
        );
        if count > ABSURD_COUNT {
            Err(self.corrupt(msg))
        } else {
            Err(GgufError::Truncated { path: self.path.to_path_buf(), what: msg })
        }
    }

    /// A length-prefixed string.
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64().map_err(|s| self.truncated(s, format!("the length of {}", what())))?;
        if len > self.remaining() {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: format!(
                    "{} is a string of {len} bytes starting at byte {}, past the end of the \
                     file ({} bytes)",
                    what(),
                    self.pos,
                    self.len()
                ),
            });
        }
        let bytes = self.take(len).map_err(|s| self.truncated(s, what()))?;
        Ok(match String::from_utf8_lossy(bytes) {
            Cow::Borrowed(s) => s.to_string(),
            Cow::Owned(s) => s,
        })
    }

    fn parse(mut self) -> Result<Parsed, GgufError> {
        // magic
        let head = self.data.get(..4).unwrap_or(self.data);
        if head != GGUF_MAGIC {
            if GGUF_MAGIC.starts_with(head) {
                return Err(GgufError::Truncated {
                    path: self.path.to_path_buf(),
                    what: format!("the file has only {} bytes; a GGUF header needs at least 24", self.len()),
                });
            }
            return Err(GgufError::NotGguf { path: self.path.to_path_buf(), found: describe_magic(head) });
        }
        self.pos = 4;

        // version
        let version = self.u32().map_err(|s| self.truncated(s, "the GGUF version"))?;
        check_version(self.path, version)?;

        // counts
        let n_tensors = self.u64().map_err(|s| self.truncated(s, "the tensor count"))?;
        let n_kv = self.u64().map_err(|s| self.truncated(s, "the metadata entry count"))?;
        if n_tensors > i64::MAX as u64 {
            return Err(self.corrupt(format!("the tensor count {n_tensors} is negative")));
        }
        if n_kv > i64::MAX as u64 {
            return Err(self.corrupt(format!("the metadata entry count {n_kv} is negative")));
        }
        // A metadata entry is at least a key length (8), a type (4) and one byte of value;
        // a tensor info at least a name length (8), n_dims (4), a type (4) and an offset (8).
        let n_kv_usize = self.check_count(n_kv, 13, "metadata entries")?;
        let n_tensors_usize = self.check_count(n_tensors, 24, "tensor infos")?;

        // metadata
        let mut metadata: Vec<(String, Value)> = Vec::with_capacity(n_kv_usize);
        let mut key_index = HashMap::with_capacity(n_kv_usize);
        for i in 0..n_kv_usize {
            let key = self.string(&|| format!("the key of metadata entry {i}"))?;
            if key.is_empty() {
                return Err(self.corrupt(format!("metadata entry {i} has an empty key")));
            }
            if key_index.contains_key(&key) {
                return Err(self.corrupt(format!("metadata key '{key}' appears twice")));
            }
            let type_id = self.u32().map_err(|s| self.truncated(s, format!("the type of metadata key '{key}'")))?;
            let ty = ValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
                path: self.path.to_path_buf(),
                what: format!("metadata key '{key}'"),
                type_id,
            })?;
            let value = self.value(ty, &key, 0)?;
            key_index.insert(key.clone(), metadata.len());
            metadata.push((key, value));
        }

        // alignment
        let alignment = match key_index.get(KEY_ALIGNMENT).and_then(|&i| metadata.get(i)) {
            None => GGUF_DEFAULT_ALIGNMENT,
            Some((_, Value::U32(a))) if *a != 0 && a.is_power_of_two() => u64::from(*a),
            Some((_, v)) => {
                return Err(
                    self.corrupt(format!("'{KEY_ALIGNMENT}' must be a u32 power of two but is {}", describe_value(v)))
                )
            }
        };

        // tensor infos
        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors_usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors_usize);
        for i in 0..n_tensors_usize {
            let info = self.tensor_info(i)?;
            if tensor_index.contains_key(&info.name) {
                return Err(self.corrupt(format!("tensor '{}' appears twice", info.name)));
            }
            tensor_index.insert(info.name.clone(), tensors.len());
            tensors.push(info);
        }

        // data section: aligned only when there are tensors (as in gguf.cpp)
        let end_of_infos = self.pos as u64;
        let data_offset = if tensors.is_empty() {
            end_of_infos
        } else {
            align_up(end_of_infos, alignment).ok_or_else(|| self.corrupt("data offset overflows"))?
        };
        let file_size = self.len();
        for t in &mut tensors {
            if t.offset % alignment != 0 {
                return Err(self.corrupt(format!(
                    "tensor '{}' has data offset {} which is not a multiple of the alignment {}",
                    t.name, t.offset, alignment
                )));
            }
            let start = data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.n_bytes));
            match (start, end) {
                (Some(start), Some(end)) if end <= file_size => t.file_offset = start,
                _ => {
                    let end = end.map_or_else(|| "beyond 2^64".to_string(), |e| e.to_string());
                    return Err(GgufError::Truncated {
                        path: self.path.to_path_buf(),
                        what: format!("tensor '{}' data ends at byte {end} but the file has {file_size} bytes", t.name),
                    });
                }
            }
        }

        Ok(Parsed { version, metadata, key_index, tensors, tensor_index, alignment, data_offset })
    }

    fn tensor_info(&mut self, i: usize) -> Result<TensorInfo, GgufError> {
        let name = self.string(&|| format!("the name of tensor {i}"))?;
        let n_dims = self.u32().map_err(|s| self.truncated(s, format!("the dimension count of tensor '{name}'")))?;
        if n_dims as usize > MAX_DIMS {
            return Err(
                self.corrupt(format!("tensor '{name}' has {n_dims} dimensions but GGUF allows at most {MAX_DIMS}"))
            );
        }
        let mut shape = Vec::with_capacity(n_dims as usize);
        let mut n_elements: u64 = 1;
        for d in 0..n_dims {
            let ne = self.u64().map_err(|s| self.truncated(s, format!("dimension {d} of tensor '{name}'")))?;
            if ne == 0 {
                return Err(self.corrupt(format!("tensor '{name}' has size 0 in dimension {d}")));
            }
            if ne > i64::MAX as u64 {
                return Err(self.corrupt(format!("tensor '{name}' has negative size {} in dimension {d}", ne as i64)));
            }
            n_elements = n_elements.checked_mul(ne).filter(|&n| n <= i64::MAX as u64).ok_or_else(|| {
                self.corrupt(format!("tensor '{name}' has too many elements: its dimensions overflow 2^63"))
            })?;
            shape.push(ne);
        }
        let type_id = self.u32().map_err(|s| self.truncated(s, format!("the type of tensor '{name}'")))?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
            path: self.path.to_path_buf(),
            tensor: name.clone(),
            type_id,
        })?;
        let ne0 = shape.first().copied().unwrap_or(1);
        let blck = ggml_type.block_size();
        if ne0 % blck != 0 {
            return Err(self.corrupt(format!(
                "tensor '{name}' of type {ggml_type} has rows of {ne0} values, not a multiple of \
                 the block size {blck}"
            )));
        }
        let n_bytes = (n_elements / blck)
            .checked_mul(ggml_type.type_size())
            .ok_or_else(|| self.corrupt(format!("tensor '{name}' is larger than 2^64 bytes")))?;
        let offset = self.u64().map_err(|s| self.truncated(s, format!("the data offset of tensor '{name}'")))?;
        Ok(TensorInfo { name, shape, ggml_type, offset, file_offset: 0, n_elements, n_bytes })
    }

    fn value(&mut self, ty: ValueType, key: &str, depth: usize) -> Result<Value, GgufError> {
        let what = || format!("the value of metadata key '{key}'");
        macro_rules! scalar {
            ($variant:ident, $t:ty) => {{
                let b = self.array_of::<{ std::mem::size_of::<$t>() }>().map_err(|s| self.truncated(s, what()))?;
                Value::$variant(<$t>::from_le_bytes(b))
            }};
        }
        Ok(match ty {
            ValueType::U8 => scalar!(U8, u8),
            ValueType::I8 => scalar!(I8, i8),
            ValueType::U16 => scalar!(U16, u16),
            ValueType::I16 => scalar!(I16, i16),
            ValueType::U32 => scalar!(U32, u32),
            ValueType::I32 => scalar!(I32, i32),
            ValueType::F32 => scalar!(F32, f32),
            ValueType::U64 => scalar!(U64, u64),
            ValueType::I64 => scalar!(I64, i64),
            ValueType::F64 => scalar!(F64, f64),
            ValueType::Bool => {
                let b = self.array_of::<1>().map_err(|s| self.truncated(s, what()))?;
                Value::Bool(b[0] != 0)
            }
            ValueType::String => Value::String(self.string(&what)?),
            ValueType::Array => Value::Array(self.array(key, depth)?),
        })
    }

    fn array(&mut self, key: &str, depth: usize) -> Result<Array, GgufError> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.corrupt(format!("metadata key '{key}' nests arrays more than {MAX_ARRAY_DEPTH} deep")));
        }
        let what = || format!("the array header of metadata key '{key}'");
        let type_id = self.u32().map_err(|s| self.truncated(s, what()))?;
        let n = self.u64().map_err(|s| self.truncated(s, what()))?;
        let elem = ValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
            path: self.path.to_path_buf(),
            what: format!("the elements of array '{key}'"),
            type_id,
        })?;
        let n = self.check_count(n, elem.min_encoded_size(), &format!("elements of array '{key}'"))?;
        let what_data = || format!("the elements of array '{key}'");
        macro_rules! numeric {
            ($variant:ident, $t:ty) => {{
                const SZ: usize = std::mem::size_of::<$t>();
                // check_count guarantees n * SZ fits in the remaining bytes
                let bytes = self.take((n * SZ) as u64).map_err(|s| self.truncated(s, what_data()))?;
                Array::$variant(
                    bytes
                        .chunks_exact(SZ)
                        .map(|c| {
                            let mut a = [0u8; SZ];
                            a.copy_from_slice(c);
                            <$t>::from_le_bytes(a)
                        })
                        .collect(),
                )
            }};
        }
        Ok(match elem {
            ValueType::U8 => numeric!(U8, u8),
            ValueType::I8 => numeric!(I8, i8),
            ValueType::U16 => numeric!(U16, u16),
            ValueType::I16 => numeric!(I16, i16),
            ValueType::U32 => numeric!(U32, u32),
            ValueType::I32 => numeric!(I32, i32),
            ValueType::F32 => numeric!(F32, f32),
            ValueType::U64 => numeric!(U64, u64),
            ValueType::I64 => numeric!(I64, i64),
            ValueType::F64 => numeric!(F64, f64),
            ValueType::Bool => {
                let bytes = self.take(n as u64).map_err(|s| self.truncated(s, what_data()))?;
                Array::Bool(bytes.iter().map(|&b| b != 0).collect())
            }
            ValueType::String => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.string(&|| format!("element {i} of array '{key}'"))?);
                }
                Array::String(v)
            }
            ValueType::Array => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.array(key, depth + 1)?);
                }
                Array::Array(v)
            }
        })
    }
}

fn check_version(path: &Path, version: u32) -> Result<(), GgufError> {
    let hint = match version {
        2 | 3 => return Ok(()),
        0 => "version 0 does not exist; the header is damaged, re-download the model".to_string(),
        1 => "GGUF v1 files are no longer supported by llama.cpp; re-convert the model with a \
              current convert_hf_to_gguf.py or download a newer GGUF"
            .to_string(),
        v if v & 0xFFFF == 0 => format!(
            "the version reads as {v:#010x}, which means the file is big-endian (or damaged); \
             only little-endian GGUF files are supported, use a little-endian conversion"
        ),
        v => format!(
            "this reader supports GGUF versions 2 and 3, and {v} is newer; update logquant \
             (and its vendored llama.cpp) or re-convert the model"
        ),
    };
    Err(GgufError::UnsupportedVersion { path: path.to_path_buf(), version, hint })
}

fn describe_magic(head: &[u8]) -> String {
    let printable: String =
        head.iter().map(|&b| if b.is_ascii_graphic() || b == b' ' { b as char } else { '?' }).collect();
    let hex: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
    format!("bytes [{}] (\"{printable}\")", hex.join(" "))
}

/// `x` rounded up to a multiple of `align` (a power of two), or `None` on overflow.
pub(crate) fn align_up(x: u64, align: u64) -> Option<u64> {
    let mask = align.checked_sub(1)?;
    Some(x.checked_add(mask)? & !mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raw GGUF byte builder for hand-made (and deliberately broken) files.
    #[derive(Default)]
    struct Raw(Vec<u8>);

    impl Raw {
        fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
            let mut r = Raw::default();
            r.0.extend_from_slice(b"GGUF");
            r.u32(version).u64(n_tensors).u64(n_kv);
            r
        }
        fn u32(&mut self, v: u32) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn u64(&mut self, v: u64) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn str(&mut self, s: &str) -> &mut Self {
            self.u64(s.len() as u64);
            self.0.extend_from_slice(s.as_bytes());
            self
        }
        fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
            self.str(key).u32(4).u32(v)
        }
        fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
            self.str(name).u32(dims.len() as u32);
            for &d in dims {
                self.u64(d);
            }
            self.u32(ty).u64(offset)
        }
        fn pad_to(&mut self, align: usize) -> &mut Self {
            while self.0.len() % align != 0 {
                self.0.push(0);
            }
            self
        }
        fn zeros(&mut self, n: usize) -> &mut Self {
            self.0.resize(self.0.len() + n, 0);
            self
        }
        fn parse(&self) -> Result<GgufFile, GgufError> {
            GgufFile::from_bytes("test.gguf", self.0.clone())
        }
    }

    /// A valid file with one f32 tensor of 8 elements.
    fn valid() -> Raw {
        let mut r = Raw::header(3, 1, 1);
        r.kv_u32("general.alignment", 32);
        r.tensor("t", &[8], 0, 0).pad_to(32).zeros(32);
        r
    }

    fn err_of(r: &Raw) -> GgufError {
        r.parse().expect_err("parse should fail")
    }

    #[test]
    fn valid_minimal_file_parses() {
        let f = valid().parse().unwrap();
        assert_eq!(f.version(), 3);
        assert_eq!(f.get_u32("general.alignment"), Some(32));
        assert_eq!(f.tensors().len(), 1);
        let t = f.tensor("t").unwrap();
        assert_eq!(t.n_bytes, 32);
        assert_eq!(t.file_offset % 32, 0);
        assert_eq!(f.tensor_data("t").unwrap().len(), 32);
        assert!(f.tensor_data("missing").is_none());
    }

    #[test]
    fn version_2_is_accepted() {
        let mut r = valid();
        r.0[4..8].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(r.parse().unwrap().version(), 2);
    }

    #[test]
    fn empty_file_is_truncated() {
        let e = GgufFile::from_bytes("empty.gguf", vec![]).unwrap_err();
        assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("empty.gguf") && msg.contains("0 bytes"), "{msg}");
    }

    #[test]
    fn wrong_magic_is_not_gguf() {
        let e = GgufFile::from_bytes("x.bin", b"PK\x03\x04 zip file".to_vec()).unwrap_err();
        assert!(matches!(e, GgufError::NotGguf { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("x.bin") && msg.contains("50 4b 03 04"), "{msg}");
        // a short file that is not a prefix of the magic is also not GGUF
        let e = GgufFile::from_bytes("x", b"{}".to_vec()).unwrap_err();
        assert!(matches!(e, GgufError::NotGguf { .. }), "{e}");
    }

    #[test]
    fn version_1_is_rejected_with_advice() {
        let e = err_of(&Raw::header(1, 0, 0));
        match &e {
            GgufError::UnsupportedVersion { version: 1, hint, .. } => {
                assert!(hint.contains("v1") && hint.contains("re-convert"), "{hint}")
            }
            other => panic!("wrong error {other}"),
        }
    }

    #[test]
    fn version_99_and_big_endian_are_rejected() {
        let e = err_of(&Raw::header(99, 0, 0));
        assert!(matches!(e, GgufError::UnsupportedVersion { version: 99, .. }), "{e}");
        assert!(e.to_string().contains("newer"), "{e}");
        let e = err_of(&Raw::header(3u32.swap_bytes(), 0, 0));
        assert!(e.to_string().contains("big-endian"), "{e}");
        let e = err_of(&Raw::header(0, 0, 0));
        assert!(matches!(e, GgufError::UnsupportedVersion { version: 0, .. }), "{e}");
    }

    #[test]
    fn truncated_in_header() {
        let full = Raw::header(3, 0, 0).0;
        for cut in 4..full.len() {
            let e = GgufFile::from_bytes("h.gguf", full[..cut].to_vec()).unwrap_err();
            assert!(matches!(e, GgufError::Truncated { .. }), "cut {cut}: {e}");
            assert!(e.to_string().contains("re-download"), "{e}");
        }
        // the bare magic and prefixes of it are truncated files too
        let e = GgufFile::from_bytes("h.gguf", b"GG".to_vec()).unwrap_err();
        assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
        // a header-only file with nothing in it is fine
        assert!(GgufFile::from_bytes("h.gguf", full).is_ok());
    }

    #[test]
    fn string_length_past_end_is_truncated() {
        let mut r = Raw::header(3, 0, 1);
        r.u64(1000).0.extend_from_slice(b"general.name");
        let e = err_of(&r);
        assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
        assert!(e.to_string().contains("string of 1000 bytes"), "{e}");

        let mut r = Raw::header(3, 0, 1);
        r.str("general.name").u32(8).u64(u64::MAX).0.extend_from_slice(b"abc");
        let e = err_of(&r);
        assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
        assert!(e.to_string().contains("general.name"), "{e}");
    }

    #[test]
    fn every_truncation_of_a_valid_file_is_an_error() {
        let mut r = Raw::header(3, 2, 3);
        r.str("general.architecture").u32(8).str("llama");
        r.str("a.list").u32(9).u32(8).u64(2).str("x").str("yy");
        r.str("a.nums").u32(9).u32(6).u64(3).u32(0).u32(0).u32(0);
        r.tensor("w", &[32, 2], 8, 0).tensor("n", &[4], 0, 96);
        r.pad_to(32).zeros(96 + 16);
        let full = r.0.clone();
        assert!(r.parse().is_ok());
        for cut in 0..full.len() {
            let res = GgufFile::from_bytes("cut.gguf", full[..cut].to_vec());
            let e = res.expect_err("a truncated file must not parse");
            assert!(matches!(e, GgufError::Truncated { .. }), "cut at {cut} gave {e}");
        }
    }

    #[test]
    fn absurd_counts_do_not_allocate() {
        let e = err_of(&Raw::header(3, 0, 1 << 60));
        assert!(matches!(e, GgufError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("metadata entries"), "{e}");
        let e = err_of(&Raw::header(3, 1 << 60, 0));
        assert!(matches!(e, GgufError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("tensor infos"), "{e}");
        // negative as i64
        let e = err_of(&Raw::header(3, 0, u64::MAX));
        assert!(matches!(e, GgufError::Corrupt { .. }), "{e}");
        // plausible count, but the file is too short: truncated
        let e = err_of(&Raw::header(3, 0, 1000));
        assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
        // absurd array length
        let mut r = Raw::header(3, 0, 1);
        r.str("k").u32(9).u32(6).u64(1 << 62);
        let e = err_of(&r);
        assert!(matches!(e, GgufError::Corrupt { .. }), "{e}");
        let mut r = Raw::header(3, 0, 1);
        r.str("k").u32(9).u32(8).u64(1 << 61);
        assert!(err_of(&r).to_string().contains("array 'k'"));
    }

    #[test]
    fn unknown_value_type() {
        let mut r = Raw::header(3, 0, 1);
        r.str("weird.key").u32(13).u32(0);
        let e = err_of(&r);
        assert!(matches!(e, GgufError::UnknownValueType { type_id: 13, .. }), "{e}");
        assert!(e.to_string().contains("weird.key"), "{e}");
        // inside an array
        let mut r = Raw::header(3, 0, 1);
        r.str("arr.key").u32(9).u32(77).u64(0);
        let e = err_of(&r);
        assert!(matches!(e, GgufError::UnknownValueType { type_id: 77, .. }), "{e}");
    }

    #[test]
    fn unknown_and_removed_tensor_types() {
        for ty in [4u32, 31, 36, 45, 1000] {
            let mut r = Raw::header(3, 1, 0);
            r.tensor("blk.0.attn_q.weight", &[32], ty, 0).pad_to(32).zeros(64);
            let e = err_of(&r);
            assert!(
                matches!(&e, GgufError::UnknownTensorType { type_id, tensor, .. }
                    if *type_id == ty && tensor == "blk.0.attn_q.weight"),
                "{e}"
            );
        }
    }

    #[test]
    fn too_many_dims() {
        let mut r = Raw::header(3, 1, 0);
        r.tensor("t5", &[1, 1, 1, 1, 1], 0, 0).pad_to(32).zeros(32);
        let e = err_of(&r);
        assert!(matches!(e, GgufError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("5 dimensions"), "{e}");
    }

    #[test]
    fn bad_dims() {
        let cases: [(&[u64], &str); 4] = [
            (&[0, 4], "size 0"),
            (&[u64::MAX], "negative"),
            (&[1 << 40, 1 << 40], "overflow"),
            (&[30], "block size"), // q8_0 needs multiples of 32
        ];
        for (dims, needle) in cases {
            let mut r = Raw::header(3, 1, 0);
            r.tensor("t", dims, 8, 0).pad_to(32).zeros(64);
            let e = err_of(&r);
            assert!(matches!(e, GgufError::Corrupt { .. }), "{dims:?}: {e}");
            assert!(e.to_string().contains(needle), "{dims:?}: {e}");
        }
    }

    #[test]
    fn tensor_data_past_end() {
        let mut r = Raw::header(3, 1, 0);
        r.tensor("blk.3.ffn_up.weight", &[64, 4], 0, 0).pad_to(32).zeros(100);
        let e = err_of(&r);
        assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("blk.3.ffn_up.weight") && msg.contains("data ends at byte"), "{msg}");
        assert!(msg.contains("re-download"), "{msg}");
        // an offset near 2^64 must not overflow
        let mut r = Raw::header(3, 1, 0);
        r.tensor("t", &[8], 0, u64::MAX - 31).pad_to(32).zeros(32);
        assert!(matches!(err_of(&r), GgufError::Truncated { .. }));
    }

    #[test]
    fn misaligned_offset() {
        let mut r = Raw::header(3, 1, 0);
        r.tensor("t", &[8], 0, 4).pad_to(32).zeros(64);
        let e = err_of(&r);
        assert!(matches!(e, GgufError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("not a multiple of the alignment 32"), "{e}");
    }

    #[test]
    fn bad_alignment_key_and_duplicates() {
        let mut r = Raw::header(3, 0, 1);
        r.kv_u32("general.alignment", 24);
        assert!(err_of(&r).to_string().contains("power of two"));
        let mut r = Raw::header(3, 0, 1);
        r.str("general.alignment").u32(10).u64(32);
        assert!(matches!(err_of(&r), GgufError::Corrupt { .. }));
        let mut r = Raw::header(3, 0, 2);
        r.kv_u32("a", 1).kv_u32("a", 2);
        assert!(err_of(&r).to_string().contains("twice"));
        let mut r = Raw::header(3, 0, 1);
        r.kv_u32("", 1);
        assert!(err_of(&r).to_string().contains("empty key"));
        let mut r = Raw::header(3, 2, 0);
        r.tensor("t", &[8], 0, 0).tensor("t", &[8], 0, 32).pad_to(32).zeros(64);
        assert!(err_of(&r).to_string().contains("twice"));
    }

    #[test]
    fn custom_alignment_is_honoured() {
        let mut r = Raw::header(3, 1, 1);
        r.kv_u32("general.alignment", 64);
        r.tensor("t", &[8], 0, 0).pad_to(64).zeros(64);
        let f = r.parse().unwrap();
        assert_eq!(f.alignment(), 64);
        assert_eq!(f.data_offset() % 64, 0);
        // offset 32 is not a multiple of 64
        let mut r = Raw::header(3, 1, 1);
        r.kv_u32("general.alignment", 64);
        r.tensor("t", &[8], 0, 32).pad_to(64).zeros(128);
        assert!(err_of(&r).to_string().contains("alignment 64"));
    }

    #[test]
    fn nested_arrays_and_depth_limit() {
        let mut r = Raw::header(3, 0, 1);
        // [[1u8, 2u8], ["a"]]
        r.str("nested").u32(9).u32(9).u64(2);
        r.u32(0).u64(2).0.extend_from_slice(&[1, 2]);
        r.u32(8).u64(1).str("a");
        let f = r.parse().unwrap();
        let a = f.get_array("nested").unwrap();
        assert_eq!(a, &Array::Array(vec![Array::U8(vec![1, 2]), Array::String(vec!["a".into()])]));

        let mut r = Raw::header(3, 0, 1);
        r.str("deep").u32(9);
        for _ in 0..(MAX_ARRAY_DEPTH + 2) {
            r.u32(9).u64(1);
        }
        r.u32(0).u64(0);
        let e = err_of(&r);
        assert!(e.to_string().contains("deep"), "{e}");
    }

    #[test]
    fn typed_getters_accept_any_integer_width() {
        let mut r = Raw::header(3, 0, 5);
        r.str("a").u32(0).0.push(7); // u8
        r.str("b").u32(11).u64(-5i64 as u64); // i64
        r.str("c").u32(10).u64(1 << 40); // u64
        r.str("d").u32(6).u32(1.5f32.to_bits());
        r.str("e").u32(8).str("hi");
        let f = r.parse().unwrap();
        assert_eq!(f.get_u32("a"), Some(7));
        assert_eq!(f.get_u64("a"), Some(7));
        assert_eq!(f.get_u32("b"), None);
        assert_eq!(f.get_i64("b"), Some(-5));
        assert_eq!(f.get_u32("c"), None);
        assert_eq!(f.get_u64("c"), Some(1 << 40));
        assert_eq!(f.get_f32("d"), Some(1.5));
        assert_eq!(f.get_f32("a"), Some(7.0));
        assert_eq!(f.get_str("e"), Some("hi"));
        assert!(matches!(f.try_get_u32("e"), Err(GgufError::WrongType { .. })));
        assert!(matches!(f.require_u32("zz"), Err(GgufError::MissingKey { .. })));
        assert_eq!(f.try_get_u32("zz").unwrap(), None);
        let keys: Vec<&str> = f.metadata().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a", "b", "c", "d", "e"]);
    }

    #[test]
    fn invalid_utf8_strings_are_replaced_not_rejected() {
        let mut r = Raw::header(3, 0, 1);
        r.str("k").u32(8).u64(2).0.extend_from_slice(&[0xff, b'a']);
        let f = r.parse().unwrap();
        assert_eq!(f.get_str("k"), Some("\u{fffd}a"));
    }

    #[test]
    fn open_reports_missing_file_and_directory() {
        let e = GgufFile::open("/nonexistent/dir/model.gguf").unwrap_err();
        assert!(matches!(e, GgufError::Io { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/dir/model.gguf"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = GgufFile::open(dir.path()).unwrap_err();
        assert!(matches!(e, GgufError::Io { .. }), "{e}");
    }

    #[test]
    fn open_empty_and_valid_files_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("empty.gguf");
        std::fs::write(&p, b"").unwrap();
        assert!(matches!(GgufFile::open(&p).unwrap_err(), GgufError::Truncated { .. }));
        let p = dir.path().join("ok.gguf");
        std::fs::write(&p, valid().0).unwrap();
        let f = GgufFile::open(&p).unwrap();
        assert_eq!(f.path(), p.as_path());
        assert_eq!(f.file_size(), valid().0.len() as u64);
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
                let _ = GgufFile::from_bytes("fuzz.gguf", bytes);
            }

            #[test]
            fn mutated_valid_files_never_panic(
                flips in proptest::collection::vec((0usize..200, any::<u8>()), 1..8)
            ) {
                let mut r = Raw::header(3, 2, 2);
                r.str("general.architecture").u32(8).str("llama");
                r.str("tokenizer.ggml.tokens").u32(9).u32(8).u64(2).str("a").str("b");
                r.tensor("w", &[32, 2], 8, 0).tensor("n", &[4], 0, 96);
                r.pad_to(32).zeros(96 + 16);
                let mut bytes = r.0;
                for (i, b) in flips {
                    if let Some(slot) = bytes.get_mut(i) {
                        *slot = b;
                    }
                }
                let _ = GgufFile::from_bytes("fuzz.gguf", bytes);
            }
        }
    }
}
