//! Whole-model steps through lamb-std's `Lamb`: BERT-base (199 tensors, 109.5M parameters),
//! 1000 tensors of 1024 elements, and one 16M-element layer, at 1, 2 and all threads.
//!
//! Throughput is `Bytes(44 × parameters)`: lamb-std runs lamb-core's two phases per layer
//! (16 B read, then 16 B read + 12 B written per element) with global clipping off, so no
//! extra gradient read. As in `kernels.rs`, `lr = 0` keeps the state stationary over many
//! repetitions without changing the work done.
//!
//! Buffers: params and grads are one `AlignedBuf` per tensor (2 MiB-aligned + MADV_HUGEPAGE
//! at 2 MiB and above, 64 B-aligned below); the moments are lamb-std's own (`AlignedBuf`
//! too). The placement is printed and saved as `target/criterion/lamb-meta-model.txt`.

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use lamb_benches::{
    Meta, cli_sets_sampling, model_tensors, model_workloads, placement_line, thread_counts,
};
use lamb_core::LambConfig;
use lamb_std::Lamb;

fn model(c: &mut Criterion) {
    let cfg = LambConfig {
        lr: 0.0,
        ..LambConfig::paper()
    };
    let mut meta = Meta::default();
    meta.note(format!("[cpu] {}", lamb_benches::cpu_model()));
    for (label, shapes) in model_workloads() {
        let total: usize = shapes.iter().map(|(_, n)| n).sum();
        let mut opt = Lamb::new(cfg).unwrap();
        let (mut params, grads) = model_tensors(&mut opt, &shapes).expect("model tensors");
        meta.note(format!(
            "[model] {label}: {} tensors, {total} parameters, backend {}",
            shapes.len(),
            opt.backend()
                .map_or_else(|e| e.to_string(), |b| b.to_string())
        ));
        meta.note(placement_line(
            &format!("{label} params + grads (moments: lamb-std's own AlignedBuf)"),
            params.iter().chain(grads.iter()),
        ));

        let mut group = c.benchmark_group(format!("model_{label}"));
        if !cli_sets_sampling() {
            group.sampling_mode(SamplingMode::Flat).sample_size(10);
        }
        group.throughput(Throughput::Bytes(44 * total as u64));
        for threads in thread_counts() {
            opt.set_threads(threads).expect("set_threads");
            let mut p: Vec<&mut [f32]> = params.iter_mut().map(|b| &mut b[..]).collect();
            let g: Vec<&[f32]> = grads.iter().map(|b| &b[..]).collect();
            let first = opt.step(&mut p, &g).expect("step");
            assert!(first.applied, "bench state is not finite");
            group.bench_function(format!("lamb-std-t{threads}"), |b| {
                b.iter(|| opt.step(&mut p, &g).expect("step").applied)
            });
        }
        group.finish();
        meta.note(placement_line(
            &format!("{label} params + grads after its benches"),
            params.iter().chain(grads.iter()),
        ));
    }
    meta.save("model");
}

criterion_group!(benches, model);
criterion_main!(benches);
