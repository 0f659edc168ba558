//! Writing a lamb checkpoint: the tensors borrow the optimizer's buffers where they can,
//! the metadata is built from the optimizer's public getters, and the checksum is patched
//! into the serialized bytes.

use std::borrow::Cow;
use std::collections::HashMap;

use lamb_core::half::bf16;
use lamb_core::{Buffer, LambError};
use safetensors::{Dtype, View};

use super::container::refused;
use super::decode::check_group;
use super::meta::{
    CHECKSUM_PLACEHOLDER, CHECKSUM_PREFIX, ConfigMeta, F64, FORMAT, GroupMeta, KEY_CHECKSUM,
    KEY_FORMAT, KEY_META, KEY_VERSION, LayerMeta, Meta, MomentMeta, PrecisionMeta, ScheduleMeta,
    VERSION, checksum_digits_at, dtypes,
};
use super::xxh64::Xxh64;
use crate::error::Error;
use crate::optimizer::{GroupId, Lamb, LayerId, LayerView, StateView};

/// A tensor to write, borrowing the optimizer's buffers where it can.
struct Out<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Cow<'a, [u8]>,
}

impl View for &Out<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn f32_out(x: &[f32]) -> Out<'_> {
    #[cfg(target_endian = "little")]
    // SAFETY: f32 has no padding bytes, u8 has alignment 1, and the byte slice covers
    // exactly `x`'s memory and borrows `x`. On a little-endian target these are the
    // little-endian bytes safetensors wants.
    let data = Cow::Borrowed(unsafe {
        std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x))
    });
    #[cfg(not(target_endian = "little"))]
    let data = Cow::Owned(x.iter().flat_map(|v| v.to_le_bytes()).collect());
    Out {
        dtype: Dtype::F32,
        shape: vec![x.len()],
        data,
    }
}

fn bf16_out(x: &[bf16]) -> Out<'_> {
    #[cfg(target_endian = "little")]
    // SAFETY: `half::bf16` is `#[repr(transparent)]` over u16 (no padding); otherwise as in
    // `f32_out`.
    let data = Cow::Borrowed(unsafe {
        std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x))
    });
    #[cfg(not(target_endian = "little"))]
    let data = Cow::Owned(x.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect());
    Out {
        dtype: Dtype::BF16,
        shape: vec![x.len()],
        data,
    }
}

fn u8_out(x: &[u8]) -> Out<'_> {
    Out {
        dtype: Dtype::U8,
        shape: vec![x.len()],
        data: Cow::Borrowed(x),
    }
}

pub(super) fn encode(lamb: &Lamb, params: Option<&[&[f32]]>) -> Result<Vec<u8>, Error> {
    if lamb.is_poisoned() {
        return Err(Error::Poisoned);
    }
    let mut groups = group_metas(lamb)?;
    if let Some(p) = params {
        check_params(lamb, p.iter().map(|p| p.len()))?;
    }
    let step = lamb.steps();
    let step_bytes = (step as f32).to_le_bytes();
    let mut layers = Vec::with_capacity(lamb.layer_count());
    let mut tensors: Vec<(String, Out<'_>)> = Vec::with_capacity(5 * lamb.layer_count());
    for i in 0..lamb.layer_count() {
        let l = lamb.layer_at(LayerId(i));
        groups[l.group.0].params.push(i as u64);
        layers.push(layer_meta(&l));
        push_layer_tensors(&mut tensors, i, &l, step_bytes);
        if let Some(p) = params {
            tensors.push((format!("param.{}", l.name), f32_out(p[i])));
        }
    }
    let meta = Meta {
        step,
        max_grad_norm: lamb.max_grad_norm().map(F64),
        schedule: ScheduleMeta::from(lamb.schedule()),
        params: params.is_some(),
        groups,
        layers,
    };
    serialize_with_checksum(&tensors, &meta)
}

/// The groups' metadata, their parameter lists still empty; refuses a group that a load
/// would refuse.
fn group_metas(lamb: &Lamb) -> Result<Vec<GroupMeta>, Error> {
    let mut groups = Vec::with_capacity(lamb.group_count());
    for g in 0..lamb.group_count() {
        let group = lamb.group(GroupId(g))?;
        check_group(&group.name, &group.config, group.lr_scale)
            .map_err(|what| refused(None, format!("not saved: {what}")))?;
        groups.push(GroupMeta {
            name: group.name.clone(),
            lr_scale: F64(group.lr_scale),
            config: ConfigMeta::from(&group.config),
            precision: PrecisionMeta::from(&group.precision),
            params: Vec::new(),
        });
    }
    Ok(groups)
}

/// A layer's metadata: name, length, group, how its moments are stored, master copy.
fn layer_meta(l: &LayerView<'_>) -> LayerMeta {
    let (dm, dv, block) = dtypes(l.state.format());
    LayerMeta {
        name: l.name.to_string(),
        len: l.len as u64,
        group: l.group.0 as u64,
        exp_avg: MomentMeta {
            dtype: dm.into(),
            block,
        },
        exp_avg_sq: MomentMeta {
            dtype: dv.into(),
            block,
        },
        master: l.master.is_some(),
    }
}

/// Appends layer `i`'s state tensors (`state.{i}.*`: the moments as stored, the step, the
/// master copy), borrowing its buffers.
fn push_layer_tensors<'a>(
    tensors: &mut Vec<(String, Out<'a>)>,
    i: usize,
    l: &LayerView<'a>,
    step_bytes: [u8; 4],
) {
    let name = |key: &str| format!("state.{i}.{key}");
    match l.state {
        StateView::F32 { m, v } => {
            tensors.push((name("exp_avg"), f32_out(m)));
            tensors.push((name("exp_avg_sq"), f32_out(v)));
        }
        StateView::Bf16 { m, v } => {
            tensors.push((name("exp_avg"), bf16_out(m)));
            tensors.push((name("exp_avg_sq"), bf16_out(v)));
        }
        StateView::Q8 {
            m,
            v,
            m_absmax,
            v_absmax,
        } => {
            tensors.push((name("exp_avg"), u8_out(m)));
            tensors.push((name("exp_avg.absmax"), f32_out(m_absmax)));
            tensors.push((name("exp_avg_sq"), u8_out(v)));
            tensors.push((name("exp_avg_sq.absmax"), f32_out(v_absmax)));
        }
    }
    tensors.push((
        name("step"),
        Out {
            dtype: Dtype::F32,
            shape: vec![],
            data: Cow::Owned(step_bytes.to_vec()),
        },
    ));
    if let Some(master) = l.master {
        tensors.push((name("master"), f32_out(master)));
    }
}

/// Serializes `tensors` with the format's metadata and `meta`, then patches the checksum
/// of the bytes into the placeholder digits.
fn serialize_with_checksum(tensors: &[(String, Out<'_>)], meta: &Meta) -> Result<Vec<u8>, Error> {
    let internal = |what: String| refused(None, format!("could not encode: {what}"));
    let meta_json = serde_json::to_string(meta).map_err(|e| internal(e.to_string()))?;
    let mut placeholder = String::from(CHECKSUM_PREFIX);
    placeholder.extend(CHECKSUM_PLACEHOLDER.iter().map(|&b| b as char));
    let metadata: HashMap<String, String> = [
        (KEY_FORMAT, FORMAT.to_string()),
        (KEY_VERSION, VERSION.to_string()),
        (KEY_META, meta_json),
        (KEY_CHECKSUM, placeholder),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut bytes =
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.clone(), t)), Some(metadata))
            .map_err(|e| internal(e.to_string()))?;
    let header_len = bytes
        .first_chunk::<8>()
        .map_or(0, |h| u64::from_le_bytes(*h) as usize);
    let header = bytes.get(8..8 + header_len).unwrap_or_default();
    let at = 8 + checksum_digits_at(header).map_err(internal)?;
    // The digits are still the placeholder zeros: the hash of the bytes as they are is the
    // checksum the definition asks for.
    let mut h = Xxh64::new();
    h.update(&bytes);
    let hex = format!("{:016x}", h.digest());
    bytes[at..at + 16].copy_from_slice(hex.as_bytes());
    Ok(bytes)
}

/// Checks that `lens` are the lengths of the optimizer's layers, in order.
pub(super) fn check_params(
    lamb: &Lamb,
    lens: impl ExactSizeIterator<Item = usize>,
) -> Result<(), Error> {
    if lens.len() != lamb.layer_count() {
        return Err(refused(
            None,
            format!(
                "got {} parameter tensors, the optimizer has {} layers",
                lens.len(),
                lamb.layer_count()
            ),
        ));
    }
    for (i, len) in lens.enumerate() {
        let layer = lamb.layer_at(LayerId(i));
        if len != layer.len {
            return Err(Error::Layer {
                index: i,
                name: layer.name.to_string(),
                source: LambError::LengthMismatch {
                    buffer: Buffer::Param,
                    expected: layer.len,
                    found: len,
                },
            });
        }
    }
    Ok(())
}
