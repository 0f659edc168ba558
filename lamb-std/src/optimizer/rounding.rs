//! The seeds of a step's stochastic rounding, per layer and step: public so that an
//! optimizer that steps pieces of a layer elsewhere (lamb-mpi's shards) rounds exactly as
//! [`Lamb`](crate::Lamb) does. The kernels hash the element's index in the layer with
//! the seed, so a piece stepped with the layer's seed and its `index0` gives the bits of
//! the whole layer.

use lamb_core::layer::Rounding;

/// The rounding of layer `layer`'s bf16 moments at step `step` (always stochastic).
///
/// ```
/// use lamb_std::{moments_rounding, lamb_core::layer::Rounding};
/// assert!(matches!(moments_rounding(1, 0), Rounding::Stochastic { .. }));
/// assert_ne!(moments_rounding(1, 0), moments_rounding(2, 0));
/// ```
pub fn moments_rounding(step: u64, layer: usize) -> Rounding {
    Rounding::Stochastic {
        seed: mix(MOMENTS_SALT ^ mix(step) ^ mix(!(layer as u64))),
    }
}

/// The rounding of layer `layer`'s in-place bf16 parameters at step `step`, given its
/// group's [`Precision::rounding`](crate::Precision::rounding): a stochastic seed is mixed
/// with the step and the layer index; round-to-nearest stays.
pub fn params_rounding(rounding: Rounding, step: u64, layer: usize) -> Rounding {
    match rounding {
        Rounding::Nearest => Rounding::Nearest,
        Rounding::Stochastic { seed } => Rounding::Stochastic {
            seed: mix(seed ^ mix(step) ^ mix(!(layer as u64))),
        },
    }
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
