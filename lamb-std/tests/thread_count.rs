//! Thread counts: every element of every layer is stepped whatever the count, with the
//! same bits as one thread, and counts beyond `Lamb::max_threads` are refused (rayon would
//! silently build a smaller pool than asked, and the pieces planned for the missing threads
//! would never be stepped).

use lamb_std::lamb_core::LambConfig;
use lamb_std::{Error, Lamb, LayerId};

/// Layers of awkward sizes: smaller than a block, block multiples plus one, one large
/// enough that every thread count here cuts it.
const LENS: [usize; 6] = [1, 1023, 1025, 3000, 7, 70_001];

fn model() -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let params = LENS
        .iter()
        .map(|&n| (0..n).map(|k| 0.5 + (k % 11) as f32 * 0.01).collect())
        .collect();
    let grads = LENS
        .iter()
        .map(|&n| (0..n).map(|k| 0.01 + (k % 7) as f32 * 0.001).collect())
        .collect();
    (params, grads)
}

/// Two steps on `threads` threads; the params and the f32 moments afterwards.
fn run(threads: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    opt.set_threads(threads).unwrap();
    assert_eq!(opt.threads(), threads);
    for (i, &n) in LENS.iter().enumerate() {
        opt.add_layer(format!("l{i}"), n).unwrap();
    }
    let (mut params, grads) = model();
    for _ in 0..2 {
        let mut p: Vec<&mut [f32]> = params.iter_mut().map(|x| x.as_mut_slice()).collect();
        let g: Vec<&[f32]> = grads.iter().map(|x| x.as_slice()).collect();
        assert!(opt.step(&mut p, &g).unwrap().applied);
    }
    let m = (0..LENS.len())
        .map(|i| opt.layer(LayerId(i)).unwrap().m.to_vec())
        .collect();
    (params, m)
}

#[test]
fn every_element_is_stepped_identically_on_any_thread_count() {
    let (start, _) = model();
    let (p1, m1) = run(1);
    // With positive gradients, every parameter moves and every first moment is non-zero:
    // an element no thread stepped would show.
    for (layer, (p, s)) in p1.iter().zip(&start).enumerate() {
        for (k, (a, b)) in p.iter().zip(s).enumerate() {
            assert!(a != b, "layer {layer} element {k} not stepped on 1 thread");
        }
        assert!(m1[layer].iter().all(|&x| x > 0.0));
    }
    for threads in [2, 3, 7, 64] {
        let (p, m) = run(threads);
        for layer in 0..LENS.len() {
            for (k, (a, b)) in p[layer].iter().zip(&p1[layer]).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{threads} threads: layer {layer} element {k}"
                );
            }
            assert!(m[layer] == m1[layer], "{threads} threads: layer {layer} m");
        }
    }
}

#[test]
fn too_many_threads_are_refused_and_the_setting_stays() {
    let max = Lamb::max_threads();
    assert!(max >= 64);
    assert_eq!(max, Lamb::MAX_THREADS.min(rayon_max()));
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    opt.set_threads(3).unwrap();
    opt.add_layer("w", 5000).unwrap();
    for n in [100_000, 65_536, max + 1, usize::MAX] {
        let e = opt.set_threads(n).unwrap_err();
        assert_eq!(e, Error::ThreadCount { requested: n, max });
        assert!(e.to_string().contains(&n.to_string()), "{e}");
        assert!(e.to_string().contains(&format!("at most {max}")), "{e}");
        assert_eq!(opt.threads(), 3);
    }
    // Still steps, on its 3 threads.
    let mut w = vec![0.5f32; 5000];
    assert!(opt.step(&mut [&mut w], &[&[0.01; 5000]]).unwrap().applied);
    assert!(w.iter().all(|&x| x < 0.5));
    // 0 is one per core, capped.
    opt.set_threads(0).unwrap();
    assert!((1..=max).contains(&opt.threads()));
}

/// rayon's own cap, as its docs state it: 2^16 − 1 threads on 64-bit targets, 2^8 − 1 on
/// 32-bit ones.
fn rayon_max() -> usize {
    if cfg!(target_pointer_width = "64") {
        65_535
    } else {
        255
    }
}
