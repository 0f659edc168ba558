//! The pool runner: one step's pieces ([`Work`]), one list per planned thread, run on the
//! pool with panics caught; and [`recycle`], which keeps the lists' allocations from one
//! step to the next.

use std::mem::ManuallyDrop;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;

use lamb_core::layer::{CompactLayer, Grads};
use lamb_core::{BLOCK, Backend, LambError, LayerNorms, StepScalars};

/// One thread's share of one layer during a step.
pub(crate) struct Work<'a> {
    pub(crate) layer: usize,
    pub(crate) group: usize,
    /// The planned thread of the piece.
    pub(crate) thread: usize,
    /// The piece's buffers.
    pub(crate) data: CompactLayer<'a>,
    /// Index in the layer of the piece's element 0 (for stochastic rounding).
    pub(crate) index0: usize,
    /// The piece's phase-1 block sums and gradient block sums of squares.
    pub(crate) norms: &'a mut [LayerNorms],
    pub(crate) grad_sq: &'a mut [f64],
}

impl Work<'_> {
    /// Phase 1 of this piece (lamb-core serves all-f32 pieces with the f32 kernels).
    pub(crate) fn norms(&mut self, b: Backend, s: &StepScalars) -> Result<(), LambError> {
        b.norms_blocks_compact(s, &self.data, self.norms)
    }

    /// Phase 2 of this piece.
    pub(crate) fn apply(
        &mut self,
        b: Backend,
        s: &StepScalars,
        step_size: f32,
    ) -> Result<(), LambError> {
        b.apply_compact(s, step_size, &mut self.data, self.index0)
    }

    /// Σg² of each block of this piece.
    pub(crate) fn grad_sq(&mut self, b: Backend) -> Result<(), LambError> {
        let g = self.data.grads;
        for (k, slot) in self.grad_sq.iter_mut().enumerate() {
            let r = k * BLOCK..((k + 1) * BLOCK).min(g.len());
            *slot = match g {
                Grads::F32(x) => b.sum_squares(&x[r])?,
                Grads::Bf16(x) => b.sum_squares_grads(&Grads::Bf16(&x[r]))?,
                Grads::F16(x) => b.sum_squares_grads(&Grads::F16(&x[r]))?,
            };
        }
        Ok(())
    }
}

/// Why a phase failed.
pub(crate) enum RunError {
    /// A kernel refused layer `.1`.
    Kernel(LambError, usize),
    /// A worker panicked.
    Panic(String),
}

/// One list of pieces per planned thread, borrowing a flat piece list in plan order.
pub(crate) type Lists<'w, 'a> = Vec<Mutex<&'w mut [Work<'a>]>>;

/// Runs `f` over every list of pieces (`reverse`: last piece first), one list per pool
/// thread, pinned by thread index so phase 2 finds phase 1's data in that core's cache.
/// Panics are caught and returned. Every list is run, whatever the pool's size: should
/// there be more lists than pool threads, pool thread `k` also runs lists `k + n`,
/// `k + 2n`, ... (`n` threads), in that order.
pub(crate) fn run<F>(
    pool: Option<&rayon::ThreadPool>,
    lists: &Lists<'_, '_>,
    reverse: bool,
    f: F,
) -> Result<(), RunError>
where
    F: Fn(&mut Work<'_>) -> Result<(), LambError> + Sync,
{
    let one = |cell: &Mutex<&mut [Work<'_>]>| -> Result<(), RunError> {
        let Ok(mut list) = cell.lock() else {
            return Err(RunError::Panic("work list poisoned".into()));
        };
        let r = catch_unwind(AssertUnwindSafe(|| {
            let mut go = |w: &mut Work<'_>| f(w).map_err(|e| RunError::Kernel(e, w.layer));
            if reverse {
                list.iter_mut().rev().try_for_each(&mut go)
            } else {
                list.iter_mut().try_for_each(&mut go)
            }
        }));
        r.unwrap_or_else(|p| Err(RunError::Panic(panic_message(&*p))))
    };
    match pool {
        None => lists.iter().try_for_each(one),
        Some(pool) => {
            let results = pool.broadcast(|ctx| {
                let stride = ctx.num_threads().max(1);
                lists
                    .iter()
                    .skip(ctx.index())
                    .step_by(stride)
                    .try_for_each(one)
            });
            results.into_iter().collect()
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".into())
}

/// `v`'s allocation, emptied, as a vector of `U`: a step's piece lists borrow the step's
/// buffers (`Work<'a>`), so they cannot be kept in the optimizer as they are; their
/// allocations can (as `Vec<Work<'static>>`, never holding a value), and a step that
/// reuses them allocates nothing. `T` and `U` are the same type up to lifetimes; should
/// their layouts ever differ, the allocation is dropped and an empty vector returned.
pub(crate) fn recycle<T, U>(mut v: Vec<T>) -> Vec<U> {
    v.clear();
    if size_of::<T>() != size_of::<U>() || align_of::<T>() != align_of::<U>() || v.capacity() == 0 {
        return Vec::new();
    }
    let mut v = ManuallyDrop::new(v);
    // SAFETY: the pointer comes from a `Vec<T>` allocation of `capacity` elements; `U` has
    // the size and alignment of `T`, so the allocation's layout is that of `capacity` `U`s
    // (what `from_raw_parts` requires); the length is 0, so no value of `T` is ever read as
    // a `U`; `ManuallyDrop` keeps the old vector from freeing the allocation.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<U>(), 0, v.capacity()) }
}
