//! One error type for everything the core can refuse.

use core::fmt;

/// A hyperparameter of [`LambConfig`](crate::LambConfig), named in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Field {
    Lr,
    Beta1,
    Beta2,
    Eps,
    WeightDecay,
    ParamNormMin,
    ParamNormMax,
    RatioMin,
    RatioMax,
    GradScale,
}

impl Field {
    /// The field's name as written in [`LambConfig`](crate::LambConfig).
    pub const fn name(self) -> &'static str {
        match self {
            Field::Lr => "lr",
            Field::Beta1 => "beta1",
            Field::Beta2 => "beta2",
            Field::Eps => "eps",
            Field::WeightDecay => "weight_decay",
            Field::ParamNormMin => "param_norm_min",
            Field::ParamNormMax => "param_norm_max",
            Field::RatioMin => "ratio_min",
            Field::RatioMax => "ratio_max",
            Field::GradScale => "grad_scale",
        }
    }
}

/// One of the four buffers of a layer, named in length errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Buffer {
    Param,
    Grad,
    ExpAvg,
    ExpAvgSq,
    /// The model's half-precision copy of master parameters.
    ModelCopy,
    /// The per-block absmax of 8-bit m.
    ExpAvgAbsmax,
    /// The per-block absmax of 8-bit v.
    ExpAvgSqAbsmax,
}

impl Buffer {
    /// Short name used in messages (`m` and `v` are the first and second moments).
    pub const fn name(self) -> &'static str {
        match self {
            Buffer::Param => "param",
            Buffer::Grad => "grad",
            Buffer::ExpAvg => "m",
            Buffer::ExpAvgSq => "v",
            Buffer::ModelCopy => "model copy",
            Buffer::ExpAvgAbsmax => "m absmax",
            Buffer::ExpAvgSqAbsmax => "v absmax",
        }
    }
}

/// Everything the core refuses. When an error is returned, no buffer has been written.
///
/// The core steps one layer at a time and does not know where the layer sits in the
/// caller's model, so no variant names a layer: a multi-layer caller names it around the
/// error (lamb-std's `Error::Layer { index, name, source }`).
///
/// ```
/// use lamb_core::{LambConfig, LambError};
/// let mut cfg = LambConfig::default();
/// cfg.beta2 = 1.0;
/// let err = cfg.validate().unwrap_err();
/// assert_eq!(err.to_string(), "invalid beta2 = 1.0: must be in [0, 1)");
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LambError {
    /// A hyperparameter is out of its domain (NaN included).
    InvalidHyperparameter {
        /// Which one.
        field: Field,
        /// Its value.
        value: f64,
        /// What it must be.
        expected: &'static str,
    },
    /// A lower bound is greater than its upper bound.
    InvalidBounds {
        /// The lower bound's field.
        lower_field: Field,
        /// Lower bound.
        lower: f64,
        /// Upper bound.
        upper: f64,
    },
    /// A learning-rate schedule parameter is out of its domain.
    InvalidSchedule {
        /// Which parameter, and what it must be.
        what: &'static str,
        /// Its value.
        value: f64,
    },
    /// The step counter is 0; LAMB counts steps from 1.
    StepZero,
    /// Buffers of one layer differ in length.
    LengthMismatch {
        /// The buffer whose length differs from the parameter's.
        buffer: Buffer,
        /// Length of the parameter.
        expected: usize,
        /// Length of `buffer`.
        found: usize,
    },
    /// The requested backend is not supported by this CPU (or not compiled for it).
    Unsupported {
        /// The backend asked for.
        backend: crate::Backend,
    },
    /// A layer in compact storage was split at an element that is not a multiple of
    /// [`QBLOCK`](crate::codec::QBLOCK) (8-bit moments are quantised in those blocks).
    MisalignedSplit {
        /// The split point.
        at: usize,
    },
    /// A gradient, moment, parameter or update was NaN or infinite, a block's sum of
    /// squares of p or u overflowed f32 (the norms' lanes are f32), or the step would take
    /// a parameter past the range of the format it is stored in (policy
    /// [`NonFinite::Error`](crate::NonFinite::Error)). No fields: the caller
    /// knows which layer it stepped.
    NonFinite {},
    /// The `out` slice given to phase 1 block by block
    /// ([`Backend::norms_blocks`](crate::Backend::norms_blocks)) has fewer slots than the
    /// layer has blocks of [`BLOCK`](crate::BLOCK) elements.
    OutTooShort {
        /// The layer's blocks: the slots `out` needs.
        blocks: usize,
        /// The slots `out` has.
        found: usize,
    },
}

impl fmt::Display for LambError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LambError::InvalidHyperparameter {
                field,
                value,
                expected,
            } => write!(
                f,
                "invalid {} = {value:?}: must be {expected}",
                field.name()
            ),
            LambError::InvalidBounds {
                lower_field,
                lower,
                upper,
            } => {
                let upper_field = match lower_field {
                    Field::RatioMin => Field::RatioMax,
                    _ => Field::ParamNormMax,
                };
                write!(
                    f,
                    "invalid bounds: {} = {lower:?} is greater than {} = {upper:?}",
                    lower_field.name(),
                    upper_field.name()
                )
            }
            LambError::InvalidSchedule { what, value } => {
                write!(f, "invalid schedule {what}: got {value:?}")
            }
            LambError::StepZero => write!(f, "step must be >= 1 (LAMB counts steps from 1), got 0"),
            LambError::LengthMismatch {
                buffer,
                expected,
                found,
            } => write!(
                f,
                "{} has {found} elements, param has {expected}",
                buffer.name()
            ),
            LambError::Unsupported { backend } => {
                write!(f, "backend {backend} is not supported by this CPU")
            }
            LambError::MisalignedSplit { at } => write!(
                f,
                "cannot split a compact layer at element {at}: not a multiple of {}",
                crate::codec::QBLOCK
            ),
            LambError::NonFinite {} => write!(
                f,
                "non-finite value (NaN or infinity) in the gradient, state or update, a norm beyond f32's range (a block's ‖p‖ or ‖u‖ above ~1.8e19), or new weights beyond their storage format's range; nothing was written"
            ),
            LambError::OutTooShort { blocks, found } => write!(
                f,
                "phase 1 by blocks: out has {found} slots, the layer has {blocks} blocks"
            ),
        }
    }
}

impl core::error::Error for LambError {}
