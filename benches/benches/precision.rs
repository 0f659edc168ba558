//! One LAMB step of one layer in each storage combination of `lamb_core::layer`
//! (`lamb_benches::precision::combos`: params {f32, bf16 in place, bf16 stochastic, bf16 +
//! f32 master, f16 + f32 master} × moments {f32, bf16 stochastic, 8-bit}), with the
//! dispatched backend, single thread, at 64K elements (cache resident) and 16M (DRAM
//! resident: 16M × 44 B = 704 MiB of traffic per step in f32).
//!
//! Throughput is `Bytes(traffic × n)` with the traffic model of
//! `lamb_benches::precision::Combo::traffic_bytes` (44 B/element for all-f32, the kernels
//! bench's figure). `bin/precision-table.rs` turns the results into ns/element and the
//! README table. The step runs with `lr = 0`, as in the kernels bench: the arithmetic and
//! traffic of any step, but nothing drifts over millions of repetitions.
//!
//! Before measuring, each combination's bytes of state per parameter are checked against
//! what `lamb_std::Lamb::bytes_per_param` reports for a layer stored that way.

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use lamb_benches::precision::{Combo, MomentFmt, ParamFmt, combos};
use lamb_benches::{Meta, Placed, cli_sets_sampling, fill, placement_line};
use lamb_core::codec::QBLOCK;
use lamb_core::half::{bf16, f16};
use lamb_core::layer::{CompactLayer, Grads, HalfMut, Moments, Params, Rounding};
use lamb_core::{Backend, LambConfig, LayerReport, StepScalars};
use lamb_std::buffer::{Aligned, AlignedBuf};
use lamb_std::{GroupId, Lamb, ParamsIn, Precision, StateFormat};

/// One layer's buffers in one combination (unused formats have length 0).
struct Storage {
    combo: Combo,
    p32: AlignedBuf,
    pb: Aligned<bf16>,
    ph: Aligned<f16>,
    g32: AlignedBuf,
    gb: Aligned<bf16>,
    gh: Aligned<f16>,
    m32: AlignedBuf,
    v32: AlignedBuf,
    mb: Aligned<bf16>,
    vb: Aligned<bf16>,
    mq: Aligned<u8>,
    vq: Aligned<u8>,
    ma: AlignedBuf,
    va: AlignedBuf,
}

impl Storage {
    /// p in [-1, 1), g in 0.01·[-1, 1), zero moments, in the combination's formats.
    fn new(combo: Combo, n: usize) -> Storage {
        let on = |yes: bool| if yes { n } else { 0 };
        let (pf, mf) = (combo.params, combo.moments);
        let half_p = matches!(pf, ParamFmt::Bf16 | ParamFmt::Bf16Sr | ParamFmt::MasterBf16);
        let mut s = Storage {
            combo,
            p32: AlignedBuf::zeroed(on(matches!(
                pf,
                ParamFmt::F32 | ParamFmt::MasterBf16 | ParamFmt::MasterF16
            ))),
            pb: Aligned::zeroed(on(half_p)),
            ph: Aligned::zeroed(on(pf == ParamFmt::MasterF16)),
            g32: AlignedBuf::zeroed(on(pf == ParamFmt::F32)),
            gb: Aligned::zeroed(on(half_p)),
            gh: Aligned::zeroed(on(pf == ParamFmt::MasterF16)),
            m32: AlignedBuf::zeroed(on(mf == MomentFmt::F32)),
            v32: AlignedBuf::zeroed(on(mf == MomentFmt::F32)),
            mb: Aligned::zeroed(on(mf == MomentFmt::Bf16)),
            vb: Aligned::zeroed(on(mf == MomentFmt::Bf16)),
            mq: Aligned::zeroed(on(mf == MomentFmt::Q8)),
            vq: Aligned::zeroed(on(mf == MomentFmt::Q8)),
            ma: AlignedBuf::zeroed(on(mf == MomentFmt::Q8).div_ceil(QBLOCK)),
            va: AlignedBuf::zeroed(on(mf == MomentFmt::Q8).div_ceil(QBLOCK)),
        };
        let mut p = vec![0.0f32; n];
        let mut g = vec![0.0f32; n];
        fill(&mut p, 1, 1.0, 0.0);
        fill(&mut g, 2, 0.01, 0.0);
        if !s.p32.is_empty() {
            s.p32.copy_from_slice(&p);
        }
        for (d, &x) in s.pb.iter_mut().zip(&p) {
            *d = bf16::from_f32(x);
        }
        for (d, &x) in s.ph.iter_mut().zip(&p) {
            *d = f16::from_f32(x);
        }
        if !s.g32.is_empty() {
            s.g32.copy_from_slice(&g);
        }
        for (d, &x) in s.gb.iter_mut().zip(&g) {
            *d = bf16::from_f32(x);
        }
        for (d, &x) in s.gh.iter_mut().zip(&g) {
            *d = f16::from_f32(x);
        }
        s
    }

    fn layer(&mut self) -> CompactLayer<'_> {
        let params = match self.combo.params {
            ParamFmt::F32 => Params::F32(&mut self.p32),
            ParamFmt::Bf16 => Params::Bf16 {
                data: &mut self.pb,
                rounding: Rounding::Nearest,
            },
            ParamFmt::Bf16Sr => Params::Bf16 {
                data: &mut self.pb,
                rounding: Rounding::Stochastic { seed: 7 },
            },
            ParamFmt::MasterBf16 => Params::Master {
                master: &mut self.p32,
                model: HalfMut::Bf16(&mut self.pb),
            },
            ParamFmt::MasterF16 => Params::Master {
                master: &mut self.p32,
                model: HalfMut::F16(&mut self.ph),
            },
        };
        let grads = match self.combo.params {
            ParamFmt::F32 => Grads::F32(&self.g32),
            ParamFmt::MasterF16 => Grads::F16(&self.gh),
            _ => Grads::Bf16(&self.gb),
        };
        let moments = match self.combo.moments {
            MomentFmt::F32 => Moments::F32 {
                m: &mut self.m32,
                v: &mut self.v32,
            },
            MomentFmt::Bf16 => Moments::Bf16 {
                m: &mut self.mb,
                v: &mut self.vb,
                rounding: Rounding::Stochastic { seed: 11 },
            },
            MomentFmt::Q8 => Moments::Q8 {
                m: &mut self.mq,
                v: &mut self.vq,
                m_absmax: &mut self.ma,
                v_absmax: &mut self.va,
            },
        };
        CompactLayer {
            params,
            grads,
            moments,
        }
    }

    /// One step; returns the step size (nonzero work for the optimiser to keep).
    fn step(&mut self, backend: Backend, cfg: &LambConfig, s: &StepScalars) -> f32 {
        let mut layer = self.layer();
        let norms = backend.norms_compact(s, &layer).expect("norms");
        let report = LayerReport::plan(cfg, norms);
        assert!(!report.skipped, "bench state is not finite");
        backend
            .apply_compact(s, report.step_size, &mut layer, 0)
            .expect("apply");
        report.step_size
    }
}

/// `Lamb::bytes_per_param` of one layer stored as `combo`, after one step (the master copy
/// is made at the first step).
fn lamb_std_state_bytes(combo: Combo) -> f64 {
    let n = 16 * QBLOCK;
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    let precision = Precision {
        moments: match combo.moments {
            MomentFmt::F32 => StateFormat::F32,
            MomentFmt::Bf16 => StateFormat::Bf16,
            MomentFmt::Q8 => StateFormat::Q8,
        },
        compact_min_len: 0,
        master: matches!(combo.params, ParamFmt::MasterBf16 | ParamFmt::MasterF16),
        rounding: if combo.params == ParamFmt::Bf16Sr {
            Rounding::Stochastic { seed: 1 }
        } else {
            Rounding::Nearest
        },
    };
    opt.set_precision(GroupId(0), precision).expect("precision");
    opt.add_layer("w", n).expect("layer");
    let (mut p32, mut pb, mut ph) = (
        vec![0.5f32; n],
        vec![bf16::from_f32(0.5); n],
        vec![f16::from_f32(0.5); n],
    );
    let (g32, gb, gh) = (
        vec![0.01f32; n],
        vec![bf16::from_f32(0.01); n],
        vec![f16::from_f32(0.01); n],
    );
    let (p, g) = match combo.params {
        ParamFmt::F32 => (ParamsIn::F32(&mut p32), Grads::F32(&g32)),
        ParamFmt::MasterF16 => (ParamsIn::F16(&mut ph), Grads::F16(&gh)),
        _ => (ParamsIn::Bf16(&mut pb), Grads::Bf16(&gb)),
    };
    let _ = opt.step_mixed(&mut [p], &[g]).expect("step");
    opt.bytes_per_param()
}

fn precision(c: &mut Criterion) {
    let cfg = LambConfig {
        lr: 0.0,
        ..LambConfig::paper()
    };
    let scalars = StepScalars::new(&cfg, 10, 1.0).expect("valid config");
    let backend = Backend::detect();
    let mut meta = Meta::default();
    meta.note(format!("[cpu] {}", lamb_benches::cpu_model()));
    meta.note(format!(
        "[dispatch] lamb-core Backend::detect() = {backend}"
    ));
    for combo in combos() {
        let ours = combo.state_bytes();
        let theirs = lamb_std_state_bytes(combo);
        assert!(
            (ours - theirs).abs() < 1e-9,
            "{}: model {ours} B/param, Lamb::bytes_per_param {theirs}",
            combo.id()
        );
        meta.note(format!(
            "[model] {}: state {ours:.4} B/param (= Lamb::bytes_per_param), traffic {} B/element",
            combo.id(),
            combo.traffic_bytes()
        ));
    }
    for (label, n) in [("64K", 1usize << 16), ("16M", 1 << 24)] {
        let mut group = c.benchmark_group(format!("precision_{label}"));
        if n >= 1 << 20 && !cli_sets_sampling() {
            group.sampling_mode(SamplingMode::Flat).sample_size(10);
        }
        for combo in combos() {
            let mut s = Storage::new(combo, n);
            // Two steps from zero moments: a mid-training state (nonzero m, v and codes).
            for _ in 0..2 {
                s.step(backend, &cfg, &scalars);
            }
            if n >= 1 << 20 {
                let bufs: [&dyn Placed; 14] = [
                    &s.p32, &s.pb, &s.ph, &s.g32, &s.gb, &s.gh, &s.m32, &s.v32, &s.mb, &s.vb,
                    &s.mq, &s.vq, &s.ma, &s.va,
                ];
                let used = bufs.into_iter().filter(|b| b.range().0 < b.range().1);
                meta.note(placement_line(
                    &format!("precision_{label} {}", combo.id()),
                    used.collect::<Vec<_>>(),
                ));
            }
            group.throughput(Throughput::Bytes(
                (combo.traffic_bytes() * n as f64).round() as u64,
            ));
            group.bench_function(combo.id(), |b| b.iter(|| s.step(backend, &cfg, &scalars)));
        }
        group.finish();
    }
    threaded(c, &mut meta);
    meta.save("precision");
}

/// The same 16M layer through `lamb_std::Lamb` on 1, 2 and all threads, f32 or bf16
/// parameters with each moment format: where threads share the memory bandwidth, fewer
/// bytes per element should start to pay for the 8-bit codec.
fn threaded(c: &mut Criterion, meta: &mut Meta) {
    let n = 1usize << 24;
    let cfg = LambConfig {
        lr: 0.0,
        ..LambConfig::paper()
    };
    let mut p32 = AlignedBuf::zeroed(n);
    let mut g32 = AlignedBuf::zeroed(n);
    fill(&mut p32, 1, 1.0, 0.0);
    fill(&mut g32, 2, 0.01, 0.0);
    let mut pb = Aligned::<bf16>::zeroed(n);
    let mut gb = Aligned::<bf16>::zeroed(n);
    for (d, &x) in pb.iter_mut().zip(p32.iter()) {
        *d = bf16::from_f32(x);
    }
    for (d, &x) in gb.iter_mut().zip(g32.iter()) {
        *d = bf16::from_f32(x);
    }
    for threads in lamb_benches::thread_counts() {
        let mut group = c.benchmark_group(format!("precision_16M_t{threads}"));
        if !cli_sets_sampling() {
            group.sampling_mode(SamplingMode::Flat).sample_size(10);
        }
        for params in [ParamFmt::F32, ParamFmt::Bf16] {
            for moments in [MomentFmt::F32, MomentFmt::Bf16, MomentFmt::Q8] {
                let combo = Combo { params, moments };
                let mut opt = Lamb::new(cfg).unwrap();
                opt.set_precision(
                    GroupId(0),
                    Precision {
                        moments: match moments {
                            MomentFmt::F32 => StateFormat::F32,
                            MomentFmt::Bf16 => StateFormat::Bf16,
                            MomentFmt::Q8 => StateFormat::Q8,
                        },
                        compact_min_len: 0,
                        master: false,
                        rounding: Rounding::Nearest,
                    },
                )
                .expect("precision");
                opt.set_threads(threads).expect("threads");
                opt.add_layer("w", n).expect("layer");
                let mut step = || {
                    let (p, g) = match params {
                        ParamFmt::F32 => (ParamsIn::F32(&mut p32), Grads::F32(&g32)),
                        _ => (ParamsIn::Bf16(&mut pb), Grads::Bf16(&gb)),
                    };
                    let r = opt.step_mixed(&mut [p], &[g]).expect("step");
                    assert!(r.applied);
                };
                step();
                step();
                meta.note(format!(
                    "[threads] precision_16M_t{threads} {}: Lamb::step_mixed, {threads} threads",
                    combo.id()
                ));
                group.throughput(Throughput::Bytes(
                    (combo.traffic_bytes() * n as f64).round() as u64,
                ));
                group.bench_function(combo.id(), |b| b.iter(&mut step));
            }
        }
        group.finish();
    }
}

criterion_group!(benches, precision);
criterion_main!(benches);
