//! `set_lr` and custom learning-rate schedules (`set_lr_schedule`).

use lamb_std::lamb_core::{LambConfig, Schedule};
use lamb_std::{Error, GroupId, Lamb, LayerId};

fn two_layers(config: LambConfig) -> Lamb {
    let mut opt = Lamb::with_decay_split(config).unwrap();
    opt.add_param("fc.weight", &[4, 3]).unwrap();
    opt.add_param("fc.bias", &[4]).unwrap();
    opt
}

fn grads(t: u64) -> (Vec<f32>, Vec<f32>) {
    let gw = (0..12)
        .map(|i| (i as f32 - 5.0) * 1e-2 + t as f32 * 1e-3)
        .collect();
    let gb = (0..4).map(|i| i as f32 * 1e-2 - t as f32 * 1e-3).collect();
    (gw, gb)
}

/// Steps `n` times from fixed parameters; the parameters' bits after each step.
fn run(opt: &mut Lamb, n: u64) -> Vec<Vec<u32>> {
    let (mut w, mut b) = (vec![0.3f32; 12], vec![0.1f32; 4]);
    let mut out = Vec::new();
    for t in 1..=n {
        let (gw, gb) = grads(t);
        let report = opt.step(&mut [&mut w, &mut b], &[&gw, &gb]).unwrap();
        assert!(report.applied);
        out.push(w.iter().chain(&b).map(|x| x.to_bits()).collect());
    }
    out
}

#[test]
fn set_lr_sets_every_group_and_a_refused_lr_changes_none() {
    let mut opt = two_layers(LambConfig::paper());
    let big = opt.add_group("big", LambConfig::paper(), 1e30).unwrap();
    opt.set_lr(2e-3).unwrap();
    for g in 0..3 {
        assert_eq!(opt.group(GroupId(g)).unwrap().config.lr, 2e-3);
    }
    // Negative: refused for the first group.
    assert!(opt.set_lr(-1.0).is_err());
    // Fine for "decay" and "no_decay", but lr × 1e30 overflows f32 in "big": no group
    // changes.
    let e = opt.set_lr(1e10).unwrap_err();
    assert!(
        matches!(&e, Error::LrScaleOverflow { group, .. } if group == "big"),
        "{e}"
    );
    for g in 0..3 {
        assert_eq!(opt.group(GroupId(g)).unwrap().config.lr, 2e-3, "group {g}");
    }
    assert_eq!(opt.group(big).unwrap().lr_scale, 1e30);
}

#[test]
fn set_lr_is_the_lr_a_new_optimizer_would_have() {
    let mut a = two_layers(LambConfig::paper());
    a.set_lr(0.05).unwrap();
    let mut b = two_layers(LambConfig {
        lr: 0.05,
        ..LambConfig::paper()
    });
    assert_eq!(run(&mut a, 3), run(&mut b, 3));
}

#[test]
fn a_custom_schedule_steps_like_the_built_in_one_it_computes() {
    let schedule = Schedule::WarmupPoly {
        warmup: 2,
        total: 6,
        power: 2.0,
        end: 0.1,
    };
    let mut built_in = two_layers(LambConfig::nvlamb());
    built_in.set_schedule(schedule).unwrap();
    let mut custom = two_layers(LambConfig::nvlamb());
    custom.set_lr_schedule(move |t| schedule.factor(t));
    assert!(custom.has_custom_schedule());
    assert_eq!(run(&mut built_in, 6), run(&mut custom, 6));

    // And it does change the steps: a constant schedule gives other bits.
    let mut constant = two_layers(LambConfig::nvlamb());
    assert_ne!(run(&mut constant, 6), run(&mut two_layers_custom(), 6));
}

fn two_layers_custom() -> Lamb {
    let mut opt = two_layers(LambConfig::nvlamb());
    opt.set_lr_schedule(|t| 1.0 / t as f64);
    opt
}

#[test]
fn a_bad_factor_refuses_the_step_naming_it_and_writes_nothing() {
    for bad in [f64::NAN, f64::INFINITY, -0.5, f64::NEG_INFINITY] {
        let mut opt = two_layers(LambConfig::paper());
        opt.set_lr_schedule(move |t| if t == 2 { bad } else { 1.0 });
        let (mut w, mut b) = (vec![0.3f32; 12], vec![0.1f32; 4]);
        let (gw, gb) = grads(1);
        let _ = opt.step(&mut [&mut w, &mut b], &[&gw, &gb]).unwrap();
        let (w1, b1) = (w.clone(), b.clone());
        let m1 = opt.layer(LayerId(0)).unwrap().m.to_vec();
        let e = opt.step(&mut [&mut w, &mut b], &[&gw, &gb]).unwrap_err();
        match e {
            Error::InvalidLrFactor { step: 2, factor } => {
                assert_eq!(factor.to_bits(), bad.to_bits())
            }
            other => panic!("{bad}: {other}"),
        }
        assert!(e.to_string().contains("step 2"), "{e}");
        assert_eq!((w, b, opt.steps()), (w1, b1, 1));
        assert_eq!(opt.layer(LayerId(0)).unwrap().m, m1.as_slice());
    }
}

#[test]
fn set_schedule_replaces_a_custom_schedule_and_the_other_way_round() {
    let mut opt = two_layers(LambConfig::paper());
    opt.set_lr_schedule(|_| f64::NAN);
    opt.set_schedule(Schedule::Constant).unwrap();
    assert!(!opt.has_custom_schedule());
    assert_eq!(run(&mut opt, 1).len(), 1);
    opt.set_lr_schedule(|_| -1.0);
    assert!(matches!(
        opt.step(
            &mut [&mut [0.0; 12], &mut [0.0; 4]],
            &[&[0.0; 12], &[0.0; 4]]
        ),
        Err(Error::InvalidLrFactor { step: 2, .. })
    ));
}

/// A closure is not data: saving refuses while one is set, and a loaded checkpoint's
/// built-in schedule replaces it.
#[test]
fn a_custom_schedule_is_not_saved_and_a_load_replaces_it() {
    let mut opt = two_layers(LambConfig::paper());
    let warmup = Schedule::WarmupCosine {
        warmup: 3,
        total: 9,
        end: 0.0,
    };
    opt.set_schedule(warmup).unwrap();
    let _ = run(&mut opt, 2);
    let saved = opt.to_checkpoint_bytes().unwrap();

    opt.set_lr_schedule(|t| 1.0 / t as f64);
    let e = opt.to_checkpoint_bytes().unwrap_err();
    assert!(
        matches!(&e, Error::Checkpoint { what, .. } if what.contains("set_lr_schedule")),
        "{e}"
    );
    let path = std::env::temp_dir().join(format!("lamb-custom-schedule-{}", std::process::id()));
    assert!(opt.save(&path).is_err());
    assert!(!path.exists());
    assert!(opt.has_custom_schedule());

    opt.load_checkpoint_bytes(&saved).unwrap();
    assert!(!opt.has_custom_schedule());
    assert_eq!(opt.schedule(), warmup);
}
