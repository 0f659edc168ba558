//! Every Var's storage, writable at once, through candle's public in-place op API.
//!
//! lamb-std steps the whole model in one call (norms of every layer first, then the
//! update, so that a non-finite value anywhere writes nothing), and so needs `&mut` slices
//! of all the parameters together. candle lends a Var's storage mutably only for the
//! duration of a callback: [`Tensor::inplace_op1`] write-locks the storage and calls
//! [`InplaceOp1::cpu_fwd`] with `&mut CpuStorage`. So the callbacks nest: the op for Var
//! `i` pushes Var `i`'s slice and, from inside its `cpu_fwd`, runs the op for Var `i + 1`;
//! the innermost call has every slice, each borrowed from a live write lock, and runs the
//! step. No `unsafe`: the borrow checker sees ordinary nested borrows. The slices travel
//! in a `Vec` passed down by value, whose element lifetime shortens at each level
//! (`ParamsIn<'a>` is covariant in `'a`).
//!
//! Each level costs a few stack frames (about 1 KiB in a release build, 5 KiB in a debug
//! build). So that a model with many Vars cannot overflow the caller's stack, the first
//! [`CALLER_LEVELS`] levels run on the caller's thread and the rest continue on helper
//! threads, [`HELPER_LEVELS`] levels each, with stacks of their own ([`Helpers`]): one
//! helper for BERT-base's 199 Vars or 1000 Vars, none for 64 Vars or fewer. The helpers
//! are one-thread rayon pools the optimizer keeps, so a step starts no thread and touches
//! no fresh stack page (`ThreadPool::install` runs a borrowing closure on the pool's thread
//! and waits for it, which is what a level needs).

use std::cell::Cell;

use candle_core::{CpuStorage, DType, InplaceOp1, Layout};
use lamb_std::ParamsIn;

use crate::Error;
use crate::slot::Slot;

/// Levels run on the caller's thread: at most about 320 KiB of its stack (debug build).
pub(crate) const CALLER_LEVELS: usize = 64;

/// Levels run on each helper thread: about 5 MiB of its [`HELPER_STACK`] in a debug build,
/// leaving room for the step itself on the last one.
pub(crate) const HELPER_LEVELS: usize = 1024;

/// The stack of a helper thread.
const HELPER_STACK: usize = 8 << 20;

/// The helper threads of one optimizer: enough for all its Vars (see the module docs).
pub(crate) struct Helpers(Vec<rayon::ThreadPool>);

impl Helpers {
    /// Helpers for `vars` Vars.
    pub(crate) fn for_vars(vars: usize) -> Result<Helpers, Error> {
        let count = vars.saturating_sub(CALLER_LEVELS).div_ceil(HELPER_LEVELS);
        let pools = (0..count)
            .map(|i| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .stack_size(HELPER_STACK)
                    .thread_name(move |_| format!("lamb-candle-nest-{i}"))
                    .build()
                    .map_err(|e| Error::Candle(format!("could not start a helper thread: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Helpers(pools))
    }
}

/// What the innermost level runs on all the slices.
pub(crate) type Last<'f> = dyn FnMut(&mut [ParamsIn<'_>]) + Send + 'f;

/// Write-locks the storage of every Var in `slots` whose `present` entry is `true` and
/// runs `last` on their slices (absent Vars get an empty slice of their dtype and are not
/// locked). Checks each Var's storage as it is locked; an `Err` comes before `last` runs.
pub(crate) fn with_params_mut(
    slots: &[Slot],
    present: &[bool],
    helpers: &Helpers,
    last: &mut Last<'_>,
) -> Result<(), Error> {
    let params = Vec::with_capacity(slots.len());
    nest(slots, present, params, last, CALLER_LEVELS, &helpers.0)
}

/// One level: adds the slices of `slots[0]` (and of the Vars without a gradient after it,
/// which take no level) to `params` and goes on with the rest.
fn nest<'p>(
    mut slots: &[Slot],
    mut present: &[bool],
    mut params: Vec<ParamsIn<'p>>,
    last: &mut Last<'_>,
    levels_left: usize,
    helpers: &[rayon::ThreadPool],
) -> Result<(), Error> {
    // Vars that are not stepped are not locked: a loop, not a level, so that a model with
    // many frozen Vars costs no stack.
    let slot = loop {
        let (Some((slot, rest)), Some((&here, present_rest))) =
            (slots.split_first(), present.split_first())
        else {
            last(&mut params);
            return Ok(());
        };
        if here {
            break slot;
        }
        params.push(empty(slot.dtype));
        (slots, present) = (rest, present_rest);
    };
    if levels_left == 0 {
        return hop(slots, present, params, last, helpers);
    }
    let op = Level {
        slot,
        state: Cell::new(Some((params, last))),
        rest: &slots[1..],
        present_rest: &present[1..],
        levels_left,
        helpers,
        result: Cell::new(None),
    };
    match slot.var.inplace_op1(&op) {
        Ok(()) => op.result.take().unwrap_or_else(|| Err(not_run(slot))),
        Err(e) => Err(candle_refused(e)),
    }
}

#[cold]
#[inline(never)]
fn candle_refused(e: candle_core::Error) -> Error {
    Error::Candle(e.to_string())
}

#[cold]
#[inline(never)]
fn not_run(slot: &Slot) -> Error {
    Error::Candle(format!(
        "the in-place op on Var '{}' did not run on the CPU",
        slot.name
    ))
}

/// Goes on with the next levels on the next helper thread; the slices move to it (they
/// are `Send`). Out of line, so that its frame is not part of every level's.
#[cold]
#[inline(never)]
fn hop(
    slots: &[Slot],
    present: &[bool],
    params: Vec<ParamsIn<'_>>,
    last: &mut Last<'_>,
    helpers: &[rayon::ThreadPool],
) -> Result<(), Error> {
    let Some((pool, rest)) = helpers.split_first() else {
        // `Helpers::for_vars` made enough for every Var.
        return Err(Error::Candle("more Vars than helper threads".into()));
    };
    pool.install(move || nest(slots, present, params, last, HELPER_LEVELS, rest))
}

/// The in-place op of one level: holds what the next level needs until candle calls it.
struct Level<'s, 'p, 'l, 'f> {
    slot: &'s Slot,
    state: Cell<Option<(Vec<ParamsIn<'p>>, &'l mut Last<'f>)>>,
    rest: &'s [Slot],
    present_rest: &'s [bool],
    levels_left: usize,
    helpers: &'s [rayon::ThreadPool],
    result: Cell<Option<Result<(), Error>>>,
}

impl InplaceOp1 for Level<'_, '_, '_, '_> {
    fn name(&self) -> &'static str {
        "lamb-candle-step"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        // candle calls this once; a second call finds no state and does nothing.
        if let Some((params, last)) = self.state.take() {
            let r = descend(self, params, last, storage, layout);
            self.result.set(Some(r));
        }
        Ok(())
    }
}

/// Takes this level's slice, with a lifetime `'c` that both the outer slices' and this
/// storage's borrows outlive, and runs the next level.
fn descend<'c>(
    level: &Level<'_, '_, '_, '_>,
    mut params: Vec<ParamsIn<'c>>,
    last: &mut Last<'_>,
    storage: &'c mut CpuStorage,
    layout: &Layout,
) -> Result<(), Error> {
    params.push(params_of(level.slot, storage, layout)?);
    nest(
        level.rest,
        level.present_rest,
        params,
        last,
        level.levels_left - 1,
        level.helpers,
    )
}

/// An empty slice of `dtype`, for a Var that is not stepped.
fn empty<'a>(dtype: DType) -> ParamsIn<'a> {
    match dtype {
        DType::BF16 => ParamsIn::Bf16(&mut []),
        DType::F16 => ParamsIn::F16(&mut []),
        _ => ParamsIn::F32(&mut []),
    }
}

/// The Var's elements in its (write-locked) storage, after checking that the storage
/// still holds what the Var had at construction: an in-place op can replace it.
fn params_of<'c>(
    slot: &Slot,
    storage: &'c mut CpuStorage,
    layout: &Layout,
) -> Result<ParamsIn<'c>, Error> {
    let Some((start, end)) = layout
        .contiguous_offsets()
        .filter(|&(s, e)| e - s == slot.len && layout.dims() == slot.shape.as_slice())
    else {
        return Err(layout_changed(slot, layout));
    };
    let (held, len) = (storage_dtype(storage), storage_len(storage));
    let p = match (storage, slot.dtype) {
        (CpuStorage::F32(v), DType::F32) => v.get_mut(start..end).map(ParamsIn::F32),
        (CpuStorage::BF16(v), DType::BF16) => v.get_mut(start..end).map(ParamsIn::Bf16),
        (CpuStorage::F16(v), DType::F16) => v.get_mut(start..end).map(ParamsIn::F16),
        _ => None,
    };
    p.ok_or_else(|| storage_changed(slot, held, len, start))
}

#[cold]
#[inline(never)]
fn layout_changed(slot: &Slot, layout: &Layout) -> Error {
    Error::var(
        &slot.name,
        format!(
            "its layout changed since the optimizer was built: shape {:?} (was {:?}), contiguous: {}",
            layout.dims(),
            slot.shape,
            layout.is_contiguous()
        ),
    )
}

#[cold]
#[inline(never)]
fn storage_changed(slot: &Slot, held: DType, len: usize, start: usize) -> Error {
    Error::var(
        &slot.name,
        format!(
            "its storage changed since the optimizer was built: it holds {len} {} elements, the Var needs {} {} from offset {start}",
            held.as_str(),
            slot.len,
            slot.dtype.as_str(),
        ),
    )
}

fn storage_dtype(s: &CpuStorage) -> DType {
    use candle_core::backend::BackendStorage;
    s.dtype()
}

fn storage_len(s: &CpuStorage) -> usize {
    match s {
        CpuStorage::U8(v)
        | CpuStorage::F6E2M3(v)
        | CpuStorage::F6E3M2(v)
        | CpuStorage::F4(v)
        | CpuStorage::F8E8M0(v) => v.len(),
        CpuStorage::U32(v) => v.len(),
        CpuStorage::I16(v) => v.len(),
        CpuStorage::I32(v) => v.len(),
        CpuStorage::I64(v) => v.len(),
        CpuStorage::BF16(v) => v.len(),
        CpuStorage::F16(v) => v.len(),
        CpuStorage::F32(v) => v.len(),
        CpuStorage::F64(v) => v.len(),
        CpuStorage::F8E4M3(v) => v.len(),
    }
}
