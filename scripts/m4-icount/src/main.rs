//! Instruction counts of one layer step of lamb-core on a Cortex-M4F (QEMU `mps2-an386`).
//!
//! Run by `scripts/m4-icount.sh` under `qemu-system-arm -icount shift=0`, where one
//! instruction takes 1 ns of virtual time and the SysTick (the 25 MHz core clock of the MPS2
//! board) ticks once per 40 instructions: ticks × 40 = instructions, exactly and the same on
//! every run. Each case prints one `RESULT` line; the script turns them into instructions per
//! element (from two sizes) and the fixed cost per call (from an empty layer).
#![no_std]
#![no_main]

use core::hint::black_box;

use cortex_m::peripheral::{SYST, syst::SystClkSource};
use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln};
use lamb_core::layer::F32Layer;
use lamb_core::{Backend, LambConfig, LayerReport, Step};

/// The largest layer measured.
const NMAX: usize = 4096;

/// The layer's buffers: a model's state lives in static memory on a microcontroller too.
struct Buffers {
    p: [f32; NMAX],
    g: [f32; NMAX],
    m: [f32; NMAX],
    v: [f32; NMAX],
}

static mut BUFFERS: Buffers = Buffers {
    p: [0.0; NMAX],
    g: [0.0; NMAX],
    m: [0.0; NMAX],
    v: [0.0; NMAX],
};

/// Deterministic values in [-1, 1).
struct Lcg(u32);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        ((self.0 >> 8) as f32) * (2.0 / 16_777_216.0) - 1.0
    }
}

/// How a case steps the layer.
#[derive(Clone, Copy)]
enum Call {
    /// `Step::new(config, t)` once (outside the count), then `step.layer(…)`: the default
    /// backend with the step's scalars prepared once, as firmware stepping several layers
    /// does.
    Prepared,
    /// `lamb_core::step_layer(config, t, …)`: the default backend, the step's scalars built
    /// in every call.
    StepLayer,
    /// `Backend::Scalar.step_layer_with(&step, …)`, scalars prepared once.
    Scalar,
}

impl Call {
    fn name(self) -> &'static str {
        match self {
            Call::Prepared => "prepared",
            Call::StepLayer => "step_layer",
            Call::Scalar => "scalar",
        }
    }

    /// Steps the first `n` elements with `step` (step `t` of `cfg`).
    fn step(self, cfg: &LambConfig, t: u64, step: &Step, b: &mut Buffers, n: usize) -> LayerReport {
        let (p, g, m, v) = (&mut b.p[..n], &b.g[..n], &mut b.m[..n], &mut b.v[..n]);
        let r = match self {
            Call::Prepared => step.layer(p, g, m, v),
            Call::StepLayer => lamb_core::step_layer(cfg, t, p, g, m, v),
            Call::Scalar => {
                let mut layer = F32Layer {
                    param: p,
                    grad: g,
                    m,
                    v,
                };
                Backend::Scalar.step_layer_with(step, &mut layer)
            }
        };
        match black_box(r) {
            Ok(r) if !r.skipped => r,
            _ => fail("a step was refused"),
        }
    }
}

/// Marks the start of a measured call in an execution trace (`scripts/m4-icount/cycles.py`);
/// called outside the counted span.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn m4_mark_begin() {
    // Different bodies, so that the linker cannot fold the two markers into one.
    black_box(1u32);
}

/// Marks the end of a measured call in an execution trace.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn m4_mark_end() {
    black_box(2u32);
}

/// SysTick ticks between two readings (it counts down, 24 bits).
fn ticks(t0: u32, t1: u32) -> u32 {
    t0.wrapping_sub(t1) & 0x00FF_FFFF
}

fn fail(why: &str) -> ! {
    hprintln!("FAILED: {}", why);
    debug::exit(debug::EXIT_FAILURE);
    loop {
        core::hint::spin_loop();
    }
}

#[entry]
fn main() -> ! {
    let Some(mut cp) = cortex_m::Peripherals::take() else {
        fail("no peripherals");
    };
    cp.SYST.set_clock_source(SystClkSource::Core);
    cp.SYST.set_reload(0x00FF_FFFF);
    cp.SYST.clear_current();
    cp.SYST.enable_counter();
    // SAFETY: `main` runs once, on one core, with no interrupt handler: this is the only
    // reference to `BUFFERS` for the rest of the program.
    let b = unsafe { &mut *core::ptr::addr_of_mut!(BUFFERS) };
    let cfg = LambConfig::paper();
    hprintln!("default backend {}", Backend::detect().name());
    for call in [Call::Prepared, Call::StepLayer, Call::Scalar] {
        for n in [0, 16, 1024, NMAX] {
            let mut rng = Lcg(12345);
            for i in 0..n {
                b.p[i] = 0.1 * rng.next();
                b.g[i] = 0.01 * rng.next();
                b.m[i] = 0.0;
                b.v[i] = 0.0;
            }
            // Two steps first, so that m and v hold ordinary non-zero values.
            for t in 1..=2 {
                let Ok(step) = Step::new(&cfg, t) else {
                    fail("Step::new");
                };
                call.step(&cfg, t, &step, b, n);
                for g in &mut b.g[..n] {
                    *g = 0.01 * rng.next();
                }
            }
            let Ok(step) = Step::new(&cfg, 3) else {
                fail("Step::new");
            };
            let step = black_box(step);
            m4_mark_begin();
            let t0 = SYST::get_current();
            let r = call.step(&cfg, black_box(3), &step, b, n);
            let t1 = SYST::get_current();
            m4_mark_end();
            let checksum = b.p[..n].iter().fold(0.0f32, |s, &x| s + x);
            hprintln!(
                "RESULT call={} n={} ticks={} checksum={:e} pnorm={:e} unorm={:e}",
                call.name(),
                n,
                ticks(t0, t1),
                checksum,
                r.param_norm,
                r.update_norm
            );
        }
    }
    debug::exit(debug::EXIT_SUCCESS);
    loop {
        core::hint::spin_loop();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    hprintln!("panic: {}", info);
    debug::exit(debug::EXIT_FAILURE);
    loop {
        core::hint::spin_loop();
    }
}
