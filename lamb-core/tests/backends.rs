//! Every backend this CPU supports, forced one by one, gives the same bits as `scalar`:
//! params, m, v and the report (norms, ratio, step size) of a step, and the plain sum of
//! squares; on every length 0..=300, on long random lengths, and on unaligned starts.

use lamb_core::layer::F32Layer;
use lamb_core::{Backend, BiasCorrection, EpsMode, LambConfig, LayerReport};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Seeded random inputs.
struct Inputs(SmallRng);

impl Inputs {
    fn new(seed: u64) -> Inputs {
        Inputs(SmallRng::seed_from_u64(seed))
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0.random_range(0..n)
    }
    /// Mostly ordinary values, with zeros, negative zeros, denormals and huge values mixed in.
    fn value(&mut self, scale: f32) -> f32 {
        let u: f32 = self.0.random_range(-1.0..1.0);
        match self.below(40) {
            0 => 0.0,
            1 => -0.0,
            2 => f32::from_bits(self.0.random_range(1..0x80_0000)), // denormal
            3 => -f32::from_bits(self.0.random_range(1..0x80_0000)),
            4 => u * 1e18, // huge, but g² stays finite in f32
            5 => u * 1e-30,
            _ => u * scale,
        }
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.value(scale)).collect()
    }
}

#[derive(Clone)]
struct Layer {
    p: Vec<f32>,
    g: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Layer {
    /// A layer of `n` elements, preceded by `offset` elements that shift it off alignment.
    fn random(rng: &mut Inputs, n: usize, offset: usize) -> Layer {
        let total = n + offset;
        Layer {
            p: rng.vec(total, 1.0),
            g: rng.vec(total, 0.1),
            m: rng.vec(total, 0.01),
            v: rng.vec(total, 1e-3).iter().map(|x| x.abs()).collect(),
        }
    }

    fn bits(&self) -> Vec<u32> {
        [&self.p, &self.m, &self.v]
            .iter()
            .flat_map(|b| b.iter().map(|x| x.to_bits()))
            .collect()
    }
}

fn report_bits(r: &LayerReport) -> [u32; 5] {
    // NaN is compared as "both NaN": one canonical pattern.
    let b = |x: f32| if x.is_nan() { u32::MAX } else { x.to_bits() };
    [
        b(r.param_norm),
        b(r.update_norm),
        b(r.trust_ratio),
        b(r.step_size),
        r.skipped as u32,
    ]
}

fn configs() -> Vec<(&'static str, LambConfig, f32)> {
    vec![
        ("paper", LambConfig::paper(), 1.0),
        ("optax", LambConfig::optax(), 1.0),
        ("seed", LambConfig::seed(), 1.0),
        (
            "eps-inside, no averaging, no bias correction, scaled grads",
            LambConfig {
                eps_mode: EpsMode::InsideSqrt,
                grad_averaging: false,
                bias_correction: BiasCorrection::Off,
                ..LambConfig::paper()
            },
            0.37,
        ),
        ("adamw", LambConfig::paper().adamw(), 1.0),
    ]
}

/// Runs one step of `layer[offset..]` on `backend`; returns the layer and the report bits.
fn run(
    backend: Backend,
    cfg: &LambConfig,
    scale: f32,
    step: u64,
    layer: &Layer,
    offset: usize,
) -> (Layer, [u32; 5], u64) {
    let mut l = layer.clone();
    let r = backend
        .step_layer(
            cfg,
            step,
            scale,
            &mut F32Layer {
                param: &mut l.p[offset..],
                grad: &l.g[offset..],
                m: &mut l.m[offset..],
                v: &mut l.v[offset..],
            },
        )
        .unwrap();
    let ss = backend.sum_squares(&layer.g[offset..]).unwrap().to_bits();
    (l, report_bits(&r), ss)
}

fn others() -> Vec<Backend> {
    let mut out = vec![];
    for b in Backend::ALL {
        if b == Backend::Scalar {
            continue;
        }
        if b.checked().is_some() {
            out.push(b);
        } else {
            println!("SKIPPED backend {b}: not supported by this CPU");
        }
    }
    out
}

fn assert_same(
    backend: Backend,
    what: &str,
    cfg: &LambConfig,
    scale: f32,
    layer: &Layer,
    offset: usize,
) {
    for step in [1, 7] {
        let (ref_l, ref_r, ref_ss) = run(Backend::Scalar, cfg, scale, step, layer, offset);
        let (l, r, ss) = run(backend, cfg, scale, step, layer, offset);
        let n = layer.p.len() - offset;
        assert_eq!(
            r, ref_r,
            "{backend} {what}: report differs (n={n}, offset={offset})"
        );
        assert_eq!(
            ss, ref_ss,
            "{backend} {what}: sum of squares differs (n={n})"
        );
        if l.bits() != ref_l.bits() {
            let i = l
                .bits()
                .iter()
                .zip(ref_l.bits())
                .position(|(a, b)| *a != b)
                .unwrap();
            panic!("{backend} {what}: n={n} offset={offset} step={step}: first differing word {i}");
        }
    }
}

#[test]
fn every_length_up_to_300_every_config() {
    let mut rng = Inputs::new(0x1234_5678_9abc_def1);
    for backend in others() {
        for (name, cfg, scale) in configs() {
            for n in 0..=300 {
                let layer = Layer::random(&mut rng, n, 0);
                assert_same(backend, name, &cfg, scale, &layer, 0);
            }
        }
        println!(
            "{backend}: lengths 0..=300 x {} configs bit-exact",
            configs().len()
        );
    }
}

#[test]
fn unaligned_starts() {
    let mut rng = Inputs::new(42);
    for backend in others() {
        for offset in 1..=3 {
            for n in [1, 15, 16, 17, 63, 100, 1023, 1024, 1025, 3000] {
                let layer = Layer::random(&mut rng, n, offset);
                assert_same(backend, "paper", &LambConfig::paper(), 1.0, &layer, offset);
            }
        }
    }
}

#[test]
fn long_random_lengths() {
    let mut rng = Inputs::new(7);
    let lengths: Vec<usize> = (0..5).map(|_| 1 + rng.below(1 << 20) as usize).collect();
    for backend in others() {
        for &n in &lengths {
            let layer = Layer::random(&mut rng, n, (n % 3) + 1);
            assert_same(
                backend,
                "paper",
                &LambConfig::paper(),
                1.0,
                &layer,
                (n % 3) + 1,
            );
        }
        println!("{backend}: lengths {lengths:?} bit-exact");
    }
}

#[test]
fn non_finite_inputs_skip_alike() {
    let mut rng = Inputs::new(99);
    for backend in others() {
        for (i, bad) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 3e38]
            .into_iter()
            .enumerate()
        {
            let mut layer = Layer::random(&mut rng, 77, 0);
            layer.g[(i * 19) % 77] = bad;
            let (l, r, _) = run(backend, &LambConfig::paper(), 1.0, 2, &layer, 0);
            let (ref_l, ref_r, _) = run(Backend::Scalar, &LambConfig::paper(), 1.0, 2, &layer, 0);
            assert_eq!(r, ref_r);
            assert_eq!(r[4], 1, "{backend}: {bad} must skip");
            assert_eq!(l.bits(), ref_l.bits());
            assert_eq!(l.bits(), layer.bits(), "skipped means untouched");
        }
    }
}

#[test]
fn detection_is_consistent() {
    let best = Backend::detect();
    assert!(best.checked().is_some());
    let names: Vec<_> = Backend::available().map(|b| b.name()).collect();
    println!("available: {names:?}, detected: {best}");
    assert!(names.contains(&"scalar") && names.contains(&"portable"));
    #[cfg(target_arch = "aarch64")]
    assert_eq!(best, Backend::Neon);
    for b in Backend::ALL {
        assert_eq!(Backend::from_name(b.name()), Some(b));
    }
}
