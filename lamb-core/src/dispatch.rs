//! Backends and the choice among them.

use crate::kernels::scalar;
use crate::step::{LayerNorms, StepScalars};

/// A kernel implementation. All backends give identical bits.
///
/// ```
/// use lamb_core::Backend;
/// let fastest = Backend::detect();
/// assert!(Backend::available().any(|b| b == fastest));
/// assert_eq!(Backend::Scalar.checked(), Some(Backend::Scalar));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Backend {
    /// The one-element-at-a-time reference.
    Scalar,
}

impl Backend {
    /// Every backend this build knows, fastest last.
    pub const ALL: &'static [Backend] = &[Backend::Scalar];

    /// The fastest backend this CPU supports.
    pub fn detect() -> Backend {
        Backend::Scalar
    }

    /// `Some(self)` if this CPU and OS support it, else `None`.
    pub fn checked(self) -> Option<Backend> {
        match self {
            Backend::Scalar => Some(self),
        }
    }

    /// The backends this CPU supports, slowest first.
    pub fn available() -> impl Iterator<Item = Backend> {
        Backend::ALL
            .iter()
            .copied()
            .filter(|b| b.checked().is_some())
    }

    /// Lower-case name: `scalar`, `portable`, `avx2`, `avx512`, `neon`.
    pub const fn name(self) -> &'static str {
        match self {
            Backend::Scalar => "scalar",
        }
    }

    /// Parses a [`Backend::name`].
    pub fn from_name(name: &str) -> Option<Backend> {
        Backend::ALL.iter().copied().find(|b| b.name() == name)
    }

    #[inline]
    pub(crate) fn block_norms(
        self,
        s: &StepScalars,
        p: &[f32],
        g: &[f32],
        m: &[f32],
        v: &[f32],
    ) -> LayerNorms {
        match self {
            Backend::Scalar => scalar::block_norms(s, p, g, m, v),
        }
    }

    #[inline]
    pub(crate) fn apply_unchecked_len(
        self,
        s: &StepScalars,
        step: f32,
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
    ) {
        match self {
            Backend::Scalar => scalar::apply(s, step, p, g, m, v),
        }
    }

    #[inline]
    pub(crate) fn block_sum_squares(self, x: &[f32]) -> f64 {
        match self {
            Backend::Scalar => scalar::block_sum_squares(x),
        }
    }
}

impl core::fmt::Display for Backend {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}
