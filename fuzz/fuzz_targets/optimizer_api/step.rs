//! `Op::Step`: one step on the optimizer under test and on its shadow, with the inputs the
//! `StepSpec` asks for (faults, aliased gradients, patches), and the checks after it (see
//! the target's module docs).

use super::*;

/// Gradient arenas of one storage type; the layers' gradients are slices of it.
enum Arena {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

/// The gradients of one step: one arena (so that the alias fault can overlap two
/// gradients) and each layer's range in it.
struct StepGrads {
    arena: Arena,
    ranges: Vec<std::ops::Range<usize>>,
}

impl StepGrads {
    fn mixed(&self) -> Vec<GradsIn<'_>> {
        self.ranges
            .iter()
            .map(|r| match &self.arena {
                Arena::F32(a) => GradsIn::F32(&a[r.clone()]),
                Arena::Bf16(a) => GradsIn::Bf16(&a[r.clone()]),
                Arena::F16(a) => GradsIn::F16(&a[r.clone()]),
            })
            .collect()
    }

    fn f32(&self) -> Vec<&[f32]> {
        match &self.arena {
            Arena::F32(a) => self.ranges.iter().map(|r| &a[r.clone()]).collect(),
            _ => Vec::new(),
        }
    }
}

/// Persistent parameter patches (a NaN in the model stays there until overwritten).
fn patch_params(model: &mut Model, s: &StepSpec, n: usize) {
    for p in s.patches.iter().filter(|p| p.param) {
        if n > 0 {
            let t = &mut model.params[p.layer as usize % n];
            if t.len() > 0 {
                let i = p.index as usize % t.len();
                t.set(i, p.value.get());
            }
        }
    }
}

/// Applies a count or length fault to the parameters passed and the gradient lengths.
fn apply_fault(fault: &Fault, params: &mut Vec<Tensor>, grad_lens: &mut Vec<usize>, n: usize) {
    match *fault {
        Fault::DropParam => {
            params.pop();
        }
        Fault::ExtraParam => params.push(Tensor::F32(vec![0.5; 3])),
        Fault::DropGrad => {
            grad_lens.pop();
        }
        Fault::ExtraGrad => grad_lens.push(3),
        Fault::WrongLen { layer, grad, delta } if n > 0 => {
            let i = layer as usize % n;
            let d = delta as isize % 5;
            if grad {
                grad_lens[i] = (grad_lens[i] as isize + d).max(0) as usize;
            } else {
                let len = (params[i].len() as isize + d).max(0) as usize;
                params[i].resize(len);
            }
        }
        _ => {}
    }
}

/// Each gradient's start in the arena (back to back, unless the alias fault moves one into
/// another) and the arena's length before its slack.
fn grad_starts(fault: &Fault, grad_lens: &[usize]) -> (Vec<usize>, usize) {
    let mut starts = Vec::with_capacity(grad_lens.len());
    let mut total = 0;
    for &l in grad_lens {
        starts.push(total);
        total += l;
    }
    if let Fault::AliasGrads { a, b, shift } = *fault
        && grad_lens.len() >= 2
    {
        let (a, b) = (a as usize % grad_lens.len(), b as usize % grad_lens.len());
        if a != b {
            starts[b] = starts[a] + shift as usize % grad_lens[a].max(1);
        }
    }
    (starts, total)
}

/// The step's gradients: filled as `s.grads` says, patched, stored as `s.grad_format`
/// says in a mixed step.
fn make_grads(s: &StepSpec, fault: &Fault, grad_lens: &[usize], mixed: bool) -> StepGrads {
    let (starts, total) = grad_starts(fault, grad_lens);
    let mut values = vec![0f32; total + 4096];
    match &s.grads {
        GradFill::Finite { seed, scale } => Fill::Uniform {
            seed: *seed,
            scale: *scale,
            abs: false,
        }
        .fill(&mut values),
        GradFill::Any(f) => f.fill(&mut values),
    }
    for p in s.patches.iter().filter(|p| !p.param) {
        if !grad_lens.is_empty() {
            let l = p.layer as usize % grad_lens.len();
            if grad_lens[l] > 0 {
                values[starts[l] + p.index as usize % grad_lens[l]] = p.value.get();
            }
        }
    }
    let arena = match (mixed, s.grad_format % 4) {
        (true, 2) => Arena::Bf16(values.iter().map(|&x| bf16::from_f32(x)).collect()),
        (true, 3) => Arena::F16(values.iter().map(|&x| f16::from_f32(x)).collect()),
        _ => Arena::F32(values),
    };
    let ranges = starts
        .iter()
        .zip(grad_lens)
        .map(|(&s, &l)| s..s + l)
        .collect();
    StepGrads { arena, ranges }
}

/// The step call the spec names: plain or mixed, scaled or not.
fn call_step(
    o: &mut Lamb,
    ps: &mut [Tensor],
    grads: &StepGrads,
    mixed: bool,
    scale: Option<f32>,
) -> Result<StepReport, Error> {
    if mixed {
        let g = grads.mixed();
        let mut p: Vec<ParamsIn<'_>> = ps.iter_mut().map(Tensor::params_in).collect();
        match scale {
            None => o.step_mixed(&mut p, &g),
            Some(x) => o.step_mixed_scaled(&mut p, &g, x),
        }
    } else {
        let g = grads.f32();
        let mut p: Vec<&mut [f32]> = ps
            .iter_mut()
            .map(|t| match t {
                Tensor::F32(x) => x.as_mut_slice(),
                _ => unreachable!("a plain step only with f32 parameters"),
            })
            .collect();
        match scale {
            None => o.step(&mut p, &g),
            Some(x) => o.step_scaled(&mut p, &g, x),
        }
    }
}

/// The parameter storage rule (`lamb_std::ParamStorage`) held by the step's result;
/// `mismatch` is the first layer passed in another storage than its applied steps fixed.
fn check_storage_rule(
    opt: &Lamb,
    model: &Model,
    params: &[Tensor],
    result: &Result<StepReport, Error>,
    mismatch: Option<usize>,
) {
    if let Some(i) = mismatch {
        assert!(
            result.is_err(),
            "layer {i} passed as {:?} but fixed as {:?}: {result:?}",
            params[i].storage(),
            model.fixed[i]
        );
    }
    match result {
        Err(Error::StorageChanged {
            index,
            name,
            fixed,
            found,
        }) => {
            assert!(fixed != found);
            assert_eq!(model.fixed.get(*index), Some(&Some(*fixed)), "{result:?}");
            assert_eq!(params[*index].storage(), *found, "{result:?}");
            assert_eq!(opt.layer(LayerId(*index)).unwrap().name, name.as_str());
        }
        // Only a checkpoint load leaves a master copy with the storage free.
        Err(e @ Error::MasterNeedsHalf { .. }) => panic!("no checkpoint was loaded: {e}"),
        _ => {}
    }
}

fn print_step_stats(opt: &Lamb, model: &Model, mixed: bool, result: &Result<StepReport, Error>) {
    eprintln!(
        "STATS step mixed={mixed} layers={} elements={} threads={} backend={:?} outcome={}",
        opt.layer_count(),
        model.params.iter().map(Tensor::len).sum::<usize>(),
        opt.threads(),
        opt.backend(),
        match result {
            Ok(r) if r.applied => "applied".to_string(),
            Ok(_) => "skipped".to_string(),
            Err(e) => format!("err:{e}"),
        }
    );
}

/// An applied step counts once and the model keeps its parameters; anything else leaves
/// the parameters and the optimizer exactly as `before`.
fn check_outcome(
    opt: &Lamb,
    model: &mut Model,
    params: Vec<Tensor>,
    result: &Result<StepReport, Error>,
    before: &State,
    before_params: &[Vec<u8>],
) {
    match result {
        Ok(r) if r.applied => {
            assert_eq!(
                opt.steps(),
                before.base.steps + 1,
                "an applied step must count once"
            );
            assert_eq!(r.step, opt.steps());
            assert!(r.skipped.is_none());
            model.fixed = params.iter().map(|t| Some(t.storage())).collect();
            model.params = params;
        }
        _ => {
            if let Ok(r) = result {
                assert_eq!(
                    r.step,
                    before.base.steps + 1,
                    "a skipped step reports the step it would have been"
                );
                assert!(r.skipped.is_some(), "a skipped step names the layer");
            }
            let after_params: Vec<Vec<u8>> = params.iter().map(Tensor::bits).collect();
            assert!(
                after_params == before_params,
                "params written by {result:?}"
            );
            let after = snapshot(opt);
            assert!(after == *before, "optimizer state changed by {result:?}");
        }
    }
}

/// Runs one step on both optimizers and checks it.
pub(crate) fn do_step(opt: &mut Lamb, shadow: &mut Lamb, model: &mut Model, s: &StepSpec) {
    let n = opt.layer_count();
    patch_params(model, s, n);
    let mut params: Vec<Tensor> = model.params.clone();
    let mut grad_lens: Vec<usize> = params.iter().map(Tensor::len).collect();
    let fault = s.fault.clone().unwrap_or(Fault::None);
    apply_fault(&fault, &mut params, &mut grad_lens, n);
    let mixed = s.mixed || !params.iter().all(Tensor::is_f32);
    let grads = make_grads(s, &fault, &grad_lens, mixed);

    let mut shadow_params = params.clone();
    let before_params: Vec<Vec<u8>> = params.iter().map(Tensor::bits).collect();
    let before = snapshot(opt);
    let scale = s.inv_loss_scale.map(LossScale::get);
    // The first layer passed in another storage than the one its applied steps fixed.
    let mismatch = params
        .iter()
        .zip(&model.fixed)
        .position(|(t, f)| f.is_some_and(|f| f != t.storage()));
    let result = call_step(opt, &mut params, &grads, mixed, scale);
    let shadow_result = call_step(shadow, &mut shadow_params, &grads, mixed, scale);
    check_no_panic(&result);
    check_storage_rule(opt, model, &params, &result, mismatch);
    assert_eq!(
        show(&result),
        show(&shadow_result),
        "step: optimizer vs scalar/1-thread shadow"
    );
    if stats() {
        print_step_stats(opt, model, mixed, &result);
    }
    let after_params: Vec<Vec<u8>> = params.iter().map(Tensor::bits).collect();
    let shadow_after: Vec<Vec<u8>> = shadow_params.iter().map(Tensor::bits).collect();
    assert!(
        after_params == shadow_after,
        "step: params differ from the scalar/1-thread shadow"
    );
    check_outcome(opt, model, params, &result, &before, &before_params);
}
