//! `Lamb::step_mixed_scaled_some`: layers without a gradient are not stepped, and the
//! layers that are step exactly as an optimizer holding only them would.

use lamb_std::lamb_core::half::bf16;
use lamb_std::lamb_core::layer::Grads;
use lamb_std::lamb_core::{LambConfig, NonFinite};
use lamb_std::{Error, Lamb, LayerId, ParamsIn, Precision};
use rand::distr::Uniform;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const LENS: [usize; 3] = [5000, 300, 7001];

/// `n` values uniform in [−scale, scale), the same for the same `seed`.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let dist = Uniform::new(-scale, scale).unwrap();
    (0..n).map(|_| rng.sample(dist)).collect()
}

fn optimizer(names: &[usize], threads: usize) -> Lamb {
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    for &i in names {
        opt.add_layer(format!("l{i}"), LENS[i]).unwrap();
    }
    opt.set_threads(threads).unwrap();
    opt.set_max_grad_norm(Some(0.5)).unwrap();
    opt
}

/// Moments and last report of layer `id`.
fn state(opt: &Lamb, id: usize) -> (Vec<f32>, Vec<f32>, String) {
    let l = opt.layer(LayerId(id)).unwrap();
    (l.m.to_vec(), l.v.to_vec(), format!("{:?}", l.last))
}

#[test]
fn layers_without_gradient_are_left_alone_and_the_rest_step_as_alone() {
    let mut bits = Vec::new();
    for threads in [1, 3] {
        // `all` holds three layers and never gets a gradient for l1; `only` holds l0 and l2.
        let mut all = optimizer(&[0, 1, 2], threads);
        let mut only = optimizer(&[0, 2], threads);
        let mut p: Vec<Vec<f32>> = (0..3).map(|i| values(LENS[i], i as u64, 0.1)).collect();
        let mut q = [p[0].clone(), p[2].clone()];
        let frozen = p[1].clone();
        for step in 0..3u64 {
            let g: Vec<Vec<f32>> = (0..3)
                .map(|i| values(LENS[i], 10 * step + i as u64 + 7, 0.3))
                .collect();
            let [p0, p1, p2] = &mut p[..] else { panic!() };
            let report = all
                .step_mixed_scaled_some(
                    &mut [ParamsIn::F32(p0), ParamsIn::F32(p1), ParamsIn::F32(p2)],
                    &[Some(Grads::F32(&g[0])), None, Some(Grads::F32(&g[2]))],
                    0.5,
                )
                .unwrap();
            let [q0, q2] = &mut q;
            let alone = only
                .step_mixed_scaled(
                    &mut [ParamsIn::F32(q0), ParamsIn::F32(q2)],
                    &[Grads::F32(&g[0]), Grads::F32(&g[2])],
                    0.5,
                )
                .unwrap();
            // The same global norm: the frozen layer adds nothing to it.
            assert_eq!(report, alone);
            assert!(report.applied && report.grad_scale < 0.5, "{report:?}");
        }
        assert_eq!(p[1], frozen);
        assert_eq!(
            state(&all, 1),
            (vec![0.0; 300], vec![0.0; 300], "None".into())
        );
        for (a, b) in [(0, 0), (2, 1)] {
            assert_eq!(p[a], q[b], "l{a}");
            assert_eq!(state(&all, a), state(&only, b), "l{a}");
        }
        assert_eq!(all.steps(), 3);
        bits.push(p);
    }
    assert_eq!(bits[0], bits[1], "thread counts differ");
}

#[test]
fn a_layer_steps_again_when_its_gradient_comes_back() {
    let mut opt = optimizer(&[0, 1, 2], 2);
    let mut p: Vec<Vec<f32>> = (0..3).map(|i| values(LENS[i], i as u64, 0.1)).collect();
    let g: Vec<Vec<f32>> = (0..3).map(|i| values(LENS[i], i as u64 + 3, 0.3)).collect();
    let before = p.clone();
    for mask in [[true, false, true], [false, true, false]] {
        let [p0, p1, p2] = &mut p[..] else { panic!() };
        let grads: Vec<Option<Grads<'_>>> =
            (0..3).map(|i| mask[i].then(|| Grads::F32(&g[i]))).collect();
        let params = &mut [ParamsIn::F32(p0), ParamsIn::F32(p1), ParamsIn::F32(p2)];
        assert!(
            opt.step_mixed_scaled_some(params, &grads, 1.0)
                .unwrap()
                .applied
        );
    }
    for (i, (a, b)) in p.iter().zip(&before).enumerate() {
        assert_ne!(a, b, "layer {i} was never stepped");
        assert!(opt.layer(LayerId(i)).unwrap().last.is_some());
    }
}

#[test]
fn absent_layers_accept_empty_params_and_present_ones_are_still_checked() {
    let mut opt = optimizer(&[0, 1], 1);
    let (mut w, g) = (vec![0.1f32; LENS[0]], vec![0.01f32; LENS[0]]);
    let r = opt.step_mixed_scaled_some(
        &mut [ParamsIn::F32(&mut w), ParamsIn::F32(&mut [])],
        &[Some(Grads::F32(&g)), None],
        1.0,
    );
    assert!(r.unwrap().applied);
    // A present layer's lengths are checked as in every step.
    let short = vec![0.01f32; 10];
    let before = w.clone();
    let e = opt
        .step_mixed_scaled_some(
            &mut [ParamsIn::F32(&mut w), ParamsIn::F32(&mut [])],
            &[Some(Grads::F32(&short)), None],
            1.0,
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("layer 'l0' (#0): grad has 10 elements"),
        "{e}"
    );
    // One gradient entry per layer, present or not.
    let e = opt
        .step_mixed_scaled_some(
            &mut [ParamsIn::F32(&mut w), ParamsIn::F32(&mut [])],
            &[None],
            1.0,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::LayerCount {
                layers: 2,
                params: 2,
                grads: 1
            }
        ),
        "{e}"
    );
    assert_eq!((w, opt.steps()), (before, 1));
}

#[test]
fn a_non_finite_present_gradient_still_skips_everything() {
    let mut config = LambConfig::paper();
    config.non_finite = NonFinite::Skip;
    let mut opt = Lamb::new(config).unwrap();
    opt.add_layer("a", 100).unwrap();
    opt.add_layer("b", 100).unwrap();
    let (mut a, mut b) = (vec![0.1f32; 100], vec![0.1f32; 100]);
    let mut g = vec![0.01f32; 100];
    g[50] = f32::NAN;
    let r = opt
        .step_mixed_scaled_some(
            &mut [ParamsIn::F32(&mut a), ParamsIn::F32(&mut b)],
            &[None, Some(Grads::F32(&g))],
            1.0,
        )
        .unwrap();
    assert!(!r.applied);
    assert_eq!(r.skipped.unwrap().name, "b");
    assert_eq!((a, b, opt.steps()), (vec![0.1; 100], vec![0.1; 100], 0));
}

#[test]
fn an_absent_half_layer_gets_its_master_copy_at_its_first_step() {
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    opt.set_precision(lamb_std::GroupId(0), Precision::default())
        .unwrap();
    opt.add_layer("w", 64).unwrap();
    opt.add_layer("h", 64).unwrap();
    let mut w = vec![0.1f32; 64];
    let mut h = vec![bf16::from_f32(0.25); 64];
    let g = vec![0.01f32; 64];
    let gh = vec![bf16::from_f32(0.01); 64];
    let _ = opt
        .step_mixed_scaled_some(
            &mut [ParamsIn::F32(&mut w), ParamsIn::Bf16(&mut h)],
            &[Some(Grads::F32(&g)), None],
            1.0,
        )
        .unwrap();
    assert!(opt.layer(LayerId(1)).unwrap().master.is_none());
    // The model changed meanwhile (say, loaded): the master is taken from it when it steps.
    h.fill(bf16::from_f32(0.5));
    let _ = opt
        .step_mixed_scaled_some(
            &mut [ParamsIn::F32(&mut w), ParamsIn::Bf16(&mut h)],
            &[None, Some(Grads::Bf16(&gh))],
            1.0,
        )
        .unwrap();
    let master = opt.layer(LayerId(1)).unwrap().master.unwrap();
    assert!(
        master.iter().all(|&x| x < 0.5 && x > 0.4),
        "{:?}",
        &master[..4]
    );
}

/// A layer that is not stepped is not read: its placeholder may be of any storage and
/// length, and it neither trips nor fixes the layer's storage.
#[test]
fn an_absent_layer_placeholder_is_not_checked_against_its_storage() {
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    opt.add_layer("half", 64).unwrap();
    opt.add_layer("plain", 64).unwrap();
    let mut h = vec![bf16::from_f32(0.5); 64];
    let mut p = vec![0.5f32; 64];
    let g = vec![0.01f32; 64];
    let gh = vec![bf16::from_f32(0.01); 64];
    // The first step fixes "half" as bf16.
    let _ = opt
        .step_mixed(
            &mut [ParamsIn::Bf16(&mut h), ParamsIn::F32(&mut p)],
            &[Grads::Bf16(&gh), Grads::F32(&g)],
        )
        .unwrap();
    // "half" absent, with an empty f32 placeholder: accepted, and "half" stays bf16.
    let report = opt
        .step_mixed_scaled_some(
            &mut [ParamsIn::F32(&mut []), ParamsIn::F32(&mut p)],
            &[None, Some(Grads::F32(&g))],
            1.0,
        )
        .unwrap();
    assert!(report.applied);
    let e = opt
        .step_mixed(
            &mut [ParamsIn::F32(&mut vec![0.5; 64]), ParamsIn::F32(&mut p)],
            &[Grads::F32(&g), Grads::F32(&g)],
        )
        .unwrap_err();
    assert!(matches!(e, Error::StorageChanged { index: 0, .. }), "{e}");
}
