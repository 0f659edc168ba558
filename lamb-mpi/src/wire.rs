//! How a step's values travel: a block's phase-1 sums as five exact words, parameters as
//! 16-bit units in their own storage, and the digest of the parameters' storage.

use lamb_std::lamb_core::LayerNorms;
use lamb_std::lamb_core::layer::ParamFormat;
use lamb_std::{ParamStorage, ParamsIn};

/// A block's sums as five words, exactly: Σp², Σu², the ranges of p and u (f32 pairs),
/// the parameter format.
pub(crate) fn encode(n: &LayerNorms) -> [u64; 5] {
    let pair = |a: f32, b: f32| (a.to_bits() as u64) << 32 | b.to_bits() as u64;
    let format = match n.param_format {
        ParamFormat::F32 => 0,
        ParamFormat::F16 => 1,
        ParamFormat::Bf16 => 2,
        ParamFormat::Bf16Stochastic => 3,
    };
    [
        n.param_sq.to_bits(),
        n.update_sq.to_bits(),
        pair(n.param_min, n.param_max),
        pair(n.update_min, n.update_max),
        format,
    ]
}

/// [`encode`]'s inverse.
pub(crate) fn decode(w: &[u64]) -> LayerNorms {
    let hi = |x: u64| f32::from_bits((x >> 32) as u32);
    let lo = |x: u64| f32::from_bits(x as u32);
    LayerNorms {
        param_sq: f64::from_bits(w[0]),
        update_sq: f64::from_bits(w[1]),
        param_min: hi(w[2]),
        param_max: lo(w[2]),
        update_min: hi(w[3]),
        update_max: lo(w[3]),
        param_format: match w[4] {
            1 => ParamFormat::F16,
            2 => ParamFormat::Bf16,
            3 => ParamFormat::Bf16Stochastic,
            _ => ParamFormat::F32,
        },
    }
}

/// Elements `r` of a layer's parameters in 16-bit units (an f32 as low, high half).
pub(crate) fn pack(p: &ParamsIn<'_>, r: std::ops::Range<usize>, out: &mut Vec<u16>) {
    match p {
        ParamsIn::F32(x) => out.extend(x[r].iter().flat_map(|v| {
            let b = v.to_bits();
            [b as u16, (b >> 16) as u16]
        })),
        ParamsIn::Bf16(x) => out.extend(x[r].iter().map(|h| h.to_bits())),
        ParamsIn::F16(x) => out.extend(x[r].iter().map(|h| h.to_bits())),
    }
}

/// [`pack`]'s inverse over a whole layer.
pub(crate) fn unpack(p: &mut ParamsIn<'_>, units: &[u16]) {
    use lamb_std::lamb_core::half::{bf16, f16};
    match p {
        ParamsIn::F32(x) => {
            for (d, u) in x.iter_mut().zip(units.chunks_exact(2)) {
                *d = f32::from_bits(u[0] as u32 | (u[1] as u32) << 16);
            }
        }
        ParamsIn::Bf16(x) => x
            .iter_mut()
            .zip(units)
            .for_each(|(d, &u)| *d = bf16::from_bits(u)),
        ParamsIn::F16(x) => x
            .iter_mut()
            .zip(units)
            .for_each(|(d, &u)| *d = f16::from_bits(u)),
    }
}

pub(crate) fn params_len(p: &ParamsIn<'_>) -> usize {
    match p {
        ParamsIn::F32(x) => x.len(),
        ParamsIn::Bf16(x) => x.len(),
        ParamsIn::F16(x) => x.len(),
    }
}

/// A digest of the layers' parameter storage (and their count).
pub(crate) fn storage_digest(params: &[ParamsIn<'_>]) -> u64 {
    let text: String = params
        .iter()
        .map(|p| match p.storage() {
            ParamStorage::F32 => '4',
            ParamStorage::Bf16 => 'b',
            ParamStorage::F16 => 'h',
        })
        .collect();
    crate::agree::digest(&text)
}

pub(crate) fn prefix_sums(counts: &[i32]) -> Vec<i32> {
    counts
        .iter()
        .scan(0i32, |a, &c| {
            let d = *a;
            *a += c;
            Some(d)
        })
        .collect()
}
