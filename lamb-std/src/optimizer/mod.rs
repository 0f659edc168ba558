//! [`Lamb`]: the optimizer users hold, its registration, settings and getters.
//!
//! The files of this module follow the data: [`group`] (groups and the storage format
//! setting), [`views`] (the borrowed views the API hands out and takes), [`state`] (the
//! layer state, the one owner of moments and master copies), `scratch` (buffers a step
//! reuses), and [`step`] (the step itself, from the checks to phase 2). Imports point that
//! way: nothing here imports `step`.

mod bind;
mod clone;
mod cut;
mod group;
mod phases;
mod rounding;
mod schedule;
mod scratch;
mod state;
mod step;
#[cfg(test)]
mod tests;
mod views;

use std::collections::HashMap;

use lamb_core::{BLOCK, Backend, LambConfig, LambError, LayerReport, Schedule};

pub use bind::LayerKey;
use group::CustomSchedule;
pub use group::{Group, GroupId, LayerId, Precision, StateFormat};
pub use rounding::{moments_rounding, params_rounding};
pub(crate) use state::StateBytes;
pub use views::{LayerView, ParamStorage, ParamsIn, SkippedLayer, StateView, StepReport};

use crate::buffer::AlignedBuf;
use crate::error::Error;
use scratch::Scratch;
use state::LayerState;

/// A layer's registration (its state lives apart, in `Lamb::states`, so that a step can
/// lend the states to threads while reading this).
#[derive(Clone)]
struct Layer {
    name: String,
    group: usize,
    len: usize,
    /// Norms and ratio of the last applied step.
    last: Option<LayerReport>,
}

impl Layer {
    /// A kernel's refusal of this layer, layer `i`, with its index and name.
    fn error(&self, i: usize, source: LambError) -> Error {
        Error::Layer {
            index: i,
            name: self.name.clone(),
            source,
        }
    }
}

/// The LAMB optimizer over a model's layers.
///
/// ```
/// use lamb_std::{Lamb, lamb_core::LambConfig};
///
/// let mut opt = Lamb::new(LambConfig::paper())?;
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
    /// Number of layers in each group (parallel to `groups`).
    group_layers: Vec<usize>,
    layers: Vec<Layer>,
    /// Layer index by name: the one place names are looked up.
    names: HashMap<String, usize>,
    /// Per layer: moments, master copy, parameter storage (parallel to `layers`).
    states: Vec<LayerState>,
    step: u64,
    threads: usize,
    pool: Option<rayon::ThreadPool>,
    backend: Result<Backend, Error>,
    max_grad_norm: Option<f64>,
    schedule: Schedule,
    /// A schedule given as a closure ([`Lamb::set_lr_schedule`]); replaces `schedule` while
    /// set.
    custom_schedule: Option<CustomSchedule>,
    poisoned: bool,
    no_decay_group: Option<usize>,
    /// The plan among threads, the block sums and the buffers every step reuses.
    scratch: Scratch,
    #[cfg(test)]
    pub(crate) panic_in: Option<(&'static str, usize)>,
    /// Makes the allocation of this layer's master copy fail, as if memory ran out.
    #[cfg(test)]
    pub(crate) fail_master_of: Option<usize>,
}

impl Lamb {
    /// An optimizer with one group, `"default"`, of configuration `config`, one thread, and
    /// the backend named by the `LAMB_BACKEND` environment variable if set, else the fastest
    /// (a bad `LAMB_BACKEND` is reported by [`Lamb::backend`] and the first step, so that
    /// [`Lamb::set_backend`] can still choose one).
    ///
    /// The configuration is checked now, by the rules of [`Lamb::add_group`]
    /// ([`domain`](crate::domain)): a bad one is refused here, not at the first step.
    ///
    /// ```
    /// use lamb_std::{Error, Lamb, lamb_core::LambConfig};
    /// let e = Lamb::new(LambConfig { beta2: 1.5, ..LambConfig::paper() }).unwrap_err();
    /// assert!(matches!(e, Error::Config { group: Some(ref g), .. } if g == "default"));
    /// ```
    pub fn new(config: LambConfig) -> Result<Lamb, Error> {
        let opt = Lamb::unchecked(config);
        opt.groups.iter().try_for_each(validate_group)?;
        Ok(opt)
    }

    /// [`Lamb::new`] without the check of `config`.
    fn unchecked(config: LambConfig) -> Lamb {
        Lamb {
            groups: vec![Group {
                name: "default".into(),
                config,
                lr_scale: 1.0,
                precision: Precision::default(),
            }],
            group_layers: vec![0],
            layers: Vec::new(),
            names: HashMap::new(),
            states: Vec::new(),
            step: 0,
            threads: 1,
            pool: None,
            backend: backend_from_env(),
            max_grad_norm: None,
            schedule: Schedule::Constant,
            custom_schedule: None,
            poisoned: false,
            no_decay_group: None,
            scratch: Scratch::default(),
            #[cfg(test)]
            panic_in: None,
            #[cfg(test)]
            fail_master_of: None,
        }
    }

    /// The usual split for transformers (timm's `param_groups_weight_decay`): group
    /// `"decay"` with `config`, and group `"no_decay"` with weight decay 0 and no trust ratio
    /// for biases and normalisation scales; [`Lamb::add_param`] picks the group.
    ///
    /// ```
    /// use lamb_std::{GroupId, Lamb, lamb_core::LambConfig};
    /// let mut opt = Lamb::with_decay_split(LambConfig::paper())?;
    /// let w = opt.add_param("fc.weight", &[4, 3])?;
    /// let b = opt.add_param("fc.bias", &[4])?;
    /// assert_eq!(opt.layer(w)?.group, GroupId(0));
    /// assert_eq!(opt.layer(b)?.group, GroupId(1));
    /// # Ok::<(), lamb_std::Error>(())
    /// ```
    ///
    /// `config` is checked now, as by [`Lamb::new`], and so is the `"no_decay"` group's.
    pub fn with_decay_split(config: LambConfig) -> Result<Lamb, Error> {
        let mut opt = Lamb::unchecked(config);
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
        opt.group_layers.push(0);
        opt.no_decay_group = Some(1);
        opt.groups.iter().try_for_each(validate_group)?;
        Ok(opt)
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
        self.group_layers.push(0);
        Ok(GroupId(self.groups.len() - 1))
    }

    /// Sets how a group stores its state. Only before the group has layers: the layers'
    /// state is allocated in the group's format when they are added.
    pub fn set_precision(&mut self, id: GroupId, precision: Precision) -> Result<(), Error> {
        let name = self.group(id)?.name.clone();
        if self.group_layers[id.0] > 0 {
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

    /// Registers a layer of `len` elements in `group`. Its state is allocated now; if the
    /// allocator has no memory for it, the result is [`Error::OutOfMemory`] and nothing is
    /// registered. Registration takes constant time per layer (amortised): the names are
    /// indexed, and the partition among threads is made once, at the next step.
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
        if self.names.contains_key(&name) {
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
        // Every allocation first, fallibly; then the pushes, which cannot fail.
        let state = match LayerState::new(len, &self.groups[group.0].precision) {
            Ok(m) => m,
            Err(e) => return Err(out_of_memory(name, "moments", e.bytes())),
        };
        let blocks = len.div_ceil(BLOCK);
        let reserved = (|| {
            let table = size_of::<Layer>() + size_of::<LayerState>() + size_of::<(String, usize)>();
            let table = Some(table);
            self.layers.try_reserve(1).map_err(|_| table)?;
            self.states.try_reserve(1).map_err(|_| table)?;
            self.names.try_reserve(1).map_err(|_| table)?;
            self.scratch.reserve_layer(blocks)
        })();
        if let Err(bytes) = reserved {
            return Err(out_of_memory(name, "layer table and block sums", bytes));
        }
        let index = self.layers.len();
        self.names.insert(name.clone(), index);
        self.layers.push(Layer {
            name,
            group: group.0,
            len,
            last: None,
        });
        self.states.push(state);
        self.group_layers[group.0] += 1;
        self.scratch.push_layer(blocks);
        Ok(LayerId(index))
    }

    /// The most threads [`Lamb::set_threads`] accepts: [`Lamb::MAX_THREADS`], or rayon's
    /// maximum pool size where that is lower (255 on 32-bit targets, whose thread pools
    /// rayon caps silently).
    pub fn max_threads() -> usize {
        Lamb::MAX_THREADS.min(rayon::max_num_threads())
    }

    /// The most threads a [`Lamb`] runs on (see [`Lamb::max_threads`]). A step is
    /// memory-bound: past one thread per core more threads only add overhead, and each
    /// costs a stack and a piece of every step's partition. 1024 is above the hardware
    /// threads of today's largest common servers, far below what exhausts memory, and the
    /// same on every machine, so a program that runs on one is not refused on another.
    pub const MAX_THREADS: usize = 1024;

    /// Number of worker threads: 1 runs on the caller's thread with no pool; 0 means one per
    /// available core (at most [`Lamb::max_threads`]). Results are bit-identical for every
    /// count. A count above [`Lamb::max_threads`] is refused with [`Error::ThreadCount`],
    /// and the previous setting stays. The work is planned for the threads the pool
    /// actually has ([`Lamb::threads`]).
    ///
    /// ```
    /// use lamb_std::{Error, Lamb, lamb_core::LambConfig};
    /// let mut opt = Lamb::new(LambConfig::paper())?;
    /// opt.set_threads(3)?;
    /// assert_eq!(opt.threads(), 3);
    /// let e = opt.set_threads(100_000).unwrap_err();
    /// assert!(matches!(e, Error::ThreadCount { requested: 100_000, .. }));
    /// assert_eq!(opt.threads(), 3);
    /// # Ok::<(), lamb_std::Error>(())
    /// ```
    pub fn set_threads(&mut self, threads: usize) -> Result<(), Error> {
        let max = Lamb::max_threads();
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(max)),
            n if n > max => {
                return Err(Error::ThreadCount { requested: n, max });
            }
            n => n,
        };
        let pool = build_pool(threads)?;
        // What the pool has, not what was asked: the plan gives work to these threads only.
        self.threads = pool.as_ref().map_or(1, |p| p.current_num_threads());
        self.pool = pool;
        self.scratch.plan_stale = true;
        Ok(())
    }

    /// The thread count in use: that of the pool (1 without one).
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
    /// `None` turns it off; a threshold must be finite and at least `f32::MIN_POSITIVE`
    /// ([`domain`](crate::domain)): `Some(0.0)` is an error (apex and timm would divide by
    /// zero), and so is `Some(5e-324)`, under which every step would be skipped.
    pub fn set_max_grad_norm(&mut self, max_norm: Option<f64>) -> Result<(), Error> {
        crate::domain::validate_max_grad_norm(max_norm)?;
        self.max_grad_norm = max_norm;
        Ok(())
    }

    /// The learning-rate schedule (a factor on every group's lr). Replaces a custom
    /// schedule set by [`Lamb::set_lr_schedule`].
    pub fn set_schedule(&mut self, schedule: Schedule) -> Result<(), Error> {
        schedule.validate().map_err(|source| Error::Config {
            group: None,
            source,
        })?;
        self.schedule = schedule;
        self.custom_schedule = None;
        Ok(())
    }

    /// Replaces a group's configuration and lr multiplier, after validating them (the rules
    /// of [`domain`](crate::domain), which also refuse a configuration under which the
    /// group's moments could take no step).
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
        let states = (self.layers.iter().zip(&self.states))
            .filter(|(l, _)| l.group == id.0)
            .map(|(l, s)| (l.name.as_str(), s.view()));
        crate::domain::check_group_state(self.step, &old.config, &group.config, states)?;
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

    /// A layer's registration, moments and last report; [`Error::UnknownLayer`] for an id
    /// this optimizer did not hand out (like [`Lamb::group`]).
    ///
    /// ```
    /// use lamb_std::{Error, Lamb, LayerId, lamb_core::LambConfig};
    /// let mut opt = Lamb::new(LambConfig::paper())?;
    /// let w = opt.add_layer("w", 4)?;
    /// assert_eq!(opt.layer(w)?.name, "w");
    /// assert_eq!(opt.layer(LayerId(7)).unwrap_err(), Error::UnknownLayer(7));
    /// # Ok::<(), lamb_std::Error>(())
    /// ```
    pub fn layer(&self, id: LayerId) -> Result<LayerView<'_>, Error> {
        match (self.layers.get(id.0), self.states.get(id.0)) {
            (Some(l), Some(s)) => Ok(layer_view(l, s)),
            _ => Err(Error::UnknownLayer(id.0)),
        }
    }

    /// [`Lamb::layer`] for the crate's loops over `0..layer_count()`, whose ids are known.
    pub(crate) fn layer_at(&self, id: LayerId) -> LayerView<'_> {
        layer_view(&self.layers[id.0], &self.states[id.0])
    }

    /// Finds a layer by name.
    pub fn layer_id(&self, name: &str) -> Option<LayerId> {
        self.names.get(name).copied().map(LayerId)
    }

    /// Steps taken so far, at most [`MAX_STEP`](crate::MAX_STEP).
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Zeroes every moment and the step counter and clears reports and poisoning; layers,
    /// groups and settings stay. The layers' parameter storage is free again, to be fixed by
    /// the next applied step (see [`ParamStorage`]).
    pub fn reset(&mut self) {
        for (l, s) in self.layers.iter_mut().zip(&mut self.states) {
            s.reset();
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
        let bytes: usize = self.states.iter().map(LayerState::bytes).sum();
        if params == 0 {
            0.0
        } else {
            bytes as f64 / params as f64
        }
    }
}

/// The pool for `threads` threads (`None` for one: the caller's thread).
fn build_pool(threads: usize) -> Result<Option<rayon::ThreadPool>, Error> {
    if threads == 1 {
        return Ok(None);
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("lamb-{i}"))
        .build()
        .map(Some)
        .map_err(|e| Error::ThreadPool(e.to_string()))
}

fn layer_view<'a>(l: &'a Layer, s: &'a LayerState) -> LayerView<'a> {
    let (m, v) = s.f32_moments();
    LayerView {
        name: &l.name,
        len: l.len,
        group: GroupId(l.group),
        m,
        v,
        state: s.view(),
        master: s.master(),
        storage: s.storage(),
        last: l.last,
    }
}

pub(super) fn validate_group(g: &Group) -> Result<(), Error> {
    crate::domain::validate_group(&g.name, &g.config, g.lr_scale)
}

/// The error of a failed allocation of `what` for layer `name`.
pub(super) fn out_of_memory(name: String, what: &'static str, bytes: Option<usize>) -> Error {
    Error::OutOfMemory {
        name,
        what,
        bytes: bytes.unwrap_or(usize::MAX),
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

    /// Replaces the whole optimizer state with a checked checkpoint's: every layer's state
    /// ([`LayerState::replace_from`]), the step counter, the groups' configurations and lr
    /// multipliers (same count, names kept), clipping and schedule; clears the per-layer
    /// reports and the poisoning. The checkpoint reader has checked everything and
    /// allocated the master copies, so this cannot fail.
    pub(crate) fn restore(&mut self, snapshot: Snapshot<'_>) {
        let Snapshot {
            step,
            groups,
            max_grad_norm,
            schedule,
            layers,
        } = snapshot;
        debug_assert_eq!(groups.len(), self.groups.len());
        debug_assert_eq!(layers.len(), self.states.len());
        debug_assert!(step <= crate::MAX_STEP);
        for (state, (moments, master)) in self.states.iter_mut().zip(layers) {
            state.replace_from(moments, master);
        }
        for (g, (config, lr_scale)) in self.groups.iter_mut().zip(groups) {
            g.config = config;
            g.lr_scale = lr_scale;
        }
        for l in &mut self.layers {
            l.last = None;
        }
        self.step = step;
        self.max_grad_norm = max_grad_norm;
        if let Some(schedule) = schedule {
            self.schedule = schedule;
            self.custom_schedule = None;
        }
        self.poisoned = false;
    }
}

/// A checked checkpoint, ready for [`Lamb::restore`].
pub(crate) struct Snapshot<'a> {
    pub(crate) step: u64,
    /// Per group: configuration and lr multiplier.
    pub(crate) groups: Vec<(LambConfig, f64)>,
    pub(crate) max_grad_norm: Option<f64>,
    /// The file's schedule (`None`: keep the optimizer's, a custom one included).
    pub(crate) schedule: Option<Schedule>,
    /// Per layer: the moments (`None`: zeros) and the master copy.
    pub(crate) layers: Vec<(Option<StateBytes<'a>>, Option<AlignedBuf>)>,
}
