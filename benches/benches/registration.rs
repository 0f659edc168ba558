//! Registering many small layers, and the first step after it (which makes the partition
//! among threads): both must grow linearly with the layer count. Before names were indexed
//! and the partition made lazily, every `add_layer` scanned all names and re-partitioned
//! all layers, and registering 45,000 layers took about 20 s.
//!
//! Groups `registration_10000` and `registration_100000`: functions `add_layer` (a new
//! `Lamb` with that many 16-element layers named `layer.{i}`, its drop not timed) and
//! `first_step` (the first `step` over them, one thread). Throughput is in layers. The
//! ratio of the two groups' times is what to look at: about 10 for linear work.

use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use lamb_benches::cli_sets_sampling;
use lamb_core::LambConfig;
use lamb_std::Lamb;

/// Elements per layer: a bias or a norm scale.
const LEN: usize = 16;

fn register(layers: usize) -> Lamb {
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    for i in 0..layers {
        opt.add_layer(format!("layer.{i}"), LEN).expect("add_layer");
    }
    opt
}

fn registration(c: &mut Criterion) {
    for layers in [10_000, 100_000] {
        let mut group = c.benchmark_group(format!("registration_{layers}"));
        if !cli_sets_sampling() {
            group.sampling_mode(SamplingMode::Flat).sample_size(10);
        }
        group.throughput(Throughput::Elements(layers as u64));
        group.bench_function("add_layer", |b| b.iter_with_large_drop(|| register(layers)));
        let grads = vec![vec![0.01f32; LEN]; layers];
        group.bench_function("first_step", |b| {
            b.iter_batched(
                || (register(layers), vec![vec![0.5f32; LEN]; layers]),
                |(mut opt, mut params)| {
                    let mut p: Vec<&mut [f32]> =
                        params.iter_mut().map(|x| x.as_mut_slice()).collect();
                    let g: Vec<&[f32]> = grads.iter().map(|x| x.as_slice()).collect();
                    let report = opt.step(&mut p, &g).expect("step");
                    assert!(report.applied);
                    drop(p);
                    (opt, params)
                },
                BatchSize::PerIteration,
            )
        });
        group.finish();
    }
}

criterion_group!(benches, registration);
criterion_main!(benches);
