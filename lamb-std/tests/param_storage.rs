//! A layer's parameter storage (f32, bf16, f16) is fixed by its first applied step: another
//! storage later is an `Err` naming the layer and both storages, with nothing written, so
//! that a master copy made for one storage is never stepped for parameters held in
//! another (it would be stale: the weights would silently come out wrong).

use lamb_std::lamb_core::LambConfig;
use lamb_std::lamb_core::half::{bf16, f16};
use lamb_std::lamb_core::layer::Grads;
use lamb_std::{Error, Lamb, LayerId, ParamStorage, ParamsIn, Precision};

fn bf(xs: &[f32]) -> Vec<bf16> {
    xs.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn bf16_step(opt: &mut Lamb, w: &mut [bf16], g: &[bf16]) -> Result<bool, Error> {
    opt.step_mixed(&mut [ParamsIn::Bf16(w)], &[Grads::Bf16(g)])
        .map(|r| r.applied)
}

/// Everything a refused step must leave as it was.
fn snapshot(opt: &Lamb) -> String {
    let l = opt.layer(LayerId(0)).unwrap();
    format!(
        "{} {:?} {:?} {:?} {:?} {:?}",
        opt.steps(),
        l.state,
        l.master,
        l.storage,
        l.last,
        l.m
    )
}

/// The report's scenario: bf16 (master copy made), then f32, then bf16 again with the
/// weights the f32 step left. Before the fix the f32 step was applied without touching the
/// master copy, and the third step continued from the first step's copy: the f32 step's
/// update was silently lost. Now the f32 step is refused, with nothing written.
#[test]
fn a_storage_change_is_refused_and_no_stale_master_is_used() {
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    opt.add_layer("enc.w", 4).unwrap();
    let mut w = bf(&[0.5; 4]);
    let g = bf(&[0.01; 4]);
    assert!(bf16_step(&mut opt, &mut w, &g).unwrap());
    assert!(opt.layer(LayerId(0)).unwrap().master.is_some());
    assert_eq!(
        opt.layer(LayerId(0)).unwrap().storage,
        Some(ParamStorage::Bf16)
    );

    // The model is converted to f32 for a step.
    let before = snapshot(&opt);
    let mut w32: Vec<f32> = w.iter().map(|x| x.to_f32()).collect();
    let w32_before = w32.clone();
    let e = opt.step(&mut [&mut w32], &[&[0.01; 4]]).unwrap_err();
    assert_eq!(
        e,
        Error::StorageChanged {
            index: 0,
            name: "enc.w".into(),
            fixed: ParamStorage::Bf16,
            found: ParamStorage::F32,
        }
    );
    let msg = e.to_string();
    assert!(
        msg.contains("layer 'enc.w' (#0)") && msg.contains("f32") && msg.contains("bf16"),
        "{msg}"
    );
    assert_eq!(w32, w32_before, "nothing written");
    assert_eq!(snapshot(&opt), before);

    // bf16 again: the master copy is current (the model's last written values).
    let master: Vec<f32> = opt.layer(LayerId(0)).unwrap().master.unwrap().to_vec();
    assert!(master.iter().zip(&w).all(|(m, x)| bf16::from_f32(*m) == *x));
    assert!(bf16_step(&mut opt, &mut w, &g).unwrap());

    // New weights: reset() frees the storage and drops the master copy, and the next step
    // takes the new weights.
    opt.reset();
    assert_eq!(opt.layer(LayerId(0)).unwrap().storage, None);
    let mut w_new = bf(&[-3.0; 4]);
    assert!(bf16_step(&mut opt, &mut w_new, &g).unwrap());
    for x in &w_new {
        assert!((x.to_f32() + 3.0).abs() < 0.1, "stale master used: {x}");
    }
}

/// A two-layer model whose second layer is held in every storage.
#[derive(Clone, PartialEq)]
struct Tensors {
    other: Vec<f32>,
    p32: Vec<f32>,
    pb: Vec<bf16>,
    ph: Vec<f16>,
}

impl Tensors {
    fn new() -> Tensors {
        Tensors {
            other: vec![0.5; 3],
            p32: vec![0.5; 8],
            pb: bf(&[0.5; 8]),
            ph: vec![f16::from_f32(0.5); 8],
        }
    }

    /// A step with the second layer in storage `s`.
    fn step(&mut self, opt: &mut Lamb, s: ParamStorage) -> Result<bool, Error> {
        let (g_other, g32, gh) = ([0.01f32; 3], [0.01f32; 8], bf(&[0.01; 8]));
        let (p, g) = match s {
            ParamStorage::F32 => (ParamsIn::F32(&mut self.p32), Grads::F32(&g32)),
            ParamStorage::Bf16 => (ParamsIn::Bf16(&mut self.pb), Grads::Bf16(&gh)),
            ParamStorage::F16 => (ParamsIn::F16(&mut self.ph), Grads::Bf16(&gh)),
        };
        opt.step_mixed(
            &mut [ParamsIn::F32(&mut self.other), p],
            &[Grads::F32(&g_other), g],
        )
        .map(|r| r.applied)
    }
}

/// Every pair of different storages is refused, in both directions, whatever the group
/// keeps (a master copy or not).
#[test]
fn every_other_storage_is_refused_after_the_first_applied_step() {
    let storages = [ParamStorage::F32, ParamStorage::Bf16, ParamStorage::F16];
    for first in storages {
        for later in storages {
            let mut opt = Lamb::new(LambConfig::paper()).unwrap();
            opt.add_layer("other", 3).unwrap();
            opt.add_layer("w", 8).unwrap();
            let mut t = Tensors::new();
            assert!(t.step(&mut opt, first).unwrap());
            assert_eq!(opt.layer(LayerId(1)).unwrap().storage, Some(first));
            assert_eq!(
                opt.layer(LayerId(0)).unwrap().storage,
                Some(ParamStorage::F32)
            );
            let before = (snapshot(&opt), t.clone());
            let r = t.step(&mut opt, later);
            if later == first {
                assert!(r.unwrap());
            } else {
                assert_eq!(
                    r.unwrap_err(),
                    Error::StorageChanged {
                        index: 1,
                        name: "w".into(),
                        fixed: first,
                        found: later,
                    }
                );
                assert!((snapshot(&opt), t.clone()) == before);
            }
        }
    }
    // Without a master copy (bf16 updated in place) too.
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    let no_master = Precision {
        master: false,
        ..Precision::default()
    };
    opt.set_precision(lamb_std::GroupId(0), no_master).unwrap();
    opt.add_layer("w", 4).unwrap();
    let mut w = bf(&[0.5; 4]);
    assert!(bf16_step(&mut opt, &mut w, &bf(&[0.01; 4])).unwrap());
    let mut w32 = vec![0.5f32; 4];
    let e = opt.step(&mut [&mut w32], &[&[0.01; 4]]).unwrap_err();
    assert!(matches!(
        e,
        Error::StorageChanged {
            fixed: ParamStorage::Bf16,
            ..
        }
    ));
}

/// Only an applied step fixes the storage: a refused or skipped first step leaves it free
/// (a refused step changes nothing).
#[test]
fn a_refused_first_step_does_not_fix_the_storage() {
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    opt.add_layer("w", 4).unwrap();
    let mut w = bf(&[0.5; 4]);
    // Skipped: an overflowing gradient.
    assert!(!bf16_step(&mut opt, &mut w, &bf(&[f32::INFINITY, 0.0, 0.0, 0.0])).unwrap());
    assert_eq!(opt.layer(LayerId(0)).unwrap().storage, None);
    assert!(opt.layer(LayerId(0)).unwrap().master.is_none());
    // Refused: a bad loss scale.
    let e = opt.step_mixed_scaled(
        &mut [ParamsIn::Bf16(&mut w)],
        &[Grads::Bf16(&bf(&[0.01; 4]))],
        f32::NAN,
    );
    assert!(e.is_err());
    assert_eq!(opt.layer(LayerId(0)).unwrap().storage, None);
    // So f32 is still free, and then fixed.
    let mut w32 = vec![0.5f32; 4];
    assert!(opt.step(&mut [&mut w32], &[&[0.01; 4]]).unwrap().applied);
    assert_eq!(
        opt.layer(LayerId(0)).unwrap().storage,
        Some(ParamStorage::F32)
    );
    assert!(opt.layer(LayerId(0)).unwrap().master.is_none());
}

/// A checkpoint does not record the storage: a load frees it. A master copy loaded with the
/// state is of bf16/f16 parameters: f32 ones are refused (the copy would go stale), bf16
/// ones continue from the copy.
#[test]
fn a_checkpoint_load_frees_the_storage_but_a_loaded_master_needs_half_precision() {
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    opt.add_layer("w", 4).unwrap();
    let mut w = bf(&[0.5; 4]);
    let g = bf(&[0.01; 4]);
    assert!(bf16_step(&mut opt, &mut w, &g).unwrap());
    let with_master = opt.to_checkpoint_bytes().unwrap();

    let mut loaded = Lamb::new(LambConfig::paper()).unwrap();
    loaded.add_layer("w", 4).unwrap();
    loaded.load_checkpoint_bytes(&with_master).unwrap();
    assert_eq!(loaded.layer(LayerId(0)).unwrap().storage, None);
    assert!(loaded.layer(LayerId(0)).unwrap().master.is_some());
    let before = snapshot(&loaded);
    let mut w32 = vec![0.5f32; 4];
    let e = loaded.step(&mut [&mut w32], &[&[0.01; 4]]).unwrap_err();
    assert_eq!(
        e,
        Error::MasterNeedsHalf {
            index: 0,
            name: "w".into()
        }
    );
    assert!(e.to_string().contains("layer 'w' (#0)"), "{e}");
    assert_eq!(w32, [0.5; 4]);
    assert_eq!(snapshot(&loaded), before);
    // f16 is half precision too: the loaded copy is the weights' f32 value.
    let mut wh = vec![f16::from_f32(0.5); 4];
    assert!(
        loaded
            .step_mixed(&mut [ParamsIn::F16(&mut wh)], &[Grads::Bf16(&g)])
            .unwrap()
            .applied
    );
    assert_eq!(
        loaded.layer(LayerId(0)).unwrap().storage,
        Some(ParamStorage::F16)
    );

    // Loading into an optimizer whose layer was fixed to f32 frees it.
    let mut fixed = Lamb::new(LambConfig::paper()).unwrap();
    fixed.add_layer("w", 4).unwrap();
    let mut w32 = vec![0.5f32; 4];
    let _ = fixed.step(&mut [&mut w32], &[&[0.01; 4]]).unwrap();
    assert_eq!(
        fixed.layer(LayerId(0)).unwrap().storage,
        Some(ParamStorage::F32)
    );
    fixed.load_checkpoint_bytes(&with_master).unwrap();
    assert_eq!(fixed.layer(LayerId(0)).unwrap().storage, None);
    let mut w2 = w.clone();
    assert!(bf16_step(&mut fixed, &mut w2, &g).unwrap());
    // The same as the source optimizer's next step.
    assert!(bf16_step(&mut opt, &mut w, &g).unwrap());
    assert_eq!(w2, w);
}
