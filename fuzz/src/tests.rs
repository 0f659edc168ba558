//! Unit tests of the fuzz helpers.

use super::*;

#[test]
fn f32_classes() {
    assert!(
        F32::Nan {
            payload: 0,
            negative: true
        }
        .get()
        .is_nan()
    );
    assert!(
        F32::Denormal {
            mantissa: 0,
            negative: false
        }
        .get()
        .is_subnormal()
    );
    for e in [-128i8, -1, 0, 127] {
        let x = F32::Ordinary {
            mantissa: u32::MAX,
            exp: e,
            negative: false,
        }
        .get();
        assert!(x.is_normal() && x.abs() < 2f32.powi(41) && x.abs() >= 2f32.powi(-40));
        let h = F32::Huge {
            mantissa: 0,
            exp: e as u8,
            negative: true,
        }
        .get();
        assert!(h.is_finite() && h <= -2f32.powi(60));
    }
}

#[test]
fn f64_edges_round_as_documented() {
    assert_eq!(F32_EDGES[0] as f32, f32::MAX);
    assert!((F32_EDGES[1] as f32).is_infinite());
    assert_eq!(f64::from_bits(F32_EDGES[1].to_bits() - 1) as f32, f32::MAX);
    assert_eq!(F32_EDGES[2] as f32, f32::from_bits(1));
    assert_eq!(F32_EDGES[3] as f32, 0.0);
    assert_eq!(
        f64::from_bits(F32_EDGES[3].to_bits() + 1) as f32,
        f32::from_bits(1)
    );
    assert_eq!(
        F64::NearOne {
            k: 63,
            above: false
        }
        .get(),
        1.0
    );
    assert!(
        F64::NearOne {
            k: 52,
            above: false
        }
        .get()
            < 1.0
    );
    assert!(
        (F64::NearOne {
            k: 52,
            above: false
        }
        .get() as f32)
            == 1.0
    );
    for e in [-128i8, 0, 127] {
        let x = F64::Ordinary {
            mantissa: 0,
            exp: e,
            negative: false,
        }
        .get();
        assert!(x.is_normal() && x <= 2f64.powi(60) && x >= 2f64.powi(-60));
    }
}

#[test]
fn presets_pass_the_independent_predicate() {
    for p in 0..6u8 {
        let c = ConfigSpec::Preset {
            preset: p,
            overrides: Few(vec![]),
        }
        .build();
        assert_eq!(expected_first_invalid(&c), None);
        assert!(c.validate().is_ok());
    }
}
