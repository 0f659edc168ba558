//! The per-block phase-1 entry points that lamb-std's threads use (`norms_blocks`,
//! `norms_blocks_compact`) and the gradient sum of squares of the global norm
//! (`sum_squares_grads`), on every backend this CPU has: each block's entry is phase 1 of
//! that block alone, the entries add up (in order) to phase 1 of the whole layer, entries
//! past the layer are left alone, and a short `out` is refused with nothing written.

use lamb_core::half::{bf16, f16};
use lamb_core::layer::{CompactLayer, Grads, Moments, Params};
use lamb_core::{BLOCK, Backend, LambConfig, LambError, LayerNorms, StepScalars};

const LENGTHS: [usize; 7] = [1, 17, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 5000];

/// A sentinel that no phase 1 produces.
const UNTOUCHED: LayerNorms = LayerNorms {
    param_sq: -1.0,
    update_sq: -2.0,
    param_min: 0.0,
    param_max: 0.0,
    update_min: 0.0,
    update_max: 0.0,
    param_format: lamb_core::layer::ParamFormat::F32,
};

struct Layer {
    p: Vec<f32>,
    g: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Layer {
    fn new(n: usize) -> Layer {
        let f = |k: usize, a: usize, s: f32| ((k * a) % 97) as f32 * s - 48.0 * s;
        Layer {
            p: (0..n).map(|k| f(k, 7, 0.02)).collect(),
            g: (0..n).map(|k| f(k, 13, 0.001)).collect(),
            m: (0..n).map(|k| f(k, 5, 0.0001)).collect(),
            v: (0..n).map(|k| f(k, 11, 1e-6).abs()).collect(),
        }
    }
}

fn scalars() -> StepScalars {
    StepScalars::new(&LambConfig::paper(), 3, 1.0).unwrap()
}

fn sum(entries: &[LayerNorms]) -> LayerNorms {
    entries.iter().fold(LayerNorms::default(), |a, &b| a + b)
}

#[test]
fn norms_blocks_are_the_blocks_phase_1() {
    let s = scalars();
    for b in Backend::available() {
        for n in LENGTHS {
            let l = Layer::new(n);
            let blocks = n.div_ceil(BLOCK);
            let mut out = vec![UNTOUCHED; blocks + 2];
            b.norms_blocks(&s, &l.p, &l.g, &l.m, &l.v, &mut out)
                .unwrap();
            for (k, entry) in out[..blocks].iter().enumerate() {
                let r = k * BLOCK..((k + 1) * BLOCK).min(n);
                let alone = b
                    .norms(
                        &s,
                        &l.p[r.clone()],
                        &l.g[r.clone()],
                        &l.m[r.clone()],
                        &l.v[r],
                    )
                    .unwrap();
                assert_eq!(*entry, alone, "{b:?} n = {n} block {k}");
            }
            assert_eq!(
                out[blocks..],
                [UNTOUCHED; 2],
                "{b:?} n = {n}: past the layer"
            );
            let whole = b.norms(&s, &l.p, &l.g, &l.m, &l.v).unwrap();
            assert_eq!(sum(&out[..blocks]), whole, "{b:?} n = {n}: the sum");
            assert!(whole.param_sq > 0.0 && whole.update_sq > 0.0);
        }
    }
}

#[test]
fn norms_blocks_refuse_a_short_out_untouched() {
    let s = scalars();
    for b in Backend::available() {
        let n = 3 * BLOCK + 5;
        let l = Layer::new(n);
        let mut out = vec![UNTOUCHED; 3];
        // The error says how many blocks the layer has, and how many slots `out` has.
        let short = |e: LambError| match e {
            LambError::OutTooShort { blocks, found } => (blocks, found),
            other => panic!("{b:?}: {other}"),
        };
        let e = b
            .norms_blocks(&s, &l.p, &l.g, &l.m, &l.v, &mut out)
            .unwrap_err();
        assert_eq!(short(e), (4, 3), "{b:?}");
        assert_eq!(
            e.to_string(),
            "phase 1 by blocks: out has 3 slots, the layer has 4 blocks"
        );
        assert_eq!(out, [UNTOUCHED; 3]);

        let g: Vec<bf16> = l.g.iter().map(|&x| bf16::from_f32(x)).collect();
        let (mut m, mut v) = (l.m.clone(), l.v.clone());
        let mut p = l.p.clone();
        let layer = CompactLayer {
            params: Params::F32(&mut p),
            grads: Grads::Bf16(&g),
            moments: Moments::F32 {
                m: &mut m,
                v: &mut v,
            },
        };
        let e = b.norms_blocks_compact(&s, &layer, &mut out).unwrap_err();
        assert_eq!(short(e), (4, 3), "{b:?}");
        assert_eq!(out, [UNTOUCHED; 3]);
    }
}

#[test]
fn norms_blocks_compact_are_the_blocks_phase_1() {
    let s = scalars();
    for b in Backend::available() {
        for n in LENGTHS {
            let l = Layer::new(n);
            let g: Vec<bf16> = l.g.iter().map(|&x| bf16::from_f32(x)).collect();
            let (mut p, mut m, mut v) = (l.p.clone(), l.m.clone(), l.v.clone());
            let layer = CompactLayer {
                params: Params::F32(&mut p),
                grads: Grads::Bf16(&g),
                moments: Moments::F32 {
                    m: &mut m,
                    v: &mut v,
                },
            };
            let blocks = n.div_ceil(BLOCK);
            let mut out = vec![UNTOUCHED; blocks + 2];
            b.norms_blocks_compact(&s, &layer, &mut out).unwrap();
            assert_eq!(
                out[blocks..],
                [UNTOUCHED; 2],
                "{b:?} n = {n}: past the layer"
            );
            let mut exact = vec![UNTOUCHED; blocks];
            b.norms_blocks_compact(&s, &layer, &mut exact).unwrap();
            assert_eq!(
                exact,
                out[..blocks],
                "{b:?} n = {n}: an `out` of exactly the blocks"
            );
            // The same layer with the gradients decoded to f32 goes through the f32
            // kernels: block for block the same sums.
            let decoded: Vec<f32> = g.iter().map(|x| x.to_f32()).collect();
            let mut f32_out = vec![UNTOUCHED; blocks];
            b.norms_blocks(&s, &l.p, &decoded, &l.m, &l.v, &mut f32_out)
                .unwrap();
            for (k, (compact, plain)) in out.iter().zip(&f32_out).enumerate() {
                assert_eq!(compact.param_sq, plain.param_sq, "{b:?} n = {n} block {k}");
                assert_eq!(
                    compact.update_sq, plain.update_sq,
                    "{b:?} n = {n} block {k}"
                );
            }
        }
    }
}

#[test]
fn sum_squares_grads_is_exact_on_integers_in_every_format() {
    // Small integers: every square and every partial sum is exact, so the sum is known
    // whatever the order, and any lost, doubled or negated block shows.
    for b in Backend::available() {
        for n in LENGTHS {
            let x: Vec<f32> = (0..n).map(|k| (k % 9) as f32 - 4.0).collect();
            let expected: f64 = x.iter().map(|&a| (a as f64) * (a as f64)).sum();
            let h: Vec<f16> = x.iter().map(|&a| f16::from_f32(a)).collect();
            let bh: Vec<bf16> = x.iter().map(|&a| bf16::from_f32(a)).collect();
            for (name, grads) in [
                ("f32", Grads::F32(&x)),
                ("f16", Grads::F16(&h)),
                ("bf16", Grads::Bf16(&bh)),
            ] {
                assert_eq!(
                    b.sum_squares_grads(&grads),
                    Ok(expected),
                    "{b:?} {name} n = {n}"
                );
            }
            assert_eq!(b.sum_squares(&x), Ok(expected), "{b:?} n = {n}");
        }
    }
}

/// On values whose sums round, the order of the additions shows: the sum of squares of
/// half-precision gradients is, bit for bit, the f32 kernel's sum over the decoded values
/// (element `i` to lane `i % 16`, the fixed tree, blocks in order), on every backend.
#[test]
fn sum_squares_grads_keeps_the_lane_order_of_the_f32_sum() {
    for b in Backend::available() {
        for n in LENGTHS {
            // Magnitudes from 1e-3 to 1e2: the squares span more bits than an f64 holds,
            // so their sum rounds and depends on the order of the additions.
            let x: Vec<f32> = (0..n)
                .map(|k| ((k * 7919) % 97 + 1) as f32 * 10f32.powi((k % 6) as i32 - 3))
                .collect();
            let h: Vec<f16> = x.iter().map(|&a| f16::from_f32(a)).collect();
            let bh: Vec<bf16> = x.iter().map(|&a| bf16::from_f32(a)).collect();
            let hx: Vec<f32> = h.iter().map(|a| a.to_f32()).collect();
            let bx: Vec<f32> = bh.iter().map(|a| a.to_f32()).collect();
            let bits = |r: Result<f64, LambError>| r.unwrap().to_bits();
            assert_eq!(
                bits(b.sum_squares_grads(&Grads::F16(&h))),
                bits(Backend::Scalar.sum_squares(&hx)),
                "{b:?} f16 n = {n}"
            );
            assert_eq!(
                bits(b.sum_squares_grads(&Grads::Bf16(&bh))),
                bits(Backend::Scalar.sum_squares(&bx)),
                "{b:?} bf16 n = {n}"
            );
        }
    }
}
