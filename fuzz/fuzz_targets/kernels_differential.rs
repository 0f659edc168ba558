//! Every backend this CPU supports gives the same bits as `Backend::Scalar` for one layer's
//! step: every buffer the step may write, the report, the `Result` (variant and error), and
//! the sums of squares; no backend writes outside its slices; and on `Err` or a skipped step
//! nothing is written.
//!
//! Two storage modes:
//! - `F32`: `Backend::step_layer` on f32 p, g, m, v (also checked against the scalar
//!   `step_layer_compact` with all-f32 storage, which must be the same step);
//! - `Mixed`: `Backend::step_layer_compact` with parameters in f32, bf16 (rounded to nearest
//!   or stochastically), or an f32 master copy with a bf16/f16 model copy; gradients in
//!   f32/bf16/f16; moments in f32, bf16 (rounded to nearest or stochastically) or 8-bit
//!   codes with per-block absmax.
//!
//! Input: a length in 0..=4096, a start offset 0..=3 (in elements) after a 64-byte-aligned
//! point inside a larger buffer, a configuration (skipped unless `validate()` accepts it),
//! a step (1..=u64::MAX, and 0, which must be refused alike), a gradient scale, a fill for
//! each buffer, and single elements patched to arbitrary values (NaN payloads, ±0,
//! subnormals, ±inf, huge).
#![no_main]

use arbitrary::Arbitrary;
use lamb_core::codec::QBLOCK;
use lamb_core::half::{bf16, f16};
use lamb_core::layer::{CompactLayer, F32Layer, Grads, HalfMut, Moments, Params, Rounding};
use lamb_core::{Backend, LambConfig, LambError, LayerReport};
use lamb_fuzz::{ConfigSpec, F32, Few, Fill, Rng, StepNo, canon};
use libfuzzer_sys::fuzz_target;

#[path = "kernels_differential/mixed.rs"]
mod mixed;
use mixed::run_mixed;

/// Elements of guard before the 64-byte-aligned base (plus the offset) and after the slice:
/// more than one AVX-512 vector times the unrolling, so that a stray full-width store or a
/// wrong tail mask lands on a canary.
const GUARD: usize = 80;

/// An element type of a buffer: a canary value and its bits.
trait Elem: Copy + std::fmt::Debug {
    /// A value no kernel writes by chance (a signalling NaN with a payload for floats, so
    /// that a canary read into a sum also shows, as NaN, in the norms).
    const CANARY: Self;
    /// Exact bits.
    fn raw(self) -> u32;
    /// Bits with every NaN mapped to one pattern ("both NaN" compares equal).
    fn key(self) -> u32;
    fn from_f32(x: f32) -> Self;
}

impl Elem for f32 {
    const CANARY: f32 = f32::from_bits(0x7fa5_5a5a);
    fn raw(self) -> u32 {
        self.to_bits()
    }
    fn key(self) -> u32 {
        canon(self)
    }
    fn from_f32(x: f32) -> f32 {
        x
    }
}

impl Elem for bf16 {
    const CANARY: bf16 = bf16::from_bits(0x7fa5);
    fn raw(self) -> u32 {
        self.to_bits() as u32
    }
    fn key(self) -> u32 {
        if self.is_nan() {
            0x7fc0
        } else {
            self.to_bits() as u32
        }
    }
    fn from_f32(x: f32) -> bf16 {
        bf16::from_f32(x)
    }
}

impl Elem for f16 {
    const CANARY: f16 = f16::from_bits(0x7d5a);
    fn raw(self) -> u32 {
        self.to_bits() as u32
    }
    fn key(self) -> u32 {
        if self.is_nan() {
            0x7e00
        } else {
            self.to_bits() as u32
        }
    }
    fn from_f32(x: f32) -> f16 {
        f16::from_f32(x)
    }
}

impl Elem for u8 {
    const CANARY: u8 = 0xa5;
    fn raw(self) -> u32 {
        self as u32
    }
    fn key(self) -> u32 {
        self as u32
    }
    fn from_f32(x: f32) -> u8 {
        x.to_bits() as u8
    }
}

/// A buffer with canaries around the slice `[start, start + len)`.
#[derive(Clone)]
struct Guarded<T> {
    buf: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Elem> Guarded<T> {
    /// `len` elements from `fill`, starting `offset` elements after a 64-byte boundary.
    fn new(len: usize, offset: usize, fill: &Fill) -> Guarded<T> {
        let size = std::mem::size_of::<T>();
        let mut buf = vec![T::CANARY; GUARD + 64 + len + GUARD];
        let addr = buf.as_ptr() as usize;
        let mut base = GUARD;
        while !(addr + base * size).is_multiple_of(64) {
            base += 1;
        }
        let start = base + offset;
        let mut vals = vec![0f32; len];
        fill.fill(&mut vals);
        for (o, v) in buf[start..start + len].iter_mut().zip(vals) {
            *o = T::from_f32(v);
        }
        Guarded { buf, start, len }
    }
    fn slice(&self) -> &[T] {
        &self.buf[self.start..self.start + self.len]
    }
    fn slice_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.start..self.start + self.len]
    }
    fn set(&mut self, index: usize, x: F32) {
        if self.len > 0 {
            let i = self.start + index % self.len;
            self.buf[i] = T::from_f32(x.get());
        }
    }
    /// Panics if any element outside the slice is not the canary.
    fn check_canaries(&self, what: &str, backend: Backend) {
        let end = self.start + self.len;
        for (i, x) in self.buf.iter().enumerate() {
            if (i < self.start || i >= end) && x.raw() != T::CANARY.raw() {
                panic!(
                    "{backend}: {what} written outside its slice at buffer index {i} (slice {}..{end}): {x:?}",
                    self.start
                );
            }
        }
    }
    fn raw(&self) -> Vec<u32> {
        self.slice().iter().map(|x| x.raw()).collect()
    }
    fn keys(&self) -> Vec<u32> {
        self.slice().iter().map(|x| x.key()).collect()
    }
}

/// A visitor of a layer's buffers: `(name, exact bits, canonical bits, canary check)`.
type Visit<'a> = dyn FnMut(&str, Vec<u32>, Vec<u32>, &dyn Fn(Backend)) + 'a;

#[derive(Arbitrary, Debug)]
enum GradScale {
    One,
    Value(F32),
}

/// Storage of a layer.
#[derive(Arbitrary, Debug)]
enum Storage {
    /// `Backend::step_layer` on f32 slices.
    F32,
    /// `Backend::step_layer_compact`.
    Mixed {
        /// f32, bf16 nearest, bf16 stochastic, master + bf16, master + f16.
        params: u8,
        /// f32, bf16, f16.
        grads: u8,
        /// f32, bf16, 8-bit.
        moments: u8,
        /// Stochastic rounding seed.
        seed: u64,
    },
}

#[derive(Arbitrary, Debug)]
struct Patch {
    /// Which buffer (folded into the ones the storage has).
    buffer: u8,
    index: u16,
    value: F32,
}

#[derive(Arbitrary, Debug)]
struct Input {
    len: u16,
    offset: u8,
    config: ConfigSpec,
    step: StepNo,
    grad_scale: GradScale,
    storage: Storage,
    /// Fills of p (or master), g, m, v, and the model copy / absmax scales.
    fills: [Fill; 6],
    patches: Few<Patch, 16>,
}

/// `LAMB_FUZZ_STATS=1`: print one line per input (run the binary on corpus files to see
/// what a corpus exercises: lengths, offsets, storages, outcomes).
fn stats() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("LAMB_FUZZ_STATS").is_some())
}

fn report_bits(r: &LayerReport) -> [u32; 5] {
    [
        canon(r.param_norm),
        canon(r.update_norm),
        canon(r.trust_ratio),
        canon(r.step_size),
        r.skipped as u32,
    ]
}

/// The result of one step in comparable form: the report's bits or the error's Debug text
/// (the error carries f64 values; Debug prints every NaN as `NaN`).
type Outcome = Result<[u32; 5], String>;

fn outcome(r: &Result<LayerReport, LambError>) -> Outcome {
    match r {
        Ok(rep) => Ok(report_bits(rep)),
        Err(e) => Err(format!("{e:?}")),
    }
}

fn untouched(r: &Result<LayerReport, LambError>) -> bool {
    match r {
        Err(_) => true,
        Ok(r) => r.skipped,
    }
}

fn describe(r: &Result<LayerReport, LambError>) -> String {
    match r {
        Ok(r) if r.skipped => "skipped".into(),
        Ok(_) => "applied".into(),
        Err(e) => format!("err:{e}"),
    }
}

/// Compares one backend's buffers (name, keys) and outcome with the scalar reference.
struct Reference {
    outcome: Outcome,
    buffers: Vec<(String, Vec<u32>)>,
    sums: Vec<u64>,
}

fn compare(backend: Backend, len: usize, got: &Reference, want: &Reference) {
    assert_eq!(
        got.outcome, want.outcome,
        "{backend} vs scalar: result differs"
    );
    for ((name, a), (_, b)) in got.buffers.iter().zip(&want.buffers) {
        if a != b {
            let i = a.iter().zip(b).position(|(x, y)| x != y);
            panic!(
                "{backend} vs scalar: {name} differs at element {i:?} of {len}: {:#x?} vs {:#x?}",
                i.map(|i| a[i]),
                i.map(|i| b[i]),
            );
        }
    }
    assert_eq!(
        got.sums, want.sums,
        "{backend} vs scalar: sums of squares differ"
    );
}

/// Steps every available backend with `step`, the scalar reference first, and compares each
/// other backend with it; `on_reference` sees the reference's run (statistics, checks of
/// its own).
fn against_scalar(
    len: usize,
    mut step: impl FnMut(Backend) -> (Result<LayerReport, LambError>, Reference),
    mut on_reference: impl FnMut(&Result<LayerReport, LambError>, &Reference),
) {
    let mut reference: Option<Reference> = None;
    for backend in Backend::available() {
        let (result, got) = step(backend);
        if backend == Backend::Scalar {
            on_reference(&result, &got);
            reference = Some(got);
        } else {
            let want = reference.as_ref().expect("scalar runs first");
            compare(backend, len, &got, want);
        }
    }
}

fn nan_free(x: f64) -> u64 {
    if x.is_nan() { u64::MAX } else { x.to_bits() }
}

/// One step's inputs: the fuzz input, its configuration, and the layer's length, offset
/// from the buffers' alignment, step number and gradient scale.
struct Case<'a> {
    input: &'a Input,
    config: &'a LambConfig,
    len: usize,
    offset: usize,
    step: u64,
    gs: f32,
}

/// p, g, m, v of an f32 layer, filled and patched as the input says.
fn f32_buffers(c: &Case<'_>) -> [Guarded<f32>; 4] {
    let [fp, fg, fm, fv, _, _] = &c.input.fills;
    let mut bufs = [fp, fg, fm, fv].map(|f| Guarded::<f32>::new(c.len, c.offset, f));
    for patch in c.input.patches.iter() {
        bufs[patch.buffer as usize % 4].set(patch.index as usize, patch.value);
    }
    bufs
}

/// One backend's f32 step on copies of p, m, v: canaries checked, nothing written when the
/// step is refused or skipped.
fn step_f32(
    c: &Case<'_>,
    backend: Backend,
    [p0, g, m0, v0]: &[Guarded<f32>; 4],
) -> (Result<LayerReport, LambError>, Reference) {
    let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
    let result = backend.step_layer(
        c.config,
        c.step,
        c.gs,
        &mut F32Layer {
            param: p.slice_mut(),
            grad: g.slice(),
            m: m.slice_mut(),
            v: v.slice_mut(),
        },
    );
    p.check_canaries("param", backend);
    m.check_canaries("m", backend);
    v.check_canaries("v", backend);
    g.check_canaries("grad", backend);
    if untouched(&result) {
        assert_eq!(p.raw(), p0.raw(), "{backend}: params written on {result:?}");
        assert_eq!(m.raw(), m0.raw(), "{backend}: m written on {result:?}");
        assert_eq!(v.raw(), v0.raw(), "{backend}: v written on {result:?}");
    }
    let sums = [p0.slice(), g.slice()]
        .map(|x| nan_free(backend.sum_squares(x).expect("available backend")))
        .to_vec();
    let got = Reference {
        outcome: outcome(&result),
        buffers: vec![
            ("param".into(), p.keys()),
            ("m".into(), m.keys()),
            ("v".into(), v.keys()),
        ],
        sums,
    };
    (result, got)
}

/// The compact-storage entry point with all-f32 storage, on the scalar backend: the same
/// step as the f32 entry point (`param_sum`: the f32 path's sum of squares of p).
fn step_f32_as_compact(
    c: &Case<'_>,
    [p0, g, m0, v0]: &[Guarded<f32>; 4],
    param_sum: u64,
) -> Reference {
    let backend = Backend::Scalar;
    let (mut p2, mut m2, mut v2) = (p0.clone(), m0.clone(), v0.clone());
    let mut layer = CompactLayer {
        params: Params::F32(p2.slice_mut()),
        grads: Grads::F32(g.slice()),
        moments: Moments::F32 {
            m: m2.slice_mut(),
            v: v2.slice_mut(),
        },
    };
    let mixed = backend.step_layer_compact(c.config, c.step, c.gs, &mut layer);
    let sum_mixed = nan_free(
        backend
            .sum_squares_grads(&Grads::F32(g.slice()))
            .expect("scalar"),
    );
    Reference {
        outcome: outcome(&mixed),
        buffers: vec![
            ("param".into(), p2.keys()),
            ("m".into(), m2.keys()),
            ("v".into(), v2.keys()),
        ],
        sums: vec![param_sum, sum_mixed],
    }
}

fn run_f32(c: &Case<'_>) {
    let bufs = f32_buffers(c);
    against_scalar(
        c.len,
        |backend| step_f32(c, backend, &bufs),
        |result, got| {
            if stats() {
                eprintln!(
                    "STATS f32 len={} offset={} step={} outcome={}",
                    c.len,
                    c.offset,
                    c.step,
                    describe(result)
                );
            }
            let as_mixed = step_f32_as_compact(c, &bufs, got.sums[0]);
            compare(Backend::Scalar, c.len, &as_mixed, got);
        },
    );
}

fuzz_target!(|input: Input| {
    let config = input.config.build();
    if config.validate().is_err() {
        if stats() {
            eprintln!("STATS invalid-config");
        }
        return;
    }
    let len = input.len as usize % 4097;
    let offset = input.offset as usize % 4;
    let step = input.step.get();
    let gs = match input.grad_scale {
        GradScale::One => 1.0,
        GradScale::Value(x) => x.get(),
    };
    assert_eq!(
        Backend::available().next(),
        Some(Backend::Scalar),
        "scalar must come first"
    );
    let case = Case {
        input: &input,
        config: &config,
        len,
        offset,
        step,
        gs,
    };
    match input.storage {
        Storage::F32 => run_f32(&case),
        Storage::Mixed {
            params,
            grads,
            moments,
            seed,
        } => run_mixed(&case, (params, grads, moments, seed)),
    }
});
