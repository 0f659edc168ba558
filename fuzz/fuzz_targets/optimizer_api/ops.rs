//! Every `Op` but `Step` (see `step.rs`): the call on the optimizer under test and on its
//! shadow, and the checks of its result; then the checks after every call (see the
//! target's module docs).

use super::*;

/// `add_layer` / `add_layer_to`; `None` when the model is full (the op is not run).
fn add_layer(
    opt: &mut Lamb,
    shadow: &mut Lamb,
    model: &mut Model,
    op: &Op,
    before: &State,
) -> Option<Result<(), Error>> {
    let (Op::AddLayer { name, len, format }
    | Op::AddLayerTo {
        name, len, format, ..
    }) = op
    else {
        unreachable!("add_layer runs the two AddLayer ops");
    };
    if opt.layer_count() >= MAX_LAYERS {
        return None;
    }
    let (name, len) = (name.get(), len.get());
    let (r, sr) = match op {
        Op::AddLayerTo { group, .. } => {
            // An existing group, or one past the last (UnknownGroup).
            let g = GroupId(*group as usize % (opt.group_count() + 1));
            (
                opt.add_layer_to(g, name.clone(), len),
                shadow.add_layer_to(g, name, len),
            )
        }
        _ => (
            opt.add_layer(name.clone(), len),
            shadow.add_layer(name, len),
        ),
    };
    assert_eq!(show(&r), show(&sr), "add_layer: optimizer vs shadow");
    assert!(
        r.is_err() || len <= MAX_LEN,
        "add_layer accepted {len} elements"
    );
    if stats() {
        eprintln!("STATS add_layer len={len} outcome={}", show(&r));
    }
    if (UNALLOCATABLE..UNALLOCATABLE + 256).contains(&len) {
        // Refused by the allocator (or earlier, for a bad group or name).
        assert!(
            matches!(
                &r,
                Err(Error::OutOfMemory { what: "moments", bytes, .. }) if *bytes >= len
            ) || matches!(&r, Err(Error::UnknownGroup(_) | Error::DuplicateName(_))),
            "add_layer({len}): {r:?}"
        );
    }
    if let Ok(id) = &r {
        assert_eq!(id.0, before.base.layers.len());
        let l = opt.layer(*id).unwrap();
        assert_eq!(l.len, len);
        assert!(
            state_bytes(&l.state)[1..].iter().all(|&x| x == 0),
            "new moments not zero"
        );
        assert!(l.master.is_none() && l.last.is_none());
        model.add(len, *format);
    }
    Some(r.map(|_| ()))
}

/// `add_param`; `None` when the model is full (the op is not run).
fn add_param(
    opt: &mut Lamb,
    shadow: &mut Lamb,
    model: &mut Model,
    (name, shape, huge, format): (&Name, &Few<u8, 3>, bool, Format),
) -> Option<Result<(), Error>> {
    if opt.layer_count() >= MAX_LAYERS {
        return None;
    }
    let shape: Vec<usize> = if huge {
        // At least 2^62 elements (2^64 bytes), or a product that overflows: never
        // allocatable. (Shapes between the memory there is and isize::MAX bytes
        // abort in the allocator, as a too-large Vec does: not fuzzed.)
        [0u8, 0]
            .iter()
            .chain(shape.iter())
            .map(|&d| 1usize << (31 + d % 33))
            .collect()
    } else {
        shape.iter().map(|&d| d as usize % 13).collect()
    };
    let name = name.get();
    let r = opt.add_param(name.clone(), &shape);
    let sr = shadow.add_param(name, &shape);
    assert_eq!(show(&r), show(&sr), "add_param: optimizer vs shadow");
    if let Ok(id) = &r {
        let len = opt.layer(*id).unwrap().len;
        assert!(
            len <= MAX_LEN,
            "add_param accepted shape {shape:?} as {len} elements"
        );
        assert_eq!(
            Some(len),
            shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
        );
        model.add(len, format);
    }
    Some(r.map(|_| ()))
}

fn add_group(
    opt: &mut Lamb,
    shadow: &mut Lamb,
    before: &State,
    (name, config, lr_scale): (&Name, &ConfigSpec, &F64),
) -> Result<(), Error> {
    let (name, c, s) = (name.get(), config.build(), lr_scale.get());
    let r = opt.add_group(name.clone(), c, s);
    assert_eq!(show(&r), show(&shadow.add_group(name, c, s)), "add_group");
    if let Ok(id) = &r {
        assert_eq!(id.0, before.base.groups.len());
        let g = opt.group(*id).expect("new group");
        assert_eq!(g.config.validate(), Ok(()));
        assert!(g.lr_scale.is_finite() && g.lr_scale >= 0.0);
    }
    r.map(|_| ())
}

fn set_group(
    opt: &mut Lamb,
    shadow: &mut Lamb,
    (group, config, lr_scale): (u8, &ConfigSpec, &F64),
) -> Result<(), Error> {
    let id = GroupId(group as usize % (opt.group_count() + 1));
    let (c, s) = (config.build(), lr_scale.get());
    let r = opt.set_group(id, c, s);
    assert_eq!(show(&r), show(&shadow.set_group(id, c, s)), "set_group");
    if r.is_ok() {
        let g = opt.group(id).expect("set group");
        assert_eq!(format!("{:?}", g.config), format!("{c:?}"));
        assert_eq!(g.lr_scale.to_bits(), s.to_bits());
    }
    r
}

fn set_precision(opt: &mut Lamb, shadow: &mut Lamb, op: &Op) -> Result<(), Error> {
    let Op::SetPrecision {
        group,
        moments,
        min_len,
        master,
        stochastic,
    } = op
    else {
        unreachable!("set_precision runs SetPrecision");
    };
    let id = GroupId(*group as usize % (opt.group_count() + 1));
    let precision = Precision {
        moments: [StateFormat::F32, StateFormat::Bf16, StateFormat::Q8][*moments as usize % 3],
        compact_min_len: match *min_len {
            MinLen::Zero => 0,
            MinLen::Blocks(k) => (k % 9) as usize * lamb_core::codec::QBLOCK,
            MinLen::Default => Precision::default().compact_min_len,
            MinLen::Any(n) => n as usize,
        },
        master: *master,
        rounding: match stochastic {
            None => Rounding::Nearest,
            Some(seed) => Rounding::Stochastic { seed: *seed },
        },
    };
    let r = opt.set_precision(id, precision);
    assert_eq!(
        show(&r),
        show(&shadow.set_precision(id, precision)),
        "set_precision"
    );
    if r.is_ok() {
        assert_eq!(opt.group(id).expect("group").precision, precision);
    }
    r
}

/// `set_threads` (on the optimizer under test only: the shadow keeps one thread).
fn set_threads(opt: &mut Lamb, t: Threads) -> Result<(), Error> {
    let max = Lamb::max_threads();
    let threads_before = opt.threads();
    let n = match t {
        Threads::Few(k) => 1 + k as usize % 3,
        Threads::Auto => 0,
        Threads::Over(k) => max + 1 + k as usize,
        Threads::Huge => usize::MAX,
    };
    let r = opt.set_threads(n);
    if n > max {
        assert_eq!(r, Err(Error::ThreadCount { requested: n, max }));
        assert_eq!(
            opt.threads(),
            threads_before,
            "a refused count changed the threads"
        );
    } else {
        assert!(r.is_ok(), "set_threads({n}): {r:?}");
        let expected = match n {
            0 => std::thread::available_parallelism().map_or(1, |c| c.get().min(max)),
            n => n,
        };
        assert_eq!(opt.threads(), expected);
    }
    r
}

fn reset(opt: &mut Lamb, shadow: &mut Lamb, model: &mut Model) -> Result<(), Error> {
    opt.reset();
    shadow.reset();
    model.fixed.iter_mut().for_each(|f| *f = None);
    let st = snapshot(opt);
    assert_eq!(st.base.steps, 0);
    for (l, storage) in st.base.layers.iter().zip(&st.storage) {
        assert!(
            l.state[1..].iter().all(|&b| b == 0)
                && l.master.is_none()
                && l.last.is_none()
                && storage.is_none(),
            "reset left state"
        );
    }
    Ok(())
}

/// Runs `op` on both optimizers (the checks of its own result included); `None` when the
/// op is not run.
fn run_op(
    opt: &mut Lamb,
    shadow: &mut Lamb,
    model: &mut Model,
    op: &Op,
    before: &State,
) -> Option<Result<(), Error>> {
    Some(match op {
        Op::AddLayer { .. } | Op::AddLayerTo { .. } => {
            return add_layer(opt, shadow, model, op, before);
        }
        Op::AddParam {
            name,
            shape,
            huge,
            format,
        } => return add_param(opt, shadow, model, (name, shape, *huge, *format)),
        Op::AddGroup {
            name,
            config,
            lr_scale,
        } => add_group(opt, shadow, before, (name, config, lr_scale)),
        Op::SetGroup {
            group,
            config,
            lr_scale,
        } => set_group(opt, shadow, (*group, config, lr_scale)),
        Op::SetPrecision { .. } => set_precision(opt, shadow, op),
        Op::SetMaxGradNorm(x) => {
            let x = x.map(F64::get);
            let r = opt.set_max_grad_norm(x);
            assert_eq!(
                show(&r),
                show(&shadow.set_max_grad_norm(x)),
                "set_max_grad_norm"
            );
            r
        }
        Op::SetSchedule(s) => {
            let s = s.build();
            let r = opt.set_schedule(s);
            assert_eq!(show(&r), show(&shadow.set_schedule(s)), "set_schedule");
            r
        }
        Op::SetThreads(t) => set_threads(opt, *t),
        Op::SetBackend(b) => {
            let b = Backend::ALL[*b as usize % Backend::ALL.len()];
            let r = opt.set_backend(b);
            assert_eq!(r.is_ok(), b.checked().is_some(), "set_backend({b}): {r:?}");
            r
        }
        Op::Step(s) => {
            do_step(opt, shadow, model, s);
            Ok(())
        }
        Op::Convert { layer, format } => {
            if let Some(t) = model
                .params
                .get_mut(*layer as usize % opt.layer_count().max(1))
            {
                *t = t.convert(*format);
            }
            Ok(())
        }
        Op::Reset => reset(opt, shadow, model),
    })
}

/// Runs `op` and checks what holds after every call.
pub(crate) fn apply_op(opt: &mut Lamb, shadow: &mut Lamb, model: &mut Model, op: &Op) {
    let before = snapshot(opt);
    // Every op runs the call on both optimizers and compares their results.
    let Some(result) = run_op(opt, shadow, model, op, &before) else {
        return;
    };
    check_no_panic(&result);
    if result.is_err() {
        assert!(
            snapshot(opt) == before,
            "{op:?} failed with {result:?} but changed the state"
        );
    }
    // The storage each layer reports is the harness's record.
    for (i, f) in model.fixed.iter().enumerate() {
        assert_eq!(
            opt.layer(LayerId(i)).unwrap().storage,
            *f,
            "layer {i}'s storage after {op:?}"
        );
    }
    // The optimizer and its shadow agree on every bit after every call.
    let (a, b) = (snapshot(opt), snapshot(shadow));
    assert!(
        a == b,
        "after {op:?}: optimizer and scalar/1-thread shadow disagree"
    );
}
