//! The structured metadata of a lamb checkpoint: the JSON of its `lamb.meta` key.
//!
//! Every struct refuses unknown fields: a field this version does not know could change
//! what the state means, so a newer file is refused with serde's "unknown field" message
//! rather than misread. Floats are JSON numbers (written shortest-round-trip, read with
//! serde_json's `float_roundtrip`, so every f64 comes back bit for bit); infinities and NaN,
//! which JSON lacks, are the strings `"inf"`, `"-inf"` and `"nan"`.

use lamb_core::layer::Rounding;
use lamb_core::{Adaptation, BiasCorrection, EpsMode, LambConfig, NonFinite, RatioRule, Schedule};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use lamb_core::codec::QBLOCK;

use super::container::{Refusal, split_header};
use super::xxh64::Xxh64;
use crate::optimizer::{Precision, StateFormat};

/// The value of the `lamb.format` metadata key.
pub const FORMAT: &str = "lamb-checkpoint";
/// The format version this library writes and reads (`lamb.version`).
pub const VERSION: u32 = 1;

pub(crate) const KEY_FORMAT: &str = "lamb.format";
pub(crate) const KEY_VERSION: &str = "lamb.version";
pub(crate) const KEY_META: &str = "lamb.meta";
pub(crate) const KEY_CHECKSUM: &str = "lamb.checksum";
pub(crate) const CHECKSUM_PREFIX: &str = "xxh64:";
pub(crate) const CHECKSUM_PLACEHOLDER: &[u8; 16] = b"0000000000000000";
/// Moment dtypes (`layers[i].exp_avg.dtype` in `lamb.meta`).
pub(crate) const DTYPE_F32: &str = "f32";
pub(crate) const DTYPE_BF16: &str = "bf16";
/// lamb-core's 8-bit first-moment code (sign + E4M3 of `|m| / absmax`, bias 15).
pub(crate) const DTYPE_Q8_M: &str = "q8_e4m3";
/// lamb-core's 8-bit second-moment code (E5M3 of `v / absmax`, bias 31).
pub(crate) const DTYPE_Q8_V: &str = "q8_e5m3";

/// The dtype names of moments stored in `format` (m, v) and their 8-bit block size.
pub(crate) fn dtypes(format: StateFormat) -> (&'static str, &'static str, Option<u64>) {
    match format {
        StateFormat::F32 => (DTYPE_F32, DTYPE_F32, None),
        StateFormat::Bf16 => (DTYPE_BF16, DTYPE_BF16, None),
        StateFormat::Q8 => (DTYPE_Q8_M, DTYPE_Q8_V, Some(QBLOCK as u64)),
    }
}

/// Where, in the header, the 16 hex digits of the checksum are: after the only
/// `"lamb.checksum"`, optional JSON whitespace, `:`, whitespace, `"xxh64:`.
pub(crate) fn checksum_digits_at(header: &[u8]) -> Result<usize, Refusal> {
    // (std's substring search: fast even in unoptimised test builds.)
    let text = std::str::from_utf8(header).map_err(|e| format!("the header is not UTF-8: {e}"))?;
    let key = format!("\"{KEY_CHECKSUM}\"");
    let mut hits = text.match_indices(&key).map(|(i, _)| i);
    let (Some(at), None) = (hits.next(), hits.next()) else {
        return Err(format!(
            "the header must hold \"{KEY_CHECKSUM}\" exactly once"
        ));
    };
    let key = key.as_bytes();
    let ws = |mut i: usize| {
        while header.get(i).is_some_and(|b| b" \t\r\n".contains(b)) {
            i += 1;
        }
        i
    };
    let mut i = ws(at + key.len());
    let malformed = || format!("the {KEY_CHECKSUM} entry is malformed");
    if header.get(i) != Some(&b':') {
        return Err(malformed());
    }
    i = ws(i + 1);
    let quoted = format!("\"{CHECKSUM_PREFIX}");
    if header.get(i..i + quoted.len()) != Some(quoted.as_bytes()) {
        return Err(malformed());
    }
    i += quoted.len();
    if header.get(i + 16) != Some(&b'"') {
        return Err(malformed());
    }
    Ok(i)
}

/// Checks the checksum where the raw header has one (before anything parses the header):
/// `Ok(Some(digits))` if it matches, `Ok(None)` if the header has no well-formed
/// `lamb.checksum` entry (then the metadata checks say what the file is).
pub(crate) fn verify_checksum(bytes: &[u8]) -> Result<Option<String>, Refusal> {
    let (header, _) = split_header(bytes)?;
    let Ok(at) = checksum_digits_at(header) else {
        return Ok(None);
    };
    let at = 8 + at;
    let digits = &bytes[at..at + 16];
    let mut h = Xxh64::new();
    h.update(&bytes[..at]);
    h.update(CHECKSUM_PLACEHOLDER);
    h.update(&bytes[at + 16..]);
    let computed = format!("{:016x}", h.digest());
    if digits != computed.as_bytes() {
        return Err(format!(
            "checksum mismatch: the file records {CHECKSUM_PREFIX}{}, its contents hash to \
             {CHECKSUM_PREFIX}{computed}; the file is corrupted",
            String::from_utf8_lossy(digits)
        ));
    }
    Ok(Some(computed))
}

/// The whole `lamb.meta` object.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Meta {
    /// Steps taken (the exact counter; the `state.{i}.step` tensors are its f32 rounding).
    pub step: u64,
    /// Global gradient clipping; `null`: off.
    pub max_grad_norm: Option<F64>,
    pub schedule: ScheduleMeta,
    /// Whether the file also holds the parameters (`param.{name}` tensors).
    pub params: bool,
    pub groups: Vec<GroupMeta>,
    pub layers: Vec<LayerMeta>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GroupMeta {
    pub name: String,
    pub lr_scale: F64,
    pub config: ConfigMeta,
    pub precision: PrecisionMeta,
    /// Indices of the group's layers, ascending (PyTorch's `param_groups[g]["params"]`).
    pub params: Vec<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LayerMeta {
    pub name: String,
    pub len: u64,
    pub group: u64,
    pub exp_avg: MomentMeta,
    pub exp_avg_sq: MomentMeta,
    /// Whether `state.{i}.master`, the f32 master copy of half-precision parameters, is in
    /// the file.
    pub master: bool,
}

/// How a moment is stored: `"f32"`, `"bf16"`, or lamb-core's 8-bit blockwise codes,
/// `"q8_e4m3"` (m) / `"q8_e5m3"` (v) with `block` elements per f32 scale in
/// `state.{i}.{moment}.absmax`. A reader refuses a dtype it does not know, naming it, so
/// new storage formats need no version change.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MomentMeta {
    pub dtype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<u64>,
}

/// A group's [`Precision`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PrecisionMeta {
    pub moments: StateFormatMeta,
    pub compact_min_len: u64,
    pub master: bool,
    pub rounding: RoundingMeta,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum RoundingMeta {
    Nearest,
    Stochastic { seed: u64 },
}

/// All of [`LambConfig`], field for field.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConfigMeta {
    pub lr: F64,
    pub beta1: F64,
    pub beta2: F64,
    pub eps: F64,
    pub eps_mode: EpsModeMeta,
    pub weight_decay: F64,
    pub bias_correction: BiasCorrectionMeta,
    pub grad_averaging: bool,
    pub adaptation: AdaptationMeta,
    pub ratio_rule: RatioRuleMeta,
    pub param_norm_min: F64,
    pub param_norm_max: F64,
    pub ratio_min: F64,
    pub ratio_max: F64,
    pub non_finite: NonFiniteMeta,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum ScheduleMeta {
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
}

macro_rules! mirror_enum {
    ($meta:ident, $core:ident { $($variant:ident),* $(,)? }) => {
        #[derive(Debug, Clone, Copy, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub(crate) enum $meta { $($variant),* }
        impl From<$core> for $meta {
            fn from(x: $core) -> $meta {
                match x { $($core::$variant => $meta::$variant),* }
            }
        }
        impl From<$meta> for $core {
            fn from(x: $meta) -> $core {
                match x { $($meta::$variant => $core::$variant),* }
            }
        }
    };
}

mirror_enum!(
    EpsModeMeta,
    EpsMode {
        OutsideSqrt,
        InsideSqrt
    }
);
mirror_enum!(BiasCorrectionMeta, BiasCorrection { Off, F64, F32 });
mirror_enum!(
    AdaptationMeta,
    Adaptation {
        Always,
        WhenDecayed,
        Never
    }
);
mirror_enum!(
    RatioRuleMeta,
    RatioRule {
        ZeroNormIsOne,
        EpsDenominator
    }
);
mirror_enum!(NonFiniteMeta, NonFinite { Skip, Error });
mirror_enum!(StateFormatMeta, StateFormat { F32, Bf16, Q8 });

impl From<&Precision> for PrecisionMeta {
    fn from(p: &Precision) -> PrecisionMeta {
        PrecisionMeta {
            moments: p.moments.into(),
            compact_min_len: p.compact_min_len as u64,
            master: p.master,
            rounding: match p.rounding {
                Rounding::Nearest => RoundingMeta::Nearest,
                Rounding::Stochastic { seed } => RoundingMeta::Stochastic { seed },
            },
        }
    }
}

impl PrecisionMeta {
    /// The precision, or `None` if `compact_min_len` does not fit a `usize`.
    pub(crate) fn to_precision(&self) -> Option<Precision> {
        Some(Precision {
            moments: self.moments.into(),
            compact_min_len: usize::try_from(self.compact_min_len).ok()?,
            master: self.master,
            rounding: match self.rounding {
                RoundingMeta::Nearest => Rounding::Nearest,
                RoundingMeta::Stochastic { seed } => Rounding::Stochastic { seed },
            },
        })
    }
}

/// An f64 that survives JSON exactly, infinities and NaN included.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct F64(pub f64);

impl Serialize for F64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let x = self.0;
        if x.is_finite() {
            s.serialize_f64(x)
        } else if x.is_nan() {
            s.serialize_str("nan")
        } else if x > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_str("-inf")
        }
    }
}

impl<'de> Deserialize<'de> for F64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<F64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Num(f64),
            Str(String),
        }
        match Repr::deserialize(d)? {
            Repr::Num(x) => Ok(F64(x)),
            Repr::Str(s) => match s.as_str() {
                "inf" => Ok(F64(f64::INFINITY)),
                "-inf" => Ok(F64(f64::NEG_INFINITY)),
                "nan" => Ok(F64(f64::NAN)),
                _ => Err(serde::de::Error::custom(format!(
                    "expected a number, \"inf\", \"-inf\" or \"nan\", found the string {s:?}"
                ))),
            },
        }
    }
}

impl From<&LambConfig> for ConfigMeta {
    fn from(c: &LambConfig) -> ConfigMeta {
        ConfigMeta {
            lr: F64(c.lr),
            beta1: F64(c.beta1),
            beta2: F64(c.beta2),
            eps: F64(c.eps),
            eps_mode: c.eps_mode.into(),
            weight_decay: F64(c.weight_decay),
            bias_correction: c.bias_correction.into(),
            grad_averaging: c.grad_averaging,
            adaptation: c.adaptation.into(),
            ratio_rule: c.ratio_rule.into(),
            param_norm_min: F64(c.param_norm_min),
            param_norm_max: F64(c.param_norm_max),
            ratio_min: F64(c.ratio_min),
            ratio_max: F64(c.ratio_max),
            non_finite: c.non_finite.into(),
        }
    }
}

impl From<&ConfigMeta> for LambConfig {
    fn from(c: &ConfigMeta) -> LambConfig {
        LambConfig {
            lr: c.lr.0,
            beta1: c.beta1.0,
            beta2: c.beta2.0,
            eps: c.eps.0,
            eps_mode: c.eps_mode.into(),
            weight_decay: c.weight_decay.0,
            bias_correction: c.bias_correction.into(),
            grad_averaging: c.grad_averaging,
            adaptation: c.adaptation.into(),
            ratio_rule: c.ratio_rule.into(),
            param_norm_min: c.param_norm_min.0,
            param_norm_max: c.param_norm_max.0,
            ratio_min: c.ratio_min.0,
            ratio_max: c.ratio_max.0,
            non_finite: c.non_finite.into(),
        }
    }
}

impl From<Schedule> for ScheduleMeta {
    fn from(s: Schedule) -> ScheduleMeta {
        match s {
            Schedule::Constant => ScheduleMeta::Constant,
            Schedule::WarmupPoly {
                warmup,
                total,
                power,
                end,
            } => ScheduleMeta::WarmupPoly {
                warmup,
                total,
                power: F64(power),
                end: F64(end),
            },
            Schedule::WarmupCosine { warmup, total, end } => ScheduleMeta::WarmupCosine {
                warmup,
                total,
                end: F64(end),
            },
        }
    }
}

impl From<&ScheduleMeta> for Schedule {
    fn from(s: &ScheduleMeta) -> Schedule {
        match *s {
            ScheduleMeta::Constant => Schedule::Constant,
            ScheduleMeta::WarmupPoly {
                warmup,
                total,
                power,
                end,
            } => Schedule::WarmupPoly {
                warmup,
                total,
                power: power.0,
                end: end.0,
            },
            ScheduleMeta::WarmupCosine { warmup, total, end } => Schedule::WarmupCosine {
                warmup,
                total,
                end: end.0,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_f64_round_trips_bit_for_bit() {
        let mut x = 0x243F_6A88_85A3_08D3u64;
        let mut values = vec![
            0.0,
            -0.0,
            f64::MIN_POSITIVE,
            5e-324,
            f64::MAX,
            0.1,
            1e-6,
            0.999,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ];
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push(f64::from_bits(x));
        }
        for v in values {
            let json = serde_json::to_string(&F64(v)).unwrap();
            let back: F64 = serde_json::from_str(&json).unwrap();
            if v.is_nan() {
                assert!(back.0.is_nan(), "{json}");
            } else {
                assert_eq!(back.0.to_bits(), v.to_bits(), "{v:?} -> {json}");
            }
        }
    }

    #[test]
    fn configs_and_schedules_round_trip() {
        let configs = [
            LambConfig::paper(),
            LambConfig::optax(),
            LambConfig::timm(),
            LambConfig::seed().adamw(),
            LambConfig {
                eps_mode: EpsMode::InsideSqrt,
                bias_correction: BiasCorrection::Off,
                grad_averaging: false,
                non_finite: NonFinite::Error,
                param_norm_min: 0.01,
                param_norm_max: 10.0,
                ratio_min: 0.1,
                ratio_max: 1.0,
                ..LambConfig::paper()
            },
        ];
        for c in configs {
            let json = serde_json::to_string(&ConfigMeta::from(&c)).unwrap();
            let back: ConfigMeta = serde_json::from_str(&json).unwrap();
            assert_eq!(LambConfig::from(&back), c, "{json}");
        }
        for s in [
            Schedule::Constant,
            Schedule::WarmupPoly {
                warmup: 10,
                total: 1000,
                power: 0.5,
                end: 0.1,
            },
            Schedule::WarmupCosine {
                warmup: 0,
                total: 7,
                end: 0.0,
            },
        ] {
            let json = serde_json::to_string(&ScheduleMeta::from(s)).unwrap();
            let back: ScheduleMeta = serde_json::from_str(&json).unwrap();
            assert_eq!(Schedule::from(&back), s, "{json}");
        }
    }

    #[test]
    fn unknown_fields_and_variants_are_refused() {
        let e =
            serde_json::from_str::<MomentMeta>(r#"{"dtype":"f32","scale":"absmax"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `scale`"), "{e}");
        let e = serde_json::from_str::<ScheduleMeta>(r#"{"kind":"step_decay"}"#).unwrap_err();
        assert!(e.to_string().contains("step_decay"), "{e}");
        let e = serde_json::from_str::<F64>(r#""infinity""#).unwrap_err();
        assert!(e.to_string().contains("infinity"), "{e}");
    }
}
