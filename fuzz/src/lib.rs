//! Structured inputs shared by the fuzz targets (`fuzz_targets/*.rs`).
//!
//! libFuzzer hands each target a byte string; [`arbitrary`] turns it into the types below.
//! They are biased on purpose: a float is far more often one of the values that break float
//! code (±0, denormals, ±inf, NaN with a payload, f32's largest value, the rounding edges of
//! f64 → f32) than a uniformly random bit pattern, and a configuration is far more often a
//! preset with a few fields changed than nine independent random fields (which would nearly
//! never pass `validate()`).

use arbitrary::Arbitrary;
use lamb_core::{Adaptation, BiasCorrection, EpsMode, LambConfig, NonFinite, RatioRule, Schedule};

/// At most `N` values of `T`, the count read from one byte. Unlike `Vec<T>`, whose length
/// `arbitrary` derives from the bytes left (so one vector can swallow the rest of the
/// input), this keeps nested lists short and leaves bytes for the fields after it.
#[derive(Debug, Clone)]
pub struct Few<T, const N: usize>(pub Vec<T>);

impl<'a, T: Arbitrary<'a>, const N: usize> Arbitrary<'a> for Few<T, N> {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let n = u.int_in_range(0..=N)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(T::arbitrary(u)?);
        }
        Ok(Few(v))
    }
}

impl<T, const N: usize> std::ops::Deref for Few<T, N> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

/// An `f32`, biased towards the values that break float code.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum F32 {
    /// Any bit pattern.
    Bits(u32),
    /// +0.
    Zero,
    /// −0.
    NegZero,
    /// +∞.
    Inf,
    /// −∞.
    NegInf,
    /// A NaN with this payload (quiet or signalling by the payload's top bit) and sign.
    Nan {
        /// The 23 mantissa bits (0 becomes 1, which is still a NaN).
        payload: u32,
        /// Sign bit.
        negative: bool,
    },
    /// A subnormal with these mantissa bits (0 becomes the smallest).
    Denormal {
        /// Mantissa bits.
        mantissa: u32,
        /// Sign bit.
        negative: bool,
    },
    /// ±f32::MAX.
    Max(bool),
    /// ±f32::MIN_POSITIVE (the smallest normal).
    MinNormal(bool),
    /// ±1.
    One(bool),
    /// A normal number with a binary exponent in [-40, 40]: the ordinary range.
    Ordinary {
        /// Mantissa bits.
        mantissa: u32,
        /// Exponent, folded into [-40, 40].
        exp: i8,
        /// Sign bit.
        negative: bool,
    },
    /// A normal number with a binary exponent in [60, 127]: squares overflow f32.
    Huge {
        /// Mantissa bits.
        mantissa: u32,
        /// Exponent, folded into [60, 127].
        exp: u8,
        /// Sign bit.
        negative: bool,
    },
}

impl F32 {
    /// The value.
    pub fn get(self) -> f32 {
        let sign = |neg: bool| if neg { 0x8000_0000u32 } else { 0 };
        match self {
            F32::Bits(b) => f32::from_bits(b),
            F32::Zero => 0.0,
            F32::NegZero => -0.0,
            F32::Inf => f32::INFINITY,
            F32::NegInf => f32::NEG_INFINITY,
            F32::Nan { payload, negative } => {
                f32::from_bits(sign(negative) | 0x7f80_0000 | (payload & 0x7f_ffff).max(1))
            }
            F32::Denormal { mantissa, negative } => {
                f32::from_bits(sign(negative) | (mantissa & 0x7f_ffff).max(1))
            }
            F32::Max(neg) => f32::from_bits(sign(neg) | f32::MAX.to_bits()),
            F32::MinNormal(neg) => f32::from_bits(sign(neg) | f32::MIN_POSITIVE.to_bits()),
            F32::One(neg) => f32::from_bits(sign(neg) | 1f32.to_bits()),
            F32::Ordinary {
                mantissa,
                exp,
                negative,
            } => {
                let e = (exp as i32).rem_euclid(81) - 40 + 127;
                f32::from_bits(sign(negative) | (e as u32) << 23 | (mantissa & 0x7f_ffff))
            }
            F32::Huge {
                mantissa,
                exp,
                negative,
            } => {
                let e = 60 + (exp as i32 % 68) + 127;
                f32::from_bits(sign(negative) | (e as u32) << 23 | (mantissa & 0x7f_ffff))
            }
        }
    }
}

/// An `f64` hyperparameter, biased towards the edges of the valid ranges: typical values,
/// ±0, ±∞, NaN payloads, subnormals, and the f64 values around which rounding to f32
/// changes (f32::MAX and the overflow threshold, the smallest f32 subnormal and half of it),
/// and `1 − 2^-k` (betas that round to 1 in f32 but are < 1 in f64).
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum F64 {
    /// Any bit pattern.
    Bits(u64),
    /// A value commonly used for some hyperparameter.
    Typical(u8),
    /// +0.
    Zero,
    /// −0.
    NegZero,
    /// +∞.
    Inf,
    /// −∞.
    NegInf,
    /// NaN with a payload and sign.
    Nan {
        /// Mantissa bits (0 becomes 1).
        payload: u64,
        /// Sign bit.
        negative: bool,
    },
    /// An f64 subnormal.
    Denormal(u64),
    /// One of the f64 values where `as f32` changes behaviour, nudged by `nudge` ulps.
    F32Edge {
        /// Which edge.
        which: u8,
        /// Ulps to move, in [-2, 2].
        nudge: i8,
    },
    /// `1 − 2^-k`, k in [1, 64] (k ≥ 54 gives exactly 1), or `1 + 2^-k`.
    NearOne {
        /// k.
        k: u8,
        /// Above 1 instead of below.
        above: bool,
    },
    /// A normal number with a decimal-ish magnitude 2^[-60, 60].
    Ordinary {
        /// Mantissa bits.
        mantissa: u64,
        /// Exponent, folded into [-60, 60].
        exp: i8,
        /// Sign bit.
        negative: bool,
    },
}

const TYPICAL: [f64; 16] = [
    1e-3, 0.9, 0.999, 1e-6, 0.01, 1.0, 0.5, 1e-8, 2e-3, 0.95, 0.98, 0.1, 10.0, 1e6, 1e-12, 0.0,
];

/// f32::MAX, the overflow threshold (f32::MAX + half an ulp), the smallest f32 subnormal,
/// half of it (rounds to 0), f32::MIN_POSITIVE, and 1e38/1e39.
const F32_EDGES: [f64; 7] = [
    f32::MAX as f64,
    3.4028235677973366e38, // 2^128 − 2^103: the first f64 that rounds to f32 infinity
    1.401298464324817e-45, // 2^-149
    7.006492321624085e-46, // 2^-150: rounds (ties to even) to 0
    f32::MIN_POSITIVE as f64,
    1e38,
    1e39,
];

impl F64 {
    /// The value.
    pub fn get(self) -> f64 {
        let sign = |neg: bool| if neg { 1u64 << 63 } else { 0 };
        match self {
            F64::Bits(b) => f64::from_bits(b),
            F64::Typical(i) => TYPICAL[i as usize % TYPICAL.len()],
            F64::Zero => 0.0,
            F64::NegZero => -0.0,
            F64::Inf => f64::INFINITY,
            F64::NegInf => f64::NEG_INFINITY,
            F64::Nan { payload, negative } => f64::from_bits(
                sign(negative) | 0x7ff0_0000_0000_0000 | (payload & ((1 << 52) - 1)).max(1),
            ),
            F64::Denormal(m) => f64::from_bits((m & ((1 << 52) - 1)).max(1)),
            F64::F32Edge { which, nudge } => {
                let base = F32_EDGES[which as usize % F32_EDGES.len()];
                let n = (nudge % 3) as i64;
                f64::from_bits((base.to_bits() as i64 + n) as u64)
            }
            F64::NearOne { k, above } => {
                let d = libm_exp2(-(1 + (k as i32 % 64)));
                if above { 1.0 + d } else { 1.0 - d }
            }
            F64::Ordinary {
                mantissa,
                exp,
                negative,
            } => {
                let e = (exp as i64).rem_euclid(121) - 60 + 1023;
                f64::from_bits(sign(negative) | (e as u64) << 52 | (mantissa & ((1 << 52) - 1)))
            }
        }
    }
}

fn libm_exp2(k: i32) -> f64 {
    // 2^k for k in [-64, 0], exactly.
    f64::from_bits(((1023 + k) as u64) << 52)
}

/// One field of [`LambConfig`] set to a value.
#[derive(Arbitrary, Debug, Clone, Copy)]
#[allow(missing_docs)]
pub enum Override {
    Lr(F64),
    Beta1(F64),
    Beta2(F64),
    Eps(F64),
    WeightDecay(F64),
    ParamNormMin(F64),
    ParamNormMax(F64),
    RatioMin(F64),
    RatioMax(F64),
    EpsMode(u8),
    BiasCorrection(u8),
    GradAveraging(bool),
    Adaptation(u8),
    RatioRule(u8),
    NonFinite(u8),
}

/// Every field of a [`LambConfig`], each chosen independently.
#[derive(Arbitrary, Debug, Clone)]
#[allow(missing_docs)]
pub struct FullConfig {
    pub lr: F64,
    pub beta1: F64,
    pub beta2: F64,
    pub eps: F64,
    pub weight_decay: F64,
    pub param_norm_min: F64,
    pub param_norm_max: F64,
    pub ratio_min: F64,
    pub ratio_max: F64,
    pub eps_mode: u8,
    pub bias_correction: u8,
    pub grad_averaging: bool,
    pub adaptation: u8,
    pub ratio_rule: u8,
    pub non_finite: u8,
}

/// A [`LambConfig`]: a preset with some fields overridden, or every field arbitrary.
#[derive(Arbitrary, Debug, Clone)]
pub enum ConfigSpec {
    /// A preset (paper, optax, timm, nvlamb, seed, paper-AdamW) with overrides applied in order.
    Preset {
        /// Which preset.
        preset: u8,
        /// Fields to change.
        overrides: Few<Override, 4>,
    },
    /// Every field chosen independently.
    Full(FullConfig),
}

fn eps_mode(i: u8) -> EpsMode {
    [EpsMode::OutsideSqrt, EpsMode::InsideSqrt][i as usize % 2]
}
fn bias_correction(i: u8) -> BiasCorrection {
    [
        BiasCorrection::Off,
        BiasCorrection::F64,
        BiasCorrection::F32,
    ][i as usize % 3]
}
fn adaptation(i: u8) -> Adaptation {
    [
        Adaptation::Always,
        Adaptation::WhenDecayed,
        Adaptation::Never,
    ][i as usize % 3]
}
fn ratio_rule(i: u8) -> RatioRule {
    [RatioRule::ZeroNormIsOne, RatioRule::EpsDenominator][i as usize % 2]
}
fn non_finite(i: u8) -> NonFinite {
    [NonFinite::Skip, NonFinite::Error][i as usize % 2]
}

impl Override {
    /// Applies this override to `c`.
    pub fn apply(self, c: &mut LambConfig) {
        match self {
            Override::Lr(x) => c.lr = x.get(),
            Override::Beta1(x) => c.beta1 = x.get(),
            Override::Beta2(x) => c.beta2 = x.get(),
            Override::Eps(x) => c.eps = x.get(),
            Override::WeightDecay(x) => c.weight_decay = x.get(),
            Override::ParamNormMin(x) => c.param_norm_min = x.get(),
            Override::ParamNormMax(x) => c.param_norm_max = x.get(),
            Override::RatioMin(x) => c.ratio_min = x.get(),
            Override::RatioMax(x) => c.ratio_max = x.get(),
            Override::EpsMode(i) => c.eps_mode = eps_mode(i),
            Override::BiasCorrection(i) => c.bias_correction = bias_correction(i),
            Override::GradAveraging(b) => c.grad_averaging = b,
            Override::Adaptation(i) => c.adaptation = adaptation(i),
            Override::RatioRule(i) => c.ratio_rule = ratio_rule(i),
            Override::NonFinite(i) => c.non_finite = non_finite(i),
        }
    }
}

impl ConfigSpec {
    /// The configuration (not validated).
    pub fn build(&self) -> LambConfig {
        match self {
            ConfigSpec::Preset { preset, overrides } => {
                let mut c = match preset % 6 {
                    0 => LambConfig::paper(),
                    1 => LambConfig::optax(),
                    2 => LambConfig::timm(),
                    3 => LambConfig::nvlamb(),
                    4 => LambConfig::seed(),
                    _ => LambConfig::paper().adamw(),
                };
                for o in overrides.iter() {
                    o.apply(&mut c);
                }
                c
            }
            ConfigSpec::Full(f) => LambConfig {
                lr: f.lr.get(),
                beta1: f.beta1.get(),
                beta2: f.beta2.get(),
                eps: f.eps.get(),
                eps_mode: eps_mode(f.eps_mode),
                weight_decay: f.weight_decay.get(),
                bias_correction: bias_correction(f.bias_correction),
                grad_averaging: f.grad_averaging,
                adaptation: adaptation(f.adaptation),
                ratio_rule: ratio_rule(f.ratio_rule),
                param_norm_min: f.param_norm_min.get(),
                param_norm_max: f.param_norm_max.get(),
                ratio_min: f.ratio_min.get(),
                ratio_max: f.ratio_max.get(),
                non_finite: non_finite(f.non_finite),
            },
        }
    }
}

/// A step number: small, any u64 (0 included, which must be refused), or near `u64::MAX`.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum StepNo {
    /// 1..=256.
    Small(u8),
    /// Any value, 0 included.
    Any(u64),
    /// `u64::MAX - k`.
    NearMax(u8),
    /// `2^k`, k in [0, 63].
    Pow2(u8),
}

impl StepNo {
    /// The step.
    pub fn get(self) -> u64 {
        match self {
            StepNo::Small(s) => s as u64 + 1,
            StepNo::Any(s) => s,
            StepNo::NearMax(k) => u64::MAX - k as u64,
            StepNo::Pow2(k) => 1u64 << (k % 64),
        }
    }
}

/// A learning-rate schedule with arbitrary (possibly invalid) parameters.
#[derive(Arbitrary, Debug, Clone, Copy)]
#[allow(missing_docs)]
pub enum ScheduleSpec {
    Constant,
    WarmupPoly {
        warmup: u64,
        total: u64,
        power: F64,
        end: F64,
    },
    WarmupCosine {
        warmup: u64,
        total: u64,
        end: F64,
    },
    /// Small, valid-looking step counts.
    SmallPoly {
        warmup: u8,
        total: u8,
        power: F64,
        end: F64,
    },
}

impl ScheduleSpec {
    /// The schedule (not validated).
    pub fn build(self) -> Schedule {
        match self {
            ScheduleSpec::Constant => Schedule::Constant,
            ScheduleSpec::WarmupPoly {
                warmup,
                total,
                power,
                end,
            } => Schedule::WarmupPoly {
                warmup,
                total,
                power: power.get(),
                end: end.get(),
            },
            ScheduleSpec::WarmupCosine { warmup, total, end } => Schedule::WarmupCosine {
                warmup,
                total,
                end: end.get(),
            },
            ScheduleSpec::SmallPoly {
                warmup,
                total,
                power,
                end,
            } => Schedule::WarmupPoly {
                warmup: warmup as u64,
                total: total as u64,
                power: power.get(),
                end: end.get(),
            },
        }
    }
}

/// xorshift64*: cheap deterministic filler, so that a few input bytes describe a long buffer.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from any seed (0 is remapped).
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    /// Next 64 random bits.
    #[allow(clippy::should_implement_trait)] // an infinite generator, not an iterator
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// The special values a [`Fill::Mixed`] buffer sprinkles in.
pub const SPECIALS: [f32; 12] = [
    0.0,
    -0.0,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::NAN,
    f32::MAX,
    -f32::MAX,
    f32::MIN_POSITIVE,
    1e-45,  // smallest subnormal
    -3e-39, // a negative subnormal
    1e20,   // its square overflows f32
    -1e-20, // its square is subnormal
];

/// How to fill a buffer.
#[derive(Arbitrary, Debug, Clone)]
pub enum Fill {
    /// Every element the same.
    Constant(F32),
    /// Uniform in ±2^scale (scale folded into [-30, 30]); `abs` makes it non-negative
    /// (a second moment).
    Uniform {
        /// Seed.
        seed: u64,
        /// Binary exponent of the range.
        scale: i8,
        /// Non-negative.
        abs: bool,
    },
    /// Like `Uniform`, with one element in `256 / rate` (rate ≥ 1) taken from [`SPECIALS`].
    Mixed {
        /// Seed.
        seed: u64,
        /// Binary exponent of the range.
        scale: i8,
        /// How often a special value appears.
        rate: u8,
    },
    /// Random bit patterns (mostly huge, tiny or NaN).
    Bits {
        /// Seed.
        seed: u64,
    },
}

impl Fill {
    /// Writes `out`.
    pub fn fill(&self, out: &mut [f32]) {
        match *self {
            Fill::Constant(x) => out.fill(x.get()),
            Fill::Uniform { seed, scale, abs } => {
                let mut r = Rng::new(seed);
                let s = 2f32.powi((scale as i32).rem_euclid(61) - 30);
                for x in out {
                    let v = r.unit() * s;
                    *x = if abs { v.abs() } else { v };
                }
            }
            Fill::Mixed { seed, scale, rate } => {
                let mut r = Rng::new(seed);
                let s = 2f32.powi((scale as i32).rem_euclid(61) - 30);
                for x in out {
                    let n = r.next();
                    *x = if ((n >> 8) & 0xff) < rate.max(1) as u64 {
                        SPECIALS[(n & 0xff) as usize % SPECIALS.len()]
                    } else {
                        r.unit() * s
                    };
                }
            }
            Fill::Bits { seed } => {
                let mut r = Rng::new(seed);
                for x in out {
                    *x = f32::from_bits(r.next() as u32);
                }
            }
        }
    }
}

/// Whether the checks of known, reported bugs are turned off (`LAMB_FUZZ_KNOWN_BUGS=skip`),
/// to fuzz past them until they are fixed. Each such check names its regression test; see
/// fuzz/README.md, "Findings".
pub fn known_bugs_skipped() -> bool {
    static SKIP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SKIP.get_or_init(|| std::env::var("LAMB_FUZZ_KNOWN_BUGS").is_ok_and(|v| v == "skip"))
}

/// Bits of an f32 with every NaN mapped to one pattern ("both NaN" compares equal).
pub fn canon(x: f32) -> u32 {
    if x.is_nan() { 0x7fc0_0000 } else { x.to_bits() }
}

/// [`canon`] of every element.
pub fn canon_all(xs: &[f32]) -> Vec<u32> {
    xs.iter().map(|&x| canon(x)).collect()
}

/// Exact bits of every element (NaN payloads included).
pub fn bits_all(xs: &[f32]) -> Vec<u32> {
    xs.iter().map(|x| x.to_bits()).collect()
}

/// Plain-old-data element types whose bytes [`bytes_of`] may copy.
///
/// # Safety
/// No padding, no invalid bit patterns, no pointers.
pub unsafe trait Pod: Copy {}
// SAFETY: primitive numbers; bf16 and f16 are `repr(transparent)` wrappers of u16.
unsafe impl Pod for f32 {}
// SAFETY: as above.
unsafe impl Pod for u8 {}
// SAFETY: as above.
unsafe impl Pod for lamb_core::half::bf16 {}
// SAFETY: as above.
unsafe impl Pod for lamb_core::half::f16 {}

/// The bytes of a slice, copied with one `memcpy` (no per-element loop, which coverage
/// instrumentation would make slow): exact bits, NaN payloads included, for comparisons.
pub fn bytes_of<T: Pod>(xs: &[T]) -> Vec<u8> {
    // SAFETY: `T: Pod` has no padding, so every byte of the slice is initialised; the
    // length in bytes is that of the slice, which lives for the call.
    unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<u8>(), std::mem::size_of_val(xs)) }
        .to_vec()
}

/// The documented rules of `LambConfig::validate`, written independently of it (from the
/// field docs in lamb-core's `config.rs`): the first failing field in declaration order, or
/// `None` if the configuration is valid. Bounds are checked pairwise: the lower bound's own
/// rule, then the upper's, then `lower <= upper`, for `param_norm_*` and then `ratio_*`.
pub fn expected_first_invalid(c: &LambConfig) -> Option<&'static str> {
    let finite_f32 = |x: f64| x.is_finite() && (x as f32).is_finite();
    if !(finite_f32(c.lr) && c.lr >= 0.0) {
        return Some("lr");
    }
    if !(c.beta1 >= 0.0 && c.beta1 < 1.0 && (c.beta1 as f32) < 1.0) {
        return Some("beta1");
    }
    if !(c.beta2 >= 0.0 && c.beta2 < 1.0 && (c.beta2 as f32) < 1.0) {
        return Some("beta2");
    }
    if !(finite_f32(c.eps) && c.eps > 0.0 && (c.eps as f32) > 0.0) {
        return Some("eps");
    }
    if !(finite_f32(c.weight_decay) && c.weight_decay >= 0.0) {
        return Some("weight_decay");
    }
    for (lo_name, lo, hi_name, hi) in [
        (
            "param_norm_min",
            c.param_norm_min,
            "param_norm_max",
            c.param_norm_max,
        ),
        ("ratio_min", c.ratio_min, "ratio_max", c.ratio_max),
    ] {
        if !(lo.is_finite() && lo >= 0.0) {
            return Some(lo_name);
        }
        if hi.is_nan() {
            return Some(hi_name);
        }
        if lo > hi {
            // InvalidBounds names the lower field.
            return Some(lo_name);
        }
    }
    None
}

#[cfg(test)]
mod tests;

pub mod state;
