//! Parameter groups and their settings: [`Group`], [`Precision`], and [`StateFormat`], the
//! one enum of how moments are stored (the layer state, its views and checkpoints all
//! follow it).

use std::sync::Arc;

use lamb_core::LambConfig;
use lamb_core::layer::Rounding;

/// Identifies a parameter group of one [`Lamb`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GroupId(pub usize);

/// Identifies a layer of one [`Lamb`]: its index in registration order, which is also its
/// position in the slices passed to [`Lamb::step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LayerId(pub usize);

/// A parameter group: layers sharing a configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    /// Name, used in errors.
    pub name: String,
    /// Hyperparameters; `config.lr` is the base learning rate.
    pub config: LambConfig,
    /// Multiplier of `config.lr` for this group (1 by default).
    pub lr_scale: f64,
    /// How the group's state is stored.
    pub precision: Precision,
}

/// How a group stores its moments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum StateFormat {
    /// f32 m and v: 8 bytes per parameter.
    #[default]
    F32,
    /// bf16 m and v, 4 bytes per parameter, stochastically rounded: with round to
    /// nearest, `v·0.999` rounds back to `v` in bf16 and v would never decay (see
    /// [`lamb_core::layer::Moments::Bf16`]). The draws are seeded by the step and the
    /// layer index, so the bits are the same on every backend and thread count, and a run
    /// resumed from a checkpoint continues with the same draws.
    Bf16,
    /// 8-bit blockwise m and v ([`lamb_core::codec`]): 2 bytes + 8/256 per parameter.
    Q8,
}

/// A group's precision settings.
///
/// ```
/// use lamb_std::{Lamb, ParamsIn, Precision, StateFormat, lamb_core::{LambConfig, half::bf16, layer::Grads}};
/// let mut opt = Lamb::new(LambConfig::paper())?;
/// opt.set_precision(lamb_std::GroupId(0), Precision { moments: StateFormat::Q8, ..Precision::default() })?;
/// opt.add_layer("w", 8192)?;
/// let mut w = vec![bf16::from_f32(0.1); 8192];
/// let g = vec![bf16::from_f32(0.01); 8192];
/// opt.step_mixed(&mut [ParamsIn::Bf16(&mut w)], &[Grads::Bf16(&g)])?;
/// // 8-bit moments, the absmax scales and an f32 master copy of the bf16 weights:
/// assert!((opt.bytes_per_param() - (2.0 + 8.0 / 256.0 + 4.0)).abs() < 1e-9);
/// # Ok::<(), lamb_std::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Precision {
    /// Storage of m and v.
    pub moments: StateFormat,
    /// Layers with fewer elements keep f32 moments (compact formats pay off on big
    /// tensors; biases and norms are small and sensitive). Default 4096.
    pub compact_min_len: usize,
    /// Keep an f32 master copy of bf16/f16 parameters (default `true`). Without it, bf16
    /// parameters are updated in place with `rounding`; f16 parameters always need one.
    pub master: bool,
    /// Rounding of bf16 parameters updated in place. A stochastic seed is mixed with the
    /// step and the layer index, so runs are reproducible on any backend and thread count.
    pub rounding: Rounding,
}

impl Default for Precision {
    fn default() -> Precision {
        Precision {
            moments: StateFormat::F32,
            compact_min_len: 4096,
            master: true,
            rounding: Rounding::Nearest,
        }
    }
}

/// A schedule of [`Lamb::set_lr_schedule`](super::Lamb::set_lr_schedule): shared by clones, which step alike.
#[derive(Clone)]
pub(super) struct CustomSchedule(pub(super) Arc<dyn Fn(u64) -> f64 + Send + Sync>);
