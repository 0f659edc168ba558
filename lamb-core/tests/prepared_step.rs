//! A [`Step`] built once per step steps every layer with exactly the bits of
//! `step_layer(config, t, …)`, on every backend, in f32 and compact storage, and refuses
//! what `step_layer` refuses.

use half::bf16;
use lamb_core::layer::{CompactLayer, F32Layer, Grads, Moments, Params, Rounding};
use lamb_core::{Backend, LambConfig, LambError, NonFinite, Step, step_layer};

/// Layers of a few lengths (a partial block, a block, several blocks and a tail).
fn layers() -> Vec<[Vec<f32>; 4]> {
    [1usize, 17, 1024, 2500]
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            let f = |j: usize, i: usize| ((i * 7 + j * 13 + k * 5) % 17) as f32 / 8.0 - 1.0;
            [
                (0..n).map(|i| f(1, i)).collect(),
                (0..n).map(|i| f(2, i) * 0.1).collect(),
                (0..n).map(|i| f(3, i) * 0.01).collect(),
                (0..n).map(|i| f(4, i).abs() * 0.001).collect(),
            ]
        })
        .collect()
}

#[test]
fn a_prepared_step_gives_the_bits_of_step_layer() {
    for config in [
        LambConfig::paper(),
        LambConfig::optax(),
        LambConfig::timm(),
        LambConfig::nvlamb(),
    ] {
        let mut a = layers();
        let mut b = a.clone();
        for t in 1..=4 {
            let step = Step::new(&config, t).unwrap();
            for (x, y) in a.iter_mut().zip(&mut b) {
                let [p, g, m, v] = x;
                let ra = step_layer(&config, t, p, g, m, v).unwrap();
                let [p, g, m, v] = y;
                let rb = step.layer(p, g, m, v).unwrap();
                assert_eq!(ra, rb);
            }
            assert_eq!(a, b, "{config:?} t={t}");
        }
        for backend in Backend::available() {
            let mut c = layers();
            let mut d = c.clone();
            let step = Step::with_grad_scale(&config, 3, 0.5).unwrap();
            for (x, y) in c.iter_mut().zip(&mut d) {
                let [param, grad, m, v] = x;
                let mut l = F32Layer { param, grad, m, v };
                let rc = backend.step_layer(&config, 3, 0.5, &mut l).unwrap();
                let [param, grad, m, v] = y;
                let mut l = F32Layer { param, grad, m, v };
                let rd = backend.step_layer_with(&step, &mut l).unwrap();
                assert_eq!(rc, rd, "{backend}");
            }
            assert_eq!(c, d, "{backend} {config:?}");
        }
    }
}

#[test]
fn a_prepared_step_gives_the_bits_of_step_layer_compact() {
    let config = LambConfig::paper();
    let n = 700;
    let p0: Vec<bf16> = (0..n)
        .map(|i| bf16::from_f32((i % 13) as f32 * 0.1))
        .collect();
    let g: Vec<bf16> = (0..n)
        .map(|i| bf16::from_f32((i % 7) as f32 * 0.01))
        .collect();
    for backend in Backend::available() {
        let mut out = Vec::new();
        for prepared in [false, true] {
            let mut p = p0.clone();
            let (mut m, mut v) = (vec![bf16::ZERO; n], vec![bf16::ZERO; n]);
            for t in 1..=3 {
                let mut layer = CompactLayer {
                    params: Params::Bf16 {
                        data: &mut p,
                        rounding: Rounding::Stochastic { seed: 9 },
                    },
                    grads: Grads::Bf16(&g),
                    moments: Moments::Bf16 {
                        m: &mut m,
                        v: &mut v,
                        rounding: Rounding::Nearest,
                    },
                };
                let r = if prepared {
                    let step = Step::new(&config, t).unwrap();
                    backend.step_layer_compact_with(&step, &mut layer)
                } else {
                    backend.step_layer_compact(&config, t, 1.0, &mut layer)
                };
                assert!(!r.unwrap().skipped);
            }
            out.push((p, m, v));
        }
        assert_eq!(out[0], out[1], "{backend}");
    }
}

#[test]
fn a_prepared_step_refuses_what_step_layer_refuses() {
    assert_eq!(Step::new(&LambConfig::paper(), 0), Err(LambError::StepZero));
    let bad = LambConfig {
        beta1: f64::NAN,
        ..LambConfig::paper()
    };
    assert!(Step::new(&bad, 1).is_err());
    assert!(Step::with_grad_scale(&LambConfig::paper(), 1, 0.0).is_err());
    let config = LambConfig {
        non_finite: NonFinite::Error,
        ..LambConfig::paper()
    };
    let step = Step::new(&config, 1).unwrap();
    assert_eq!(step.config(), &config);
    let mut p = vec![1.0f32; 40];
    let mut g = vec![0.5f32; 40];
    g[33] = f32::NAN;
    let (mut m, mut v) = (vec![0.0f32; 40], vec![0.0f32; 40]);
    assert_eq!(
        step.layer(&mut p, &g, &mut m, &mut v),
        Err(LambError::NonFinite {})
    );
    assert!(p.iter().all(|&x| x == 1.0) && m.iter().chain(&v).all(|&x| x == 0.0));
    assert!(matches!(
        step.layer(&mut p, &g[..39], &mut m, &mut v),
        Err(LambError::LengthMismatch { .. })
    ));
}
