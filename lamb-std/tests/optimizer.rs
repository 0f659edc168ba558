//! The whole-model optimizer: determinism across thread counts, equality with the per-layer
//! core, clipping, loss scaling, all-or-nothing skips, and every kind of bad input.

use lamb_std::lamb_core::layer::F32Layer;
use lamb_std::lamb_core::{Backend, LambConfig, NonFinite, Schedule, step_layer};
use lamb_std::{Error, GroupId, Lamb, LayerId};

/// BERT-base and uniform shapes: the benches' module, one copy for both.
#[path = "../../benches/src/shapes.rs"]
#[allow(dead_code)]
mod shapes;
use rand::distr::Uniform;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// `n` values uniform in [−scale, scale).
fn uniform(rng: &mut SmallRng, n: usize, scale: f32) -> Vec<f32> {
    let dist = Uniform::new(-scale, scale).unwrap();
    (0..n).map(|_| rng.sample(dist)).collect()
}

/// A model: its shapes, params, and a few steps of gradients.
struct Model {
    shapes: Vec<(String, usize)>,
    params: Vec<Vec<f32>>,
    grads: Vec<Vec<Vec<f32>>>,
}

impl Model {
    fn new(shapes: Vec<(String, usize)>, steps: usize, seed: u64) -> Model {
        let mut rng = SmallRng::seed_from_u64(seed);
        let params = shapes
            .iter()
            .map(|(name, n)| {
                if name.ends_with(".bias") {
                    vec![0.0; *n] // zero-initialised, as real biases are
                } else {
                    uniform(&mut rng, *n, 0.05)
                }
            })
            .collect();
        let grads = (0..steps)
            .map(|_| {
                shapes
                    .iter()
                    .map(|(_, n)| uniform(&mut rng, *n, 0.01))
                    .collect()
            })
            .collect();
        Model {
            shapes,
            params,
            grads,
        }
    }

    fn optimizer(&self, config: LambConfig) -> Lamb {
        let mut opt = Lamb::new(config).unwrap();
        for (name, n) in &self.shapes {
            opt.add_layer(name.clone(), *n).unwrap();
        }
        opt
    }
}

fn step(
    opt: &mut Lamb,
    params: &mut [Vec<f32>],
    grads: &[Vec<f32>],
) -> Result<lamb_std::StepReport, Error> {
    let mut p: Vec<&mut [f32]> = params.iter_mut().map(|x| x.as_mut_slice()).collect();
    let g: Vec<&[f32]> = grads.iter().map(|x| x.as_slice()).collect();
    opt.step(&mut p, &g)
}

/// Every bit of params, moments and the step counter.
fn snapshot(opt: &Lamb, params: &[Vec<f32>]) -> Vec<u32> {
    let mut out = vec![opt.steps() as u32];
    for p in params {
        out.extend(p.iter().map(|x| x.to_bits()));
    }
    for i in 0..opt.layer_count() {
        let l = opt.layer(LayerId(i)).unwrap();
        out.extend(l.m.iter().chain(l.v).map(|x| x.to_bits()));
    }
    out
}

fn bert_small() -> Model {
    // BERT-base's 199 tensors, each 1/64 of its size (1.7M parameters).
    Model::new(shapes::scaled(&shapes::bert_base(), 64), 3, 1)
}

#[test]
fn bit_identical_for_1_2_3_8_threads_and_equal_to_per_layer_core() {
    let model = bert_small();
    for clip in [None, Some(0.5)] {
        let mut results = vec![];
        for threads in [1, 2, 3, 8] {
            let mut opt = model.optimizer(LambConfig::paper());
            opt.set_threads(threads).unwrap();
            opt.set_max_grad_norm(clip).unwrap();
            let mut params = model.params.clone();
            for g in &model.grads {
                assert!(step(&mut opt, &mut params, g).unwrap().applied);
            }
            results.push(snapshot(&opt, &params));
        }
        for (k, r) in results.iter().enumerate().skip(1) {
            assert!(
                r == &results[0],
                "clip={clip:?}: thread count #{k} differs from 1 thread"
            );
        }
    }

    // Without clipping, the optimizer is exactly lamb_core::step_layer layer by layer.
    let mut opt = model.optimizer(LambConfig::paper());
    opt.set_threads(3).unwrap();
    let mut params = model.params.clone();
    let mut reference = model.params.clone();
    let mut m: Vec<Vec<f32>> = model.shapes.iter().map(|(_, n)| vec![0.0; *n]).collect();
    let mut v = m.clone();
    for (t, g) in model.grads.iter().enumerate() {
        let _ = step(&mut opt, &mut params, g).unwrap();
        for i in 0..reference.len() {
            step_layer(
                &LambConfig::paper(),
                t as u64 + 1,
                &mut reference[i],
                &g[i],
                &mut m[i],
                &mut v[i],
            )
            .unwrap();
        }
    }
    assert!(params == reference);
    for i in 0..m.len() {
        let l = opt.layer(LayerId(i)).unwrap();
        assert!(
            l.m == m[i].as_slice() && l.v == v[i].as_slice(),
            "state of layer {i}"
        );
    }
}

#[test]
fn clipping_equals_the_core_with_the_global_scale() {
    let model = Model::new(shapes::uniform(5, 3000), 1, 2);
    let max_norm = 0.1;
    let mut opt = model.optimizer(LambConfig::nvlamb());
    opt.set_max_grad_norm(Some(max_norm)).unwrap();
    let mut params = model.params.clone();
    let report = step(&mut opt, &mut params, &model.grads[0]).unwrap();

    let b = Backend::detect();
    let total: f64 = model.grads[0]
        .iter()
        .map(|g| b.sum_squares(g).unwrap())
        .sum();
    let norm = total.sqrt();
    assert_eq!(report.grad_norm, Some(norm));
    let scale = (1.0 / (norm / max_norm).max(1.0)) as f32;
    assert!(scale < 1.0, "the test must actually clip");
    assert_eq!(report.grad_scale, scale);
    for (i, p) in params.iter().enumerate() {
        let mut r = model.params[i].clone();
        let (mut m, mut v) = (vec![0.0; r.len()], vec![0.0; r.len()]);
        b.step_layer(
            &LambConfig::nvlamb(),
            1,
            scale,
            &mut F32Layer {
                param: &mut r,
                grad: &model.grads[0][i],
                m: &mut m,
                v: &mut v,
            },
        )
        .unwrap();
        assert!(p == &r, "layer {i}");
    }
    assert!(matches!(
        opt.set_max_grad_norm(Some(0.0)),
        Err(Error::InvalidMaxGradNorm(_))
    ));
    assert!(opt.set_max_grad_norm(Some(f64::NAN)).is_err());
}

#[test]
fn loss_scale_is_folded_into_the_gradient_scale() {
    let model = Model::new(shapes::uniform(3, 500), 1, 3);
    let mut a = model.optimizer(LambConfig::paper());
    let mut b = model.optimizer(LambConfig::paper());
    let (mut pa, mut pb) = (model.params.clone(), model.params.clone());
    // Gradients scaled by 1024 and un-scaled in the kernel == gradients given unscaled.
    let scaled: Vec<Vec<f32>> = model.grads[0]
        .iter()
        .map(|g| g.iter().map(|x| x * 1024.0).collect())
        .collect();
    {
        let mut p: Vec<&mut [f32]> = pa.iter_mut().map(|x| x.as_mut_slice()).collect();
        let g: Vec<&[f32]> = scaled.iter().map(|x| x.as_slice()).collect();
        let _ = a.step_scaled(&mut p, &g, 1.0 / 1024.0).unwrap();
    }
    let _ = step(&mut b, &mut pb, &model.grads[0]).unwrap();
    assert!(pa == pb);
    assert!(snapshot(&a, &pa) == snapshot(&b, &pb));
}

#[test]
fn a_non_finite_gradient_anywhere_skips_every_layer() {
    let model = bert_small();
    for clip in [None, Some(1.0)] {
        for threads in [1, 3] {
            let mut opt = model.optimizer(LambConfig::paper());
            opt.set_threads(threads).unwrap();
            opt.set_max_grad_norm(clip).unwrap();
            let mut params = model.params.clone();
            let _ = step(&mut opt, &mut params, &model.grads[0]).unwrap();
            let before = snapshot(&opt, &params);
            let mut bad = model.grads[1].clone();
            bad[150][7] = f32::NAN;
            let r = step(&mut opt, &mut params, &bad).unwrap();
            assert!(!r.applied);
            assert_eq!(r.step, 2);
            let skipped = r.skipped.unwrap();
            assert_eq!(skipped.index, 150);
            assert_eq!(skipped.name, model.shapes[150].0);
            assert!(snapshot(&opt, &params) == before, "nothing may be written");
            assert_eq!(opt.steps(), 1);

            // With the Error policy: an Err that names the layer, and still nothing written.
            let mut strict = model.optimizer(LambConfig {
                non_finite: NonFinite::Error,
                ..LambConfig::paper()
            });
            strict.set_max_grad_norm(clip).unwrap();
            let mut p2 = model.params.clone();
            let before = snapshot(&strict, &p2);
            let e = step(&mut strict, &mut p2, &bad).unwrap_err();
            assert!(
                e.to_string()
                    .contains(&format!("layer '{}' (#150)", model.shapes[150].0)),
                "{e}"
            );
            assert!(snapshot(&strict, &p2) == before);
        }
    }
}

#[test]
fn bad_input_is_refused_and_nothing_is_written() {
    let model = Model::new(shapes::uniform(4, 100), 1, 4);
    let mut opt = model.optimizer(LambConfig::paper());
    opt.set_threads(2).unwrap();
    let mut params = model.params.clone();
    let _ = step(&mut opt, &mut params, &model.grads[0]).unwrap();
    let before = snapshot(&opt, &params);
    let g = &model.grads[0];

    refuse_bad_tensors(&mut opt, &mut params, g);
    assert!(snapshot(&opt, &params) == before);

    // A group without layers.
    let empty = opt.add_group("empty", LambConfig::paper(), 1.0).unwrap();
    let e = step(&mut opt, &mut params, g).unwrap_err();
    assert_eq!(e, Error::EmptyGroup("empty".into()));
    assert!(snapshot(&opt, &params) == before);
    opt.add_layer_to(empty, "late", 0).unwrap();
    let e = step(&mut opt, &mut params, g).unwrap_err();
    assert!(matches!(e, Error::LayerCount { layers: 5, .. }));

    refuse_bad_settings(&mut opt);
}

/// The step refuses tensors of the wrong count or length, aliased gradients and bad loss
/// scales (the caller checks that nothing changed).
fn refuse_bad_tensors(opt: &mut Lamb, params: &mut [Vec<f32>], g: &[Vec<f32>]) {
    // Wrong number of tensors.
    {
        let mut p: Vec<&mut [f32]> = params
            .iter_mut()
            .take(3)
            .map(|x| x.as_mut_slice())
            .collect();
        let gg: Vec<&[f32]> = g.iter().map(|x| x.as_slice()).collect();
        let e = opt.step(&mut p, &gg).unwrap_err();
        assert_eq!(
            e,
            Error::LayerCount {
                layers: 4,
                params: 3,
                grads: 4
            }
        );
        assert!(e.to_string().contains("has 4 layers"));
    }
    // A gradient of the wrong length names the layer and both lengths.
    {
        let mut short = g.to_vec();
        short[2].pop();
        let e = step(opt, params, &short).unwrap_err();
        assert_eq!(
            e.to_string(),
            "layer 'layer.2' (#2): grad has 99 elements, the layer has 100"
        );
    }
    // A param of the wrong length.
    {
        let mut p = params.to_vec();
        p[1].push(0.0);
        let e = step(opt, &mut p, g).unwrap_err();
        assert!(
            e.to_string()
                .contains("layer 'layer.1' (#1): param has 101"),
            "{e}"
        );
    }
    // The same gradient buffer passed twice.
    {
        let mut p: Vec<&mut [f32]> = params.iter_mut().map(|x| x.as_mut_slice()).collect();
        let gg: Vec<&[f32]> = vec![&g[0], &g[1], &g[0], &g[3]];
        let e = opt.step(&mut p, &gg).unwrap_err();
        assert!(matches!(e, Error::AliasedBuffers { .. }), "{e}");
        assert!(e.to_string().contains("'layer.0'") && e.to_string().contains("'layer.2'"));
    }
    // A bad loss scale.
    {
        let mut p: Vec<&mut [f32]> = params.iter_mut().map(|x| x.as_mut_slice()).collect();
        let gg: Vec<&[f32]> = g.iter().map(|x| x.as_slice()).collect();
        assert!(opt.step_scaled(&mut p, &gg, 0.0).is_err());
        assert!(opt.step_scaled(&mut p, &gg, f32::NAN).is_err());
    }
}

/// Invalid configurations, groups, names and schedules are refused when set, and the old
/// ones stay.
fn refuse_bad_settings(opt: &mut Lamb) {
    let bad = LambConfig {
        beta1: 1.0,
        ..LambConfig::paper()
    };
    let e = opt.set_group(GroupId(0), bad, 1.0).unwrap_err();
    assert_eq!(
        e.to_string(),
        "group 'default': invalid beta1 = 1.0: must be in [0, 1)"
    );
    assert!(
        opt.set_group(GroupId(0), LambConfig::paper(), f64::NAN)
            .is_err()
    );
    assert!(opt.add_group("bad", bad, 1.0).is_err());
    assert_eq!(opt.group(GroupId(0)).unwrap().config, LambConfig::paper());
    assert!(matches!(
        opt.add_layer_to(GroupId(99), "x", 1),
        Err(Error::UnknownGroup(99))
    ));
    assert!(matches!(
        opt.add_layer("layer.0", 1),
        Err(Error::DuplicateName(_))
    ));
    assert!(
        opt.set_schedule(Schedule::WarmupPoly {
            warmup: 5,
            total: 1,
            power: 1.0,
            end: 0.0
        })
        .is_err()
    );
}

#[test]
fn schedule_and_group_lr_scale_set_the_step_size() {
    let model = Model::new(shapes::uniform(2, 64), 1, 5);
    let cfg = LambConfig {
        lr: 0.01,
        ..LambConfig::paper()
    };
    let mut opt = Lamb::new(cfg).unwrap();
    opt.add_layer("a", 64).unwrap();
    let half = opt.add_group("half", cfg, 0.5).unwrap();
    opt.add_layer_to(half, "b", 64).unwrap();
    opt.set_schedule(Schedule::WarmupPoly {
        warmup: 4,
        total: 10,
        power: 1.0,
        end: 0.0,
    })
    .unwrap();
    let mut params = model.params.clone();
    let r = step(&mut opt, &mut params, &model.grads[0]).unwrap();
    assert_eq!(r.lr_factor, 0.25);
    let a = opt.layer(LayerId(0)).unwrap().last.unwrap();
    let b = opt.layer(LayerId(1)).unwrap().last.unwrap();
    // The step size is lr·scale·factor times the f64 trust ratio, rounded to f32 once; the
    // report's ratio is that ratio rounded to f32, so the product of the two roundings may
    // be one f32 ulp away.
    let within_an_ulp = |size: f32, expect: f64| {
        let e = expect as f32;
        size == e || size == e.next_up() || size == e.next_down()
    };
    assert!(
        within_an_ulp(a.step_size, 0.01 * 0.25 * a.trust_ratio as f64),
        "{a:?}"
    );
    assert!(
        within_an_ulp(b.step_size, 0.01 * 0.5 * 0.25 * b.trust_ratio as f64),
        "{b:?}"
    );
}

#[test]
fn decay_split_follows_timm() {
    let mut opt = Lamb::with_decay_split(LambConfig::paper()).unwrap();
    let w = opt.add_param("attn.qkv.weight", &[8, 8]).unwrap();
    let b = opt.add_param("attn.qkv.bias", &[8]).unwrap();
    let n = opt.add_param("norm.weight", &[8]).unwrap();
    assert_eq!(opt.layer(w).unwrap().group, GroupId(0));
    assert_eq!(opt.layer(b).unwrap().group, GroupId(1));
    assert_eq!(opt.layer(n).unwrap().group, GroupId(1));
    let nd = opt.group(GroupId(1)).unwrap().config;
    assert_eq!(nd.weight_decay, 0.0);
    assert!(!nd.adapts());
}

#[test]
fn reset_zeroes_state_and_counter() {
    let model = Model::new(shapes::uniform(2, 50), 1, 6);
    let mut opt = model.optimizer(LambConfig::paper());
    let mut params = model.params.clone();
    let _ = step(&mut opt, &mut params, &model.grads[0]).unwrap();
    assert_eq!(opt.steps(), 1);
    assert!(opt.layer(LayerId(0)).unwrap().m.iter().any(|&x| x != 0.0));
    assert!(opt.layer(LayerId(0)).unwrap().last.is_some());
    opt.reset();
    assert_eq!(opt.steps(), 0);
    assert!(opt.layer(LayerId(0)).unwrap().m.iter().all(|&x| x == 0.0));
    assert!(opt.layer(LayerId(0)).unwrap().last.is_none());
}

#[test]
fn every_backend_gives_the_same_model_step() {
    let model = bert_small();
    let mut results = vec![];
    for b in Backend::available() {
        let mut opt = model.optimizer(LambConfig::paper());
        opt.set_backend(b).unwrap();
        opt.set_threads(2).unwrap();
        let mut params = model.params.clone();
        let _ = step(&mut opt, &mut params, &model.grads[0]).unwrap();
        results.push((b, snapshot(&opt, &params)));
    }
    for (b, r) in &results[1..] {
        assert!(r == &results[0].1, "{b} differs from {}", results[0].0);
    }
}

/// A layer id this optimizer did not hand out is an error, like a foreign group id, not a
/// panic.
#[test]
fn an_unknown_layer_id_is_an_error_not_a_panic() {
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    let w = opt.add_layer("w", 3).unwrap();
    assert_eq!(opt.layer(w).unwrap().len, 3);
    assert_eq!(opt.layer(LayerId(1)).unwrap_err(), Error::UnknownLayer(1));
    assert_eq!(
        opt.layer(LayerId(usize::MAX)).unwrap_err().to_string(),
        format!("no layer with id {}", usize::MAX)
    );
}

/// A bad configuration is refused when the optimizer is made, naming the group, not at
/// the first step.
#[test]
fn a_bad_config_is_refused_at_construction() {
    let bad = LambConfig {
        eps: -1.0,
        ..LambConfig::paper()
    };
    let e = Lamb::new(bad).unwrap_err();
    assert!(
        matches!(&e, Error::Config { group: Some(g), .. } if g == "default"),
        "{e}"
    );
    let e = Lamb::with_decay_split(bad).unwrap_err();
    assert!(
        matches!(&e, Error::Config { group: Some(g), .. } if g == "decay"),
        "{e}"
    );
    let e = Lamb::new(LambConfig {
        lr: 1e300,
        ..LambConfig::paper()
    })
    .unwrap_err();
    assert!(e.to_string().contains("lr = 1e300"), "{e}");
    assert!(Lamb::with_decay_split(LambConfig::paper()).is_ok());
}
