//! One LAMB step of one layer (phase 1 `norms` + trust ratio + phase 2 `apply`) per forced
//! lamb-core backend, the pulp-generic baseline, and the memory-roofline loops, at 1K, 64K,
//! 1M and 16M elements, all in one criterion run.
//!
//! Throughput is `Bytes(model × n)` with the model of what each loop moves: 44 B/element
//! for lamb-core's step (phase 1 reads p, g, m, v; phase 2 reads them and writes m, v, p),
//! the pulp baseline and the same-traffic roofline; 40 for the 40 B two-pass plan (ARCHITECTURE.md, Design notes); 28 for a
//! single-pass read-4/write-3 (Adam's traffic); 8 for memcpy.
//!
//! The step runs with `lr = 0`: the arithmetic and the traffic are those of any step (the
//! step size is a runtime value, nothing can be skipped), but p stays put and, with a fixed
//! gradient, m and v settle, so millions of repetitions neither overflow nor drift into
//! denormals (with lr > 0 and a fixed gradient, p would grow without bound).
//!
//! Buffers: four `lamb_std::buffer::AlignedBuf` per size (2 MiB-aligned + MADV_HUGEPAGE at
//! 2 MiB and above), re-filled before every benchmark; the placement is printed and saved
//! as `target/criterion/lamb-meta-kernels.txt`.

use std::hint::black_box;

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use lamb_benches::pulp_lamb::{self, Level};
use lamb_benches::roofline::{self, Roofline, bytes};
use lamb_benches::{LAYER_SIZES, Meta, cli_sets_sampling, fill, placement_line};
use lamb_core::{Backend, LambConfig, LayerReport, StepScalars};
use lamb_std::buffer::AlignedBuf;

struct Bufs {
    p: AlignedBuf,
    g: AlignedBuf,
    m: AlignedBuf,
    v: AlignedBuf,
}

impl Bufs {
    fn new(n: usize) -> Bufs {
        let mut b = Bufs {
            p: AlignedBuf::zeroed(n),
            g: AlignedBuf::zeroed(n),
            m: AlignedBuf::zeroed(n),
            v: AlignedBuf::zeroed(n),
        };
        b.reset();
        b
    }

    /// p in [-1, 1), g in 0.01·[-1, 1) (never 0), m = g, v = g²: a mid-training state.
    fn reset(&mut self) {
        fill(&mut self.p, 1, 1.0, 0.0);
        fill(&mut self.g, 2, 0.01, 0.0);
        self.m.copy_from_slice(&self.g);
        for (v, g) in self.v.iter_mut().zip(self.g.iter()) {
            *v = g * g;
        }
    }
}

fn config() -> LambConfig {
    LambConfig {
        lr: 0.0,
        ..LambConfig::paper()
    }
}

/// The benchmark group of one size, measured in the same-traffic model's bytes at first.
type Group<'a> = criterion::BenchmarkGroup<'a, criterion::measurement::WallTime>;

/// What every size's benches share: the configuration, its step scalars, the roofline
/// loops and the pulp levels to run.
struct Setup {
    cfg: LambConfig,
    scalars: StepScalars,
    roof: Roofline,
    pulp_levels: Vec<Level>,
}

/// The meta notes of the run: the CPU, what dispatch picked, the backends skipped.
fn dispatch_notes(meta: &mut Meta, roof: &Roofline) {
    meta.note(format!("[cpu] {}", lamb_benches::cpu_model()));
    meta.note(format!(
        "[dispatch] lamb-core Backend::detect() = {}; pulp Arch::new() = {}; roofline loops compiled for {}",
        Backend::detect(),
        Level::Best.name(),
        roof.isa
    ));
    for b in Backend::ALL {
        if b.checked().is_none() {
            meta.note(format!(
                "[skip] lamb-{b}: Backend::{b:?}.checked() is None on this CPU"
            ));
        }
    }
}

/// One LAMB step per available lamb-core backend, then per pulp level.
fn bench_steps(group: &mut Group<'_>, bufs: &mut Bufs, set: &Setup) {
    let (cfg, scalars) = (&set.cfg, &set.scalars);
    for backend in Backend::ALL.into_iter().filter_map(Backend::checked) {
        bufs.reset();
        let Bufs { p, g, m, v } = &mut *bufs;
        group.bench_function(format!("lamb-{backend}"), |b| {
            b.iter(|| {
                let norms = backend.norms(scalars, p, g, m, v).unwrap();
                let report = LayerReport::plan(cfg, norms);
                backend
                    .apply(scalars, report.step_size, p, g, m, v)
                    .unwrap();
                report.step_size
            })
        });
    }
    for &level in &set.pulp_levels {
        bufs.reset();
        let Bufs { p, g, m, v } = &mut *bufs;
        group.bench_function(format!("pulp-{}", level.name()), |b| {
            b.iter(|| {
                let norms = pulp_lamb::norms(level, scalars, p, g, m, v);
                let report = LayerReport::plan(cfg, norms);
                pulp_lamb::apply(level, scalars, report.step_size, p, g, m, v);
                report.step_size
            })
        });
    }
}

/// The memory-roofline loops, each in its own traffic model's bytes.
fn bench_rooflines(group: &mut Group<'_>, bufs: &mut Bufs, roof: &Roofline, n: usize) {
    let tp = |b: u64| Throughput::Bytes(b * n as u64);
    type Loop = fn(&Roofline, &mut [f32], &[f32], &mut [f32], &mut [f32]) -> f32;
    let loops: [(&str, u64, Loop); 3] = [
        ("roof-same44", bytes::SAME44, Roofline::same44),
        ("roof-design40", bytes::DESIGN40, Roofline::design40),
        ("roof-rw43", bytes::RW43, Roofline::rw43),
    ];
    for (name, per, f) in loops {
        bufs.reset();
        let Bufs { p, g, m, v } = &mut *bufs;
        group.throughput(tp(per));
        group.bench_function(name, |b| b.iter(|| f(roof, p, g, m, v)));
    }
    bufs.reset();
    let Bufs { g, m, .. } = &mut *bufs;
    group.throughput(tp(bytes::COPY));
    group.bench_function("roof-copy", |b| {
        b.iter(|| {
            roofline::copy(m, g);
            black_box(m[0])
        })
    });
}

/// Every bench of one layer size.
fn bench_size(c: &mut Criterion, meta: &mut Meta, set: &Setup, (label, n): (&str, usize)) {
    let mut bufs = Bufs::new(n);
    meta.note(placement_line(
        &format!("layer_{label} (p, g, m, v of {n} f32)"),
        [&bufs.p, &bufs.g, &bufs.m, &bufs.v],
    ));
    // Sanity: the measured step is a real, applied step.
    let norms = Backend::detect()
        .norms(&set.scalars, &bufs.p, &bufs.g, &bufs.m, &bufs.v)
        .expect("norms");
    assert!(
        !LayerReport::plan(&set.cfg, norms).skipped,
        "bench state is not finite"
    );

    let mut group = c.benchmark_group(format!("layer_{label}"));
    if n >= 1 << 20 && !cli_sets_sampling() {
        // One 16M step takes tens of ms (scalar: ~100 ms): 10 equal samples.
        group.sampling_mode(SamplingMode::Flat).sample_size(10);
    }
    group.throughput(Throughput::Bytes(bytes::LAMB * n as u64));
    bench_steps(&mut group, &mut bufs, set);
    bench_rooflines(&mut group, &mut bufs, &set.roof, n);
    group.finish();
    meta.note(placement_line(
        &format!("layer_{label} after its benches"),
        [&bufs.p, &bufs.g, &bufs.m, &bufs.v],
    ));
}

fn kernels(c: &mut Criterion) {
    let cfg = config();
    let mut pulp_levels = vec![Level::Best];
    #[cfg(target_arch = "x86_64")]
    if Level::V3.checked().is_some() && Level::Best.name() != "v3" {
        pulp_levels.push(Level::V3);
    }
    let set = Setup {
        cfg,
        scalars: StepScalars::new(&cfg, 10, 1.0).expect("valid config"),
        roof: Roofline::detect(),
        pulp_levels,
    };
    let mut meta = Meta::default();
    dispatch_notes(&mut meta, &set.roof);
    for size in LAYER_SIZES {
        bench_size(c, &mut meta, &set, size);
    }
    meta.save("kernels");
}

criterion_group!(benches, kernels);
criterion_main!(benches);
