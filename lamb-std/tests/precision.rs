//! Compact state in the optimizer: per-group formats, master copies, stochastic rounding,
//! all bit-identical across thread counts, plus memory accounting.

use lamb_std::lamb_core::half::{bf16, f16};
use lamb_std::lamb_core::layer::{Grads, Rounding};
use lamb_std::lamb_core::{Backend, LambConfig};
use lamb_std::{Error, GroupId, Lamb, LayerId, ParamsIn, Precision, StateFormat, StateView};
use rand::distr::Uniform;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// `n` values uniform in [−scale, scale), the same for the same `seed`.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let dist = Uniform::new(-scale, scale).unwrap();
    (0..n).map(|_| rng.sample(dist)).collect()
}

const LENS: [usize; 4] = [70_000, 3000, 5000, 100];

/// bf16 model weights + bf16 grads, with the given precision, for 3 steps; returns every
/// stored bit (model weights, master copies, moments).
fn run(precision: Precision, threads: usize, backend: Backend) -> Vec<u32> {
    let mut opt = Lamb::new(LambConfig {
        lr: 0.01,
        ..LambConfig::paper()
    })
    .unwrap();
    opt.set_precision(GroupId(0), precision).unwrap();
    opt.set_threads(threads).unwrap();
    opt.set_backend(backend).unwrap();
    let mut weights: Vec<Vec<bf16>> = LENS
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            values(n, i as u64, 0.1)
                .into_iter()
                .map(bf16::from_f32)
                .collect()
        })
        .collect();
    for (i, &n) in LENS.iter().enumerate() {
        opt.add_layer(format!("l{i}"), n).unwrap();
    }
    for step in 0..3u64 {
        let grads: Vec<Vec<bf16>> = LENS
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                values(n, 100 + step * 10 + i as u64, 0.01)
                    .into_iter()
                    .map(bf16::from_f32)
                    .collect()
            })
            .collect();
        let mut p: Vec<ParamsIn> = weights.iter_mut().map(|w| ParamsIn::Bf16(w)).collect();
        let g: Vec<Grads> = grads.iter().map(|g| Grads::Bf16(g)).collect();
        assert!(opt.step_mixed(&mut p, &g).unwrap().applied);
    }
    let mut bits: Vec<u32> = weights
        .iter()
        .flatten()
        .map(|x| x.to_bits() as u32)
        .collect();
    for i in 0..LENS.len() {
        let l = opt.layer(LayerId(i)).unwrap();
        if let Some(m) = l.master {
            bits.extend(m.iter().map(|x| x.to_bits()));
        }
        match l.state {
            StateView::F32 { m, v } => bits.extend(m.iter().chain(v).map(|x| x.to_bits())),
            StateView::Bf16 { m, v } => bits.extend(m.iter().chain(v).map(|x| x.to_bits() as u32)),
            StateView::Q8 {
                m,
                v,
                m_absmax,
                v_absmax,
            } => {
                bits.extend(m.iter().chain(v).map(|&x| x as u32));
                bits.extend(m_absmax.iter().chain(v_absmax).map(|x| x.to_bits()));
            }
        }
    }
    bits
}

#[test]
fn compact_state_is_bit_identical_for_every_thread_count_and_backend() {
    for moments in [StateFormat::F32, StateFormat::Bf16, StateFormat::Q8] {
        for (master, rounding) in [
            (true, Rounding::Nearest),
            (false, Rounding::Nearest),
            (false, Rounding::Stochastic { seed: 9 }),
        ] {
            let precision = Precision {
                moments,
                master,
                rounding,
                ..Precision::default()
            };
            let reference = run(precision, 1, Backend::Scalar);
            for threads in [1, 2, 3, 8] {
                for b in Backend::available() {
                    assert!(
                        run(precision, threads, b) == reference,
                        "{precision:?}: {threads} threads on {b} differ from 1 thread on scalar"
                    );
                }
            }
        }
    }
}

#[test]
fn formats_and_accounting() {
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    let q8 = opt.add_group("q8", LambConfig::paper(), 1.0).unwrap();
    opt.set_precision(
        q8,
        Precision {
            moments: StateFormat::Q8,
            ..Precision::default()
        },
    )
    .unwrap();
    opt.add_layer("f32", 8192).unwrap();
    opt.add_layer_to(q8, "big", 8192).unwrap();
    opt.add_layer_to(q8, "small", 100).unwrap(); // below compact_min_len: stays f32
    assert!(matches!(
        opt.layer(LayerId(1)).unwrap().state,
        StateView::Q8 { .. }
    ));
    assert!(matches!(
        opt.layer(LayerId(2)).unwrap().state,
        StateView::F32 { .. }
    ));
    let expect =
        (8192.0 * 8.0 + 8192.0 * (2.0 + 8.0 / 256.0) + 100.0 * 8.0) / (8192.0 * 2.0 + 100.0);
    assert!((opt.bytes_per_param() - expect).abs() < 1e-12);
    // A group's precision cannot change once it has layers.
    assert!(matches!(
        opt.set_precision(q8, Precision::default()),
        Err(Error::PrecisionAfterLayers(_))
    ));
}

#[test]
fn master_copy_tracks_the_model_and_keeps_small_updates() {
    // bf16 weights of 1.0 with updates far below bf16's resolution (2^-8): in place they
    // never move; through the f32 master they accumulate and eventually move the model.
    let n = 4096;
    let cfg = LambConfig {
        lr: 1e-4,
        weight_decay: 0.0,
        ..LambConfig::paper().adamw()
    };
    for master in [false, true] {
        let mut opt = Lamb::new(cfg).unwrap();
        opt.set_precision(
            GroupId(0),
            Precision {
                master,
                ..Precision::default()
            },
        )
        .unwrap();
        opt.add_layer("w", n).unwrap();
        let mut w = vec![bf16::ONE; n];
        let g = vec![bf16::from_f32(1.0); n];
        for _ in 0..100 {
            let _ = opt
                .step_mixed(&mut [ParamsIn::Bf16(&mut w)], &[Grads::Bf16(&g)])
                .unwrap();
        }
        let moved = w.iter().any(|x| *x != bf16::ONE);
        assert_eq!(moved, master, "master={master}");
        if master {
            let m = opt.layer(LayerId(0)).unwrap().master.unwrap();
            assert!((m[0] - (1.0 - 100.0 * 1e-4)).abs() < 1e-5, "{}", m[0]);
            assert_eq!(w[0], bf16::from_f32(m[0]));
        }
    }
}

#[test]
fn f16_without_master_is_refused_untouched() {
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    opt.set_precision(
        GroupId(0),
        Precision {
            master: false,
            ..Precision::default()
        },
    )
    .unwrap();
    opt.add_layer("w", 10).unwrap();
    let mut w = vec![f16::ONE; 10];
    let g = vec![f16::ONE; 10];
    let e = opt
        .step_mixed(&mut [ParamsIn::F16(&mut w)], &[Grads::F16(&g)])
        .unwrap_err();
    assert_eq!(e, Error::NeedsMaster("w".into()));
    assert!(w.iter().all(|x| *x == f16::ONE));
    assert_eq!(opt.steps(), 0);
}

#[test]
fn f16_master_with_loss_scaling_and_clipping() {
    let n = 5000;
    let mut opt = Lamb::new(LambConfig::nvlamb()).unwrap();
    opt.set_max_grad_norm(Some(1.0)).unwrap();
    opt.set_precision(
        GroupId(0),
        Precision {
            moments: StateFormat::Bf16,
            ..Precision::default()
        },
    )
    .unwrap();
    opt.add_layer("w", n).unwrap();
    let mut w: Vec<f16> = values(n, 1, 0.1).into_iter().map(f16::from_f32).collect();
    // Loss-scaled f16 gradients: one overflowed to infinity skips the step.
    let mut g: Vec<f16> = values(n, 2, 0.01 * 1024.0)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let r = opt
        .step_mixed_scaled(
            &mut [ParamsIn::F16(&mut w)],
            &[Grads::F16(&g)],
            1.0 / 1024.0,
        )
        .unwrap();
    assert!(r.applied);
    let before: Vec<u16> = w.iter().map(|x| x.to_bits()).collect();
    g[7] = f16::INFINITY;
    let r = opt
        .step_mixed_scaled(
            &mut [ParamsIn::F16(&mut w)],
            &[Grads::F16(&g)],
            1.0 / 1024.0,
        )
        .unwrap();
    assert!(!r.applied);
    assert_eq!(w.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), before);
    assert_eq!(opt.steps(), 1);
}

/// The second moment after a gradient stops: 1 step of |g| = 0.1, then 1000 steps of zero
/// gradients. With β2 = 0.999, f32 v decays by 0.999^1000 = 0.368. bf16 v must decay
/// likewise (stochastic rounding with a fresh draw per step); with round to nearest, or a
/// seed that did not change per step, it would stay where it was.
#[test]
fn bf16_second_moment_decays_like_f32() {
    let n = 8192;
    let mean_v = |moments: StateFormat| {
        let mut opt = Lamb::new(LambConfig::paper()).unwrap();
        opt.set_precision(
            GroupId(0),
            Precision {
                moments,
                ..Precision::default()
            },
        )
        .unwrap();
        let id = opt.add_layer("w", n).unwrap();
        let mut w = values(n, 1, 1.0);
        let signs: Vec<f32> = values(n, 2, 1.0)
            .iter()
            .map(|x| 0.1f32.copysign(*x))
            .collect();
        let zeros = vec![0.0f32; n];
        for step in 0..1001 {
            let g = if step == 0 { &signs } else { &zeros };
            let _ = opt.step(&mut [&mut w[..]], &[&g[..]]).unwrap();
        }
        match opt.layer(id).unwrap().state {
            StateView::F32 { v, .. } => v.iter().map(|&x| x as f64).sum::<f64>() / n as f64,
            StateView::Bf16 { v, .. } => v.iter().map(|x| x.to_f64()).sum::<f64>() / n as f64,
            _ => unreachable!(),
        }
    };
    let f32_v = mean_v(StateFormat::F32);
    let bf16_v = mean_v(StateFormat::Bf16);
    let start = 1e-5; // (1 − β2)·0.1²
    println!("mean v after 1000 zero-gradient steps: f32 {f32_v:e}, bf16 {bf16_v:e}");
    assert!(
        (f32_v / (start * 0.999f64.powi(1000)) - 1.0).abs() < 1e-3,
        "{f32_v:e}"
    );
    assert!(
        (bf16_v / f32_v - 1.0).abs() < 0.02,
        "bf16 {bf16_v:e} vs f32 {f32_v:e}"
    );
}
