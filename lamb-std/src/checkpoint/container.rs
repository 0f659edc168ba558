//! safetensors, read defensively: the header length is checked against the file's size and
//! the `safetensors` crate's own limit before that crate parses or allocates anything.

use std::collections::HashMap;
use std::path::Path;

use lamb_core::half::bf16;
use safetensors::{Dtype, SafeTensors};

use crate::error::Error;

/// The safetensors crate's own limit on the JSON header.
pub(crate) const MAX_HEADER: u64 = 100_000_000;

/// A checkpoint error without a path yet.
pub(crate) type Refusal = String;

pub(crate) fn refused(path: Option<&Path>, what: Refusal) -> Error {
    Error::Checkpoint {
        path: path.map(Path::to_path_buf),
        what,
    }
}

/// A tensor of a parsed file.
pub(crate) struct Tensor<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

/// A parsed safetensors file.
pub(crate) struct Parsed<'a> {
    pub metadata: HashMap<String, String>,
    pub tensors: HashMap<String, Tensor<'a>>,
}

/// The JSON header of a safetensors file (with its padding) and the length of the tensor
/// data after it, from the length field, checked against the file's size.
pub(crate) fn split_header(bytes: &[u8]) -> Result<(&[u8], u64), Refusal> {
    let Some(len_field) = bytes.first_chunk::<8>() else {
        return Err(format!(
            "not a safetensors file: {} bytes, fewer than the 8 of the header length",
            bytes.len()
        ));
    };
    let n = u64::from_le_bytes(*len_field);
    let after = bytes.len() as u64 - 8;
    if n > after {
        return Err(format!(
            "truncated or not a safetensors file: the header length field says {n} bytes, \
             {after} follow it"
        ));
    }
    if n > MAX_HEADER {
        return Err(format!(
            "the header is {n} bytes, more than the {MAX_HEADER} safetensors allows"
        ));
    }
    Ok((&bytes[8..8 + n as usize], after - n))
}

/// Parses a safetensors file with the `safetensors` crate, after the checks that keep that
/// crate from allocating or overflowing on a hostile header.
pub(crate) fn parse(bytes: &[u8]) -> Result<Parsed<'_>, Refusal> {
    let (header, data_len) = split_header(bytes)?;
    // The crate adds the tensors' end offsets without overflow checks: refuse any offset
    // past the data first (only a hostile header has one).
    let json: serde_json::Value = serde_json::from_slice(header)
        .map_err(|e| format!("not a safetensors file: the header is not JSON: {e}"))?;
    let Some(entries) = json.as_object() else {
        return Err("not a safetensors file: the header is not a JSON object".into());
    };
    for (name, entry) in entries {
        if name == "__metadata__" {
            continue;
        }
        let offsets = entry.get("data_offsets").and_then(|o| o.as_array());
        for off in offsets.into_iter().flatten() {
            if off.as_u64().is_some_and(|o| o > data_len) {
                return Err(format!(
                    "tensor '{name}': its data_offsets {off} lie past the {data_len} bytes \
                     of tensor data (truncated file?)"
                ));
            }
        }
    }
    let (n2, md) = SafeTensors::read_metadata(bytes)
        .map_err(|e| format!("not a valid safetensors file: {e}"))?;
    let data_start = 8 + n2;
    let mut tensors = HashMap::new();
    for (name, info) in md.tensors() {
        let (s, e) = info.data_offsets;
        let data = s
            .checked_add(data_start)
            .zip(e.checked_add(data_start))
            .and_then(|(s, e)| bytes.get(s..e))
            .ok_or_else(|| format!("tensor '{name}': offsets outside the file"))?;
        tensors.insert(
            name,
            Tensor {
                dtype: info.dtype,
                shape: info.shape.clone(),
                data,
            },
        );
    }
    Ok(Parsed {
        metadata: md.metadata().clone().unwrap_or_default(),
        tensors,
    })
}

/// The f32 values of little-endian bytes (`len % 4 == 0`, checked by the caller).
pub(crate) fn f32s(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .as_chunks::<4>()
        .0
        .iter()
        .map(|c| f32::from_le_bytes(*c))
}

/// The bf16 values of little-endian bytes.
pub(crate) fn bf16s(bytes: &[u8]) -> impl Iterator<Item = bf16> + '_ {
    bytes
        .as_chunks::<2>()
        .0
        .iter()
        .map(|c| bf16::from_bits(u16::from_le_bytes(*c)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// safetensors' own header limit is ours: a header of exactly `MAX_HEADER` bytes passes
    /// the length checks (and goes on to be parsed), one byte more is refused before
    /// anything is parsed or allocated from it.
    #[test]
    fn the_header_limit_is_exact() {
        for (n, refused) in [(MAX_HEADER, false), (MAX_HEADER + 1, true)] {
            let mut bytes = vec![b' '; 8 + n as usize];
            bytes[..8].copy_from_slice(&n.to_le_bytes());
            match split_header(&bytes) {
                Ok((header, rest)) => {
                    assert!(!refused, "{n}");
                    assert_eq!((header.len() as u64, rest), (n, 0));
                }
                Err(e) => {
                    assert!(refused, "{n}: {e}");
                    assert!(
                        e.contains("more than the 100000000 safetensors allows"),
                        "{e}"
                    );
                }
            }
        }
    }
}
