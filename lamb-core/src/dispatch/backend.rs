//! The names of the backends. A leaf, so that an error can name the backend it refused;
//! what a backend does (detection, the kernels, the phases) is in the rest of
//! [`crate::dispatch`].

/// A kernel implementation. All backends give identical bits.
///
/// ```
/// use lamb_core::Backend;
/// let fastest = Backend::detect();
/// assert!(Backend::available().any(|b| b == fastest));
/// assert_eq!(Backend::Scalar.checked(), Some(Backend::Scalar));
/// // Asking for a backend this CPU lacks is an error, never undefined behaviour.
/// for b in Backend::ALL {
///     if b.checked().is_none() {
///         assert!(b.sum_squares(&[1.0]).is_err());
///     }
/// }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Backend {
    /// The one-element-at-a-time reference.
    Scalar = 0,
    /// `wide` compile-time SIMD: SSE2 on x86-64, simd128 on wasm, NEON on aarch64.
    Portable = 1,
    /// x86-64 AVX2 + F16C (`core::arch` intrinsics; no FMA by the bit-exact rule).
    Avx2 = 2,
    /// x86-64 AVX-512F (+ DQ), masked tails.
    Avx512 = 3,
    /// aarch64 NEON.
    Neon = 4,
}

impl Backend {
    /// Every backend this crate knows, slowest first.
    pub const ALL: [Backend; 5] = [
        Backend::Scalar,
        Backend::Portable,
        Backend::Avx2,
        Backend::Avx512,
        Backend::Neon,
    ];

    /// Lower-case name: `scalar`, `portable`, `avx2`, `avx512`, `neon`.
    pub const fn name(self) -> &'static str {
        match self {
            Backend::Scalar => "scalar",
            Backend::Portable => "portable",
            Backend::Avx2 => "avx2",
            Backend::Avx512 => "avx512",
            Backend::Neon => "neon",
        }
    }

    /// Parses a [`Backend::name`].
    ///
    /// ```
    /// assert_eq!(lamb_core::Backend::from_name("avx2"), Some(lamb_core::Backend::Avx2));
    /// ```
    pub fn from_name(name: &str) -> Option<Backend> {
        Backend::ALL.into_iter().find(|b| b.name() == name)
    }
}

impl core::fmt::Display for Backend {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}
