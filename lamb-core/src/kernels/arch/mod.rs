//! One module per instruction set: each is a [`Simd`](super::simd::Simd) impl plus the
//! `#[target_feature]` entry points that [`entry_points!`](super::simd::entry_points) declares.

pub(crate) mod portable;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;

#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
