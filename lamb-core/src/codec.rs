//! The codecs of compact storage: how an f32 value is stored in bf16, f16 or 8 bits, and
//! read back. A leaf: it knows nothing of layers, kernels or errors.
//!
//! Every codec is integer and bit manipulation (or an exactly rounded f32 operation), so
//! every backend produces the same bits: the kernels decode a chunk to f32, compute in f32
//! and encode the result ([`crate::layer`] says which buffer is stored how).
//!
//! 8-bit moments are quantised in blocks of [`QBLOCK`] elements with one f32 `absmax` per
//! block: `x ≈ absmax · value(code)`. The codes are small floating-point formats of
//! `|x| / absmax ∈ [0, 1]`, a dynamic (non-linear) code like bitsandbytes' dynamic map:
//! - m (signed): sign bit + 4 exponent bits + 3 mantissa bits (E4M3, bias 15); relative
//!   step 1/8 from 1 down to 6.1e-5, then linear down to 7.6e-6.
//! - v (unsigned): 5 exponent bits + 3 mantissa bits (E5M3, bias 31), down to 1.2e-10, as
//!   v spans the square of the gradient's range.
//!
//! Rounding is to nearest, ties to even, everywhere, except where stochastic rounding is
//! asked for (bf16 parameters updated in place, bf16 moments): [`f32_to_bf16_stochastic`]
//! with the draws of [`stochastic_bits`].

use half::f16;

/// Elements per 8-bit quantisation block (one `absmax` each).
pub const QBLOCK: usize = 256;

/// bf16 → f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 → bf16, round to nearest even; NaN stays NaN (quieted).
///
/// ```
/// use lamb_core::codec::{bf16_to_f32, f32_to_bf16};
/// assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + 1.0 / 256.0)), 1.0); // tie: to even
/// assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0);
/// assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
/// ```
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        ((b >> 16) as u16) | 0x40
    } else {
        rounded
    }
}

/// f32 → bf16 with stochastic rounding from 16 random bits `r`: adds `r` below the kept
/// bits and truncates, so it rounds away from zero with probability (discarded bits)/2^16.
#[inline(always)]
pub fn f32_to_bf16_stochastic(x: f32, r: u32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(r & 0xffff) >> 16) as u16;
    if x.is_nan() {
        ((b >> 16) as u16) | 0x40
    } else {
        rounded
    }
}

/// Mixed into a [`Moments::Bf16`](crate::layer::Moments::Bf16) seed for the first moment's draws.
pub const M_STREAM: u64 = 0x6d5f_7374_7265_616d; // "m_stream"
/// Mixed into a [`Moments::Bf16`](crate::layer::Moments::Bf16) seed for the second moment's draws.
pub const V_STREAM: u64 = 0x765f_7374_7265_616d; // "v_stream"

/// The 16 random bits of element `index` under `seed` (a SplitMix64-style hash).
#[inline(always)]
pub fn stochastic_bits(seed: u64, index: u64) -> u32 {
    let mut z = seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((z ^ (z >> 31)) >> 48) as u32
}

/// f16 → f32 (exact).
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    f16::from_bits(h).to_f32()
}

/// f32 → f16, round to nearest even (the `half` crate's conversion, which F16C matches).
#[inline(always)]
pub fn f32_to_f16(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

// The codecs below are branch-free integer and bit arithmetic (plus one exactly rounded
// f32 multiply or divide), so that the block loops in `kernels::compact` vectorize inside each
// backend's target features, and every backend gets the same bits.

/// Value of an unsigned minifloat code with 3 mantissa bits and exponent bias `bias`:
/// `(8 + f)·2^(e − bias − 3)` for `e > 0` (built directly as f32 bits: exponent
/// `e − bias`, mantissa `f/8`), `f·2^−(bias + 2)` for `e = 0`.
#[inline(always)]
fn minifloat_value(code: u32, bias: i32) -> f32 {
    let e = code >> 3;
    let f = code & 7;
    let normal = f32::from_bits(((e.wrapping_add((127 - bias) as u32)) << 23) | (f << 20));
    let subnormal = f as f32 * pow2(-(bias + 2));
    if e == 0 { subnormal } else { normal }
}

/// Code of `y ∈ [0, 1]` in the minifloat with 3 mantissa bits and exponent bias `bias`,
/// rounded to nearest, ties to even.
#[inline(always)]
fn minifloat_code(y: f32, bias: i32) -> u32 {
    // Subnormal range (y < 2^(1−bias)): y·2^(bias+2) < 8 rounded to an integer by adding
    // 2^23, whose spacing is 1 (f32 addition rounds to nearest even); the integer is then
    // the low mantissa bits. `min` keeps the unused lane of large y in range.
    const MAGIC: f32 = 8_388_608.0; // 2^23
    let sub = (y.min(pow2(1 - bias)) * pow2(bias + 2) + MAGIC).to_bits() - MAGIC.to_bits();
    // Normal range: round y's f32 bits to 3 mantissa bits (nearest, ties to even), then
    // rebase the exponent.
    let b = y.to_bits();
    let r = b.wrapping_add(0x7_ffff + ((b >> 20) & 1));
    let normal = (r >> 20).wrapping_sub(((127 - bias) as u32) << 3);
    if y < pow2(1 - bias) { sub } else { normal }
}

/// 2^e for e in the normal f32 range, exactly.
#[inline(always)]
fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

const M_BIAS: i32 = 15;
const V_BIAS: i32 = 31;

/// Dequantises a first-moment code: `absmax · value(code)`.
#[inline(always)]
pub fn q8_m_decode(code: u8, absmax: f32) -> f32 {
    let mag = minifloat_value((code & 0x7f) as u32, M_BIAS) * absmax;
    f32::from_bits(mag.to_bits() | (((code & 0x80) as u32) << 24))
}

/// Quantises a first moment: sign bit + E4M3 code of `|x| / absmax` (0 if `absmax` is 0).
///
/// ```
/// use lamb_core::codec::{q8_m_decode, q8_m_encode};
/// assert_eq!(q8_m_decode(q8_m_encode(-0.5, 2.0), 2.0), -0.5);
/// assert_eq!(q8_m_decode(q8_m_encode(2.0, 2.0), 2.0), 2.0);
/// let x = 0.3;
/// assert!((q8_m_decode(q8_m_encode(x, 1.0), 1.0) - x).abs() <= x / 16.0);
/// ```
#[inline(always)]
pub fn q8_m_encode(x: f32, absmax: f32) -> u8 {
    if absmax <= 0.0 {
        return 0;
    }
    m_code(x, absmax)
}

/// `q8_m_encode` for `absmax > 0`.
#[inline(always)]
fn m_code(x: f32, absmax: f32) -> u8 {
    let code = minifloat_code(x.abs() / absmax, M_BIAS);
    // The sign bit, unless the code is 0 (no negative zero code).
    let sign = (x.to_bits() >> 31) & (code != 0) as u32;
    (code | (sign << 7)) as u8
}

/// Dequantises a second-moment code.
#[inline(always)]
pub fn q8_v_decode(code: u8, absmax: f32) -> f32 {
    minifloat_value(code as u32, V_BIAS) * absmax
}

/// Quantises a second moment (`x >= 0`): E5M3 code of `x / absmax`.
///
/// ```
/// use lamb_core::codec::{q8_v_decode, q8_v_encode};
/// let x = 1e-6;
/// assert!((q8_v_decode(q8_v_encode(x, 1.0), 1.0) - x).abs() <= x / 16.0);
/// assert_eq!(q8_v_encode(0.0, 1.0), 0);
/// assert_eq!(q8_v_decode(q8_v_encode(4.0, 4.0), 4.0), 4.0);
/// ```
#[inline(always)]
pub fn q8_v_encode(x: f32, absmax: f32) -> u8 {
    if absmax <= 0.0 {
        return 0;
    }
    v_code(x, absmax)
}

/// `q8_v_encode` for `absmax > 0`.
#[inline(always)]
fn v_code(x: f32, absmax: f32) -> u8 {
    minifloat_code(x.abs() / absmax, V_BIAS) as u8
}

/// max |x| of finite values, on the bits (for non-NaN f32, |x|'s bits order like |x|): an
/// integer reduction, which vectorizes.
#[inline(always)]
fn absmax_of(xs: &[f32]) -> f32 {
    f32::from_bits(
        xs.iter()
            .fold(0u32, |a, x| a.max(x.to_bits() & 0x7fff_ffff)),
    )
}

/// Encodes one block of new first moments (finite) into `codes`; returns its absmax.
#[inline(always)]
pub(crate) fn q8_m_encode_block(xs: &[f32], codes: &mut [u8]) -> f32 {
    encode_block::<true>(xs, codes)
}

/// Encodes one block of new second moments (finite, `>= 0`); returns its absmax.
#[inline(always)]
pub(crate) fn q8_v_encode_block(xs: &[f32], codes: &mut [u8]) -> f32 {
    encode_block::<false>(xs, codes)
}

/// Encodes one block with the first moment's code (`SIGNED`) or the second's; returns the
/// block's absmax, the scale of its codes (all codes 0 where it is 0).
#[inline(always)]
fn encode_block<const SIGNED: bool>(xs: &[f32], codes: &mut [u8]) -> f32 {
    let am = absmax_of(xs);
    if am > 0.0 {
        for (c, &x) in codes.iter_mut().zip(xs) {
            *c = if SIGNED { m_code(x, am) } else { v_code(x, am) };
        }
    } else {
        codes.fill(0);
    }
    am
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code decodes to a value that encodes back to the same code, and codes are
    /// monotonic in value: the code is a proper rounding grid.
    #[test]
    fn codes_round_trip_and_are_monotonic() {
        for code in 0u8..=0x78 {
            let y = q8_m_decode(code, 1.0);
            assert_eq!(q8_m_encode(y, 1.0), code, "m code {code}");
            assert_eq!(
                q8_m_encode(-y, 1.0),
                if code == 0 { 0 } else { code | 0x80 }
            );
            if code > 0 {
                assert!(y > q8_m_decode(code - 1, 1.0));
            }
        }
        for code in 0u8..=248 {
            let y = q8_v_decode(code, 1.0);
            assert_eq!(q8_v_encode(y, 1.0), code, "v code {code}");
            if code > 0 {
                assert!(y > q8_v_decode(code - 1, 1.0));
            }
        }
    }

    /// Encoding picks the nearest code (ties to the even code), checked against a search.
    #[test]
    fn encoding_is_round_to_nearest() {
        let mut x = 1e-12f32;
        while x <= 1.0 {
            for (enc, dec, max) in [
                (
                    q8_m_encode as fn(f32, f32) -> u8,
                    q8_m_decode as fn(u8, f32) -> f32,
                    0x78u8,
                ),
                (q8_v_encode, q8_v_decode, 248),
            ] {
                let c = enc(x, 1.0);
                let err = (dec(c, 1.0) as f64 - x as f64).abs();
                for other in 0..=max {
                    let e2 = (dec(other, 1.0) as f64 - x as f64).abs();
                    assert!(
                        err <= e2,
                        "x={x}: code {c} err {err} but code {other} err {e2}"
                    );
                    if e2 == err && other != c {
                        assert_eq!(c % 2, 0, "x={x}: tie must go to the even code");
                    }
                }
            }
            x *= 1.013;
        }
    }

    /// The branch-free codecs equal the straightforward definitions (the forms with
    /// branches this file used first), over every code and a sweep of values.
    #[test]
    fn branch_free_codecs_equal_the_definitions() {
        fn value_def(code: u32, bias: i32) -> f32 {
            let e = (code >> 3) as i32;
            let f = (code & 7) as f32;
            if e == 0 {
                f * pow2(-(bias + 2))
            } else {
                (8.0 + f) * pow2(e - bias - 3)
            }
        }
        fn code_def(y: f32, bias: i32) -> u32 {
            if y < pow2(1 - bias) {
                const MAGIC: f32 = 8_388_608.0;
                ((y * pow2(bias + 2) + MAGIC) - MAGIC) as u32
            } else {
                let b = y.to_bits();
                let r = b + 0x7_ffff + ((b >> 20) & 1);
                (r >> 20) - (((127 - bias) as u32) << 3)
            }
        }
        for bias in [M_BIAS, V_BIAS] {
            for code in 0..=255u32 {
                if (code >> 3) as i32 <= 31 {
                    assert_eq!(minifloat_value(code, bias), value_def(code, bias));
                }
            }
            let mut y = 0.0f32;
            while y <= 1.0 {
                assert_eq!(minifloat_code(y, bias), code_def(y, bias), "y={y:e}");
                // Geometric steps, but at least one f32 ulp (subnormals).
                y = f32::from_bits((y * 1.0007).to_bits().max(y.to_bits() + 1));
            }
            assert_eq!(minifloat_code(1.0, bias), code_def(1.0, bias));
        }
        let mut xs = [0.0f32; QBLOCK];
        let mut codes = [0u8; QBLOCK];
        let mut s = 1u32;
        for round in 0..200 {
            for x in xs.iter_mut() {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                *x = f32::from_bits(s & 0x3fff_ffff | (s & 0x8000_0000)) * 1e-30;
            }
            if round % 7 == 0 {
                xs.fill(-0.0);
            }
            let am = q8_m_encode_block(&xs, &mut codes);
            let am_def = xs.iter().fold(0.0f32, |a, x| a.max(x.abs()));
            assert_eq!(am.to_bits(), am_def.to_bits());
            for (i, &x) in xs.iter().enumerate() {
                assert_eq!(codes[i], q8_m_encode(x, am_def));
                let def = if am_def <= 0.0 {
                    0
                } else {
                    let c = code_def(x.abs() / am_def, M_BIAS) as u8;
                    if x.is_sign_negative() && c != 0 {
                        c | 0x80
                    } else {
                        c
                    }
                };
                assert_eq!(codes[i], def);
                let d = q8_m_decode(codes[i], am);
                let mag = value_def((codes[i] & 0x7f) as u32, M_BIAS) * am;
                let d_def = if codes[i] & 0x80 != 0 { -mag } else { mag };
                assert_eq!(d.to_bits(), d_def.to_bits());
            }
            let vs: [f32; QBLOCK] = core::array::from_fn(|i| xs[i].abs());
            let av = q8_v_encode_block(&vs, &mut codes);
            for (i, &x) in vs.iter().enumerate() {
                assert_eq!(codes[i], q8_v_encode(x, av));
                assert_eq!(
                    q8_v_decode(codes[i], av).to_bits(),
                    (value_def(codes[i] as u32, V_BIAS) * av).to_bits()
                );
            }
        }
    }

    #[test]
    fn bf16_rounding() {
        for bits in (0u32..u32::MAX).step_by(65_537 * 17) {
            let x = f32::from_bits(bits);
            let b = f32_to_bf16(x);
            if x.is_nan() {
                assert!(bf16_to_f32(b).is_nan());
                continue;
            }
            let expect = half::bf16::from_f32(x).to_bits();
            assert_eq!(b, expect, "{x:e}");
        }
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        let x = 1.0f32 + 1.0 / 512.0; // a quarter of the way between two bf16 values
        let ups = (0..100_000u64)
            .filter(|&i| bf16_to_f32(f32_to_bf16_stochastic(x, stochastic_bits(7, i))) > x)
            .count();
        assert!((ups as f64 / 1e5 - 0.25).abs() < 0.01, "{ups}");
    }
}
