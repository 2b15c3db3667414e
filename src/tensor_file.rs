//! safetensors files written and read piece by piece. The header is written first (every name,
//! shape and offset is known up front), then data lands at its offset in any order — so a rank
//! streams its optimizer state straight from the nvme tier into its checkpoint file, and
//! `consolidate` writes one unit at a time. Reading parses the header and reads ranges with
//! `pread`, never the whole file. f32 tensors (narrowed to bf16/f16 on request), and byte
//! tensors (8-bit optimizer codes), little-endian, as the format specifies.

use crate::error::{KilnError, Result};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[cfg(not(target_endian = "little"))]
compile_error!("safetensors data is little-endian; kiln writes f32 slices as they are in memory");

fn as_bytes(data: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any bytes are valid u8; little-endian per the check above.
    unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data)) }
}

fn as_bytes_mut(data: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above; any byte pattern is a valid f32.
    unsafe {
        std::slice::from_raw_parts_mut(data.as_mut_ptr() as *mut u8, std::mem::size_of_val(data))
    }
}

fn as_bytes_mut_u16(data: &mut [u16]) -> &mut [u8] {
    // SAFETY: as above; any byte pattern is a valid u16.
    unsafe {
        std::slice::from_raw_parts_mut(data.as_mut_ptr() as *mut u8, std::mem::size_of_val(data))
    }
}

/// Where one tensor's data is.
#[derive(Debug, Clone)]
struct Entry {
    shape: Vec<usize>,
    /// Byte offset of the first element in the file.
    start: u64,
    elems: usize,
    dtype: StoredDtype,
}

/// A safetensors file being written.
pub struct TensorFileWriter {
    file: File,
    path: PathBuf,
    entries: HashMap<String, Entry>,
}

impl TensorFileWriter {
    /// Creates `path` (which must not exist) holding `tensors` (name, shape) in this order as
    /// f32, and writes the header. The data is zero until written.
    pub fn create(
        path: &Path,
        tensors: &[(String, Vec<usize>)],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        Self::create_as(path, tensors, metadata, StoredDtype::F32)
    }

    /// [`create`](Self::create) storing every tensor as `dtype`; [`write`](Self::write) still
    /// takes f32 values and narrows them.
    pub fn create_as(
        path: &Path,
        tensors: &[(String, Vec<usize>)],
        metadata: &BTreeMap<String, String>,
        dtype: StoredDtype,
    ) -> Result<Self> {
        let typed: Vec<_> = tensors
            .iter()
            .map(|(name, shape)| (name.clone(), shape.clone(), dtype))
            .collect();
        Self::create_typed(path, &typed, metadata)
    }

    /// [`create`](Self::create) with a dtype per tensor: `U8` tensors are written with
    /// [`write_bytes`](Self::write_bytes), the others with [`write`](Self::write).
    pub fn create_typed(
        path: &Path,
        tensors: &[(String, Vec<usize>, StoredDtype)],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let mut header = Map::new();
        if !metadata.is_empty() {
            header.insert("__metadata__".into(), json!(metadata));
        }
        let mut offset = 0usize;
        let mut spans = Vec::new();
        for (name, shape, dtype) in tensors {
            let bytes = shape.iter().product::<usize>() * dtype.size();
            header.insert(
                name.clone(),
                json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            spans.push((name.clone(), shape.clone(), offset, *dtype));
            offset += bytes;
        }
        let mut text = serde_json::to_vec(&Value::Object(header)).expect("header serialises");
        // The data starts 8-aligned, as the reference writer does.
        while (8 + text.len()) % 8 != 0 {
            text.push(b' ');
        }
        let data_start = 8 + text.len() as u64;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .open(path)
            .map_err(|e| KilnError::file(path, format!("cannot create: {e}")))?;
        let io = |e| KilnError::io(path, e);
        file.write_all_at(&(text.len() as u64).to_le_bytes(), 0)
            .map_err(io)?;
        file.write_all_at(&text, 8).map_err(io)?;
        file.set_len(data_start + offset as u64).map_err(io)?;
        let entries = spans
            .into_iter()
            .map(|(name, shape, off, dtype)| {
                let elems = shape.iter().product();
                (
                    name,
                    Entry {
                        shape,
                        start: data_start + off as u64,
                        elems,
                        dtype,
                    },
                )
            })
            .collect();
        Ok(TensorFileWriter {
            file,
            path: path.to_path_buf(),
            entries,
        })
    }

    /// Writes `data` into tensor `name` from element `at` on.
    pub fn write(&self, name: &str, at: usize, data: &[f32]) -> Result<()> {
        let e = &self.entries[name];
        assert!(at + data.len() <= e.elems, "write past the end of {name}");
        assert!(
            e.dtype != StoredDtype::U8,
            "{name} is a byte tensor: write_bytes"
        );
        let Some(h) = e.dtype.half() else {
            return self
                .file
                .write_all_at(as_bytes(data), e.start + (at * 4) as u64)
                .map_err(|err| KilnError::io(&self.path, err));
        };
        let bytes: Vec<u8> = data
            .iter()
            .flat_map(|&x| h.narrow(x).to_le_bytes())
            .collect();
        self.file
            .write_all_at(&bytes, e.start + (at * 2) as u64)
            .map_err(|err| KilnError::io(&self.path, err))
    }

    /// Writes `data` into byte tensor `name` from element `at` on.
    pub fn write_bytes(&self, name: &str, at: usize, data: &[u8]) -> Result<()> {
        let e = &self.entries[name];
        assert!(at + data.len() <= e.elems, "write past the end of {name}");
        assert!(e.dtype == StoredDtype::U8, "{name} is not a byte tensor");
        self.file
            .write_all_at(data, e.start + at as u64)
            .map_err(|err| KilnError::io(&self.path, err))
    }

    /// Flushes the file to the device.
    pub fn finish(self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| KilnError::io(&self.path, e))
    }
}

/// A safetensors file opened for ranged reads.
pub struct TensorFileReader {
    file: File,
    path: PathBuf,
    entries: HashMap<String, Entry>,
    metadata: HashMap<String, String>,
}

impl TensorFileReader {
    /// Opens `path` and checks its header against its length.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |msg: &str| KilnError::file(path, msg.to_string());
        let file =
            File::open(path).map_err(|e| KilnError::file(path, format!("cannot open: {e}")))?;
        let len = file.metadata().map_err(|e| KilnError::io(path, e))?.len();
        let mut n = [0u8; 8];
        file.read_exact_at(&mut n, 0)
            .map_err(|_| bad("truncated: shorter than a safetensors header"))?;
        let n = u64::from_le_bytes(n);
        if n > 100 << 20 || 8 + n > len {
            return Err(bad("truncated or not a safetensors file (header length)"));
        }
        let mut text = vec![0u8; n as usize];
        file.read_exact_at(&mut text, 8)
            .map_err(|e| KilnError::io(path, e))?;
        let header: Map<String, Value> = serde_json::from_slice(&text)
            .map_err(|e| bad(&format!("malformed safetensors header: {e}")))?;
        let data_start = 8 + n;
        let mut entries = HashMap::new();
        let mut metadata = HashMap::new();
        let mut data_len = 0u64;
        for (name, v) in header {
            if name == "__metadata__" {
                metadata = serde_json::from_value(v)
                    .map_err(|e| bad(&format!("malformed metadata: {e}")))?;
                continue;
            }
            let dtype = v["dtype"].as_str().unwrap_or("");
            let shape: Vec<usize> = serde_json::from_value(v["shape"].clone())
                .map_err(|_| bad(&format!("tensor {name}: malformed shape")))?;
            let offsets: [u64; 2] = serde_json::from_value(v["data_offsets"].clone())
                .map_err(|_| bad(&format!("tensor {name}: malformed data_offsets")))?;
            let elems: usize = shape.iter().product();
            let dtype = StoredDtype::parse(dtype).ok_or_else(|| {
                bad(&format!(
                    "tensor {name}: dtype {dtype} is not one kiln reads (F32, BF16, F16, U8)"
                ))
            })?;
            if offsets[1] < offsets[0] || offsets[1] - offsets[0] != (elems * dtype.size()) as u64 {
                return Err(bad(&format!(
                    "tensor {name}: its data_offsets do not hold {elems} {dtype:?} values"
                )));
            }
            data_len = data_len.max(offsets[1]);
            entries.insert(
                name,
                Entry {
                    shape,
                    start: data_start + offsets[0],
                    elems,
                    dtype,
                },
            );
        }
        if data_start + data_len != len {
            return Err(bad(&format!(
                "truncated or padded: {len} bytes, the header describes {}",
                data_start + data_len
            )));
        }
        Ok(TensorFileReader {
            file,
            path: path.to_path_buf(),
            entries,
            metadata,
        })
    }

    /// The file's `__metadata__` entry `key`.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// The names of the file's tensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Shape of tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// The entry of tensor `name`, if it holds elements `at..at + len`.
    fn entry(&self, name: &str, at: usize, len: usize) -> Result<&Entry> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| KilnError::file(&self.path, format!("has no tensor `{name}`")))?;
        if at + len > e.elems {
            return Err(KilnError::file(
                &self.path,
                format!(
                    "tensor `{name}` has {} elements, fewer than expected",
                    e.elems
                ),
            ));
        }
        Ok(e)
    }

    /// Reads elements `at..at + out.len()` of byte tensor `name`.
    pub fn read_bytes(&self, name: &str, at: usize, out: &mut [u8]) -> Result<()> {
        let e = self.entry(name, at, out.len())?;
        if e.dtype != StoredDtype::U8 {
            return Err(KilnError::file(
                &self.path,
                format!("tensor `{name}` is {}, not U8", e.dtype.name()),
            ));
        }
        self.file
            .read_exact_at(out, e.start + at as u64)
            .map_err(|err| KilnError::io(&self.path, err))
    }

    /// Reads elements `at..at + out.len()` of tensor `name`.
    pub fn read(&self, name: &str, at: usize, out: &mut [f32]) -> Result<()> {
        let e = self.entry(name, at, out.len())?;
        if e.dtype == StoredDtype::U8 {
            return Err(KilnError::file(
                &self.path,
                format!("tensor `{name}` is U8 (quantized), not a float tensor"),
            ));
        }
        let start = e.start + (at * e.dtype.size()) as u64;
        let io = |err| KilnError::io(&self.path, err);
        if e.dtype == StoredDtype::F32 {
            return self
                .file
                .read_exact_at(as_bytes_mut(out), start)
                .map_err(io);
        }
        // Half-precision files (most checkpoints on the Hub) widen to f32 exactly.
        let mut half = vec![0u16; out.len()];
        self.file
            .read_exact_at(as_bytes_mut_u16(&mut half), start)
            .map_err(io)?;
        let h = e.dtype.half().expect("not F32");
        for (o, &b) in out.iter_mut().zip(&half) {
            *o = h.widen(b);
        }
        Ok(())
    }

    /// The dtype tensor `name` is stored in (`F32`, `BF16`, `F16`).
    pub fn dtype(&self, name: &str) -> Option<&'static str> {
        self.entries.get(name).map(|e| e.dtype.name())
    }
}

/// The element types kiln reads from a safetensors file (every one widens to f32 exactly) and
/// writes (narrowing from f32 rounds to nearest even, as PyTorch's casts do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    /// IEEE single.
    F32,
    /// bfloat16.
    BF16,
    /// IEEE half.
    F16,
    /// Bytes (8-bit optimizer codes); never widened to f32.
    U8,
}

impl StoredDtype {
    /// `F32`, `BF16`, `F16` or `U8`, as safetensors headers spell them.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "F32" => Some(StoredDtype::F32),
            "BF16" => Some(StoredDtype::BF16),
            "F16" => Some(StoredDtype::F16),
            "U8" => Some(StoredDtype::U8),
            _ => None,
        }
    }

    /// The safetensors header's name.
    pub fn name(self) -> &'static str {
        match self {
            StoredDtype::F32 => "F32",
            StoredDtype::BF16 => "BF16",
            StoredDtype::F16 => "F16",
            StoredDtype::U8 => "U8",
        }
    }

    /// The 16-bit format, for BF16 and F16.
    fn half(self) -> Option<crate::halves::Half> {
        match self {
            StoredDtype::F32 | StoredDtype::U8 => None,
            StoredDtype::BF16 => Some(crate::halves::Half::Bf16),
            StoredDtype::F16 => Some(crate::halves::Half::F16),
        }
    }

    fn size(self) -> usize {
        match self {
            StoredDtype::F32 => 4,
            StoredDtype::BF16 | StoredDtype::F16 => 2,
            StoredDtype::U8 => 1,
        }
    }
}

/// CRC-32 of a whole file, read in large blocks.
pub fn file_crc32(path: &Path) -> Result<u32> {
    use std::io::Read;
    let mut file =
        File::open(path).map_err(|e| KilnError::file(path, format!("cannot open: {e}")))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| KilnError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize())
}
