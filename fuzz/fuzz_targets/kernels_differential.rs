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

/// Parameters in one of the storages of `lamb_core::layer::Params`.
#[derive(Clone)]
enum PBuf {
    F32(Guarded<f32>),
    Bf16(Guarded<bf16>, Rounding),
    MasterBf16(Guarded<f32>, Guarded<bf16>),
    MasterF16(Guarded<f32>, Guarded<f16>),
}

#[derive(Clone)]
enum GBuf {
    F32(Guarded<f32>),
    Bf16(Guarded<bf16>),
    F16(Guarded<f16>),
}

#[derive(Clone)]
enum MBuf {
    F32(Guarded<f32>, Guarded<f32>),
    Bf16(Guarded<bf16>, Guarded<bf16>, Rounding),
    Q8(Guarded<u8>, Guarded<u8>, Guarded<f32>, Guarded<f32>),
}

impl PBuf {
    fn params(&mut self) -> Params<'_> {
        match self {
            PBuf::F32(p) => Params::F32(p.slice_mut()),
            PBuf::Bf16(p, r) => Params::Bf16 {
                data: p.slice_mut(),
                rounding: *r,
            },
            PBuf::MasterBf16(m, h) => Params::Master {
                master: m.slice_mut(),
                model: HalfMut::Bf16(h.slice_mut()),
            },
            PBuf::MasterF16(m, h) => Params::Master {
                master: m.slice_mut(),
                model: HalfMut::F16(h.slice_mut()),
            },
        }
    }
    /// (name, raw bits, keys, canary check) of every buffer.
    fn each(&self, f: &mut Visit<'_>) {
        match self {
            PBuf::F32(p) => f("param", p.raw(), p.keys(), &|b| {
                p.check_canaries("param", b)
            }),
            PBuf::Bf16(p, _) => f("param", p.raw(), p.keys(), &|b| {
                p.check_canaries("param", b)
            }),
            PBuf::MasterBf16(m, h) => {
                f("master", m.raw(), m.keys(), &|b| {
                    m.check_canaries("master", b)
                });
                f("model", h.raw(), h.keys(), &|b| {
                    h.check_canaries("model", b)
                });
            }
            PBuf::MasterF16(m, h) => {
                f("master", m.raw(), m.keys(), &|b| {
                    m.check_canaries("master", b)
                });
                f("model", h.raw(), h.keys(), &|b| {
                    h.check_canaries("model", b)
                });
            }
        }
    }
}

impl GBuf {
    fn grads(&self) -> Grads<'_> {
        match self {
            GBuf::F32(g) => Grads::F32(g.slice()),
            GBuf::Bf16(g) => Grads::Bf16(g.slice()),
            GBuf::F16(g) => Grads::F16(g.slice()),
        }
    }
    fn check_canaries(&self, b: Backend) {
        match self {
            GBuf::F32(g) => g.check_canaries("grad", b),
            GBuf::Bf16(g) => g.check_canaries("grad", b),
            GBuf::F16(g) => g.check_canaries("grad", b),
        }
    }
}

impl MBuf {
    fn moments(&mut self) -> Moments<'_> {
        match self {
            MBuf::F32(m, v) => Moments::F32 {
                m: m.slice_mut(),
                v: v.slice_mut(),
            },
            MBuf::Bf16(m, v, rounding) => Moments::Bf16 {
                m: m.slice_mut(),
                v: v.slice_mut(),
                rounding: *rounding,
            },
            MBuf::Q8(m, v, ma, va) => Moments::Q8 {
                m: m.slice_mut(),
                v: v.slice_mut(),
                m_absmax: ma.slice_mut(),
                v_absmax: va.slice_mut(),
            },
        }
    }
    fn each(&self, f: &mut Visit<'_>) {
        match self {
            MBuf::F32(m, v) => {
                f("m", m.raw(), m.keys(), &|b| m.check_canaries("m", b));
                f("v", v.raw(), v.keys(), &|b| v.check_canaries("v", b));
            }
            MBuf::Bf16(m, v, _) => {
                f("m", m.raw(), m.keys(), &|b| m.check_canaries("m", b));
                f("v", v.raw(), v.keys(), &|b| v.check_canaries("v", b));
            }
            MBuf::Q8(m, v, ma, va) => {
                f("m", m.raw(), m.keys(), &|b| m.check_canaries("m", b));
                f("v", v.raw(), v.keys(), &|b| v.check_canaries("v", b));
                f("m_absmax", ma.raw(), ma.keys(), &|b| {
                    ma.check_canaries("m_absmax", b)
                });
                f("v_absmax", va.raw(), va.keys(), &|b| {
                    va.check_canaries("v_absmax", b)
                });
            }
        }
    }
}

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

fn nan_free(x: f64) -> u64 {
    if x.is_nan() { u64::MAX } else { x.to_bits() }
}

fn run_f32(input: &Input, config: &LambConfig, len: usize, offset: usize, step: u64, gs: f32) {
    let [fp, fg, fm, fv, _, _] = &input.fills;
    let mut p0 = Guarded::<f32>::new(len, offset, fp);
    let mut g = Guarded::<f32>::new(len, offset, fg);
    let mut m0 = Guarded::<f32>::new(len, offset, fm);
    let mut v0 = Guarded::<f32>::new(len, offset, fv);
    for patch in input.patches.iter() {
        let b = match patch.buffer % 4 {
            0 => &mut p0,
            1 => &mut g,
            2 => &mut m0,
            _ => &mut v0,
        };
        b.set(patch.index as usize, patch.value);
    }
    let before = [p0.raw(), m0.raw(), v0.raw()];

    let mut reference: Option<Reference> = None;
    for backend in Backend::available() {
        let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
        let result = backend.step_layer(
            config,
            step,
            gs,
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
            assert_eq!(
                p.raw(),
                before[0],
                "{backend}: params written on {result:?}"
            );
            assert_eq!(m.raw(), before[1], "{backend}: m written on {result:?}");
            assert_eq!(v.raw(), before[2], "{backend}: v written on {result:?}");
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
        if backend == Backend::Scalar {
            if stats() {
                eprintln!(
                    "STATS f32 len={len} offset={offset} step={step} outcome={}",
                    describe(&result)
                );
            }
            // The compact-storage entry point with all-f32 storage is the same step.
            let (mut p2, mut m2, mut v2) = (p0.clone(), m0.clone(), v0.clone());
            let mut layer = CompactLayer {
                params: Params::F32(p2.slice_mut()),
                grads: Grads::F32(g.slice()),
                moments: Moments::F32 {
                    m: m2.slice_mut(),
                    v: v2.slice_mut(),
                },
            };
            let mixed = backend.step_layer_compact(config, step, gs, &mut layer);
            let sum_mixed = nan_free(
                backend
                    .sum_squares_grads(&Grads::F32(g.slice()))
                    .expect("scalar"),
            );
            let as_mixed = Reference {
                outcome: outcome(&mixed),
                buffers: vec![
                    ("param".into(), p2.keys()),
                    ("m".into(), m2.keys()),
                    ("v".into(), v2.keys()),
                ],
                sums: vec![got.sums[0], sum_mixed],
            };
            compare(backend, len, &as_mixed, &got);
            reference = Some(got);
        } else {
            compare(
                backend,
                len,
                &got,
                reference.as_ref().expect("scalar runs first"),
            );
        }
    }
}

fn run_mixed(
    input: &Input,
    config: &LambConfig,
    len: usize,
    offset: usize,
    step: u64,
    gs: f32,
    (params, grads, moments, seed): (u8, u8, u8, u64),
) {
    let [fp, fg, fm, fv, fx, fs] = &input.fills;
    let mut p0 = match params % 5 {
        0 => PBuf::F32(Guarded::new(len, offset, fp)),
        1 => PBuf::Bf16(Guarded::new(len, offset, fp), Rounding::Nearest),
        2 => PBuf::Bf16(Guarded::new(len, offset, fp), Rounding::Stochastic { seed }),
        3 => PBuf::MasterBf16(Guarded::new(len, offset, fp), Guarded::new(len, offset, fx)),
        _ => PBuf::MasterF16(Guarded::new(len, offset, fp), Guarded::new(len, offset, fx)),
    };
    let mut g = match grads % 3 {
        0 => GBuf::F32(Guarded::new(len, offset, fg)),
        1 => GBuf::Bf16(Guarded::new(len, offset, fg)),
        _ => GBuf::F16(Guarded::new(len, offset, fg)),
    };
    let nb = len.div_ceil(QBLOCK);
    let mut m0 = match moments % 4 {
        0 => MBuf::F32(Guarded::new(len, offset, fm), Guarded::new(len, offset, fv)),
        1 => MBuf::Bf16(
            Guarded::new(len, offset, fm),
            Guarded::new(len, offset, fv),
            Rounding::Nearest,
        ),
        2 => MBuf::Bf16(
            Guarded::new(len, offset, fm),
            Guarded::new(len, offset, fv),
            Rounding::Stochastic { seed },
        ),
        _ => {
            // Codes are arbitrary bytes; the absmax scales come from a float fill.
            let codes = |f: &Fill| {
                let mut b = Guarded::<u8>::new(len, offset, &Fill::Constant(F32::Zero));
                let mut r = Rng::new(match f {
                    Fill::Bits { seed } | Fill::Uniform { seed, .. } | Fill::Mixed { seed, .. } => {
                        *seed
                    }
                    Fill::Constant(x) => x.get().to_bits() as u64,
                });
                b.slice_mut().iter_mut().for_each(|c| *c = r.next() as u8);
                b
            };
            let (m, v) = (codes(fm), codes(fv));
            MBuf::Q8(
                m,
                v,
                Guarded::new(nb, offset, fs),
                Guarded::new(nb, offset, fx),
            )
        }
    };
    for patch in input.patches.iter() {
        let (i, x) = (patch.index as usize, patch.value);
        match (patch.buffer % 6, &mut p0, &mut g, &mut m0) {
            (0, PBuf::F32(p) | PBuf::MasterBf16(p, _) | PBuf::MasterF16(p, _), _, _) => p.set(i, x),
            (0, PBuf::Bf16(p, _), _, _) => p.set(i, x),
            (1, PBuf::MasterBf16(_, h), _, _) => h.set(i, x),
            (1, PBuf::MasterF16(_, h), _, _) => h.set(i, x),
            (2, _, GBuf::F32(b), _) => b.set(i, x),
            (2, _, GBuf::Bf16(b), _) => b.set(i, x),
            (2, _, GBuf::F16(b), _) => b.set(i, x),
            (3, _, _, MBuf::F32(m, _)) => m.set(i, x),
            (3, _, _, MBuf::Bf16(m, ..)) => m.set(i, x),
            (3, _, _, MBuf::Q8(m, ..)) => m.set(i, x),
            (4, _, _, MBuf::F32(_, v)) => v.set(i, x),
            (4, _, _, MBuf::Bf16(_, v, _)) => v.set(i, x),
            (4, _, _, MBuf::Q8(_, v, ..)) => v.set(i, x),
            (5, _, _, MBuf::Q8(_, _, ma, va)) => {
                if i % 2 == 0 {
                    ma.set(i / 2, x)
                } else {
                    va.set(i / 2, x)
                }
            }
            _ => {}
        }
    }
    let mut before = Vec::new();
    p0.each(&mut |_, raw, _, _| before.push(raw));
    m0.each(&mut |_, raw, _, _| before.push(raw));

    let mut reference: Option<Reference> = None;
    for backend in Backend::available() {
        let (mut p, mut m) = (p0.clone(), m0.clone());
        let result = {
            let mut layer = CompactLayer {
                params: p.params(),
                grads: g.grads(),
                moments: m.moments(),
            };
            backend.step_layer_compact(config, step, gs, &mut layer)
        };
        let mut buffers = Vec::new();
        let mut after = Vec::new();
        let mut visit = |name: &str, raw: Vec<u32>, keys: Vec<u32>, check: &dyn Fn(Backend)| {
            check(backend);
            after.push(raw);
            buffers.push((name.to_string(), keys));
        };
        p.each(&mut visit);
        m.each(&mut visit);
        g.check_canaries(backend);
        if untouched(&result) {
            for (k, (a, b)) in after.iter().zip(&before).enumerate() {
                assert!(a == b, "{backend}: {} written on {result:?}", buffers[k].0);
            }
        }
        let sums = vec![nan_free(
            backend
                .sum_squares_grads(&g.grads())
                .expect("available backend"),
        )];
        let got = Reference {
            outcome: outcome(&result),
            buffers,
            sums,
        };
        if backend == Backend::Scalar {
            if stats() {
                eprintln!(
                    "STATS mixed p{} g{} m{} len={len} offset={offset} step={step} outcome={}",
                    params % 5,
                    grads % 3,
                    moments % 3,
                    describe(&result)
                );
            }
            reference = Some(got);
        } else {
            compare(
                backend,
                len,
                &got,
                reference.as_ref().expect("scalar runs first"),
            );
        }
    }
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
    match input.storage {
        Storage::F32 => run_f32(&input, &config, len, offset, step, gs),
        Storage::Mixed {
            params,
            grads,
            moments,
            seed,
        } => run_mixed(
            &input,
            &config,
            len,
            offset,
            step,
            gs,
            (params, grads, moments, seed),
        ),
    }
});
