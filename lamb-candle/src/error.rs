//! What [`Lamb`](crate::Lamb) refuses. Every `Err` leaves the Vars, the optimizer's state
//! and its step counter as they were.

use std::fmt;

/// Everything [`Lamb`](crate::Lamb) refuses, each naming the Var (or value) at fault.
/// Through [`candle_nn::Optimizer`] it arrives as a [`candle_core::Error`] with this text.
#[derive(Clone, Debug, PartialEq)]
pub enum Error {
    /// A Var this optimizer cannot step: its dtype, device or layout, or (at a step) a
    /// storage that changed under it since construction.
    Var {
        /// The Var's name.
        name: String,
        /// What is wrong with it.
        what: String,
    },
    /// Two Vars share one storage: a step would update the same memory twice.
    SharedVars {
        /// One Var's name.
        first: String,
        /// The other's.
        second: String,
    },
    /// A Var's gradient cannot be used as it is: dtype, shape, device, layout, or a storage
    /// that is a Var's own.
    Grad {
        /// The Var's name.
        name: String,
        /// What is wrong with its gradient.
        what: String,
    },
    /// [`set_learning_rate`](candle_nn::Optimizer::set_learning_rate) got a rate lamb
    /// refuses (negative or not finite). The trait's setter cannot fail, so the rate is
    /// kept aside and every step refuses until a valid one is set.
    LearningRate(f64),
    /// The loss scale must be finite and > 0.
    LossScale(f32),
    /// lamb-std refused: a configuration, a non-finite gradient under
    /// [`NonFinite::Error`](lamb_std::lamb_core::NonFinite::Error), a checkpoint.
    Lamb(lamb_std::Error),
    /// candle refused the in-place update (its message).
    Candle(String),
}

impl Error {
    pub(crate) fn var(name: &str, what: impl Into<String>) -> Error {
        Error::Var {
            name: name.to_string(),
            what: what.into(),
        }
    }

    pub(crate) fn grad(name: &str, what: impl Into<String>) -> Error {
        Error::Grad {
            name: name.to_string(),
            what: what.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Var { name, what } => write!(f, "Var '{name}': {what}"),
            Error::SharedVars { first, second } => write!(
                f,
                "Vars '{first}' and '{second}' share one storage; pass each Var once"
            ),
            Error::Grad { name, what } => write!(f, "gradient of Var '{name}': {what}"),
            Error::LearningRate(lr) => write!(
                f,
                "learning rate {lr:?} (from set_learning_rate) must be finite and >= 0; set a valid one to step again"
            ),
            Error::LossScale(s) => write!(f, "loss scale {s:?} must be finite and > 0"),
            Error::Lamb(e) => write!(f, "{e}"),
            Error::Candle(e) => write!(f, "candle: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Lamb(e) => Some(e),
            _ => None,
        }
    }
}

impl From<lamb_std::Error> for Error {
    fn from(e: lamb_std::Error) -> Error {
        Error::Lamb(e)
    }
}

impl From<Error> for candle_core::Error {
    fn from(e: Error) -> candle_core::Error {
        candle_core::Error::wrap(e)
    }
}
