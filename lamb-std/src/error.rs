//! Errors of the optimizer: the core's, attributed to a named layer, plus the whole-model ones.

use std::fmt;
use std::path::PathBuf;

use lamb_core::LambError;

use crate::ParamStorage;

/// Everything [`Lamb`](crate::Lamb) refuses. Whenever an `Err` is returned by a step, no
/// parameter, moment or counter has changed, except for [`Error::WorkerPanicked`] in the
/// apply phase, which says so and poisons the optimizer.
///
/// **One message, the whole story.** An error's `Display` says everything, the core's
/// error included, and [`source`](std::error::Error::source) is `None` for every variant:
/// an error reporter (`anyhow`, `{:#}`, a `caused by:` chain) prints each fact once. The
/// core's error stays available as data, in the `source` field of [`Error::Layer`],
/// [`Error::Config`] and [`Error::Core`].
///
/// A [`LambError`] converts into an `Error` ([`Error::Core`]), so a program that calls
/// both crates can use `?` on both in one function:
///
/// ```
/// use lamb_std::{Lamb, lamb_core::{LambConfig, step_layer}};
///
/// fn main() -> Result<(), lamb_std::Error> {
///     // lamb-core alone, on one layer's buffers: `?` converts the `LambError`.
///     let (mut p, g, mut m, mut v) = ([0.5f32; 4], [0.1f32; 4], [0.0f32; 4], [0.0f32; 4]);
///     step_layer(&LambConfig::paper(), 1, &mut p, &g, &mut m, &mut v)?;
///
///     // The optimizer over a model.
///     let mut opt = Lamb::new(LambConfig::paper())?;
///     opt.add_layer("w", 4)?;
///     let report = opt.step(&mut [&mut p], &[&g])?;
///     assert!(report.applied);
///     Ok(())
/// }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub enum Error {
    /// An error of lamb-core from a direct call to it (such as
    /// [`lamb_core::step_layer`]), converted by `?` ([`From<LambError>`]); the optimizer's
    /// own errors name the layer or group instead ([`Error::Layer`], [`Error::Config`]).
    Core {
        /// What is wrong.
        source: LambError,
    },
    /// An error of the core about one layer (lengths, non-finite values).
    Layer {
        /// Index of the layer.
        index: usize,
        /// Its registered name.
        name: String,
        /// What is wrong.
        source: LambError,
    },
    /// An error of the core about a group's configuration or the step itself.
    Config {
        /// The group's name (`None`: not about one group).
        group: Option<String>,
        /// What is wrong.
        source: LambError,
    },
    /// The step was given a different number of tensors than there are layers.
    LayerCount {
        /// Registered layers.
        layers: usize,
        /// Parameter tensors passed.
        params: usize,
        /// Gradient tensors passed.
        grads: usize,
    },
    /// A bound step ([`Lamb::step_bound`](crate::Lamb::step_bound)) was given a tensor
    /// for another layer than the one registered at its position (two layers swapped, a
    /// layer left out, a foreign id). Nothing was written.
    WrongLayer {
        /// The tensor's position in the list.
        position: usize,
        /// `"parameters"` or `"gradient"`.
        what: &'static str,
        /// The layer registered at that position.
        registered: String,
        /// The layer the tensor was given for.
        found: String,
    },
    /// Two gradient tensors share memory.
    AliasedBuffers {
        /// First layer's name.
        first: String,
        /// Second layer's name.
        second: String,
    },
    /// A layer name is registered twice.
    DuplicateName(String),
    /// A group id that this optimizer did not hand out.
    UnknownGroup(usize),
    /// A layer id that this optimizer did not hand out.
    UnknownLayer(usize),
    /// A group has no layers when a step is taken.
    EmptyGroup(String),
    /// `max_grad_norm` must be finite and at least `f32::MIN_POSITIVE` (see
    /// [`domain`](crate::domain)).
    InvalidMaxGradNorm(f64),
    /// A group's learning-rate multiplier must be finite and >= 0.
    InvalidLrScale {
        /// The group.
        group: String,
        /// The value.
        value: f64,
    },
    /// A group's `lr × lr_scale` is not finite in f32: every step at the schedule's full
    /// rate would err (see [`domain`](crate::domain)).
    LrScaleOverflow {
        /// The group.
        group: String,
        /// Its `config.lr`.
        lr: f64,
        /// Its `lr_scale`.
        lr_scale: f64,
    },
    /// A custom schedule ([`Lamb::set_lr_schedule`](crate::Lamb::set_lr_schedule)) gave a
    /// factor that is NaN, infinite or negative; the step was not taken.
    InvalidLrFactor {
        /// The step (1-based) it was asked for.
        step: u64,
        /// The factor it gave.
        factor: f64,
    },
    /// The step counter is at [`MAX_STEP`](crate::MAX_STEP): no further step can be
    /// counted. Nothing was changed; `reset()` or load a checkpoint.
    StepLimit {
        /// The counter.
        step: u64,
    },
    /// A new group configuration would leave a layer's moments unable to take any step
    /// (see [`domain`](crate::domain)); nothing was changed.
    StateCannotStep {
        /// The layer's name.
        layer: String,
        /// Which moment element, its value, and the limit.
        what: String,
    },
    /// `LAMB_BACKEND` names no backend, or one this CPU lacks.
    BadBackendEnv(String),
    /// The thread pool could not be built.
    ThreadPool(String),
    /// [`Lamb::set_threads`](crate::Lamb::set_threads) was asked for more threads than
    /// [`Lamb::max_threads`](crate::Lamb::max_threads); the previous setting stays.
    ThreadCount {
        /// The count asked for.
        requested: usize,
        /// The most accepted.
        max: usize,
    },
    /// A step passed a layer's parameters in another storage than the one its first applied
    /// step fixed (see [`ParamStorage`]). Nothing was written.
    StorageChanged {
        /// Index of the layer.
        index: usize,
        /// Its registered name.
        name: String,
        /// The storage fixed for it.
        fixed: ParamStorage,
        /// The storage the step passed.
        found: ParamStorage,
    },
    /// A step passed f32 parameters for a layer holding an f32 master copy of bf16/f16
    /// parameters (loaded from a checkpoint): the copy would be left stale. Nothing was
    /// written.
    MasterNeedsHalf {
        /// Index of the layer.
        index: usize,
        /// Its registered name.
        name: String,
    },
    /// The allocator had no memory for a layer's state (moments when registering it, its
    /// master copy at a step). Nothing was registered or written.
    OutOfMemory {
        /// The layer's name.
        name: String,
        /// What was being allocated (`"moments"`, `"master copy"`, ...).
        what: &'static str,
        /// The size of the allocation that failed, in bytes.
        bytes: usize,
    },
    /// A parameter's shape has more elements than `usize` can count.
    ShapeOverflow {
        /// The layer's name.
        name: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A group's precision can only be set before it has layers.
    PrecisionAfterLayers(String),
    /// f16 parameters need an f32 master copy (`Precision::master`).
    NeedsMaster(String),
    /// A worker thread panicked. In the norms phase nothing was written; in the apply phase
    /// some layers may have been written, the optimizer is poisoned and refuses further
    /// steps until [`Lamb::reset`](crate::Lamb::reset).
    WorkerPanicked {
        /// `"norms"` or `"apply"`.
        phase: &'static str,
        /// The panic message.
        message: String,
    },
    /// A worker panicked in an earlier apply phase; the state is inconsistent.
    Poisoned,
    /// (Checkpoints.) A checkpoint was refused: not one, corrupted, truncated, of
    /// another version, or of another model. The optimizer is unchanged.
    Checkpoint {
        /// The file, when loading from one.
        path: Option<PathBuf>,
        /// What is wrong, naming the layer, tensor or field and both values.
        what: String,
    },
    /// (Checkpoints.) A file operation failed; an existing checkpoint at the
    /// target path is untouched.
    Io {
        /// The path operated on.
        path: PathBuf,
        /// What was being done (`"read"`, `"create a temporary file beside"`, ...).
        op: &'static str,
        /// The OS error's kind.
        kind: std::io::ErrorKind,
        /// The OS error's message.
        message: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Core { source } => write!(f, "{source}"),
            Error::Layer {
                index,
                name,
                source,
            } => fmt_layer(f, *index, name, source),
            Error::Config {
                group: Some(g),
                source,
            } => write!(f, "group '{g}': {source}"),
            Error::Config {
                group: None,
                source,
            } => write!(f, "{source}"),
            Error::LayerCount { .. }
            | Error::AliasedBuffers { .. }
            | Error::WrongLayer { .. }
            | Error::StorageChanged { .. }
            | Error::MasterNeedsHalf { .. }
            | Error::NeedsMaster(_) => fmt_step_input(self, f),
            Error::DuplicateName(_)
            | Error::UnknownGroup(_)
            | Error::UnknownLayer(_)
            | Error::EmptyGroup(_)
            | Error::ShapeOverflow { .. }
            | Error::PrecisionAfterLayers(_) => fmt_registration(self, f),
            Error::InvalidMaxGradNorm(_)
            | Error::InvalidLrScale { .. }
            | Error::LrScaleOverflow { .. }
            | Error::InvalidLrFactor { .. }
            | Error::StepLimit { .. }
            | Error::StateCannotStep { .. } => fmt_domain(self, f),
            Error::BadBackendEnv(_)
            | Error::ThreadPool(_)
            | Error::ThreadCount { .. }
            | Error::OutOfMemory { .. }
            | Error::WorkerPanicked { .. }
            | Error::Poisoned => fmt_runtime(self, f),
            Error::Checkpoint { .. } | Error::Io { .. } => fmt_checkpoint(self, f),
        }
    }
}

/// [`Error::Layer`]: the layer, then the core's error in the layer's terms.
fn fmt_layer(
    f: &mut fmt::Formatter<'_>,
    index: usize,
    name: &str,
    source: &LambError,
) -> fmt::Result {
    match source {
        LambError::LengthMismatch {
            buffer,
            expected,
            found,
            ..
        } => write!(
            f,
            "layer '{name}' (#{index}): {} has {found} elements, the layer has {expected}",
            buffer.name()
        ),
        LambError::NonFinite { .. } => write!(
            f,
            "layer '{name}' (#{index}): non-finite value (NaN or infinity) in the gradient, state or update, a norm beyond f32's range (a block's ‖p‖ or ‖u‖ above ~1.8e19), or new weights beyond their storage format's range; the step was not applied"
        ),
        other => write!(f, "layer '{name}' (#{index}): {other}"),
    }
}

/// The tensors a step was given do not fit the registration or the state.
fn fmt_step_input(e: &Error, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match e {
        Error::LayerCount {
            layers,
            params,
            grads,
        } => write!(
            f,
            "the optimizer has {layers} layers, but the step got {params} parameter and {grads} gradient tensors"
        ),
        Error::AliasedBuffers { first, second } => write!(
            f,
            "the gradients of layers '{first}' and '{second}' share memory"
        ),
        Error::WrongLayer {
            position,
            what,
            registered,
            found,
        } => write!(
            f,
            "the {what} tensor at position {position} is given for layer {found}, but layer {registered} is registered there: pass every layer once, in registration order; nothing was written"
        ),
        Error::StorageChanged {
            index,
            name,
            fixed,
            found,
        } => write!(
            f,
            "layer '{name}' (#{index}): the step passed {found} parameters, but the layer's storage is {fixed} since its first step; nothing was written (reset() frees it)"
        ),
        Error::MasterNeedsHalf { index, name } => write!(
            f,
            "layer '{name}' (#{index}): the step passed f32 parameters, but the layer holds an f32 master copy of bf16/f16 parameters (from a checkpoint); nothing was written"
        ),
        Error::NeedsMaster(l) => write!(
            f,
            "layer '{l}': f16 parameters need an f32 master copy (Precision::master = true)"
        ),
        _ => unreachable!("fmt_step_input is called for the step-input variants only"),
    }
}

/// Layers and groups as registered.
fn fmt_registration(e: &Error, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match e {
        Error::DuplicateName(n) => write!(f, "a layer named '{n}' is already registered"),
        Error::UnknownGroup(g) => write!(f, "no parameter group with id {g}"),
        Error::UnknownLayer(l) => write!(f, "no layer with id {l}"),
        Error::EmptyGroup(g) => write!(f, "parameter group '{g}' has no layers"),
        Error::ShapeOverflow { name, shape } => write!(
            f,
            "layer '{name}': shape {shape:?} has more elements than usize can count"
        ),
        Error::PrecisionAfterLayers(g) => write!(
            f,
            "group '{g}' already has layers: set its precision before adding them"
        ),
        _ => unreachable!("fmt_registration is called for the registration variants only"),
    }
}

/// Settings outside the step domain (see [`domain`](crate::domain)).
fn fmt_domain(e: &Error, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match e {
        Error::InvalidMaxGradNorm(x) => write!(
            f,
            "invalid max_grad_norm = {x:?}: must be finite and at least {:?} (f32::MIN_POSITIVE; use None to turn clipping off)",
            f32::MIN_POSITIVE
        ),
        Error::InvalidLrScale { group, value } => write!(
            f,
            "group '{group}': invalid lr_scale = {value:?}: must be finite and >= 0"
        ),
        Error::LrScaleOverflow {
            group,
            lr,
            lr_scale,
        } => write!(
            f,
            "group '{group}': lr × lr_scale = {lr:?} × {lr_scale:?} = {:?} is not finite in f32: every step would err",
            lr * lr_scale
        ),
        Error::InvalidLrFactor { step, factor } => write!(
            f,
            "the custom lr schedule gave the factor {factor:?} for step {step}: must be finite and >= 0; the step was not taken"
        ),
        Error::StepLimit { step } => write!(
            f,
            "the step counter is at {step}, the most lamb counts (MAX_STEP = 2^53): no further step can be taken; reset() or load a checkpoint"
        ),
        Error::StateCannotStep { layer, what } => write!(
            f,
            "layer '{layer}': with this configuration {what}; the group was not changed"
        ),
        _ => unreachable!("fmt_domain is called for the domain variants only"),
    }
}

/// The machine: backend, threads, memory, worker panics.
fn fmt_runtime(e: &Error, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match e {
        Error::BadBackendEnv(v) => write!(
            f,
            "LAMB_BACKEND='{v}' is not a backend this CPU supports (scalar, portable, avx2, avx512, neon)"
        ),
        Error::ThreadPool(e) => write!(f, "could not build the thread pool: {e}"),
        Error::ThreadCount { requested, max } => write!(
            f,
            "{requested} threads requested; at most {max} are supported (0 means one per core)"
        ),
        Error::OutOfMemory { name, what, bytes } => write!(
            f,
            "layer '{name}': could not allocate {bytes} bytes for its {what}; nothing was changed"
        ),
        Error::WorkerPanicked { phase, message } => write!(
            f,
            "a worker thread panicked in the {phase} phase: {message}{}",
            if *phase == "apply" {
                "; some layers may have been written, the optimizer is poisoned until reset()"
            } else {
                "; nothing was written"
            }
        ),
        Error::Poisoned => write!(
            f,
            "the optimizer is poisoned by a panic in an earlier step; call reset() or reload a checkpoint"
        ),
        _ => unreachable!("fmt_runtime is called for the runtime variants only"),
    }
}

/// Checkpoint files and their contents.
fn fmt_checkpoint(e: &Error, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match e {
        Error::Checkpoint {
            path: Some(p),
            what,
        } => write!(f, "checkpoint '{}': {what}", p.display()),
        Error::Checkpoint { path: None, what } => write!(f, "checkpoint: {what}"),
        Error::Io {
            path, op, message, ..
        } => write!(f, "could not {op} '{}': {message}", path.display()),
        _ => unreachable!("fmt_checkpoint is called for the checkpoint variants only"),
    }
}

/// `source()` is `None` for every variant: the message already includes the core's error
/// (see [`Error`], "One message, the whole story").
impl std::error::Error for Error {}

impl From<LambError> for Error {
    fn from(source: LambError) -> Error {
        Error::Core { source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lamb_core::{Buffer, Field};

    /// The messages of an error and of every `source()` below it.
    fn chain(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
        let mut out = vec![e.to_string()];
        let mut next = e.source();
        while let Some(s) = next {
            out.push(s.to_string());
            next = s.source();
        }
        out
    }

    /// An error reporter walking `source()` prints each fact once: the fact appears in
    /// exactly one message of the chain.
    #[test]
    fn an_error_chain_states_each_fact_once() {
        let layer = |source| Error::Layer {
            index: 2,
            name: "w".into(),
            source,
        };
        let cases: Vec<(Error, &str)> = vec![
            (
                layer(LambError::LengthMismatch {
                    buffer: Buffer::Grad,
                    expected: 64,
                    found: 3,
                }),
                "has 3 elements",
            ),
            (layer(LambError::NonFinite {}), "non-finite"),
            (
                layer(LambError::InvalidHyperparameter {
                    field: Field::Lr,
                    value: -1.0,
                    expected: "finite and >= 0",
                }),
                "-1",
            ),
            (
                Error::Config {
                    group: Some("decay".into()),
                    source: LambError::InvalidHyperparameter {
                        field: Field::Lr,
                        value: f64::NAN,
                        expected: "finite and >= 0",
                    },
                },
                "NaN",
            ),
            (
                Error::Config {
                    group: None,
                    source: LambError::InvalidHyperparameter {
                        field: Field::GradScale,
                        value: 0.0,
                        expected: "finite and > 0",
                    },
                },
                "finite and > 0",
            ),
            (LambError::NonFinite {}.into(), "non-finite"),
        ];
        for (e, fact) in cases {
            let messages = chain(&e);
            let with_fact = messages.iter().filter(|m| m.contains(fact)).count();
            assert_eq!(with_fact, 1, "{fact:?} in {messages:#?}");
        }
    }

    /// `?` turns a core error into this crate's, keeping it as data.
    #[test]
    fn a_core_error_converts_with_question_mark() {
        fn core() -> Result<(), LambError> {
            Err(LambError::NonFinite {})
        }
        fn both() -> Result<(), Error> {
            core()?;
            Ok(())
        }
        let e = both().unwrap_err();
        assert_eq!(
            e,
            Error::Core {
                source: LambError::NonFinite {}
            }
        );
        assert_eq!(e.to_string(), LambError::NonFinite {}.to_string());
    }
}
