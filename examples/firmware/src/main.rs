//! A bare-metal image that trains a tiny model with lamb-core.
//!
//! Everything lives in static arrays (no allocator, no std): the parameters, gradients and
//! both moments of a 16-32-4 perceptron. `_start` runs a few LAMB steps on the toy loss
//! `½‖p − t‖²` and leaves its verdict in [`LAMB_STATUS`] for a debugger to read.
//!
//! It exists to prove that the core links (every symbol it needs resolves without std,
//! alloc or a libc) and to measure its footprint; it is not a board support package:
//! nothing here sets up a stack or zeroes `.bss`, which a board's runtime does before
//! jumping to `_start`.
#![no_std]
#![no_main]

use core::cell::UnsafeCell;
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicU32, Ordering};

use lamb_core::{LambConfig, Step};

/// Layer sizes: weights 16×32, bias 32, weights 32×4, bias 4.
const LAYERS: [usize; 4] = [16 * 32, 32, 32 * 4, 4];
/// Total number of parameters.
const N: usize = LAYERS[0] + LAYERS[1] + LAYERS[2] + LAYERS[3];
/// LAMB steps to run.
const STEPS: u64 = 5;

/// A model and its optimizer state. All zero, so the whole thing lands in `.bss`.
struct Model {
    param: [f32; N],
    grad: [f32; N],
    exp_avg: [f32; N],
    exp_avg_sq: [f32; N],
}

/// Static storage that `_start`, and only it, borrows mutably.
struct Singleton<T>(UnsafeCell<T>);

// SAFETY: the one access is the `&mut` that `_start` takes once, on one core, with no
// interrupt handler or other thread that could touch it.
unsafe impl<T> Sync for Singleton<T> {}

static MODEL: Singleton<Model> = Singleton(UnsafeCell::new(Model {
    param: [0.0; N],
    grad: [0.0; N],
    exp_avg: [0.0; N],
    exp_avg_sq: [0.0; N],
}));

/// 0 while running; [`STATUS_OK`] when the loss went down; [`STATUS_NO_PROGRESS`] when it
/// did not; [`STATUS_ERROR`] when lamb-core refused a step.
#[unsafe(no_mangle)]
pub static LAMB_STATUS: AtomicU32 = AtomicU32::new(0);
const STATUS_OK: u32 = 1;
const STATUS_NO_PROGRESS: u32 = 2;
const STATUS_ERROR: u32 = 3;

/// The entry point.
#[unsafe(no_mangle)]
pub extern "C" fn _start() -> ! {
    // SAFETY: `_start` runs once and is the only code that touches `MODEL` (see
    // `Singleton`), so this is the only reference to it for the rest of the program.
    let model = unsafe { &mut *MODEL.0.get() };
    init(model);
    let before = loss(model);
    let status = match train(model) {
        Ok(()) if loss(model) < before => STATUS_OK,
        Ok(()) => STATUS_NO_PROGRESS,
        Err(_) => STATUS_ERROR,
    };
    // An exported atomic: the store, and with it the work that produced the value, stays.
    LAMB_STATUS.store(status, Ordering::Release);
    loop {
        core::hint::spin_loop();
    }
}

/// Small deterministic weights; zero biases (the zero-norm rule lets them move).
fn init(model: &mut Model) {
    let (weights1, rest) = model.param.split_at_mut(LAYERS[0]);
    let (_bias1, rest) = rest.split_at_mut(LAYERS[1]);
    let (weights2, _bias2) = rest.split_at_mut(LAYERS[2]);
    for w in [weights1, weights2] {
        for (i, x) in w.iter_mut().enumerate() {
            *x = ((i * 37 % 17) as f32 - 8.0) * 0.02;
        }
    }
}

/// The target of the toy loss.
fn target(i: usize) -> f32 {
    ((i * 11 % 7) as f32 - 3.0) * 0.05
}

/// `½‖p − t‖²`.
fn loss(model: &Model) -> f32 {
    let mut sum = 0.0;
    for (i, &p) in model.param.iter().enumerate() {
        let d = p - target(i);
        sum += d * d;
    }
    0.5 * sum
}

/// lamb-core refused a step. The image has nowhere to report which `LambError` it was,
/// and dropping it at once keeps the error's bytes from being moved around (`memcpy`).
struct Refused;

/// [`STEPS`] LAMB steps of every layer with the paper's hyperparameters. Each step's
/// scalars are prepared once ([`Step`]) and serve all its layers.
fn train(model: &mut Model) -> Result<(), Refused> {
    let config = LambConfig::paper();
    for t in 1..=STEPS {
        let step = Step::new(&config, t).map_err(|_| Refused)?;
        for (i, g) in model.grad.iter_mut().enumerate() {
            *g = model.param[i] - target(i);
        }
        let mut param = &mut model.param[..];
        let mut grad = &model.grad[..];
        let mut exp_avg = &mut model.exp_avg[..];
        let mut exp_avg_sq = &mut model.exp_avg_sq[..];
        for len in LAYERS {
            let (p, p_rest) = core::mem::take(&mut param).split_at_mut(len);
            let (g, g_rest) = grad.split_at(len);
            let (m, m_rest) = core::mem::take(&mut exp_avg).split_at_mut(len);
            let (v, v_rest) = core::mem::take(&mut exp_avg_sq).split_at_mut(len);
            (param, grad, exp_avg, exp_avg_sq) = (p_rest, g_rest, m_rest, v_rest);
            step.layer(p, g, m, v).map_err(|_| Refused)?;
        }
    }
    Ok(())
}

#[panic_handler]
fn panic(_: &PanicInfo) -> ! {
    loop {
        core::hint::spin_loop();
    }
}
