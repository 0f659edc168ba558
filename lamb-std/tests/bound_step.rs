//! Bound steps (`step_bound`, `step_bound_mixed`): a tensor passed for another layer is an
//! error, where the positional `step` can only check lengths.

use lamb_std::lamb_core::LambConfig;
use lamb_std::lamb_core::half::bf16;
use lamb_std::lamb_core::layer::Grads;
use lamb_std::{Error, Lamb, LayerId, ParamsIn};

/// Two layers of the same length (q, k) and one of another (bias).
fn attention() -> (Lamb, LayerId, LayerId, LayerId) {
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    let q = opt.add_layer("attn.q", 6).unwrap();
    let k = opt.add_layer("attn.k", 6).unwrap();
    let b = opt.add_layer("attn.bias", 2).unwrap();
    (opt, q, k, b)
}

struct Model {
    q: Vec<f32>,
    k: Vec<f32>,
    b: Vec<f32>,
    gq: Vec<f32>,
    gk: Vec<f32>,
    gb: Vec<f32>,
}

fn model() -> Model {
    Model {
        q: (0..6).map(|i| 0.1 * i as f32).collect(),
        k: (0..6).map(|i| -0.2 * i as f32 + 0.3).collect(),
        b: vec![0.0, 0.1],
        gq: vec![0.01, -0.02, 0.03, 0.0, 0.5, -0.1],
        gk: vec![-0.3, 0.2, 0.1, 0.05, 0.0, 0.01],
        gb: vec![0.1, -0.1],
    }
}

fn moments(opt: &Lamb) -> Vec<Vec<f32>> {
    (0..opt.layer_count())
        .map(|i| {
            let l = opt.layer(LayerId(i)).unwrap();
            l.m.iter().chain(l.v).copied().collect()
        })
        .collect()
}

#[test]
fn swapped_layers_of_equal_length_are_refused_and_nothing_is_written() {
    let (mut opt, q, k, b) = attention();
    let mut m = model();
    let _ = opt
        .step_bound(
            &mut [(q, &mut m.q[..]), (k, &mut m.k[..]), (b, &mut m.b[..])],
            &[(q, &m.gq[..]), (k, &m.gk[..]), (b, &m.gb[..])],
        )
        .unwrap();
    let (params, state) = ((m.q.clone(), m.k.clone(), m.b.clone()), moments(&opt));

    let e = opt
        .step_bound(
            &mut [(k, &mut m.k[..]), (q, &mut m.q[..]), (b, &mut m.b[..])],
            &[(k, &m.gk[..]), (q, &m.gq[..]), (b, &m.gb[..])],
        )
        .unwrap_err();
    assert_eq!(
        e,
        Error::WrongLayer {
            position: 0,
            what: "parameters",
            registered: "'attn.q' (#0)".into(),
            found: "'attn.k' (#1)".into(),
        }
    );
    assert!(e.to_string().contains("registration order"), "{e}");
    assert_eq!((m.q.clone(), m.k.clone(), m.b.clone()), params);
    assert_eq!(moments(&opt), state);
    assert_eq!(opt.steps(), 1);

    // Only the gradients swapped.
    let e = opt
        .step_bound(
            &mut [(q, &mut m.q[..]), (k, &mut m.k[..]), (b, &mut m.b[..])],
            &[(k, &m.gk[..]), (q, &m.gq[..]), (b, &m.gb[..])],
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::WrongLayer {
                position: 0,
                what: "gradient",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!((m.q, m.k, m.b), params);
    assert_eq!(opt.steps(), 1);
}

/// The positional step binds by position only: the same swap is accepted (documented on
/// `Lamb::step`), which is what the bound step is for.
#[test]
fn the_positional_step_cannot_see_a_swap_of_equal_lengths() {
    let (mut opt, ..) = attention();
    let mut m = model();
    let report = opt
        .step(&mut [&mut m.k, &mut m.q, &mut m.b], &[&m.gk, &m.gq, &m.gb])
        .unwrap();
    assert!(report.applied);
}

#[test]
fn a_bound_step_is_the_positional_step() {
    let (mut bound, q, k, b) = attention();
    let (mut positional, ..) = attention();
    let (mut m1, mut m2) = (model(), model());
    for _ in 0..3 {
        let r1 = bound
            .step_bound(
                &mut [(q, &mut m1.q[..]), (k, &mut m1.k[..]), (b, &mut m1.b[..])],
                &[(q, &m1.gq[..]), (k, &m1.gk[..]), (b, &m1.gb[..])],
            )
            .unwrap();
        let r2 = positional
            .step(
                &mut [&mut m2.q, &mut m2.k, &mut m2.b],
                &[&m2.gq, &m2.gk, &m2.gb],
            )
            .unwrap();
        assert_eq!(r1, r2);
    }
    assert_eq!((m1.q, m1.k, m1.b), (m2.q, m2.k, m2.b));
    assert_eq!(moments(&bound), moments(&positional));
}

#[test]
fn names_foreign_ids_and_missing_layers_are_refused() {
    let (mut opt, q, k, _) = attention();
    let mut m = model();
    // By name, one misspelt.
    let e = opt
        .step_bound(
            &mut [
                ("attn.q", &mut m.q[..]),
                ("attn.K", &mut m.k[..]),
                ("attn.bias", &mut m.b[..]),
            ],
            &[
                ("attn.q", &m.gq[..]),
                ("attn.k", &m.gk[..]),
                ("attn.bias", &m.gb[..]),
            ],
        )
        .unwrap_err();
    assert!(
        matches!(&e, Error::WrongLayer { position: 1, found, .. } if found == "'attn.K'"),
        "{e}"
    );
    // An id this optimizer did not hand out.
    let e = opt
        .step_bound(
            &mut [
                (q, &mut m.q[..]),
                (k, &mut m.k[..]),
                (LayerId(9), &mut m.b[..]),
            ],
            &[(q, &m.gq[..]), (k, &m.gk[..]), (LayerId(9), &m.gb[..])],
        )
        .unwrap_err();
    assert!(e.to_string().contains("#9 (no such layer)"), "{e}");
    // The bias left out: a count error, as for the positional step.
    let e = opt
        .step_bound(
            &mut [(q, &mut m.q[..]), (k, &mut m.k[..])],
            &[(q, &m.gq[..]), (k, &m.gk[..])],
        )
        .unwrap_err();
    assert!(matches!(e, Error::LayerCount { layers: 3, .. }), "{e}");
    assert_eq!(opt.steps(), 0);
}

#[test]
fn a_bound_mixed_step_refuses_a_swap_too() {
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    let a = opt.add_layer("a", 4).unwrap();
    let b = opt.add_layer("b", 4).unwrap();
    let mut wa = vec![bf16::from_f32(0.5); 4];
    let mut wb = vec![0.25f32; 4];
    let ga = vec![bf16::from_f32(0.1); 4];
    let gb = vec![0.1f32; 4];
    let e = opt
        .step_bound_mixed(
            &mut [(b, ParamsIn::F32(&mut wb)), (a, ParamsIn::Bf16(&mut wa))],
            &[(b, Grads::F32(&gb)), (a, Grads::Bf16(&ga))],
            1.0,
        )
        .unwrap_err();
    assert!(matches!(e, Error::WrongLayer { position: 0, .. }), "{e}");
    let report = opt
        .step_bound_mixed(
            &mut [(a, ParamsIn::Bf16(&mut wa)), (b, ParamsIn::F32(&mut wb))],
            &[(a, Grads::Bf16(&ga)), (b, Grads::F32(&gb))],
            0.5,
        )
        .unwrap();
    assert!(report.applied && wb[0] < 0.25);
}
