//! The compact-storage step (`Storage::Mixed`): parameters, gradients and moments in
//! every storage `lamb_core::layer` takes, each backend against the scalar reference.

use super::*;

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

/// What `Storage::Mixed` chose: the parameters', gradients' and moments' storage, and the
/// stochastic-rounding seed.
pub(crate) type MixedSpec = (u8, u8, u8, u64);

fn make_params(c: &Case<'_>, params: u8, seed: u64) -> PBuf {
    let (len, offset) = (c.len, c.offset);
    let [fp, _, _, _, fx, _] = &c.input.fills;
    match params % 5 {
        0 => PBuf::F32(Guarded::new(len, offset, fp)),
        1 => PBuf::Bf16(Guarded::new(len, offset, fp), Rounding::Nearest),
        2 => PBuf::Bf16(Guarded::new(len, offset, fp), Rounding::Stochastic { seed }),
        3 => PBuf::MasterBf16(Guarded::new(len, offset, fp), Guarded::new(len, offset, fx)),
        _ => PBuf::MasterF16(Guarded::new(len, offset, fp), Guarded::new(len, offset, fx)),
    }
}

fn make_grads(c: &Case<'_>, grads: u8) -> GBuf {
    let fg = &c.input.fills[1];
    match grads % 3 {
        0 => GBuf::F32(Guarded::new(c.len, c.offset, fg)),
        1 => GBuf::Bf16(Guarded::new(c.len, c.offset, fg)),
        _ => GBuf::F16(Guarded::new(c.len, c.offset, fg)),
    }
}

/// 8-bit codes: arbitrary bytes, seeded from a float fill.
fn q8_codes(len: usize, offset: usize, f: &Fill) -> Guarded<u8> {
    let mut b = Guarded::<u8>::new(len, offset, &Fill::Constant(F32::Zero));
    let mut r = Rng::new(match f {
        Fill::Bits { seed } | Fill::Uniform { seed, .. } | Fill::Mixed { seed, .. } => *seed,
        Fill::Constant(x) => x.get().to_bits() as u64,
    });
    b.slice_mut().iter_mut().for_each(|c| *c = r.next() as u8);
    b
}

fn make_moments(c: &Case<'_>, moments: u8, seed: u64) -> MBuf {
    let (len, offset) = (c.len, c.offset);
    let [_, _, fm, fv, fx, fs] = &c.input.fills;
    let nb = len.div_ceil(QBLOCK);
    match moments % 4 {
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
        // Codes are arbitrary bytes; the absmax scales come from a float fill.
        _ => MBuf::Q8(
            q8_codes(len, offset, fm),
            q8_codes(len, offset, fv),
            Guarded::new(nb, offset, fs),
            Guarded::new(nb, offset, fx),
        ),
    }
}

/// Writes the input's patches into the buffers (`buffer % 6`: params, master's model copy,
/// grads, m, v, absmax scales).
fn patch(input: &Input, p0: &mut PBuf, g: &mut GBuf, m0: &mut MBuf) {
    for patch in input.patches.iter() {
        let (i, x) = (patch.index as usize, patch.value);
        match (patch.buffer % 6, &mut *p0, &mut *g, &mut *m0) {
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
}

/// One backend's compact step on copies of the buffers: canaries checked, nothing
/// written when the step is refused or skipped (`before`: the raw bits of every buffer).
fn step_backend(
    c: &Case<'_>,
    backend: Backend,
    (p0, g, m0): (&PBuf, &GBuf, &MBuf),
    before: &[Vec<u32>],
) -> (Result<LayerReport, LambError>, Reference) {
    let (mut p, mut m) = (p0.clone(), m0.clone());
    let result = {
        let mut layer = CompactLayer {
            params: p.params(),
            grads: g.grads(),
            moments: m.moments(),
        };
        backend.step_layer_compact(c.config, c.step, c.gs, &mut layer)
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
        for (k, (a, b)) in after.iter().zip(before).enumerate() {
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
    (result, got)
}

pub(crate) fn run_mixed(c: &Case<'_>, (params, grads, moments, seed): MixedSpec) {
    let mut p0 = make_params(c, params, seed);
    let mut g = make_grads(c, grads);
    let mut m0 = make_moments(c, moments, seed);
    patch(c.input, &mut p0, &mut g, &mut m0);
    let mut before = Vec::new();
    p0.each(&mut |_, raw, _, _| before.push(raw));
    m0.each(&mut |_, raw, _, _| before.push(raw));

    against_scalar(
        c.len,
        |backend| step_backend(c, backend, (&p0, &g, &m0), &before),
        |result, _| {
            if stats() {
                eprintln!(
                    "STATS mixed p{} g{} m{} len={} offset={} step={} outcome={}",
                    params % 5,
                    grads % 3,
                    moments % 3,
                    c.len,
                    c.offset,
                    c.step,
                    describe(result)
                );
            }
        },
    );
}
