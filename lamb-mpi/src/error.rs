//! [`Error`]: what every rank returns, alike, when a collective call is refused.

use std::fmt;

/// Why a collective call of [`DistLamb`](crate::DistLamb) failed. Every rank returns the
/// same value: ranks agree on an error before any of them returns (see the crate docs,
/// "No deadlocks").
#[derive(Clone, Debug, PartialEq)]
pub enum Error {
    /// Rank `rank` (the lowest-numbered one that did) refused the call's input: `what` is
    /// its own error's message, naming the layer or group and the value.
    Refused {
        /// The rank that refused (the lowest, if several did).
        rank: usize,
        /// Its error, as text (it was made on that rank and sent to the others).
        what: String,
    },
    /// The ranks registered different models: rank `rank` (the lowest whose table differs
    /// from rank 0's) at the first difference, `what`.
    LayerTable {
        /// The first rank whose table differs from rank 0's.
        rank: usize,
        /// The first difference, with both values.
        what: String,
    },
    /// An error every rank found alike from the same exchanged values, such as a step
    /// refused for a non-finite value under [`NonFinite::Error`](lamb_std::lamb_core::NonFinite).
    Optimizer(lamb_std::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Refused { rank, what } => write!(f, "refused on rank {rank}: {what}"),
            Error::LayerTable { rank, what } => {
                write!(
                    f,
                    "rank {rank} registered another model than rank 0: {what}"
                )
            }
            Error::Optimizer(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}
