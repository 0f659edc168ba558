//! The model of `checkpoint.rs`: a few layers in every state precision, its gradients,
//! its steps, and saving and loading it (to bytes and to files under a temp dir).

use std::path::PathBuf;

use lamb_std::lamb_core::half::bf16;
use lamb_std::lamb_core::layer::{Grads, Rounding};
use lamb_std::lamb_core::{LambConfig, Schedule};
use lamb_std::{GroupId, Lamb, ParamsIn, Precision, StateFormat};
use rand::distr::Uniform;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// `n` values uniform in [−scale, scale).
pub fn uniform(rng: &mut SmallRng, n: usize, scale: f32) -> Vec<f32> {
    let dist = Uniform::new(-scale, scale).unwrap();
    (0..n).map(|_| rng.sample(dist)).collect()
}

/// (name, shape): with the decay split, 2-d tensors decay, biases and 1-d tensors do not.
pub const SHAPES: &[(&str, &[usize])] = &[
    ("embed.weight", &[40, 75]),
    ("encoder.0.attn.w", &[30, 30]),
    ("encoder.0.attn.b", &[30]),
    ("encoder.0.norm.weight", &[30]),
    ("encoder.0.ffn.w1", &[30, 64]),
    ("encoder.0.ffn.b1", &[64]),
    ("head.weight", &[3, 30]),
    ("head.bias", &[3]),
    ("unused.bias", &[0]),
];

/// How the state is stored; every test of exact resume runs over all of these.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Variant {
    /// f32 moments, f32 params (saved in the checkpoint with `save_with_params`).
    F32,
    /// bf16 moments on the large tensors, f32 params.
    Bf16,
    /// 8-bit moments on the large tensors, bf16 params with an f32 master copy (the params
    /// are saved by the "model", the master by the optimizer).
    Q8Master,
    /// 8-bit moments, bf16 params updated in place with stochastic rounding.
    Q8Stochastic,
}

pub const VARIANTS: [Variant; 4] = [
    Variant::F32,
    Variant::Bf16,
    Variant::Q8Master,
    Variant::Q8Stochastic,
];

impl Variant {
    pub fn precision(self) -> Precision {
        let base = Precision {
            compact_min_len: 500,
            ..Precision::default()
        };
        match self {
            Variant::F32 => base,
            Variant::Bf16 => Precision {
                moments: StateFormat::Bf16,
                ..base
            },
            Variant::Q8Master => Precision {
                moments: StateFormat::Q8,
                ..base
            },
            Variant::Q8Stochastic => Precision {
                moments: StateFormat::Q8,
                master: false,
                rounding: Rounding::Stochastic { seed: 0x5eed },
                ..base
            },
        }
    }
    pub fn half_params(self) -> bool {
        matches!(self, Variant::Q8Master | Variant::Q8Stochastic)
    }
}

pub fn optimizer(variant: Variant, threads: usize) -> Lamb {
    let mut opt = Lamb::with_decay_split(LambConfig {
        lr: 5e-3,
        ..LambConfig::timm()
    })
    .unwrap();
    for g in 0..opt.group_count() {
        opt.set_precision(GroupId(g), variant.precision()).unwrap();
    }
    for (name, shape) in SHAPES {
        opt.add_param(*name, shape).unwrap();
    }
    opt.set_max_grad_norm(Some(1.0)).unwrap();
    opt.set_schedule(Schedule::WarmupCosine {
        warmup: 2,
        total: 6,
        end: 0.1,
    })
    .unwrap();
    opt.set_threads(threads).unwrap();
    opt
}

/// The model's parameters, in f32 or bf16.
#[derive(Clone, PartialEq, Debug)]
pub enum Model {
    F32(Vec<Vec<f32>>),
    Bf16(Vec<Vec<bf16>>),
}

impl Model {
    pub fn new(variant: Variant) -> Model {
        let mut rng = SmallRng::seed_from_u64(7);
        let p: Vec<Vec<f32>> = SHAPES
            .iter()
            .map(|(name, shape)| {
                let n = shape.iter().product();
                if name.ends_with("bias") || name.contains(".b") {
                    vec![0.0; n]
                } else {
                    uniform(&mut rng, n, 0.05)
                }
            })
            .collect();
        if variant.half_params() {
            Model::Bf16(
                p.iter()
                    .map(|x| x.iter().map(|&v| bf16::from_f32(v)).collect())
                    .collect(),
            )
        } else {
            Model::F32(p)
        }
    }

    pub fn bits(&self) -> Vec<u32> {
        match self {
            Model::F32(p) => p.iter().flatten().map(|x| x.to_bits()).collect(),
            Model::Bf16(p) => p.iter().flatten().map(|x| x.to_bits() as u32).collect(),
        }
    }
}

/// Gradients of step `t` (1-based), the same in every run.
pub fn grads(t: u64) -> Vec<Vec<f32>> {
    let mut rng = SmallRng::seed_from_u64(1000 + t);
    SHAPES
        .iter()
        .map(|(_, s)| uniform(&mut rng, s.iter().product(), 0.02))
        .collect()
}

pub fn step(opt: &mut Lamb, model: &mut Model) {
    let g = grads(opt.steps() + 1);
    let gg: Vec<Grads<'_>> = g.iter().map(|x| Grads::F32(x)).collect();
    let mut pp: Vec<ParamsIn<'_>> = match model {
        Model::F32(p) => p.iter_mut().map(|x| ParamsIn::F32(x)).collect(),
        Model::Bf16(p) => p.iter_mut().map(|x| ParamsIn::Bf16(x)).collect(),
    };
    let report = opt.step_mixed(&mut pp, &gg).unwrap();
    assert!(report.applied);
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("checkpoint-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Saves optimizer and model (f32 params inside the checkpoint, half params beside it, as
/// a model checkpoint would hold them).
pub fn save(opt: &Lamb, model: &Model, path: &std::path::Path) -> Option<Model> {
    match model {
        Model::F32(p) => {
            let pp: Vec<&[f32]> = p.iter().map(|x| x.as_slice()).collect();
            opt.save_with_params(path, &pp).unwrap();
            None
        }
        Model::Bf16(_) => {
            opt.save(path).unwrap();
            Some(model.clone())
        }
    }
}

pub fn load(
    variant: Variant,
    threads: usize,
    path: &std::path::Path,
    kept: Option<Model>,
) -> (Lamb, Model) {
    let mut opt = optimizer(variant, threads);
    let model = match kept {
        Some(m) => {
            opt.load(path).unwrap();
            m
        }
        None => {
            // Fresh (wrong) params, overwritten by the checkpoint's.
            let mut p: Vec<Vec<f32>> = SHAPES
                .iter()
                .map(|(_, s)| vec![9.0; s.iter().product()])
                .collect();
            let mut pp: Vec<&mut [f32]> = p.iter_mut().map(|x| x.as_mut_slice()).collect();
            opt.load_with_params(path, &mut pp).unwrap();
            Model::F32(p)
        }
    };
    (opt, model)
}
