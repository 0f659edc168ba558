//! [`Slot`]: a Var as the optimizer registered it, checked once at construction. Both the
//! optimizer and the in-place nesting (`nest.rs`) read it; it reads neither.

use candle_core::{DType, Storage, Var};

use crate::{Config, Error};

/// A Var as the optimizer registered it.
pub(crate) struct Slot {
    pub(crate) name: String,
    pub(crate) var: Var,
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<usize>,
    pub(crate) len: usize,
    /// Identity of the Var's storage (see [`storage_key`]).
    pub(crate) key: usize,
}

impl Slot {
    pub(crate) fn new(name: String, var: Var, config: &Config) -> Result<Slot, Error> {
        if !var.device().is_cpu() {
            return Err(Error::var(
                &name,
                format!(
                    "it is on {:?}; lamb-candle steps Vars on the CPU",
                    var.device().location()
                ),
            ));
        }
        let dtype = var.dtype();
        match dtype {
            DType::F32 | DType::BF16 => {}
            DType::F16 if config.precision.master => {}
            DType::F16 => {
                return Err(Error::var(
                    &name,
                    "f16 Vars need an f32 master copy (Config::precision.master = true)",
                ));
            }
            other => {
                return Err(Error::var(
                    &name,
                    format!(
                        "its dtype is {}; lamb-candle steps f32, bf16 and f16 Vars",
                        other.as_str()
                    ),
                ));
            }
        }
        let layout = var.layout();
        if !layout.is_contiguous() {
            return Err(Error::var(
                &name,
                "it is not contiguous; make it from a contiguous tensor (Var::from_tensor(&t.contiguous()?))",
            ));
        }
        let key = storage_key(&var.storage_and_layout().0);
        Ok(Slot {
            name,
            dtype,
            shape: var.dims().to_vec(),
            len: var.elem_count(),
            key,
            var,
        })
    }
}

/// The identity of a tensor's storage: the address of the `Storage` inside its lock,
/// which lives as long as any tensor sharing it. Equal for tensors that share a storage
/// (views, clones of a Var), different otherwise.
pub(crate) fn storage_key(storage: &Storage) -> usize {
    std::ptr::from_ref(storage) as usize
}
