//! Tests of the step that need the optimizer's insides: injected panics and allocation
//! failures, a plan that disagrees with the pool.

use lamb_core::LambConfig;
use lamb_core::layer::Grads;

use super::{Lamb, LayerId, ParamsIn, StepReport};
use crate::error::Error;
use crate::parallel::partition::partition;

fn setup(threads: usize) -> (Lamb, Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    opt.set_threads(threads).unwrap();
    let mut params = vec![];
    let mut grads = vec![];
    for i in 0..6 {
        let n = 3000 + i;
        opt.add_layer(format!("l{i}"), n).unwrap();
        params.push((0..n).map(|k| (k % 7) as f32 * 0.1 + 0.1).collect());
        grads.push((0..n).map(|k| (k % 5) as f32 * 0.01 - 0.02).collect());
    }
    (opt, params, grads)
}

fn do_step(opt: &mut Lamb, p: &mut [Vec<f32>], g: &[Vec<f32>]) -> Result<StepReport, Error> {
    let mut pp: Vec<&mut [f32]> = p.iter_mut().map(|x| x.as_mut_slice()).collect();
    let gg: Vec<&[f32]> = g.iter().map(|x| x.as_slice()).collect();
    opt.step(&mut pp, &gg)
}

fn state(opt: &Lamb, p: &[Vec<f32>]) -> (u64, Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let ms = opt
        .states
        .iter()
        .map(|s| s.f32_moments().0.to_vec())
        .collect();
    (opt.step, p.to_vec(), ms)
}

#[test]
fn a_panic_in_the_norms_phase_is_an_error_and_writes_nothing() {
    for threads in [1, 2] {
        for phase in ["norms", "grad_norm"] {
            let (mut opt, mut p, g) = setup(threads);
            opt.set_max_grad_norm(Some(1.0)).unwrap();
            let _ = do_step(&mut opt, &mut p, &g).unwrap();
            let before = state(&opt, &p);
            opt.panic_in = Some((phase, 4));
            let e = do_step(&mut opt, &mut p, &g).unwrap_err();
            assert!(
                matches!(e, Error::WorkerPanicked { phase: "norms", .. }),
                "{e}"
            );
            assert!(e.to_string().contains("injected fault in layer 4"));
            assert!(e.to_string().contains("nothing was written"));
            assert!(state(&opt, &p) == before);
            // Not poisoned: the next step works.
            opt.panic_in = None;
            assert!(do_step(&mut opt, &mut p, &g).unwrap().applied);
        }
    }
}

#[test]
fn a_panic_in_the_apply_phase_poisons_until_reset() {
    for threads in [1, 2] {
        let (mut opt, mut p, g) = setup(threads);
        opt.panic_in = Some(("apply", 2));
        let e = do_step(&mut opt, &mut p, &g).unwrap_err();
        assert!(matches!(e, Error::WorkerPanicked { phase: "apply", .. }));
        assert!(e.to_string().contains("poisoned"));
        opt.panic_in = None;
        assert_eq!(do_step(&mut opt, &mut p, &g).unwrap_err(), Error::Poisoned);
        opt.reset();
        assert!(do_step(&mut opt, &mut p, &g).unwrap().applied);
    }
}

/// The plan and the pool can disagree (a pool smaller than the plan's thread count):
/// every work list must still run. Here the plan is for 7 threads and the pool has 2.
#[test]
fn every_work_list_runs_on_a_pool_smaller_than_the_plan() {
    let (mut reference, mut p1, g) = setup(1);
    let _ = do_step(&mut reference, &mut p1, &g).unwrap();
    let (mut opt, mut p, _) = setup(2);
    opt.ensure_plan();
    opt.scratch.plan = partition(opt.layers.iter().map(|l| l.len), 7);
    opt.threads = 7;
    assert_eq!(opt.scratch.plan.last().unwrap().thread, 6);
    assert_eq!(opt.pool.as_ref().unwrap().current_num_threads(), 2);
    assert!(do_step(&mut opt, &mut p, &g).unwrap().applied);
    assert!(p == p1, "pieces of threads the pool lacks were not stepped");
    assert!(state(&opt, &p) == state(&reference, &p1));
}

/// A layer added, or a thread count set, after a step is in the next step's plan.
#[test]
fn the_plan_follows_layers_and_threads_added_after_a_step() {
    let (mut opt, mut p, mut g) = setup(3);
    let _ = do_step(&mut opt, &mut p, &g).unwrap();
    assert!(!opt.scratch.plan_stale);
    opt.add_layer("late", 5000).unwrap();
    p.push(vec![0.5; 5000]);
    g.push(vec![0.01; 5000]);
    let _ = do_step(&mut opt, &mut p, &g).unwrap();
    assert!(
        p[6].iter().all(|&x| x < 0.5),
        "the late layer was not stepped"
    );
    opt.set_threads(5).unwrap();
    let _ = do_step(&mut opt, &mut p, &g).unwrap();
    assert_eq!(opt.scratch.plan.last().unwrap().thread, 4);
    assert_eq!(
        opt.scratch.plan,
        partition(opt.layers.iter().map(|l| l.len), 5)
    );
}

/// A master copy whose allocation fails fails the step: an `Err` naming the layer and
/// the bytes, the copies made before it dropped, nothing written; the next step works.
#[test]
fn a_failed_master_allocation_fails_the_step_cleanly() {
    use lamb_core::half::bf16;
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    for i in 0..3 {
        opt.add_layer(format!("h{i}"), 100).unwrap();
    }
    let mut w: Vec<Vec<bf16>> = (0..3).map(|_| vec![bf16::from_f32(0.5); 100]).collect();
    let g: Vec<Vec<bf16>> = (0..3).map(|_| vec![bf16::from_f32(0.01); 100]).collect();
    let grads: Vec<Grads<'_>> = g.iter().map(|x| Grads::Bf16(x)).collect();
    opt.fail_master_of = Some(2);
    let before = w.clone();
    let mut p: Vec<ParamsIn<'_>> = w.iter_mut().map(|x| ParamsIn::Bf16(x)).collect();
    let e = opt.step_mixed(&mut p, &grads).unwrap_err();
    assert!(
        matches!(&e, Error::OutOfMemory { name, what: "master copy", bytes }
            if name == "h2" && *bytes >= usize::MAX / 8 * 4),
        "{e:?}"
    );
    assert!(e.to_string().contains("layer 'h2'"), "{e}");
    drop(p);
    assert!(w == before);
    assert_eq!(opt.steps(), 0);
    for i in 0..3 {
        let l = opt.layer(LayerId(i)).unwrap();
        assert!(l.master.is_none() && l.storage.is_none() && l.last.is_none());
        assert!(l.m.iter().all(|&x| x == 0.0));
    }
    opt.fail_master_of = None;
    let mut p: Vec<ParamsIn<'_>> = w.iter_mut().map(|x| ParamsIn::Bf16(x)).collect();
    assert!(opt.step_mixed(&mut p, &grads).unwrap().applied);
    assert!((0..3).all(|i| opt.layer(LayerId(i)).unwrap().master.is_some()));
}
