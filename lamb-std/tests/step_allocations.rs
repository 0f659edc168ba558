//! A step of f32 parameters allocates nothing once the optimizer has taken one step: the
//! buffers a step needs are kept in the optimizer and reused (`optimizer/scratch.rs`).
//!
//! A counting global allocator counts the allocations made on the current thread while a
//! flag is up. With a thread pool, the count on the calling thread includes what rayon's
//! `broadcast` allocates to hand the job to the pool (its per-thread job records and
//! result vector); the test reports that count, and asserts that it does not grow with
//! the model's size (it is per step and per thread, not per layer or per element).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use lamb_std::Lamb;
use lamb_std::lamb_core::LambConfig;

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; the thread-locals it
// touches are const-initialised `Cell`s, which allocate nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn note() {
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        }
    });
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations on this thread during `f`.
fn allocations(f: impl FnOnce()) -> usize {
    COUNT.with(|c| c.set(0));
    COUNTING.with(|on| on.set(true));
    f();
    COUNTING.with(|on| on.set(false));
    COUNT.with(|c| c.get())
}

/// A model of `layers` layers (some cut among threads), its optimizer with clipping on, and
/// the allocations of the second step.
fn second_step_allocations(layers: usize, threads: usize) -> usize {
    let mut opt = Lamb::with_decay_split(LambConfig::nvlamb()).unwrap();
    opt.set_threads(threads).unwrap();
    opt.set_max_grad_norm(Some(1.0)).unwrap();
    let mut params = Vec::new();
    let mut grads = Vec::new();
    for i in 0..layers {
        let n = 3000 + 517 * i;
        // Weights and biases: both groups have layers.
        let shape: &[usize] = if i % 2 == 0 { &[1, n] } else { &[n] };
        opt.add_param(format!("l{i}"), shape).unwrap();
        params.push(vec![0.1f32; n]);
        grads.push(vec![0.01f32; n]);
    }
    let mut p: Vec<&mut [f32]> = params.iter_mut().map(|x| x.as_mut_slice()).collect();
    let g: Vec<&[f32]> = grads.iter().map(|x| x.as_slice()).collect();
    assert!(opt.step(&mut p, &g).unwrap().applied); // warm-up: plan and buffers made
    let mut report = None;
    let n = allocations(|| report = Some(opt.step(&mut p, &g)));
    assert!(report.unwrap().unwrap().applied);
    n
}

#[test]
fn a_plain_f32_step_allocates_nothing_on_one_thread() {
    assert_eq!(second_step_allocations(5, 1), 0);
    assert_eq!(second_step_allocations(40, 1), 0);
}

#[test]
fn with_a_pool_only_the_pool_hand_off_allocates() {
    let small = second_step_allocations(5, 3);
    let large = second_step_allocations(40, 3);
    eprintln!(
        "allocations on the calling thread, 3 threads: {small} (5 layers), {large} (40 layers)"
    );
    assert_eq!(small, large, "a step's allocations grew with the model");
}

/// A bound step (each tensor with its layer's id) allocates nothing either: the keys are
/// compared, not looked up.
#[test]
fn a_bound_f32_step_allocates_nothing_on_one_thread() {
    let mut opt = Lamb::new(LambConfig::nvlamb()).unwrap();
    let (mut params, mut grads, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..10 {
        let n = 3000 + 517 * i;
        ids.push(opt.add_layer(format!("l{i}"), n).unwrap());
        params.push(vec![0.1f32; n]);
        grads.push(vec![0.01f32; n]);
    }
    let mut p: Vec<_> = ids
        .iter()
        .copied()
        .zip(params.iter_mut().map(|x| x.as_mut_slice()))
        .collect();
    let g: Vec<_> = ids
        .iter()
        .copied()
        .zip(grads.iter().map(|x| x.as_slice()))
        .collect();
    assert!(opt.step_bound(&mut p, &g).unwrap().applied);
    let mut report = None;
    let n = allocations(|| report = Some(opt.step_bound(&mut p, &g)));
    assert!(report.unwrap().unwrap().applied);
    assert_eq!(n, 0);
}
