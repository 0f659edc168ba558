//! Checkpoints (issue #8): save and resume exactly, interoperate with PyTorch, never lose one.
//!
//! [`Lamb::save`] writes the whole optimizer state as a [safetensors] file;
//! [`Lamb::load`] reads it back into an optimizer whose layers are registered, after
//! checking that everything matches. A resumed run is bit-identical to one that never
//! stopped. [`Lamb::save_with_params`] / [`Lamb::load_with_params`] also carry the model's
//! parameters, so that one atomic file holds everything a resume needs.
//! [`Lamb::load_torch_state`] reads a PyTorch (timm `Lamb`) optimizer state saved with the
//! Python `safetensors` package. `docs/checkpoints.md` has the same description with
//! Python snippets for both directions.
//!
//! ```
//! use lamb_std::{Lamb, lamb_core::LambConfig};
//!
//! let mut opt = Lamb::with_decay_split(LambConfig::timm());
//! opt.add_param("fc.weight", &[4, 3])?;
//! opt.add_param("fc.bias", &[4])?;
//! let (mut w, mut b) = (vec![0.5f32; 12], vec![0.0f32; 4]);
//! opt.step(&mut [&mut w, &mut b], &[&[0.1; 12], &[0.2; 4]])?;
//!
//! let bytes = opt.to_checkpoint_bytes()?; // Lamb::save(path) writes these atomically
//!
//! let mut resumed = Lamb::with_decay_split(LambConfig::timm());
//! resumed.add_param("fc.weight", &[4, 3])?;
//! resumed.add_param("fc.bias", &[4])?;
//! resumed.load_checkpoint_bytes(&bytes)?;
//! assert_eq!(resumed.steps(), 1);
//!
//! // Another model is refused, and the optimizer is left as it was.
//! let mut other = Lamb::new(LambConfig::timm());
//! other.add_layer("fc.weight", 13)?;
//! other.add_layer("fc.bias", 4)?;
//! let err = other.load_checkpoint_bytes(&bytes).unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     "checkpoint: checkpoint has 2 parameter groups, the optimizer has 1"
//! );
//! assert_eq!(other.steps(), 0);
//! # Ok::<(), lamb_std::Error>(())
//! ```
//!
//! # The file (format `lamb-checkpoint`, version 1)
//!
//! A safetensors file (8-byte little-endian header length, JSON header, tensor bytes),
//! written by the `safetensors` crate. Tensors are little-endian and named as in a PyTorch
//! optimizer `state_dict()` flattened with dots, `i` being the layer's index (registration
//! order, [`LayerId`]):
//!
//! | tensor                       | dtype, shape     | holds                                  |
//! |------------------------------|------------------|----------------------------------------|
//! | `state.{i}.exp_avg`          | F32 `[len]`      | first moment m of layer `i`            |
//! | `state.{i}.exp_avg_sq`       | F32 `[len]`      | second moment v                        |
//! | `state.{i}.step`             | F32 `[]`         | the step counter (0-d, like torch's)   |
//! | `state.{i}.master`           | F32 `[len]`      | f32 master copy of half-precision params, where the layer has one |
//! | `param.{name}`               | F32 `[len]`      | the parameters (`save_with_params` only) |
//!
//! A group with compact moments ([`Precision`]) stores them as they are held, so that they
//! come back bit for bit: bf16 moments as `BF16 [len]`; 8-bit moments as `U8 [len]` codes
//! plus `state.{i}.exp_avg.absmax` / `state.{i}.exp_avg_sq.absmax`, `F32 [⌈len / 256⌉]`,
//! the per-block scales (lamb-core's codes: m sign + E4M3, v E5M3, see
//! [`lamb_core::codec`]). Each layer's metadata names its moments' dtype (`"f32"`,
//! `"bf16"`, `"q8_e4m3"` / `"q8_e5m3"` with `"block": 256`); a reader refuses a dtype it
//! does not know, naming it, so a new storage format needs no version change.
//!
//! The header's `__metadata__` map (string to string) has exactly four keys:
//!
//! - `lamb.format` = `"lamb-checkpoint"` ([`FORMAT`]), `lamb.version` = `"1"` ([`VERSION`]);
//! - `lamb.meta`: a JSON object, `{"step", "max_grad_norm", "schedule", "params",
//!   "groups", "layers"}`: the exact step counter (u64, at most 2^53), clipping (`null` =
//!   off), the schedule (`{"kind": "constant" | "warmup_poly" | "warmup_cosine", ...}`), whether
//!   `param.*` tensors are present, each group's `name`, `lr_scale`, every [`LambConfig`]
//!   field under `config` (enums as snake_case strings), and `params` (its layer indices,
//!   as PyTorch's `param_groups[g]["params"]`) and `precision` ([`Precision`]: `moments`,
//!   `compact_min_len`, `master`, `rounding`), and each layer's `name`, `len`, `group`, the
//!   dtype of each moment (`{"dtype": "f32"}`) and whether it has a `master`. Floats are
//!   JSON numbers written shortest-round-trip (exact); infinities are the strings `"inf"`
//!   / `"-inf"`;
//! - `lamb.checksum` = `"xxh64:"` + 16 lowercase hex digits: XXH64 (seed 0) of **every byte
//!   of the file**, the header length, the JSON header with its padding and all tensor
//!   bytes, computed with those 16 digits replaced by ASCII `'0'`. So a change anywhere,
//!   metadata included, is caught; a reader finds the digits as the string value after the
//!   only occurrence of `"lamb.checksum"` in the header.
//!
//! # What loading checks
//!
//! Before changing anything: that the path is a regular file (symbolic links are
//! followed; a directory, FIFO, device or socket is an [`Error::Io`] saying what it is,
//! found before the file is opened, so a FIFO with no writer cannot block the load and
//! `/dev/zero` is not read; the open itself does not block either), its size against what
//! this optimizer could need (before reading it; the read stops at the size the file had
//! when opened, and a file that grew meanwhile is refused), the safetensors structure
//! (header length against the file size before any allocation from it, offsets, sizes),
//! format name, version, checksum, that the metadata has exactly the known keys and
//! fields, the layer count, each layer's name, length, group and moment dtype, the group
//! count, names and precision, every tensor's presence, dtype and shape and that there is
//! no other, the step tensors against the step, that the step is at most [`MAX_STEP`],
//! every configuration, `lr_scale`, `max_grad_norm` and the schedule by the rules the
//! setters apply ([`crate::domain`]: `lr × lr_scale` finite in f32, `max_grad_norm` at
//! least `f32::MIN_POSITIVE`, ...), that every moment is finite (v ≥ 0; 8-bit scales
//! finite and ≥ 0, codes within the encoder's range), and that the moments can take the
//! next step (the domain's moment rule: a state from which every step would be skipped is
//! refused). Any failure is an [`Error::Checkpoint`] that says what differs, e.g.
//! `layer 'encoder.3.ffn.w1': checkpoint has 2359296 elements, model has 2359297`, and the
//! optimizer is unchanged; otherwise the load replaces the
//! moments and master copies, the step counter, every group's configuration and `lr_scale`,
//! `max_grad_norm` and the schedule (as PyTorch's `load_state_dict` replaces
//! hyperparameters; change them after loading if you want others), clears the last-step
//! reports and the poisoning of a panicked step. Threads and backend are not state: a
//! checkpoint loads with any, with the same results.
//!
//! Memory: saving builds the file in memory before writing it, loading reads it whole
//! before checking it; either needs one file's worth (8 bytes per parameter with f32
//! moments, 12 with the parameters) on top of the optimizer.
//!
//! Half-precision models: the parameters `save_with_params` takes are f32. A bf16/f16
//! model saves its own weights; with master copies (the default) the optimizer's
//! checkpoint holds the f32 masters, which is what the next step reads.
//!
//! # Never losing one
//!
//! [`Lamb::save`] writes through [`write_atomic`]: a temporary file in the same directory
//! (unnamed on Linux until it is complete), `fsync`, rename over the target, `fsync` of
//! the directory. A crash at any point leaves the previous checkpoint or the new one,
//! complete (the crash test of `tests/checkpoint_crash.rs` kills a saving process
//! hundreds of times to show it), and the temporary files of killed saves do not pile up:
//! each save removes those of the same target whose writer is dead (they are locked while
//! their writer lives). Only a regular file is replaced: a directory, FIFO, device or
//! socket at the path is refused, saying what it is; a symbolic link is followed, and the
//! file it leads to is replaced (the link stays); a link to anything else, or to nothing,
//! is refused. See [`write_atomic`].
//!
//! # PyTorch and timm
//!
//! A PyTorch optimizer's `state_dict()` is
//! `{"state": {i: {"exp_avg": T, "exp_avg_sq": T, ...}}, "param_groups": [{"params": [i, ...], "lr": ..., ...}]}`
//! with `i` the parameter's index in the concatenation of the groups' `params`. Its
//! safetensors form, as `scripts/checkpoint/generate.py` writes it and
//! [`Lamb::load_torch_state`] reads it: each state tensor as `state.{i}.{key}`, and the
//! `param_groups` list as JSON in the metadata key `param_groups` (tensor values such as
//! timm's step as numbers). timm's `Lamb` (`timm/optim/lamb.py`) keeps `exp_avg` and
//! `exp_avg_sq` per parameter, f32 and of the parameter's shape, and the step per **group**
//! (`param_groups[g]["step"]`, a 0-d float32 tensor incremented by every `step()`), where
//! torch's Adam keeps `state[i]["step"]` per parameter. lamb has one step counter for the
//! whole model: it writes it into every layer's `state.{i}.step` (Adam's layout, all equal;
//! f32 like torch's, exact to 2^24 steps, the exact u64 being in `lamb.meta`), and reads a
//! PyTorch state's step from its `state.{i}.step` tensors or its groups' `step`, refusing
//! a file in which they differ.
//!
//! [`Lamb::load_torch_state`] maps PyTorch parameter `i` to a lamb layer by name where the
//! groups carry `param_names` (torch ≥ 2.6 optimizers built from `named_parameters()`),
//! else by position: the k-th parameter of `param_groups[g]` is the k-th layer of lamb
//! group `g`. The groups must correspond one to one. Each group's timm hyperparameters
//! replace the lamb group's: `lr` (`initial_lr` where a scheduler left one), `betas`,
//! `eps`, `weight_decay`, `bias_correction` (→ [`BiasCorrection::F64`] or `Off`),
//! `grad_averaging`, `trust_clip` (→ `ratio_max = 1`), `always_adapt` (→
//! [`Adaptation::Always`], else `WhenDecayed`), and `max_grad_norm` the clipping; the
//! other [`LambConfig`] fields, `lr_scale` and the schedule stay. States lamb cannot
//! continue are refused: `caution`, `amsgrad` or `maximize` on, `decoupled_decay` with
//! weight decay, a moment other than `exp_avg` / `exp_avg_sq`, or moments not in f32. A
//! parameter without state (never stepped) loads zero moments. The moment tensors may have
//! the parameter's shape (any shape with the layer's element count).
//!
//! The other way, a lamb file is read in Python with `safetensors.safe_open` (or
//! `safetensors.torch.load_file`) and `json.loads(metadata["lamb.meta"])`; for a timm
//! `Lamb`, put `state.{i}.exp_avg` / `exp_avg_sq`, reshaped to the parameter's shape, under
//! the index of the parameter named `layers[i]["name"]`, and the step into every group's
//! `step` (`scripts/checkpoint/generate.py`, `lamb_to_timm_state_dict`, does this and
//! checks that timm then continues exactly as it would have).
//!
//! Not done: a `no_std` encoder/decoder in lamb-core into caller-provided buffers.
//!
//! [safetensors]: https://github.com/huggingface/safetensors
//! [`LayerId`]: crate::LayerId
//! [`BiasCorrection::F64`]: lamb_core::BiasCorrection::F64
//! [`Adaptation::Always`]: lamb_core::Adaptation::Always
//! [`Precision`]: crate::Precision
//! [`MAX_STEP`]: crate::MAX_STEP

mod atomic;
mod file;
mod meta;
mod torch;
mod xxh64;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::Path;

use lamb_core::codec::{QBLOCK, q8_m_encode, q8_v_encode};
use lamb_core::half::bf16;
use lamb_core::layer::Moments as CoreMoments;
use lamb_core::{Buffer, LambConfig, LambError, Schedule};
use safetensors::{Dtype, SafeTensors, View};

use crate::buffer::AlignedBuf;
use crate::domain::{NextStep, Unsteppable};
use crate::error::Error;
use crate::optimizer::{GroupId, Lamb, LayerId, StateView};
use meta::{ConfigMeta, F64, GroupMeta, LayerMeta, Meta, MomentMeta, PrecisionMeta, ScheduleMeta};
use xxh64::Xxh64;

pub use atomic::write_atomic;
use file::read_bounded;

/// The value of the `lamb.format` metadata key.
pub const FORMAT: &str = "lamb-checkpoint";
/// The format version this library writes and reads (`lamb.version`).
pub const VERSION: u32 = 1;

const KEY_FORMAT: &str = "lamb.format";
const KEY_VERSION: &str = "lamb.version";
const KEY_META: &str = "lamb.meta";
const KEY_CHECKSUM: &str = "lamb.checksum";
const CHECKSUM_PREFIX: &str = "xxh64:";
const CHECKSUM_PLACEHOLDER: &[u8; 16] = b"0000000000000000";
/// Moment dtypes (`layers[i].exp_avg.dtype` in `lamb.meta`).
const DTYPE_F32: &str = "f32";
const DTYPE_BF16: &str = "bf16";
/// lamb-core's 8-bit first-moment code (sign + E4M3 of `|m| / absmax`, bias 15).
const DTYPE_Q8_M: &str = "q8_e4m3";
/// lamb-core's 8-bit second-moment code (E5M3 of `v / absmax`, bias 31).
const DTYPE_Q8_V: &str = "q8_e5m3";
/// The safetensors crate's own limit on the JSON header.
const MAX_HEADER: u64 = 100_000_000;

/// A checkpoint error without a path yet.
type Refusal = String;

fn refused(path: Option<&Path>, what: Refusal) -> Error {
    Error::Checkpoint {
        path: path.map(Path::to_path_buf),
        what,
    }
}

// ---------------------------------------------------------------------------------------
// The public API.

impl Lamb {
    /// Saves the optimizer state to `path` atomically (see the [module docs](self)): the
    /// file at `path` is either the previous one or this one, whatever happens.
    ///
    /// Refused: a poisoned optimizer ([`Error::Poisoned`]; its state is inconsistent), a
    /// group whose configuration does not validate (it could not be loaded back), and a
    /// path that holds anything but a regular file or a symbolic link to one (see
    /// [`write_atomic`]).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        write_atomic(path, &self.to_checkpoint_bytes()?)
    }

    /// [`Lamb::save`] with the model's parameters (`params[i]` is layer `i`'s) in the same
    /// file, as `param.{name}` tensors.
    pub fn save_with_params(&self, path: impl AsRef<Path>, params: &[&[f32]]) -> Result<(), Error> {
        write_atomic(path, &self.to_checkpoint_bytes_with_params(params)?)
    }

    /// The bytes [`Lamb::save`] writes.
    pub fn to_checkpoint_bytes(&self) -> Result<Vec<u8>, Error> {
        encode(self, None)
    }

    /// The bytes [`Lamb::save_with_params`] writes.
    pub fn to_checkpoint_bytes_with_params(&self, params: &[&[f32]]) -> Result<Vec<u8>, Error> {
        encode(self, Some(params))
    }

    /// Loads a checkpoint written by [`Lamb::save`] (or `save_with_params`; the
    /// parameters are then ignored) into this optimizer, whose layers must be registered as
    /// they were: same count, names, lengths and groups. Either everything loads or
    /// nothing changes; see the [module docs](self) for what is checked and replaced.
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<(), Error> {
        let path = path.as_ref();
        let bytes = read_bounded(self, path)?;
        self.load_impl(&bytes, None)
            .map_err(|what| refused(Some(path), what))
    }

    /// [`Lamb::load`] of a file written by [`Lamb::save_with_params`], also restoring the
    /// parameters into `params` (`params[i]` is layer `i`'s); a file without parameters is
    /// refused. Either everything loads, `params` included, or nothing changes.
    pub fn load_with_params(
        &mut self,
        path: impl AsRef<Path>,
        params: &mut [&mut [f32]],
    ) -> Result<(), Error> {
        let path = path.as_ref();
        self.check_params(params.iter().map(|p| p.len()))?;
        let bytes = read_bounded(self, path)?;
        self.load_impl(&bytes, Some(params))
            .map_err(|what| refused(Some(path), what))
    }

    /// [`Lamb::load`] from the bytes of a checkpoint. Never panics, whatever the bytes,
    /// and allocates at most in proportion to `bytes.len()`.
    pub fn load_checkpoint_bytes(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.load_impl(bytes, None)
            .map_err(|what| refused(None, what))
    }

    /// [`Lamb::load_with_params`] from the bytes of a checkpoint.
    pub fn load_checkpoint_bytes_with_params(
        &mut self,
        bytes: &[u8],
        params: &mut [&mut [f32]],
    ) -> Result<(), Error> {
        self.check_params(params.iter().map(|p| p.len()))?;
        self.load_impl(bytes, Some(params))
            .map_err(|what| refused(None, what))
    }

    /// Loads a PyTorch optimizer state (timm `Lamb`'s, or any with `exp_avg` and
    /// `exp_avg_sq` per parameter) saved as safetensors: `state.{i}.{key}` tensors and the
    /// `param_groups` JSON in the metadata. See the [module docs](self#pytorch-and-timm)
    /// for the mapping. Either everything loads or nothing changes.
    pub fn load_torch_state(&mut self, path: impl AsRef<Path>) -> Result<(), Error> {
        let path = path.as_ref();
        let bytes = read_bounded(self, path)?;
        torch::load(self, &bytes).map_err(|what| refused(Some(path), what))
    }

    /// [`Lamb::load_torch_state`] from the bytes of the file.
    pub fn load_torch_state_bytes(&mut self, bytes: &[u8]) -> Result<(), Error> {
        torch::load(self, bytes).map_err(|what| refused(None, what))
    }

    fn check_params(&self, lens: impl ExactSizeIterator<Item = usize>) -> Result<(), Error> {
        if lens.len() != self.layer_count() {
            return Err(refused(
                None,
                format!(
                    "got {} parameter tensors, the optimizer has {} layers",
                    lens.len(),
                    self.layer_count()
                ),
            ));
        }
        for (i, len) in lens.enumerate() {
            let layer = self.layer(LayerId(i));
            if len != layer.len {
                return Err(Error::Layer {
                    index: i,
                    name: layer.name.to_string(),
                    source: LambError::LengthMismatch {
                        layer: i,
                        buffer: Buffer::Param,
                        expected: layer.len,
                        found: len,
                    },
                });
            }
        }
        Ok(())
    }

    fn load_impl(
        &mut self,
        bytes: &[u8],
        params: Option<&mut [&mut [f32]]>,
    ) -> Result<(), Refusal> {
        let d = decode(self, bytes, params.is_some())?;
        // The master copies are the only state a load allocates: allocate them all before
        // changing anything, so that running out of memory is a refusal, not an abort.
        let mut masters = Vec::with_capacity(d.layers.len());
        for (i, layer) in d.layers.iter().enumerate() {
            masters.push(match layer.master {
                None => None,
                Some(src) => {
                    let mut b = AlignedBuf::try_zeroed(src.len() / 4).map_err(|e| {
                        Error::OutOfMemory {
                            name: self.layer(LayerId(i)).name.to_string(),
                            what: "master copy",
                            bytes: e.bytes().unwrap_or(usize::MAX),
                        }
                        .to_string()
                    })?;
                    copy_f32(&mut b, src);
                    Some(b)
                }
            });
        }
        // Everything is checked and allocated: from here nothing can fail.
        for (i, (layer, new_master)) in d.layers.iter().zip(masters).enumerate() {
            let (moments, master) = self.state_mut(i);
            copy_moments(moments, &layer.moments);
            *master = new_master;
        }
        if let Some(params) = params {
            for (dst, src) in params.iter_mut().zip(&d.params) {
                copy_f32(dst, src);
            }
        }
        self.restore_scalars(d.step, &d.groups, d.max_grad_norm, d.schedule);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// safetensors, read defensively.

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
fn split_header(bytes: &[u8]) -> Result<(&[u8], u64), Refusal> {
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

fn copy_f32(dst: &mut [f32], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(f32s(src)) {
        *d = s;
    }
}

/// The bf16 values of little-endian bytes.
fn bf16s(bytes: &[u8]) -> impl Iterator<Item = bf16> + '_ {
    bytes
        .as_chunks::<2>()
        .0
        .iter()
        .map(|c| bf16::from_bits(u16::from_le_bytes(*c)))
}

/// Copies checked moments into the optimizer's (of the same kind, as `decode` checked).
fn copy_moments(dst: CoreMoments<'_>, src: &MomentsIn<'_>) {
    match (dst, src) {
        (CoreMoments::F32 { m, v }, MomentsIn::F32 { m: sm, v: sv }) => {
            copy_f32(m, sm);
            copy_f32(v, sv);
        }
        (CoreMoments::Bf16 { m, v, .. }, MomentsIn::Bf16 { m: sm, v: sv }) => {
            for (d, s) in m
                .iter_mut()
                .zip(bf16s(sm))
                .chain(v.iter_mut().zip(bf16s(sv)))
            {
                *d = s;
            }
        }
        (
            CoreMoments::Q8 {
                m,
                v,
                m_absmax,
                v_absmax,
            },
            MomentsIn::Q8 {
                m: sm,
                v: sv,
                m_absmax: sma,
                v_absmax: sva,
            },
        ) => {
            for (d, s) in m.iter_mut().zip(*sm).chain(v.iter_mut().zip(*sv)) {
                *d = *s;
            }
            copy_f32(m_absmax, sma);
            copy_f32(v_absmax, sva);
        }
        // `decode` matched every layer's kind to the optimizer's.
        _ => debug_assert!(false, "moment kinds differ after decode"),
    }
}

/// Checks that moment values are finite (and, for v, >= 0), naming the first bad element.
pub(crate) fn check_values(
    layer: &str,
    which: &str,
    values: impl Iterator<Item = f32>,
) -> Result<(), Refusal> {
    let sq = which.starts_with("exp_avg_sq");
    for (k, x) in values.enumerate() {
        if !x.is_finite() || (sq && x < 0.0) {
            return Err(format!(
                "layer '{layer}': {which}[{k}] = {x:?}: must be finite{}",
                if sq { " and >= 0" } else { "" }
            ));
        }
    }
    Ok(())
}

/// Checks f32 moment bytes.
pub(crate) fn check_moment(layer: &str, which: &str, data: &[u8]) -> Result<(), Refusal> {
    check_values(layer, which, f32s(data))
}

/// Validates a group's configuration and lr multiplier as the optimizer's setters do.
pub(crate) fn check_group(name: &str, config: &LambConfig, lr_scale: f64) -> Result<(), Refusal> {
    crate::domain::validate_group(name, config, lr_scale).map_err(|e| e.to_string())
}

/// Validates a clipping threshold as [`Lamb::set_max_grad_norm`] does.
pub(crate) fn check_max_grad_norm(x: Option<f64>) -> Result<(), Refusal> {
    crate::domain::validate_max_grad_norm(x).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------
// Writing.

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

/// The dtype names of a layer's stored moments (m, v) and their 8-bit block size.
fn moment_kind(state: &StateView<'_>) -> (&'static str, &'static str, Option<u64>) {
    match state {
        StateView::F32 { .. } => (DTYPE_F32, DTYPE_F32, None),
        StateView::Bf16 { .. } => (DTYPE_BF16, DTYPE_BF16, None),
        StateView::Q8 { .. } => (DTYPE_Q8_M, DTYPE_Q8_V, Some(QBLOCK as u64)),
    }
}

fn encode(lamb: &Lamb, params: Option<&[&[f32]]>) -> Result<Vec<u8>, Error> {
    if lamb.is_poisoned() {
        return Err(Error::Poisoned);
    }
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
    if let Some(p) = params {
        lamb.check_params(p.iter().map(|p| p.len()))?;
    }
    let step = lamb.steps();
    let step_bytes = (step as f32).to_le_bytes();
    let mut layers = Vec::with_capacity(lamb.layer_count());
    let mut tensors: Vec<(String, Out<'_>)> = Vec::with_capacity(5 * lamb.layer_count());
    for i in 0..lamb.layer_count() {
        let l = lamb.layer(LayerId(i));
        groups[l.group.0].params.push(i as u64);
        let (dm, dv, block) = moment_kind(&l.state);
        layers.push(LayerMeta {
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
        });
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
    let internal = |what: String| refused(None, format!("could not encode: {what}"));
    let meta_json = serde_json::to_string(&meta).map_err(|e| internal(e.to_string()))?;
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

/// Where, in the header, the 16 hex digits of the checksum are: after the only
/// `"lamb.checksum"`, optional JSON whitespace, `:`, whitespace, `"xxh64:`.
fn checksum_digits_at(header: &[u8]) -> Result<usize, Refusal> {
    // (std's substring search: fast even in unoptimised test builds.)
    let text = std::str::from_utf8(header).map_err(|e| format!("the header is not UTF-8: {e}"))?;
    let key = format!("\"{KEY_CHECKSUM}\"");
    let mut hits = text.match_indices(&key).map(|(i, _)| i);
    let (Some(at), None) = (hits.next(), hits.next()) else {
        return Err(format!(
            "the header must hold \"{KEY_CHECKSUM}\" exactly once"
        ));
    };
    let key = key.as_bytes();
    let ws = |mut i: usize| {
        while header.get(i).is_some_and(|b| b" \t\r\n".contains(b)) {
            i += 1;
        }
        i
    };
    let mut i = ws(at + key.len());
    let malformed = || format!("the {KEY_CHECKSUM} entry is malformed");
    if header.get(i) != Some(&b':') {
        return Err(malformed());
    }
    i = ws(i + 1);
    let quoted = format!("\"{CHECKSUM_PREFIX}");
    if header.get(i..i + quoted.len()) != Some(quoted.as_bytes()) {
        return Err(malformed());
    }
    i += quoted.len();
    if header.get(i + 16) != Some(&b'"') {
        return Err(malformed());
    }
    Ok(i)
}

// ---------------------------------------------------------------------------------------
// Reading a lamb checkpoint.

/// A layer's checked moments: little-endian bytes of the stored kind.
enum MomentsIn<'a> {
    F32 {
        m: &'a [u8],
        v: &'a [u8],
    },
    Bf16 {
        m: &'a [u8],
        v: &'a [u8],
    },
    Q8 {
        m: &'a [u8],
        v: &'a [u8],
        m_absmax: &'a [u8],
        v_absmax: &'a [u8],
    },
}

/// A layer's checked state.
struct LayerIn<'a> {
    moments: MomentsIn<'a>,
    /// The f32 master copy, if the file has one.
    master: Option<&'a [u8]>,
}

/// A checked checkpoint, ready to copy in.
struct Decoded<'a> {
    step: u64,
    groups: Vec<(LambConfig, f64)>,
    max_grad_norm: Option<f64>,
    schedule: Schedule,
    layers: Vec<LayerIn<'a>>,
    /// Per layer, when asked for: the parameters.
    params: Vec<&'a [u8]>,
}

/// Checks the checksum where the raw header has one (before anything parses the header):
/// `Ok(Some(digits))` if it matches, `Ok(None)` if the header has no well-formed
/// `lamb.checksum` entry (then the metadata checks say what the file is).
fn verify_checksum(bytes: &[u8]) -> Result<Option<String>, Refusal> {
    let (header, _) = split_header(bytes)?;
    let Ok(at) = checksum_digits_at(header) else {
        return Ok(None);
    };
    let at = 8 + at;
    let digits = &bytes[at..at + 16];
    let mut h = Xxh64::new();
    h.update(&bytes[..at]);
    h.update(CHECKSUM_PLACEHOLDER);
    h.update(&bytes[at + 16..]);
    let computed = format!("{:016x}", h.digest());
    if digits != computed.as_bytes() {
        return Err(format!(
            "checksum mismatch: the file records {CHECKSUM_PREFIX}{}, its contents hash to \
             {CHECKSUM_PREFIX}{computed}; the file is corrupted",
            String::from_utf8_lossy(digits)
        ));
    }
    Ok(Some(computed))
}

/// The tensor `name`, which must have `dtype` and `shape`; notes it in `seen`.
fn tensor_of<'a>(
    f: &Parsed<'a>,
    seen: &mut HashSet<String>,
    name: &str,
    layer: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<&'a [u8], Refusal> {
    let t = f
        .tensors
        .get(name)
        .ok_or_else(|| format!("missing tensor '{name}' (layer '{layer}')"))?;
    if t.dtype != dtype {
        return Err(format!(
            "tensor '{name}' (layer '{layer}'): dtype {:?}, expected {dtype:?}",
            t.dtype
        ));
    }
    if t.shape != shape {
        return Err(format!(
            "tensor '{name}' (layer '{layer}'): shape {:?}, expected {shape:?}",
            t.shape
        ));
    }
    seen.insert(name.to_string());
    Ok(t.data)
}

/// Checks 8-bit moments: scales finite and >= 0, codes no larger than the code of 1 (the
/// largest the encoder makes, `|x| <= absmax`).
fn check_q8(
    layer: &str,
    which: &str,
    codes: &[u8],
    absmax: &[u8],
    signed: bool,
) -> Result<(), Refusal> {
    check_values(
        layer,
        &format!("{which}.absmax"),
        f32s(absmax).map(|x| if x < 0.0 { f32::NAN } else { x }),
    )
    .map_err(|e| e.replace("must be finite", "must be finite and >= 0"))?;
    let (max, mask) = if signed {
        (q8_m_encode(1.0, 1.0), 0x7f)
    } else {
        (q8_v_encode(1.0, 1.0), 0xff)
    };
    if let Some(k) = codes.iter().position(|&c| c & mask > max) {
        return Err(format!(
            "layer '{layer}': {which}[{k}] has the 8-bit code {:#04x}, beyond the largest \
             the encoder makes ({max:#04x})",
            codes[k]
        ));
    }
    Ok(())
}

fn decode<'a>(lamb: &Lamb, bytes: &'a [u8], want_params: bool) -> Result<Decoded<'a>, Refusal> {
    // Integrity first: a corrupted file is refused before its header is parsed.
    let checksum = verify_checksum(bytes)?;
    let f = parse(bytes)?;
    let md = &f.metadata;
    match md.get(KEY_FORMAT) {
        Some(v) if v == FORMAT => {}
        Some(v) => {
            return Err(format!(
                "not a lamb checkpoint: '{KEY_FORMAT}' is {v:?}, expected {FORMAT:?}"
            ));
        }
        None if md.contains_key("param_groups") => {
            return Err(format!(
                "not a lamb checkpoint but a PyTorch optimizer state (it has 'param_groups' \
                 and no '{KEY_FORMAT}'): load it with Lamb::load_torch_state"
            ));
        }
        None => {
            return Err(format!(
                "not a lamb checkpoint: no '{KEY_FORMAT}' in the safetensors metadata"
            ));
        }
    }
    match md.get(KEY_VERSION) {
        Some(v) if *v == VERSION.to_string() => {}
        Some(v) => {
            return Err(format!(
                "format version {v:?}; this lamb reads version {VERSION}"
            ));
        }
        None => return Err(format!("no '{KEY_VERSION}' in the metadata")),
    }
    let stored = md.get(KEY_CHECKSUM);
    match (stored, checksum) {
        (None, _) => return Err(format!("no '{KEY_CHECKSUM}' in the metadata")),
        (Some(v), Some(c)) if *v == format!("{CHECKSUM_PREFIX}{c}") => {}
        (Some(v), _) => {
            return Err(format!(
                "the '{KEY_CHECKSUM}' value {v:?} is not written as lamb writes it"
            ));
        }
    }
    if let Some(k) = md
        .keys()
        .filter(|k| ![KEY_FORMAT, KEY_VERSION, KEY_META, KEY_CHECKSUM].contains(&k.as_str()))
        .min()
    {
        return Err(format!("unexpected metadata key '{k}'"));
    }
    let meta_json = md
        .get(KEY_META)
        .ok_or_else(|| format!("no '{KEY_META}' in the metadata"))?;
    let meta: Meta =
        serde_json::from_str(meta_json).map_err(|e| format!("bad '{KEY_META}': {e}"))?;

    // The model.
    if meta.layers.len() != lamb.layer_count() {
        return Err(format!(
            "checkpoint has {} layers, the optimizer has {}",
            meta.layers.len(),
            lamb.layer_count()
        ));
    }
    if meta.groups.len() != lamb.group_count() {
        return Err(format!(
            "checkpoint has {} parameter groups, the optimizer has {}",
            meta.groups.len(),
            lamb.group_count()
        ));
    }
    for (g, gm) in meta.groups.iter().enumerate() {
        let ours = lamb.group(GroupId(g)).map_err(|e| e.to_string())?;
        if gm.name != ours.name {
            return Err(format!(
                "parameter group #{g}: checkpoint has '{}', the optimizer has '{}'",
                gm.name, ours.name
            ));
        }
        if gm.precision.to_precision() != Some(ours.precision) {
            return Err(format!(
                "group '{}': checkpoint has precision {:?}, the optimizer {:?}",
                gm.name, gm.precision, ours.precision
            ));
        }
    }
    let group_name = |g: usize| {
        lamb.group(GroupId(g))
            .map(|g| g.name.clone())
            .unwrap_or_default()
    };
    let mut members: Vec<Vec<u64>> = vec![Vec::new(); lamb.group_count()];
    for (i, lm) in meta.layers.iter().enumerate() {
        let l = lamb.layer(LayerId(i));
        if lm.name != l.name {
            return Err(format!(
                "layer #{i}: checkpoint has '{}', the optimizer has '{}'",
                lm.name, l.name
            ));
        }
        if lm.len != l.len as u64 {
            return Err(format!(
                "layer '{}': checkpoint has {} elements, model has {}",
                l.name, lm.len, l.len
            ));
        }
        if lm.group != l.group.0 as u64 {
            let theirs = usize::try_from(lm.group)
                .ok()
                .and_then(|g| meta.groups.get(g))
                .map_or_else(|| format!("#{}", lm.group), |g| format!("'{}'", g.name));
            return Err(format!(
                "layer '{}': checkpoint puts it in group {theirs}, the optimizer in group '{}'",
                l.name,
                group_name(l.group.0)
            ));
        }
        members[l.group.0].push(i as u64);
        let (om, ov, oblock) = moment_kind(&l.state);
        for (which, m, ours) in [
            ("exp_avg", &lm.exp_avg, om),
            ("exp_avg_sq", &lm.exp_avg_sq, ov),
        ] {
            if ![DTYPE_F32, DTYPE_BF16, DTYPE_Q8_M, DTYPE_Q8_V].contains(&m.dtype.as_str()) {
                return Err(format!(
                    "layer '{}': {which} is stored as {:?}, which this version of lamb cannot \
                     read",
                    l.name, m.dtype
                ));
            }
            if m.dtype != ours || m.block != oblock {
                return Err(format!(
                    "layer '{}': checkpoint stores {which} as {:?}{}, the optimizer as {ours:?}{}",
                    l.name,
                    m.dtype,
                    m.block
                        .map_or(String::new(), |b| format!(" in blocks of {b}")),
                    oblock.map_or(String::new(), |b| format!(" in blocks of {b}")),
                ));
            }
        }
        let keeps_master = lamb.group(l.group).is_ok_and(|g| g.precision.master);
        if lm.master && !keeps_master {
            return Err(format!(
                "layer '{}': the checkpoint has a master copy, but its group keeps none",
                l.name
            ));
        }
    }
    for (gm, want) in meta.groups.iter().zip(&members) {
        if gm.params != *want {
            return Err(format!(
                "parameter group '{}': its 'params' {:?} are not the layers that name it {:?}",
                gm.name, gm.params, want
            ));
        }
    }
    if want_params && !meta.params {
        return Err(
            "the checkpoint holds no parameters (it was written by save, not save_with_params)"
                .into(),
        );
    }

    // The scalars.
    crate::domain::check_step(meta.step)?;
    let mut groups = Vec::with_capacity(meta.groups.len());
    for gm in &meta.groups {
        let config = LambConfig::from(&gm.config);
        check_group(&gm.name, &config, gm.lr_scale.0)?;
        groups.push((config, gm.lr_scale.0));
    }
    let max_grad_norm = meta.max_grad_norm.map(|x| x.0);
    check_max_grad_norm(max_grad_norm)?;
    let schedule = Schedule::from(&meta.schedule);
    schedule.validate().map_err(|e| format!("schedule: {e}"))?;
    // The moments must be able to take the next step under the loaded configuration.
    let rules: Vec<Option<NextStep>> = groups
        .iter()
        .map(|(c, _)| {
            let t = crate::domain::next_step(meta.step).ok()?;
            NextStep::new(c, t)
        })
        .collect();

    // The tensors.
    let step_bits = (meta.step as f32).to_bits();
    let mut seen = HashSet::with_capacity(f.tensors.len());
    let mut layers = Vec::with_capacity(meta.layers.len());
    let mut params = Vec::new();
    for (i, lm) in meta.layers.iter().enumerate() {
        let ours = lamb.layer(LayerId(i));
        let (len, lname) = (ours.len, &lm.name);
        let mut get = |key: &str, dtype, shape: &[usize]| {
            tensor_of(
                &f,
                &mut seen,
                &format!("state.{i}.{key}"),
                lname,
                dtype,
                shape,
            )
        };
        let rule = rules[ours.group.0].as_ref();
        let steppable = |r: Result<(), Unsteppable>| r.map_err(|e| format!("layer '{lname}': {e}"));
        let moments = match ours.state {
            StateView::F32 { .. } => {
                let m = get("exp_avg", Dtype::F32, &[len])?;
                let v = get("exp_avg_sq", Dtype::F32, &[len])?;
                check_values(lname, "exp_avg", f32s(m))?;
                check_values(lname, "exp_avg_sq", f32s(v))?;
                if let Some(r) = rule {
                    steppable(r.check_m(f32s(m)).and_then(|()| r.check_v(f32s(v))))?;
                }
                MomentsIn::F32 { m, v }
            }
            StateView::Bf16 { .. } => {
                let m = get("exp_avg", Dtype::BF16, &[len])?;
                let v = get("exp_avg_sq", Dtype::BF16, &[len])?;
                let (mf, vf) = (|| bf16s(m).map(bf16::to_f32), || bf16s(v).map(bf16::to_f32));
                check_values(lname, "exp_avg", mf())?;
                check_values(lname, "exp_avg_sq", vf())?;
                if let Some(r) = rule {
                    steppable(r.check_m(mf()).and_then(|()| r.check_v(vf())))?;
                }
                MomentsIn::Bf16 { m, v }
            }
            StateView::Q8 { .. } => {
                let blocks = [len.div_ceil(QBLOCK)];
                let m = get("exp_avg", Dtype::U8, &[len])?;
                let m_absmax = get("exp_avg.absmax", Dtype::F32, &blocks)?;
                let v = get("exp_avg_sq", Dtype::U8, &[len])?;
                let v_absmax = get("exp_avg_sq.absmax", Dtype::F32, &blocks)?;
                check_q8(lname, "exp_avg", m, m_absmax, true)?;
                check_q8(lname, "exp_avg_sq", v, v_absmax, false)?;
                if let Some(r) = rule {
                    let (ma, va): (Vec<f32>, Vec<f32>) =
                        (f32s(m_absmax).collect(), f32s(v_absmax).collect());
                    steppable(r.check_q8(m, v, &ma, &va))?;
                }
                MomentsIn::Q8 {
                    m,
                    v,
                    m_absmax,
                    v_absmax,
                }
            }
        };
        let s = get("step", Dtype::F32, &[])?;
        if let Some(x) = f32s(s).next()
            && x.to_bits() != step_bits
        {
            return Err(format!(
                "tensor 'state.{i}.step' is {x:?}, but the checkpoint's step is {}",
                meta.step
            ));
        }
        let master = if lm.master {
            let bytes = get("master", Dtype::F32, &[len])?;
            // Like the moments, the master copy is state the next step reads: a NaN in it
            // would skip every step until reset().
            if let Some(k) = bytes
                .chunks_exact(4)
                .position(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite())
            {
                return Err(format!(
                    "layer '{lname}': the master copy has a non-finite value at element {k}"
                ));
            }
            Some(bytes)
        } else {
            None
        };
        if meta.params {
            let name = format!("param.{lname}");
            let p = tensor_of(&f, &mut seen, &name, lname, Dtype::F32, &[len])?;
            if want_params {
                params.push(p);
            }
        }
        layers.push(LayerIn { moments, master });
    }
    if let Some(extra) = f.tensors.keys().filter(|k| !seen.contains(*k)).min() {
        return Err(format!(
            "unexpected tensor '{extra}' (the metadata announces no such tensor)"
        ));
    }
    Ok(Decoded {
        step: meta.step,
        groups,
        max_grad_norm,
        schedule,
        layers,
        params,
    })
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

    fn do_step(opt: &mut Lamb, p: &mut [Vec<f32>]) -> Result<crate::StepReport, Error> {
        let g: Vec<Vec<f32>> = p.iter().map(|x| vec![0.01; x.len()]).collect();
        let mut pp: Vec<&mut [f32]> = p.iter_mut().map(|x| x.as_mut_slice()).collect();
        let gg: Vec<&[f32]> = g.iter().map(|x| x.as_slice()).collect();
        opt.step(&mut pp, &gg)
    }

    /// A poisoned optimizer (a worker panicked mid-apply) is not saved, and loading a
    /// checkpoint (with its parameters) is a way back.
    #[test]
    fn a_poisoned_optimizer_is_not_saved_and_a_load_recovers_it() {
        let mut opt = Lamb::new(LambConfig::paper());
        opt.add_layer("a", 3000).unwrap();
        opt.add_layer("b", 10).unwrap();
        let mut p = vec![vec![0.5f32; 3000], vec![0.1f32; 10]];
        do_step(&mut opt, &mut p).unwrap();
        let pr: Vec<&[f32]> = p.iter().map(|x| x.as_slice()).collect();
        let good = opt.to_checkpoint_bytes_with_params(&pr).unwrap();
        let saved_params = p.clone();

        opt.panic_in = Some(("apply", 0));
        let e = do_step(&mut opt, &mut p).unwrap_err();
        assert!(
            matches!(e, Error::WorkerPanicked { phase: "apply", .. }),
            "{e}"
        );
        opt.panic_in = None;
        assert_eq!(opt.to_checkpoint_bytes().unwrap_err(), Error::Poisoned);
        assert_eq!(do_step(&mut opt, &mut p).unwrap_err(), Error::Poisoned);

        let mut pm: Vec<&mut [f32]> = p.iter_mut().map(|x| x.as_mut_slice()).collect();
        opt.load_checkpoint_bytes_with_params(&good, &mut pm)
            .unwrap();
        assert_eq!(p, saved_params);
        assert_eq!(opt.steps(), 1);
        assert!(do_step(&mut opt, &mut p).unwrap().applied);
    }
}
