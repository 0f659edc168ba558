//! [`Lamb`]: owned state, parameter groups, global clipping, schedules, and the threaded step.
//!
//! A step is atomic across the whole model. All checks run first; then phase 1 (norms)
//! runs over every layer, writing nothing; only if every layer's norms are finite does
//! phase 2 (apply) run. A NaN anywhere therefore skips the step for every layer.
//!
//! Phase 2 visits each thread's pieces in *reverse* order of phase 1, so the data phase 1
//! read last, which is what is still in cache, is the first phase 2 reads again. Where a
//! thread's share of the model fits in cache, phase 2 runs entirely from cache; where it
//! does not, the cache-sized tail still does. Doing phase 2 of each layer right after its
//! phase 1 would reuse more, but would write layers before knowing whether a later layer is
//! non-finite, and a step would no longer be all or nothing.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;

use lamb_core::half::{bf16, f16};
use lamb_core::precision::{
    Grads, HalfMut, MixedLayer, Moments as CoreMoments, Params, QBLOCK, Rounding,
};
use lamb_core::{
    BLOCK, Backend, Field, LambConfig, LambError, LayerNorms, LayerReport, NonFinite, Schedule,
    StepScalars,
};

use crate::buffer::{Aligned, AlignedBuf};
use crate::error::Error;
use crate::partition::{Piece, partition};

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
    /// [`lamb_core::precision::Moments::Bf16`]). The draws are seeded by the step and the
    /// layer index, so the bits are the same on every backend and thread count, and a run
    /// resumed from a checkpoint continues with the same draws.
    Bf16,
    /// 8-bit blockwise m and v ([`lamb_core::precision`]): 2 bytes + 8/256 per parameter.
    Q8,
}

/// A group's precision settings.
///
/// ```
/// use lamb_std::{Lamb, ParamsIn, Precision, StateFormat, lamb_core::{LambConfig, half::bf16, precision::Grads}};
/// let mut opt = Lamb::new(LambConfig::paper());
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

/// A layer's parameters as the model holds them.
#[derive(Debug)]
pub enum ParamsIn<'a> {
    /// f32, updated in place.
    F32(&'a mut [f32]),
    /// bf16: updated through the f32 master copy, or in place (see [`Precision::master`]).
    Bf16(&'a mut [bf16]),
    /// f16: updated through the f32 master copy.
    F16(&'a mut [f16]),
}

impl ParamsIn<'_> {
    fn len(&self) -> usize {
        match self {
            ParamsIn::F32(p) => p.len(),
            ParamsIn::Bf16(p) => p.len(),
            ParamsIn::F16(p) => p.len(),
        }
    }
}

/// A layer's moments as stored, from [`Lamb::layer`].
#[derive(Clone, Copy, Debug)]
pub enum StateView<'a> {
    /// f32.
    F32 {
        /// First moment.
        m: &'a [f32],
        /// Second moment.
        v: &'a [f32],
    },
    /// bf16.
    Bf16 {
        /// First moment.
        m: &'a [bf16],
        /// Second moment.
        v: &'a [bf16],
    },
    /// 8-bit codes and per-block absmax.
    Q8 {
        /// First-moment codes.
        m: &'a [u8],
        /// Second-moment codes.
        v: &'a [u8],
        /// First-moment absmax per block.
        m_absmax: &'a [f32],
        /// Second-moment absmax per block.
        v_absmax: &'a [f32],
    },
}

/// A layer's registration and state, as [`Lamb::layer`] shows it.
#[derive(Debug)]
pub struct LayerView<'a> {
    /// Registered name.
    pub name: &'a str,
    /// Number of elements.
    pub len: usize,
    /// Its group.
    pub group: GroupId,
    /// First moment in f32 (empty if the layer stores its state compactly: see `state`).
    pub m: &'a [f32],
    /// Second moment in f32 (empty if compact).
    pub v: &'a [f32],
    /// The moments as stored.
    pub state: StateView<'a>,
    /// The f32 master copy of half-precision parameters, once the first step made it.
    pub master: Option<&'a [f32]>,
    /// Norms and ratio of the last applied step (`None` before the first).
    pub last: Option<LayerReport>,
}

/// The layer that made a step skip.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedLayer {
    /// Its index.
    pub index: usize,
    /// Its name.
    pub name: String,
}

/// What a call to [`Lamb::step`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// The step number (1-based) this call took, or would have taken if skipped.
    pub step: u64,
    /// `false` if the step was skipped for a non-finite value; nothing was written then.
    pub applied: bool,
    /// The first layer with a non-finite value, if any.
    pub skipped: Option<SkippedLayer>,
    /// Global L2 norm of the (unscaled) gradients, computed when clipping is on.
    pub grad_norm: Option<f64>,
    /// The factor applied to every gradient element (clipping × inverse loss scale).
    pub grad_scale: f32,
    /// The schedule's learning-rate factor at this step.
    pub lr_factor: f64,
}

/// A layer's registration (the moments live apart, in `Lamb::moments`, so that a step can
/// lend them to threads while reading this).
struct Layer {
    name: String,
    group: usize,
    len: usize,
    last: Option<LayerReport>,
}

/// A layer's optimizer state: f32 moments in `m`, `v` (empty when `compact` holds them),
/// and the f32 master copy of half-precision parameters.
struct Moments {
    m: AlignedBuf,
    v: AlignedBuf,
    compact: Compact,
    master: Option<AlignedBuf>,
}

/// Compact moments.
enum Compact {
    None,
    Bf16 {
        m: Aligned<bf16>,
        v: Aligned<bf16>,
    },
    Q8 {
        m: Aligned<u8>,
        v: Aligned<u8>,
        m_absmax: AlignedBuf,
        v_absmax: AlignedBuf,
    },
}

impl Moments {
    fn new(len: usize, precision: &Precision) -> Moments {
        let compact = if len < precision.compact_min_len {
            StateFormat::F32
        } else {
            precision.moments
        };
        let f32_len = if compact == StateFormat::F32 { len } else { 0 };
        let q = len.div_ceil(QBLOCK);
        Moments {
            m: AlignedBuf::zeroed(f32_len),
            v: AlignedBuf::zeroed(f32_len),
            compact: match compact {
                StateFormat::F32 => Compact::None,
                StateFormat::Bf16 => Compact::Bf16 {
                    m: Aligned::zeroed(len),
                    v: Aligned::zeroed(len),
                },
                StateFormat::Q8 => Compact::Q8 {
                    m: Aligned::zeroed(len),
                    v: Aligned::zeroed(len),
                    m_absmax: AlignedBuf::zeroed(q),
                    v_absmax: AlignedBuf::zeroed(q),
                },
            },
            master: None,
        }
    }

    fn zero(&mut self) {
        self.m.fill(0.0);
        self.v.fill(0.0);
        match &mut self.compact {
            Compact::None => {}
            Compact::Bf16 { m, v } => {
                m.fill(bf16::ZERO);
                v.fill(bf16::ZERO);
            }
            Compact::Q8 {
                m,
                v,
                m_absmax,
                v_absmax,
            } => {
                m.fill(0);
                v.fill(0);
                m_absmax.fill(0.0);
                v_absmax.fill(0.0);
            }
        }
    }

    fn view(&self) -> StateView<'_> {
        match &self.compact {
            Compact::None => StateView::F32 {
                m: &self.m,
                v: &self.v,
            },
            Compact::Bf16 { m, v } => StateView::Bf16 { m, v },
            Compact::Q8 {
                m,
                v,
                m_absmax,
                v_absmax,
            } => StateView::Q8 {
                m,
                v,
                m_absmax,
                v_absmax,
            },
        }
    }

    /// The moments as the core's type, from disjoint borrows of the fields.
    /// `rounding` applies to bf16 moments.
    fn core<'a>(
        m: &'a mut AlignedBuf,
        v: &'a mut AlignedBuf,
        compact: &'a mut Compact,
        rounding: Rounding,
    ) -> CoreMoments<'a> {
        match compact {
            Compact::None => CoreMoments::F32 { m, v },
            Compact::Bf16 { m, v } => CoreMoments::Bf16 { m, v, rounding },
            Compact::Q8 {
                m,
                v,
                m_absmax,
                v_absmax,
            } => CoreMoments::Q8 {
                m,
                v,
                m_absmax,
                v_absmax,
            },
        }
    }

    /// Bytes of optimizer state this layer holds.
    fn bytes(&self) -> usize {
        let compact = match &self.compact {
            Compact::None => 0,
            Compact::Bf16 { m, v } => 2 * (m.len() + v.len()),
            Compact::Q8 {
                m,
                v,
                m_absmax,
                v_absmax,
            } => m.len() + v.len() + 4 * (m_absmax.len() + v_absmax.len()),
        };
        4 * (self.m.len() + self.v.len() + self.master.as_ref().map_or(0, |b| b.len())) + compact
    }
}

/// The LAMB optimizer over a model's layers.
///
/// ```
/// use lamb_std::{Lamb, lamb_core::LambConfig};
///
/// let mut opt = Lamb::new(LambConfig::paper());
/// opt.add_layer("dense.weight", 6)?;
/// opt.add_layer("dense.bias", 2)?;
///
/// let mut w = vec![0.5f32; 6];
/// let mut b = vec![0.0f32; 2];
/// let (gw, gb) = (vec![0.1f32; 6], vec![-0.2f32; 2]);
/// let report = opt.step(&mut [&mut w, &mut b], &[&gw, &gb])?;
/// assert!(report.applied);
/// assert!(w[0] < 0.5 && b[0] > 0.0);
/// # Ok::<(), lamb_std::Error>(())
/// ```
pub struct Lamb {
    groups: Vec<Group>,
    layers: Vec<Layer>,
    moments: Vec<Moments>,
    step: u64,
    threads: usize,
    pool: Option<rayon::ThreadPool>,
    backend: Result<Backend, Error>,
    max_grad_norm: Option<f64>,
    schedule: Schedule,
    poisoned: bool,
    no_decay_group: Option<usize>,
    plan: Vec<Piece>,
    /// Phase-1 block sums of all layers, laid end to end (layer `i` at its block offset).
    block_norms: Vec<LayerNorms>,
    /// Gradient block sums of squares, same layout.
    block_grad_sq: Vec<f64>,
    #[cfg(test)]
    pub(crate) panic_in: Option<(&'static str, usize)>,
}

/// One thread's share of one layer during a step.
struct Work<'a> {
    layer: usize,
    group: usize,
    /// The piece's buffers.
    data: MixedLayer<'a>,
    /// Index in the layer of the piece's element 0 (for stochastic rounding).
    index0: usize,
    norms: &'a mut [LayerNorms],
    grad_sq: &'a mut [f64],
}

impl Work<'_> {
    /// Phase 1 of this piece (lamb-core serves all-f32 pieces with the f32 kernels).
    fn norms(&mut self, b: Backend, s: &StepScalars) -> Result<(), LambError> {
        b.norms_blocks_mixed(s, &self.data, self.norms)
    }

    /// Phase 2 of this piece.
    fn apply(&mut self, b: Backend, s: &StepScalars, step_size: f32) -> Result<(), LambError> {
        b.apply_mixed(s, step_size, &mut self.data, self.index0)
    }

    /// Σg² of each block of this piece.
    fn grad_sq(&mut self, b: Backend) -> Result<(), LambError> {
        let g = self.data.grads;
        for (k, slot) in self.grad_sq.iter_mut().enumerate() {
            let r = k * BLOCK..((k + 1) * BLOCK).min(g.len());
            *slot = match g {
                Grads::F32(x) => b.sum_squares(&x[r])?,
                Grads::Bf16(x) => b.sum_squares_grads(&Grads::Bf16(&x[r]))?,
                Grads::F16(x) => b.sum_squares_grads(&Grads::F16(&x[r]))?,
            };
        }
        Ok(())
    }
}

impl Lamb {
    /// An optimizer with one group, `"default"`, of configuration `config`, one thread, and
    /// the backend named by the `LAMB_BACKEND` environment variable if set, else the fastest.
    pub fn new(config: LambConfig) -> Lamb {
        Lamb {
            groups: vec![Group {
                name: "default".into(),
                config,
                lr_scale: 1.0,
                precision: Precision::default(),
            }],
            layers: Vec::new(),
            moments: Vec::new(),
            step: 0,
            threads: 1,
            pool: None,
            backend: backend_from_env(),
            max_grad_norm: None,
            schedule: Schedule::Constant,
            poisoned: false,
            no_decay_group: None,
            plan: Vec::new(),
            block_norms: Vec::new(),
            block_grad_sq: Vec::new(),
            #[cfg(test)]
            panic_in: None,
        }
    }

    /// The usual split for transformers (timm's `param_groups_weight_decay`): group
    /// `"decay"` with `config`, and group `"no_decay"` with weight decay 0 and no trust ratio
    /// for biases and normalisation scales; [`Lamb::add_param`] picks the group.
    ///
    /// ```
    /// use lamb_std::{GroupId, Lamb, lamb_core::LambConfig};
    /// let mut opt = Lamb::with_decay_split(LambConfig::paper());
    /// let w = opt.add_param("fc.weight", &[4, 3])?;
    /// let b = opt.add_param("fc.bias", &[4])?;
    /// assert_eq!(opt.layer(w).group, GroupId(0));
    /// assert_eq!(opt.layer(b).group, GroupId(1));
    /// # Ok::<(), lamb_std::Error>(())
    /// ```
    pub fn with_decay_split(config: LambConfig) -> Lamb {
        let mut opt = Lamb::new(config);
        opt.groups[0].name = "decay".into();
        let no_decay = LambConfig {
            weight_decay: 0.0,
            ..config
        }
        .adamw();
        opt.groups.push(Group {
            name: "no_decay".into(),
            config: no_decay,
            lr_scale: 1.0,
            precision: Precision::default(),
        });
        opt.no_decay_group = Some(1);
        opt
    }

    /// Adds a parameter group and returns its id. Its configuration is validated at once.
    pub fn add_group(
        &mut self,
        name: impl Into<String>,
        config: LambConfig,
        lr_scale: f64,
    ) -> Result<GroupId, Error> {
        let group = Group {
            name: name.into(),
            config,
            lr_scale,
            precision: Precision::default(),
        };
        validate_group(&group)?;
        self.groups.push(group);
        Ok(GroupId(self.groups.len() - 1))
    }

    /// Sets how a group stores its state. Only before the group has layers: the layers'
    /// state is allocated in the group's format when they are added.
    pub fn set_precision(&mut self, id: GroupId, precision: Precision) -> Result<(), Error> {
        let name = self.group(id)?.name.clone();
        if self.layers.iter().any(|l| l.group == id.0) {
            return Err(Error::PrecisionAfterLayers(name));
        }
        self.groups[id.0].precision = precision;
        Ok(())
    }

    /// Registers a layer of `len` elements in the first group; its moments start at zero.
    pub fn add_layer(&mut self, name: impl Into<String>, len: usize) -> Result<LayerId, Error> {
        self.add_layer_to(GroupId(0), name, len)
    }

    /// Registers a layer of shape `shape` (for the group choice only; the data is flat). With
    /// [`Lamb::with_decay_split`], rank ≤ 1 tensors and names ending in `.bias` go to
    /// `"no_decay"`; otherwise to the first group.
    pub fn add_param(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
    ) -> Result<LayerId, Error> {
        let name = name.into();
        let Some(len) = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) else {
            return Err(Error::ShapeOverflow {
                name,
                shape: shape.to_vec(),
            });
        };
        let group = match self.no_decay_group {
            Some(g) if shape.len() <= 1 || name.ends_with(".bias") => g,
            _ => 0,
        };
        self.add_layer_to(GroupId(group), name, len)
    }

    /// Registers a layer of `len` elements in `group`.
    pub fn add_layer_to(
        &mut self,
        group: GroupId,
        name: impl Into<String>,
        len: usize,
    ) -> Result<LayerId, Error> {
        let name = name.into();
        if group.0 >= self.groups.len() {
            return Err(Error::UnknownGroup(group.0));
        }
        if self.layers.iter().any(|l| l.name == name) {
            return Err(Error::DuplicateName(name));
        }
        // A length whose buffers could not even be described (more bytes than isize) is an
        // error, not a panic in the allocator.
        if len
            .checked_mul(4)
            .and_then(|b| b.checked_next_multiple_of(crate::buffer::HUGE_PAGE))
            .is_none_or(|b| b > isize::MAX as usize)
        {
            return Err(Error::ShapeOverflow {
                name,
                shape: vec![len],
            });
        }
        self.layers.push(Layer {
            name,
            group: group.0,
            len,
            last: None,
        });
        self.moments
            .push(Moments::new(len, &self.groups[group.0].precision));
        let blocks = len.div_ceil(BLOCK);
        self.block_norms
            .resize(self.block_norms.len() + blocks, LayerNorms::default());
        self.block_grad_sq
            .resize(self.block_grad_sq.len() + blocks, 0.0);
        self.replan();
        Ok(LayerId(self.layers.len() - 1))
    }

    /// Number of worker threads: 1 runs on the caller's thread with no pool; 0 means one per
    /// available core. Results are bit-identical for every count.
    pub fn set_threads(&mut self, threads: usize) -> Result<(), Error> {
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        self.pool = if threads == 1 {
            None
        } else {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("lamb-{i}"))
                    .build()
                    .map_err(|e| Error::ThreadPool(e.to_string()))?,
            )
        };
        self.threads = threads;
        self.replan();
        Ok(())
    }

    /// The thread count in use.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Uses `backend` for every kernel (refused if this CPU lacks it).
    pub fn set_backend(&mut self, backend: Backend) -> Result<(), Error> {
        let b = backend.checked().ok_or(Error::Config {
            group: None,
            source: LambError::Unsupported { backend },
        })?;
        self.backend = Ok(b);
        Ok(())
    }

    /// The backend in use (or the `LAMB_BACKEND` error).
    pub fn backend(&self) -> Result<Backend, Error> {
        self.backend.clone()
    }

    /// Global gradient-norm clipping, NVLAMB's pre-normalisation:
    /// `g ← g / max(1, ‖g‖ / max_norm)` over all layers, folded into phase 1 as a scale.
    /// `None` turns it off; `Some(0.0)` is an error (apex and timm would divide by zero).
    pub fn set_max_grad_norm(&mut self, max_norm: Option<f64>) -> Result<(), Error> {
        if let Some(x) = max_norm
            && !(x.is_finite() && x > 0.0)
        {
            return Err(Error::InvalidMaxGradNorm(x));
        }
        self.max_grad_norm = max_norm;
        Ok(())
    }

    /// The learning-rate schedule (a factor on every group's lr).
    pub fn set_schedule(&mut self, schedule: Schedule) -> Result<(), Error> {
        schedule.validate().map_err(|source| Error::Config {
            group: None,
            source,
        })?;
        self.schedule = schedule;
        Ok(())
    }

    /// Replaces a group's configuration and lr multiplier, after validating them.
    pub fn set_group(
        &mut self,
        id: GroupId,
        config: LambConfig,
        lr_scale: f64,
    ) -> Result<(), Error> {
        let old = self.group(id)?;
        let group = Group {
            name: old.name.clone(),
            config,
            lr_scale,
            precision: old.precision,
        };
        validate_group(&group)?;
        self.groups[id.0] = group;
        Ok(())
    }

    /// A group.
    pub fn group(&self, id: GroupId) -> Result<&Group, Error> {
        self.groups.get(id.0).ok_or(Error::UnknownGroup(id.0))
    }

    /// Number of groups.
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// Number of layers.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// A layer's registration, moments and last report.
    ///
    /// # Panics
    /// If `id` was not returned by this optimizer (like slice indexing).
    pub fn layer(&self, id: LayerId) -> LayerView<'_> {
        let (l, s) = (&self.layers[id.0], &self.moments[id.0]);
        LayerView {
            name: &l.name,
            len: l.len,
            group: GroupId(l.group),
            m: &s.m,
            v: &s.v,
            state: s.view(),
            master: s.master.as_deref(),
            last: l.last,
        }
    }

    /// Finds a layer by name.
    pub fn layer_id(&self, name: &str) -> Option<LayerId> {
        self.layers.iter().position(|l| l.name == name).map(LayerId)
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Zeroes every moment and the step counter and clears reports and poisoning; layers,
    /// groups and settings stay.
    pub fn reset(&mut self) {
        for (l, s) in self.layers.iter_mut().zip(&mut self.moments) {
            s.zero();
            s.master = None;
            l.last = None;
        }
        self.step = 0;
        self.poisoned = false;
    }

    /// Bytes of optimizer state per parameter, over all layers: moments in their storage
    /// format, 8-bit absmax scales, and f32 master copies (made at the first step). 8 for
    /// the default f32 state; 0 with no parameters.
    pub fn bytes_per_param(&self) -> f64 {
        let params: usize = self.layers.iter().map(|l| l.len).sum();
        let bytes: usize = self.moments.iter().map(Moments::bytes).sum();
        if params == 0 {
            0.0
        } else {
            bytes as f64 / params as f64
        }
    }

    fn replan(&mut self) {
        let lens: Vec<usize> = self.layers.iter().map(|l| l.len).collect();
        self.plan = partition(&lens, self.threads);
    }

    /// One step over every layer: `params[i]` and `grads[i]` belong to layer `i`.
    pub fn step(
        &mut self,
        params: &mut [&mut [f32]],
        grads: &[&[f32]],
    ) -> Result<StepReport, Error> {
        self.step_scaled(params, grads, 1.0)
    }

    /// One step with gradients multiplied by `inv_loss_scale` (mixed-precision loss
    /// scaling; folded into phase 1 with clipping, never a separate pass). With loss
    /// scaling, a non-finite gradient (overflow) skips the step: check
    /// [`StepReport::applied`] to lower the scale.
    pub fn step_scaled(
        &mut self,
        params: &mut [&mut [f32]],
        grads: &[&[f32]],
        inv_loss_scale: f32,
    ) -> Result<StepReport, Error> {
        let mut p: Vec<ParamsIn<'_>> = params.iter_mut().map(|x| ParamsIn::F32(x)).collect();
        let g: Vec<Grads<'_>> = grads.iter().map(|x| Grads::F32(x)).collect();
        self.step_mixed_scaled(&mut p, &g, inv_loss_scale)
    }

    /// One step with parameters and gradients in any storage (f32, bf16, f16); the state
    /// is stored as each group's [`Precision`] says.
    pub fn step_mixed(
        &mut self,
        params: &mut [ParamsIn<'_>],
        grads: &[Grads<'_>],
    ) -> Result<StepReport, Error> {
        self.step_mixed_scaled(params, grads, 1.0)
    }

    /// [`Lamb::step_mixed`] with loss scaling; see [`Lamb::step_scaled`].
    pub fn step_mixed_scaled(
        &mut self,
        params: &mut [ParamsIn<'_>],
        grads: &[Grads<'_>],
        inv_loss_scale: f32,
    ) -> Result<StepReport, Error> {
        self.step_present(params, grads, inv_loss_scale, None)
    }

    /// [`Lamb::step_mixed_scaled`] over the layers whose gradient is `Some` (a frozen
    /// layer, or one unused this step). A layer with `None` is not stepped: its parameters
    /// are not read (any length, even empty, is accepted), and its moments, master copy and
    /// [`LayerView::last`] stay as they were; it adds nothing to the global gradient norm.
    /// The step counter is the optimizer's, so it advances for every layer, and a layer's
    /// next applied step uses the new count in its bias correction (like candle's AdamW,
    /// which keeps one counter too).
    ///
    /// ```
    /// use lamb_std::{Lamb, ParamsIn, lamb_core::{LambConfig, precision::Grads}};
    /// let mut opt = Lamb::new(LambConfig::paper());
    /// opt.add_layer("trained", 4)?;
    /// opt.add_layer("frozen", 2)?;
    /// let (mut w, mut f) = (vec![0.5f32; 4], vec![0.5f32; 2]);
    /// let g = [0.1f32; 4];
    /// let report = opt.step_mixed_scaled_some(
    ///     &mut [ParamsIn::F32(&mut w), ParamsIn::F32(&mut f)],
    ///     &[Some(Grads::F32(&g)), None],
    ///     1.0,
    /// )?;
    /// assert!(report.applied && w[0] < 0.5 && f == [0.5; 2]);
    /// # Ok::<(), lamb_std::Error>(())
    /// ```
    pub fn step_mixed_scaled_some(
        &mut self,
        params: &mut [ParamsIn<'_>],
        grads: &[Option<Grads<'_>>],
        inv_loss_scale: f32,
    ) -> Result<StepReport, Error> {
        let present: Vec<bool> = grads.iter().map(Option::is_some).collect();
        let grads: Vec<Grads<'_>> = grads.iter().map(|g| g.unwrap_or(Grads::F32(&[]))).collect();
        self.step_present(params, &grads, inv_loss_scale, Some(&present))
    }

    /// A step of the layers `present` marks (`None`: all of them).
    fn step_present(
        &mut self,
        params: &mut [ParamsIn<'_>],
        grads: &[Grads<'_>],
        inv_loss_scale: f32,
        present: Option<&[bool]>,
    ) -> Result<StepReport, Error> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        let backend = self.backend.clone()?;
        self.check_inputs(params, grads, present)?;
        if !(inv_loss_scale.is_finite() && inv_loss_scale > 0.0) {
            return Err(Error::Config {
                group: None,
                source: LambError::InvalidHyperparameter {
                    field: Field::GradScale,
                    value: inv_loss_scale as f64,
                    expected: "finite and > 0 (inv_loss_scale)",
                },
            });
        }
        let t = self.step + 1;
        let lr_factor = self.schedule.factor(t);
        let configs = self.step_configs(lr_factor)?;
        let made = self.make_masters(params, present);
        let result = self.step_with_masters(
            params,
            grads,
            present,
            inv_loss_scale,
            backend,
            t,
            lr_factor,
            configs,
        );
        // A master copy made for a step that was not applied is dropped: it holds the
        // model's values of a refused step (maybe a NaN), and the next step must take the
        // model's values then, not these.
        if !matches!(result, Ok(StepReport { applied: true, .. })) {
            for i in made {
                self.moments[i].master = None;
            }
        }
        result
    }

    /// The part of a step after the inputs were checked and the master copies made.
    #[allow(clippy::too_many_arguments)]
    fn step_with_masters(
        &mut self,
        params: &mut [ParamsIn<'_>],
        grads: &[Grads<'_>],
        present: Option<&[bool]>,
        inv_loss_scale: f32,
        backend: Backend,
        t: u64,
        lr_factor: f64,
        configs: Vec<LambConfig>,
    ) -> Result<StepReport, Error> {
        let Lamb {
            layers,
            moments,
            groups,
            plan,
            block_norms,
            block_grad_sq,
            pool,
            max_grad_norm,
            threads,
            ..
        } = self;
        let layers: &[Layer] = layers;
        let mut work = split_work(
            plan,
            *threads,
            t,
            params,
            grads,
            present,
            layers,
            groups,
            moments,
            block_norms,
            block_grad_sq,
        )
        .map_err(|e| Error::Layer {
            index: e.1,
            name: layers[e.1].name.clone(),
            source: e.0,
        })?;
        #[cfg(test)]
        let panic_in = self.panic_in;
        #[cfg(not(test))]
        let panic_in: Option<(&str, usize)> = None;
        let fault = |phase: &str, w: &Work| {
            if panic_in == Some((phase, w.layer)) {
                panic!("injected fault in layer {}", w.layer);
            }
        };

        // Global gradient norm: one read of g, only when clipping is on.
        let mut grad_norm = None;
        let mut grad_scale = inv_loss_scale;
        if let Some(max_norm) = *max_grad_norm {
            run(pool.as_ref(), &mut work, false, |w| {
                fault("grad_norm", w);
                w.grad_sq(backend)
            })
            .map_err(|e| e.into_error("norms", layers))?;
            // Per layer in block order, then layers in order: independent of the thread count.
            let mut per_layer = vec![0.0f64; layers.len()];
            for w in work.iter().flatten() {
                per_layer[w.layer] = w.grad_sq.iter().fold(per_layer[w.layer], |a, b| a + b);
            }
            if let Some(i) = per_layer.iter().position(|s| !s.is_finite()) {
                return skip(layers, i, t, None, inv_loss_scale, lr_factor, &configs);
            }
            let norm = per_layer.iter().fold(0.0f64, |a, b| a + b).sqrt() * inv_loss_scale as f64;
            let clip = 1.0 / (norm / max_norm).max(1.0);
            grad_scale = (inv_loss_scale as f64 * clip) as f32;
            grad_norm = Some(norm);
            if grad_scale <= 0.0 {
                // The norm is so large that the scale underflows f32: as good as non-finite.
                return skip(layers, 0, t, grad_norm, 0.0, lr_factor, &configs);
            }
        }

        let scalars = configs
            .iter()
            .zip(groups.iter())
            .map(|(c, g)| {
                StepScalars::new(c, t, grad_scale).map_err(|source| Error::Config {
                    group: Some(g.name.clone()),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        // Phase 1: norms, nothing written.
        run(pool.as_ref(), &mut work, false, |w| {
            fault("norms", w);
            w.norms(backend, &scalars[w.group])
        })
        .map_err(|e| e.into_error("norms", layers))?;

        // Per layer in block order (the work lists are in plan order, which is block order).
        let mut norms = vec![LayerNorms::default(); layers.len()];
        for w in work.iter().flatten() {
            norms[w.layer] = w.norms.iter().fold(norms[w.layer], |a, &b| a + b);
        }
        let mut reports = Vec::with_capacity(layers.len());
        for (i, (l, n)) in layers.iter().zip(norms).enumerate() {
            let report = LayerReport::plan(&configs[l.group], n);
            if report.skipped && is_present(present, i) {
                return skip(layers, i, t, grad_norm, grad_scale, lr_factor, &configs);
            }
            reports.push(report);
        }

        // Phase 2: apply, each thread walking its pieces backwards (see the module docs).
        let applied = run(pool.as_ref(), &mut work, true, |w| {
            fault("apply", w);
            let step_size = reports[w.layer].step_size;
            w.apply(backend, &scalars[w.group], step_size)
        });
        drop(work);
        if let Err(e) = applied {
            self.poisoned = true;
            return Err(e.into_error("apply", &self.layers));
        }
        for (i, (l, r)) in self.layers.iter_mut().zip(reports).enumerate() {
            if is_present(present, i) {
                l.last = Some(r);
            }
        }
        self.step = t;
        Ok(StepReport {
            step: t,
            applied: true,
            skipped: None,
            grad_norm,
            grad_scale,
            lr_factor,
        })
    }

    /// Makes the f32 master copy of every half-precision layer whose group keeps one and
    /// that has none yet, from the model's current values (exact: bf16/f16 → f32). The
    /// master then equals the model, so making it changes nothing even if the step is
    /// later refused.
    fn make_masters(&mut self, params: &[ParamsIn<'_>], present: Option<&[bool]>) -> Vec<usize> {
        let mut made = Vec::new();
        for (i, p) in params.iter().enumerate() {
            let group = &self.groups[self.layers[i].group];
            let state = &mut self.moments[i];
            if !group.precision.master || state.master.is_some() || !is_present(present, i) {
                continue;
            }
            let master = match p {
                ParamsIn::F32(_) => continue,
                ParamsIn::Bf16(x) => {
                    let mut b = AlignedBuf::zeroed(x.len());
                    b.iter_mut()
                        .zip(x.iter())
                        .for_each(|(o, h)| *o = h.to_f32());
                    b
                }
                ParamsIn::F16(x) => {
                    let mut b = AlignedBuf::zeroed(x.len());
                    b.iter_mut()
                        .zip(x.iter())
                        .for_each(|(o, h)| *o = h.to_f32());
                    b
                }
            };
            state.master = Some(master);
            made.push(i);
        }
        made
    }

    /// Every check that needs no kernel: counts, lengths, formats, aliasing, empty groups.
    fn check_inputs(
        &self,
        params: &[ParamsIn<'_>],
        grads: &[Grads<'_>],
        present: Option<&[bool]>,
    ) -> Result<(), Error> {
        if params.len() != self.layers.len() || grads.len() != self.layers.len() {
            return Err(Error::LayerCount {
                layers: self.layers.len(),
                params: params.len(),
                grads: grads.len(),
            });
        }
        for (i, l) in self.layers.iter().enumerate() {
            let layer_err = |source| Error::Layer {
                index: i,
                name: l.name.clone(),
                source,
            };
            for (buffer, len) in [
                (lamb_core::Buffer::Param, params[i].len()),
                (lamb_core::Buffer::Grad, grads[i].len()),
            ] {
                if len != l.len && is_present(present, i) {
                    return Err(layer_err(LambError::LengthMismatch {
                        layer: i,
                        buffer,
                        expected: l.len,
                        found: len,
                    }));
                }
            }
            if matches!(params[i], ParamsIn::F16(_)) && !self.groups[l.group].precision.master {
                return Err(Error::NeedsMaster(l.name.clone()));
            }
        }
        // Two gradients sharing memory is almost certainly a bug in the caller's bookkeeping.
        let mut ranges: Vec<(usize, usize, usize)> = grads
            .iter()
            .enumerate()
            .filter(|(_, g)| !g.is_empty())
            .map(|(i, g)| {
                let (start, bytes) = match g {
                    Grads::F32(x) => (x.as_ptr() as usize, x.len() * 4),
                    Grads::Bf16(x) => (x.as_ptr() as usize, x.len() * 2),
                    Grads::F16(x) => (x.as_ptr() as usize, x.len() * 2),
                };
                (start, start + bytes, i)
            })
            .collect();
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(Error::AliasedBuffers {
                    first: self.layers[w[0].2].name.clone(),
                    second: self.layers[w[1].2].name.clone(),
                });
            }
        }
        for (g, group) in self.groups.iter().enumerate() {
            if !self.layers.iter().any(|l| l.group == g) {
                return Err(Error::EmptyGroup(group.name.clone()));
            }
        }
        Ok(())
    }

    /// Each group's configuration for this step: scheduled, scaled and validated.
    fn step_configs(&self, lr_factor: f64) -> Result<Vec<LambConfig>, Error> {
        self.groups
            .iter()
            .map(|g| {
                validate_group(g)?;
                let c = LambConfig {
                    lr: g.config.lr * g.lr_scale * lr_factor,
                    ..g.config
                };
                c.validate().map_err(|source| Error::Config {
                    group: Some(g.name.clone()),
                    source,
                })?;
                Ok(c)
            })
            .collect()
    }
}

/// Whether layer `i` is stepped (see [`Lamb::step_mixed_scaled_some`]).
fn is_present(present: Option<&[bool]>, i: usize) -> bool {
    present.is_none_or(|p| p[i])
}

fn validate_group(g: &Group) -> Result<(), Error> {
    if !(g.lr_scale.is_finite() && g.lr_scale >= 0.0) {
        return Err(Error::InvalidLrScale {
            group: g.name.clone(),
            value: g.lr_scale,
        });
    }
    g.config.validate().map_err(|source| Error::Config {
        group: Some(g.name.clone()),
        source,
    })
}

/// The report (or error, per the layer's group policy) of a step skipped at layer `index`.
fn skip(
    layers: &[Layer],
    index: usize,
    step: u64,
    grad_norm: Option<f64>,
    grad_scale: f32,
    lr_factor: f64,
    configs: &[LambConfig],
) -> Result<StepReport, Error> {
    let layer = &layers[index.min(layers.len().saturating_sub(1))];
    match configs[layer.group].non_finite {
        NonFinite::Error => Err(Error::Layer {
            index,
            name: layer.name.clone(),
            source: LambError::NonFinite { layer: index },
        }),
        NonFinite::Skip => Ok(StepReport {
            step,
            applied: false,
            skipped: Some(SkippedLayer {
                index,
                name: layer.name.clone(),
            }),
            grad_norm,
            grad_scale,
            lr_factor,
        }),
    }
}

fn backend_from_env() -> Result<Backend, Error> {
    match std::env::var("LAMB_BACKEND") {
        Ok(name) if !name.is_empty() => Backend::from_name(&name)
            .and_then(Backend::checked)
            .ok_or(Error::BadBackendEnv(name)),
        _ => Ok(Backend::detect()),
    }
}

/// Cuts the step's buffers into each thread's list of pieces (`plan` order). Errors carry
/// the layer index.
#[allow(clippy::too_many_arguments)] // the step's borrowed pieces, split apart on purpose
fn split_work<'a>(
    plan: &[Piece],
    threads: usize,
    step: u64,
    params: &'a mut [ParamsIn<'_>],
    grads: &'a [Grads<'_>],
    present: Option<&[bool]>,
    layers: &[Layer],
    groups: &[Group],
    moments: &'a mut [Moments],
    block_norms: &'a mut [LayerNorms],
    block_grad_sq: &'a mut [f64],
) -> Result<Vec<Vec<Work<'a>>>, (LambError, usize)> {
    let mut out: Vec<Vec<Work<'a>>> = (0..threads).map(|_| Vec::new()).collect();
    let (mut norms_rest, mut gsq_rest) = (block_norms, block_grad_sq);
    let mut cursor = 0;
    let all = params.iter_mut().zip(grads).zip(layers.iter().zip(moments));
    for (i, ((p, g), (layer, state))) in all.enumerate() {
        let blocks = layer.len.div_ceil(BLOCK);
        let (mut norms, nr) = std::mem::take(&mut norms_rest).split_at_mut(blocks);
        let (mut gsq, gr) = std::mem::take(&mut gsq_rest).split_at_mut(blocks);
        (norms_rest, gsq_rest) = (nr, gr);
        if !is_present(present, i) {
            // Not stepped: no pieces, so its state and block sums are left alone.
            while plan.get(cursor).is_some_and(|piece| piece.layer == i) {
                cursor += 1;
            }
            continue;
        }
        let precision = &groups[layer.group].precision;
        let Moments {
            m,
            v,
            compact,
            master,
        } = state;
        let params = match (p, master.as_deref_mut()) {
            (ParamsIn::F32(x), _) => Params::F32(x),
            (ParamsIn::Bf16(x), Some(master)) => Params::Master {
                master,
                model: HalfMut::Bf16(x),
            },
            (ParamsIn::F16(x), Some(master)) => Params::Master {
                master,
                model: HalfMut::F16(x),
            },
            (ParamsIn::Bf16(x), None) => Params::Bf16 {
                data: x,
                rounding: match precision.rounding {
                    Rounding::Nearest => Rounding::Nearest,
                    // The same seed for every piece of the layer: the hash also takes the
                    // element's index, so the bits do not depend on how the layer was cut.
                    Rounding::Stochastic { seed } => Rounding::Stochastic {
                        seed: mix(seed ^ mix(step) ^ mix(!(i as u64))),
                    },
                },
            },
            // `check_inputs` refused f16 without a master, and `make_masters` made one.
            (ParamsIn::F16(_), None) => return Err((LambError::NonFinite { layer: i }, i)),
        };
        let mut rest = MixedLayer {
            params,
            grads: *g,
            moments: Moments::core(
                m,
                v,
                compact,
                // The same seed for every piece, as above; distinct from the params' seed.
                Rounding::Stochastic {
                    seed: mix(MOMENTS_SALT ^ mix(step) ^ mix(!(i as u64))),
                },
            ),
        };
        let mut done = 0;
        while let Some(piece) = plan.get(cursor).filter(|piece| piece.layer == i) {
            cursor += 1;
            let n = piece.end - piece.start;
            let nb = n.div_ceil(BLOCK);
            let (head, tail) = rest.split_at(n).map_err(|e| (e.in_layer(i), i))?;
            rest = tail;
            let (nh, nt) = std::mem::take(&mut norms).split_at_mut(nb);
            let (qh, qt) = std::mem::take(&mut gsq).split_at_mut(nb);
            (norms, gsq) = (nt, qt);
            out[piece.thread].push(Work {
                layer: i,
                group: layer.group,
                data: head,
                index0: done,
                norms: nh,
                grad_sq: qh,
            });
            done += n;
        }
    }
    Ok(out)
}

/// Mixed into the seeds of bf16 moments' stochastic rounding.
const MOMENTS_SALT: u64 = 0x6d6f_6d65_6e74_7321; // "moments!"

/// SplitMix64's finaliser: spreads a seed's bits.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Why a phase failed.
enum RunError {
    Kernel(LambError, usize),
    Panic(String),
}

impl RunError {
    fn into_error(self, phase: &'static str, layers: &[Layer]) -> Error {
        match self {
            RunError::Kernel(source, index) => Error::Layer {
                index,
                name: layers[index].name.clone(),
                source,
            },
            RunError::Panic(message) => Error::WorkerPanicked { phase, message },
        }
    }
}

/// Runs `f` over every thread's pieces (`reverse`: last piece first), one list per pool
/// thread, pinned by thread index so phase 2 finds phase 1's data in that core's cache.
/// Panics are caught and returned.
fn run<F>(
    pool: Option<&rayon::ThreadPool>,
    work: &mut [Vec<Work<'_>>],
    reverse: bool,
    f: F,
) -> Result<(), RunError>
where
    F: Fn(&mut Work<'_>) -> Result<(), LambError> + Sync,
{
    let one = |list: &mut Vec<Work<'_>>| -> Result<(), RunError> {
        let r = catch_unwind(AssertUnwindSafe(|| {
            let mut go = |w: &mut Work<'_>| f(w).map_err(|e| RunError::Kernel(e, w.layer));
            if reverse {
                list.iter_mut().rev().try_for_each(&mut go)
            } else {
                list.iter_mut().try_for_each(&mut go)
            }
        }));
        r.unwrap_or_else(|p| Err(RunError::Panic(panic_message(&*p))))
    };
    match pool {
        None => work.iter_mut().try_for_each(one),
        Some(pool) => {
            let cells: Vec<Mutex<&mut Vec<Work<'_>>>> = work.iter_mut().map(Mutex::new).collect();
            let results = pool.broadcast(|ctx| match cells.get(ctx.index()) {
                Some(cell) => match cell.lock() {
                    Ok(mut list) => one(&mut list),
                    Err(_) => Err(RunError::Panic("work list poisoned".into())),
                },
                None => Ok(()),
            });
            results.into_iter().collect()
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".into())
}

// ---- Checkpoint support (issue #8): accessors for `crate::checkpoint`, which holds the
// ---- format and the public save/load methods. Keep these in step with the fields.
impl Lamb {
    /// The global gradient-norm clipping threshold (`None`: off).
    pub fn max_grad_norm(&self) -> Option<f64> {
        self.max_grad_norm
    }

    /// The learning-rate schedule.
    pub fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// Whether a panic in an apply phase left the state inconsistent.
    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Layer `i`'s stored moments and f32 master copy, writable.
    pub(crate) fn state_mut(&mut self, i: usize) -> (CoreMoments<'_>, &mut Option<AlignedBuf>) {
        let Moments {
            m,
            v,
            compact,
            master,
        } = &mut self.moments[i];
        // Only read and overwritten whole (checkpoints): no rounding happens.
        (Moments::core(m, v, compact, Rounding::Nearest), master)
    }

    /// Replaces the step counter, the groups' configurations and lr multipliers (same
    /// count, names kept), clipping and schedule, as a checkpoint load does after validating
    /// them; clears the per-layer reports and the poisoning.
    pub(crate) fn restore_scalars(
        &mut self,
        step: u64,
        groups: &[(LambConfig, f64)],
        max_grad_norm: Option<f64>,
        schedule: Schedule,
    ) {
        debug_assert_eq!(groups.len(), self.groups.len());
        for (g, &(config, lr_scale)) in self.groups.iter_mut().zip(groups) {
            g.config = config;
            g.lr_scale = lr_scale;
        }
        for l in &mut self.layers {
            l.last = None;
        }
        self.step = step;
        self.max_grad_norm = max_grad_norm;
        self.schedule = schedule;
        self.poisoned = false;
    }
}
// ---- end of checkpoint support.

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(threads: usize) -> (Lamb, Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let mut opt = Lamb::new(LambConfig::paper());
        opt.set_threads(threads).unwrap();
        let mut params = vec![];
        let mut grads = vec![];
        for i in 0..6 {
            let n = 3000 + i;
            opt.add_layer(format!("l{i}"), n).unwrap();
            params.push((0..n).map(|k| (k % 7) as f32 * 0.1 + 0.1).collect());
            grads.push((0..n).map(|k| (k % 5) as f32 * 0.01 - 0.02).collect());
        }
        (opt, params, grads)
    }

    fn do_step(opt: &mut Lamb, p: &mut [Vec<f32>], g: &[Vec<f32>]) -> Result<StepReport, Error> {
        let mut pp: Vec<&mut [f32]> = p.iter_mut().map(|x| x.as_mut_slice()).collect();
        let gg: Vec<&[f32]> = g.iter().map(|x| x.as_slice()).collect();
        opt.step(&mut pp, &gg)
    }

    fn state(opt: &Lamb, p: &[Vec<f32>]) -> (u64, Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let ms = opt.moments.iter().map(|s| s.m.to_vec()).collect();
        (opt.step, p.to_vec(), ms)
    }

    #[test]
    fn a_panic_in_the_norms_phase_is_an_error_and_writes_nothing() {
        for threads in [1, 2] {
            for phase in ["norms", "grad_norm"] {
                let (mut opt, mut p, g) = setup(threads);
                opt.set_max_grad_norm(Some(1.0)).unwrap();
                do_step(&mut opt, &mut p, &g).unwrap();
                let before = state(&opt, &p);
                opt.panic_in = Some((phase, 4));
                let e = do_step(&mut opt, &mut p, &g).unwrap_err();
                assert!(
                    matches!(e, Error::WorkerPanicked { phase: "norms", .. }),
                    "{e}"
                );
                assert!(e.to_string().contains("injected fault in layer 4"));
                assert!(e.to_string().contains("nothing was written"));
                assert!(state(&opt, &p) == before);
                // Not poisoned: the next step works.
                opt.panic_in = None;
                assert!(do_step(&mut opt, &mut p, &g).unwrap().applied);
            }
        }
    }

    #[test]
    fn a_panic_in_the_apply_phase_poisons_until_reset() {
        for threads in [1, 2] {
            let (mut opt, mut p, g) = setup(threads);
            opt.panic_in = Some(("apply", 2));
            let e = do_step(&mut opt, &mut p, &g).unwrap_err();
            assert!(matches!(e, Error::WorkerPanicked { phase: "apply", .. }));
            assert!(e.to_string().contains("poisoned"));
            opt.panic_in = None;
            assert_eq!(do_step(&mut opt, &mut p, &g).unwrap_err(), Error::Poisoned);
            opt.reset();
            assert!(do_step(&mut opt, &mut p, &g).unwrap().applied);
        }
    }
}
