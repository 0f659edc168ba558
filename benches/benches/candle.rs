//! lamb-candle against `candle_nn::AdamW`, in the same run: the optimizer step on
//! BERT-base's parameter set (199 f32 Vars, 109.5M parameters) and on 1000 Vars of 1024
//! elements, plus the peak memory one step allocates beyond what it started with.
//!
//! Both optimizers get the same Vars and the same `GradStore` (built once; a step reads
//! the gradients, it does not need fresh ones). As in `model.rs`, `lr = 0` keeps the Vars
//! where they are over many repetitions without changing the work done: LAMB's two passes
//! (norms, then the update with the trust ratio, one group, no clipping) and AdamW's tensor
//! expressions run in full. lamb-candle runs on 1 thread and on all cores; candle's AdamW
//! is built from candle's CPU tensor ops, whatever threads those use. `lamb-std-t1` is
//! lamb-std's own step on plain `Vec`s of the same sizes: the cost of going through candle.
//!
//! Memory: a counting global allocator ([`Counting`]) tracks the bytes allocated and
//! live. Before a step the peak is reset to the live count; after it, the peak minus that
//! count is the step's *peak extra memory*, printed as `[memory]` lines (and saved with
//! the notes as `target/criterion/lamb-meta-candle.txt`). It counts every heap allocation
//! of the process during the step, rayon's workers' included; the stack of lamb-candle's
//! helper thread (past 64 Vars, see lamb-candle's docs) is mapped once when the optimizer
//! is built, not allocated per step, and is not in it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use lamb_benches::{Meta, cli_sets_sampling, fill};
use lamb_candle::Config;
use lamb_core::LambConfig;

/// The system allocator, counting the bytes live and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

impl Counting {
    fn grew(bytes: usize) {
        let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
        PEAK.fetch_max(live, Ordering::Relaxed);
    }

    fn shrank(bytes: usize) {
        LIVE.fetch_sub(bytes, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so it
// upholds `GlobalAlloc`'s contract exactly as `System` does; the counters are atomics
// touched only on success and never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's `layout` obligations are passed on to `System`.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            Counting::grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            Counting::grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` through this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        Counting::shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` and `layout` come from this allocator, as `realloc` requires.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            Counting::grew(new_size);
            Counting::shrank(layout.size());
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns the most bytes live during it beyond those live before.
fn peak_extra(f: impl FnOnce()) -> usize {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    f();
    PEAK.load(Ordering::Relaxed).saturating_sub(before)
}

/// `1.5 KiB`, `417.6 MiB`.
fn size(bytes: usize) -> String {
    if bytes < 1 << 20 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
    }
}

/// The Vars and gradients of a parameter set (flat f32 Vars, as the sizes are what
/// matters to both optimizers).
fn model(shapes: &[(String, usize)]) -> (Vec<Var>, GradStore) {
    let mut grads = GradStore::default();
    let vars = shapes
        .iter()
        .enumerate()
        .map(|(i, (_, len))| {
            let mut p = vec![0.0f32; *len];
            fill(&mut p, 2 * i as u64 + 1, 0.05, 0.0);
            let var = Var::from_vec(p, *len, &Device::Cpu).expect("var");
            let mut g = vec![0.0f32; *len];
            fill(&mut g, 2 * i as u64 + 2, 0.01, 0.0);
            grads.insert(&var, Tensor::from_vec(g, *len, &Device::Cpu).expect("grad"));
            var
        })
        .collect();
    (vars, grads)
}

/// The benchmark group of one workload.
type Group<'a> = criterion::BenchmarkGroup<'a, criterion::measurement::WallTime>;

/// One workload's parameter set: its label, shapes, Vars and gradients.
struct Workload<'a> {
    label: &'a str,
    shapes: &'a [(String, usize)],
    vars: &'a [Var],
    grads: &'a GradStore,
}

/// lamb-candle on 1 thread and on all cores, with the peak extra memory of a step.
fn bench_lamb_candle(group: &mut Group<'_>, meta: &mut Meta, w: &Workload<'_>) {
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads = vec![1, all];
    threads.dedup();
    for t in threads {
        let config = Config {
            lamb: LambConfig {
                lr: 0.0,
                ..LambConfig::paper()
            },
            // Every Var gets the trust ratio, as in model.rs (the split would exempt
            // these flat Vars).
            decay_split: false,
            threads: t,
            ..Config::default()
        };
        let mut opt = lamb_candle::Lamb::new(w.vars.to_vec(), config).expect("lamb-candle");
        let first = opt.step_report(w.grads).expect("step");
        assert!(first.applied, "bench state is not finite");
        let extra = peak_extra(|| opt.step(w.grads).expect("step"));
        meta.note(format!(
            "[memory] {} lamb-candle-t{t}: peak extra {} per step (state held: {:.1} B/param)",
            w.label,
            size(extra),
            opt.inner().bytes_per_param()
        ));
        group.bench_function(format!("lamb-candle-t{t}"), |b| {
            b.iter(|| opt.step(w.grads).expect("step"))
        });
    }
}

/// lamb-std's own step on the same sizes, for the cost of going through candle.
fn bench_lamb_std(group: &mut Group<'_>, shapes: &[(String, usize)]) {
    let mut std_opt = lamb_std::Lamb::new(LambConfig {
        lr: 0.0,
        ..LambConfig::paper()
    })
    .unwrap();
    let mut p: Vec<Vec<f32>> = Vec::new();
    let mut g: Vec<Vec<f32>> = Vec::new();
    for (i, (name, len)) in shapes.iter().enumerate() {
        std_opt.add_layer(name.clone(), *len).expect("add_layer");
        p.push(vec![0.0; *len]);
        fill(&mut p[i], 2 * i as u64 + 1, 0.05, 0.0);
        g.push(vec![0.0; *len]);
        fill(&mut g[i], 2 * i as u64 + 2, 0.01, 0.0);
    }
    let mut p: Vec<&mut [f32]> = p.iter_mut().map(|b| &mut b[..]).collect();
    let g: Vec<&[f32]> = g.iter().map(|b| &b[..]).collect();
    group.bench_function("lamb-std-t1", |b| {
        b.iter(|| std_opt.step(&mut p, &g).expect("step").applied)
    });
}

/// candle's AdamW, with the peak extra memory of a step.
fn bench_adamw(group: &mut Group<'_>, meta: &mut Meta, w: &Workload<'_>) {
    let params = ParamsAdamW {
        lr: 0.0,
        ..ParamsAdamW::default()
    };
    let mut adamw = AdamW::new(w.vars.to_vec(), params).expect("AdamW");
    adamw.step(w.grads).expect("step");
    let extra = peak_extra(|| adamw.step(w.grads).expect("step"));
    // AdamW's temporaries live for one Var at a time: the largest Var sets the peak.
    let largest = 4 * w.shapes.iter().map(|(_, n)| *n).max().unwrap_or(0);
    meta.note(format!(
        "[memory] {} candle-adamw: peak extra {} per step ({:.1} x the largest Var, {})",
        w.label,
        size(extra),
        extra as f64 / largest.max(1) as f64,
        size(largest)
    ));
    group.bench_function("candle-adamw", |b| {
        b.iter(|| adamw.step(w.grads).expect("step"))
    });
}

fn candle(c: &mut Criterion) {
    let mut meta = Meta::default();
    meta.note(format!("[cpu] {}", lamb_benches::cpu_model()));
    let workloads = [
        ("bert_base", lamb_benches::shapes::bert_base()),
        (
            "uniform_1000x1024",
            lamb_benches::shapes::uniform(1000, 1024),
        ),
    ];
    for (label, shapes) in workloads {
        let total: usize = shapes.iter().map(|(_, n)| n).sum();
        let (vars, grads) = model(&shapes);
        meta.note(format!(
            "[model] {label}: {} f32 Vars, {total} parameters ({})",
            vars.len(),
            size(4 * total)
        ));
        let mut group = c.benchmark_group(format!("candle_{label}"));
        if !cli_sets_sampling() {
            group.sampling_mode(SamplingMode::Flat).sample_size(10);
        }
        group.throughput(Throughput::Elements(total as u64));
        let w = Workload {
            label,
            shapes: &shapes,
            vars: &vars,
            grads: &grads,
        };
        bench_lamb_candle(&mut group, &mut meta, &w);
        bench_lamb_std(&mut group, &shapes);
        bench_adamw(&mut group, &mut meta, &w);
        group.finish();
    }
    meta.save("candle");
}

criterion_group!(benches, candle);
criterion_main!(benches);
