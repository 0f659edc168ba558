//! Steps a BERT-base-shaped parameter set (199 tensors, 110M f32 parameters) with LAMB and
//! prints the time per step, for 1 thread and for every core.
//!
//! `cargo run -p benches --release --example bert_step`
//!
//! Buffers: params and grads are `AlignedBuf` (2 MiB-aligned, MADV_HUGEPAGE), as is the
//! optimizer's state. Timing here is a smoke figure; the criterion benches in `benches/`
//! are where the performance claims live.

use std::time::Instant;

use lamb_benches::shapes;
use lamb_std::Lamb;
use lamb_std::buffer::AlignedBuf;
use lamb_std::lamb_core::{Backend, LambConfig};

fn main() -> Result<(), lamb_std::Error> {
    let shapes = shapes::bert_base();
    let total: usize = shapes.iter().map(|(_, n)| n).sum();
    let mut params: Vec<AlignedBuf> = shapes.iter().map(|(_, n)| AlignedBuf::zeroed(*n)).collect();
    let mut grads: Vec<AlignedBuf> = shapes.iter().map(|(_, n)| AlignedBuf::zeroed(*n)).collect();
    for (k, (p, g)) in params.iter_mut().zip(&mut grads).enumerate() {
        for (i, (p, g)) in p.iter_mut().zip(g.iter_mut()).enumerate() {
            *p = ((i * 7 + k) % 101) as f32 * 1e-3 - 0.05;
            *g = ((i * 13 + k) % 97) as f32 * 1e-4 - 0.005;
        }
    }
    println!(
        "BERT-base: {} tensors, {:.1}M parameters, backend {}, buffers {:?}",
        shapes.len(),
        total as f64 / 1e6,
        Backend::detect(),
        params[0].placement()
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for threads in [1, cores] {
        let mut opt = Lamb::new(LambConfig::nvlamb()).unwrap();
        opt.set_threads(threads)?;
        opt.set_max_grad_norm(Some(1.0))?;
        for (name, n) in &shapes {
            opt.add_layer(name.clone(), *n)?;
        }
        let mut times = vec![];
        for _ in 0..6 {
            let mut p: Vec<&mut [f32]> = params.iter_mut().map(|b| &mut b[..]).collect();
            let g: Vec<&[f32]> = grads.iter().map(|b| &b[..]).collect();
            let t = Instant::now();
            let report = opt.step(&mut p, &g)?;
            times.push(t.elapsed().as_secs_f64());
            assert!(report.applied);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "{threads} thread(s): {:.1} ms/step, {:.2} ns/element (median of 6, first step included)",
            median * 1e3,
            median * 1e9 / total as f64
        );
        if threads == cores {
            break;
        }
    }
    Ok(())
}
