//! Checkpoints: save and resume exactly, interoperate with PyTorch, never lose one.
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
//! let mut opt = Lamb::with_decay_split(LambConfig::timm())?;
//! opt.add_param("fc.weight", &[4, 3])?;
//! opt.add_param("fc.bias", &[4])?;
//! let (mut w, mut b) = (vec![0.5f32; 12], vec![0.0f32; 4]);
//! opt.step(&mut [&mut w, &mut b], &[&[0.1; 12], &[0.2; 4]])?;
//!
//! let bytes = opt.to_checkpoint_bytes()?; // Lamb::save(path) writes these atomically
//!
//! let mut resumed = Lamb::with_decay_split(LambConfig::timm())?;
//! resumed.add_param("fc.weight", &[4, 3])?;
//! resumed.add_param("fc.bias", &[4])?;
//! resumed.load_checkpoint_bytes(&bytes)?;
//! assert_eq!(resumed.steps(), 1);
//!
//! // Another model is refused, and the optimizer is left as it was.
//! let mut other = Lamb::new(LambConfig::timm())?;
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

mod assemble;
mod atomic;
mod container;
mod decode;
mod encode;
mod file;
mod meta;
mod torch;
mod xxh64;

use std::path::Path;

use crate::error::Error;
use crate::optimizer::Lamb;
use container::refused;
use file::read_bounded;

pub use atomic::write_atomic;
pub use meta::{FORMAT, VERSION};

// ---------------------------------------------------------------------------------------
// The public API.

impl Lamb {
    /// Saves the optimizer state to `path` atomically (see the [module docs](self)): the
    /// file at `path` is either the previous one or this one, whatever happens.
    ///
    /// Refused: a poisoned optimizer ([`Error::Poisoned`]; its state is inconsistent), a
    /// custom learning-rate schedule ([`Lamb::set_lr_schedule`]: a closure is not data), a
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
        self.check_schedule_saveable()?;
        encode::encode(self, None)
    }

    /// The bytes [`Lamb::save_with_params`] writes.
    pub fn to_checkpoint_bytes_with_params(&self, params: &[&[f32]]) -> Result<Vec<u8>, Error> {
        self.check_schedule_saveable()?;
        encode::encode(self, Some(params))
    }

    /// A custom schedule is code, not data: a checkpoint cannot hold it, and one that
    /// recorded a built-in schedule instead would resume on the wrong rate.
    fn check_schedule_saveable(&self) -> Result<(), Error> {
        if self.has_custom_schedule() {
            return Err(Error::Checkpoint {
                path: None,
                what: "not saved: the learning-rate schedule is a closure (set_lr_schedule), \
                       which a checkpoint cannot hold; save under a built-in schedule \
                       (set_schedule) and set the closure again after loading"
                    .into(),
            });
        }
        Ok(())
    }

    /// Loads a checkpoint written by [`Lamb::save`] (or `save_with_params`; the
    /// parameters are then ignored) into this optimizer, whose layers must be registered as
    /// they were: same count, names, lengths and groups. Either everything loads or
    /// nothing changes; see the [module docs](self) for what is checked and replaced.
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<(), Error> {
        let path = path.as_ref();
        let bytes = read_bounded(self, path)?;
        decode::load(self, &bytes, None).map_err(|what| refused(Some(path), what))
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
        encode::check_params(self, params.iter().map(|p| p.len()))?;
        let bytes = read_bounded(self, path)?;
        decode::load(self, &bytes, Some(params)).map_err(|what| refused(Some(path), what))
    }

    /// [`Lamb::load`] from the bytes of a checkpoint. Never panics, whatever the bytes,
    /// and allocates at most in proportion to `bytes.len()`.
    pub fn load_checkpoint_bytes(&mut self, bytes: &[u8]) -> Result<(), Error> {
        decode::load(self, bytes, None).map_err(|what| refused(None, what))
    }

    /// [`Lamb::load_with_params`] from the bytes of a checkpoint.
    pub fn load_checkpoint_bytes_with_params(
        &mut self,
        bytes: &[u8],
        params: &mut [&mut [f32]],
    ) -> Result<(), Error> {
        encode::check_params(self, params.iter().map(|p| p.len()))?;
        decode::load(self, bytes, Some(params)).map_err(|what| refused(None, what))
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
}

#[cfg(test)]
mod tests {
    use lamb_core::LambConfig;

    use crate::{Error, Lamb};

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
        let mut opt = Lamb::new(LambConfig::paper()).unwrap();
        opt.add_layer("a", 3000).unwrap();
        opt.add_layer("b", 10).unwrap();
        let mut p = vec![vec![0.5f32; 3000], vec![0.1f32; 10]];
        let _ = do_step(&mut opt, &mut p).unwrap();
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
