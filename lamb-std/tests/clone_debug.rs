//! `Lamb` is `Clone` (a deep copy that steps bit-identically) and `Debug` (settings and
//! sizes, not the buffers).

use lamb_std::lamb_core::half::bf16;
use lamb_std::lamb_core::layer::Grads;
use lamb_std::lamb_core::{LambConfig, Schedule};
use lamb_std::{Lamb, LayerId, ParamsIn, Precision, StateFormat, StateView};

const BIG: usize = 5000;

/// Two groups: 8-bit moments with bf16 parameters through a master copy, and f32.
fn model() -> Lamb {
    let mut opt = Lamb::with_decay_split(LambConfig::nvlamb()).unwrap();
    let q8 = Precision {
        moments: StateFormat::Q8,
        ..Precision::default()
    };
    opt.set_precision(lamb_std::GroupId(0), q8).unwrap();
    opt.add_param("fc.weight", &[50, BIG / 50]).unwrap();
    opt.add_param("fc.bias", &[7]).unwrap();
    opt.set_max_grad_norm(Some(1.0)).unwrap();
    opt.set_schedule(Schedule::WarmupPoly {
        warmup: 2,
        total: 10,
        power: 1.0,
        end: 0.0,
    })
    .unwrap();
    opt.set_threads(3).unwrap();
    opt
}

fn grads(step: usize) -> (Vec<bf16>, Vec<f32>) {
    let gw = (0..BIG)
        .map(|i| bf16::from_f32(((i * 7 + step * 13) % 29) as f32 * 1e-3 - 0.01))
        .collect();
    let gb = (0..7).map(|i| (i + step) as f32 * 1e-2).collect();
    (gw, gb)
}

fn step(opt: &mut Lamb, w: &mut [bf16], b: &mut [f32], step: usize) {
    let (gw, gb) = grads(step);
    let report = opt
        .step_mixed(
            &mut [ParamsIn::Bf16(w), ParamsIn::F32(b)],
            &[Grads::Bf16(&gw), Grads::F32(&gb)],
        )
        .unwrap();
    assert!(report.applied);
}

/// Every byte of a layer's state, the master copy included.
fn state_bytes(opt: &Lamb, i: usize) -> Vec<u32> {
    let l = opt.layer(LayerId(i)).unwrap();
    let mut out: Vec<u32> = match l.state {
        StateView::F32 { m, v } => m.iter().chain(v).map(|x| x.to_bits()).collect(),
        StateView::Bf16 { m, v } => m.iter().chain(v).map(|x| x.to_bits() as u32).collect(),
        StateView::Q8 {
            m,
            v,
            m_absmax,
            v_absmax,
        } => (m.iter().chain(v).map(|&x| x as u32))
            .chain(m_absmax.iter().chain(v_absmax).map(|x| x.to_bits()))
            .collect(),
    };
    out.extend(l.master.unwrap_or(&[]).iter().map(|x| x.to_bits()));
    out
}

#[test]
fn a_clone_steps_bit_identically_to_the_original_and_independently() {
    let mut opt = model();
    let mut w: Vec<bf16> = (0..BIG)
        .map(|i| bf16::from_f32(0.1 + i as f32 * 1e-5))
        .collect();
    let mut b = vec![0.0f32; 7];
    for s in 0..2 {
        step(&mut opt, &mut w, &mut b, s);
    }
    let mut copy = opt.clone();
    assert_eq!(copy.threads(), 3);
    assert_eq!(copy.steps(), 2);
    let (mut w2, mut b2) = (w.clone(), b.clone());
    // Both step on: shared buffers would be stepped twice and differ.
    for s in 2..5 {
        step(&mut opt, &mut w, &mut b, s);
        step(&mut copy, &mut w2, &mut b2, s);
    }
    assert_eq!(w, w2);
    assert_eq!(
        b.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        b2.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    for i in 0..2 {
        assert_eq!(state_bytes(&opt, i), state_bytes(&copy, i), "layer {i}");
    }
    assert_eq!(opt.steps(), copy.steps());

    // A setting changed on the copy leaves the original alone.
    copy.set_threads(1).unwrap();
    copy.reset();
    assert_eq!((opt.threads(), opt.steps()), (3, 5));
    assert!(opt.layer(LayerId(0)).unwrap().master.is_some());
}

#[test]
fn debug_shows_the_settings_not_the_buffers() {
    let mut opt = model();
    let mut w = vec![bf16::from_f32(0.1); BIG];
    let mut b = vec![0.0f32; 7];
    step(&mut opt, &mut w, &mut b, 0);
    let text = format!("{opt:?}");
    for part in [
        "Lamb {",
        "name: \"decay\"",
        "name: \"no_decay\"",
        "layers: 2",
        &format!("params: {}", BIG + 7),
        "step: 1",
        "threads: 3",
        "backend: Ok(",
        "max_grad_norm: Some(1.0)",
        "WarmupPoly",
    ] {
        assert!(text.contains(part), "{part:?} not in {text}");
    }
    assert!(text.len() < 2000, "{} bytes: {text}", text.len());
}
