//! A small named model, its gradients, and the same steps through lamb-std directly.
#![allow(dead_code)] // each test file uses a part

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use lamb_candle::Config;
use lamb_std::lamb_core::half::{bf16, f16};
use lamb_std::lamb_core::layer::Grads;
use lamb_std::{Lamb, ParamsIn};

/// Names and shapes, in name order (the order `Lamb::from_varmap` registers them). The
/// big weight is over lamb-std's compact-state threshold (4096) and spans several blocks.
pub const SHAPES: &[(&str, &[usize])] = &[
    ("enc.bias", &[48]),
    ("enc.weight", &[48, 200]),
    ("head.bias", &[10]),
    ("head.weight", &[10, 48]),
    ("norm.weight", &[48]),
];

/// Deterministic values in `[-scale, scale)`.
pub fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

pub fn len(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// A tensor of `values(..)` in `dtype`.
pub fn tensor(shape: &[usize], seed: u64, scale: f32, dtype: DType) -> Tensor {
    Tensor::from_vec(values(len(shape), seed, scale), shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .unwrap()
}

/// The model of `SHAPES` in `dtype`.
pub fn varmap(dtype: DType) -> VarMap {
    named_varmap(SHAPES, dtype)
}

pub fn named_varmap(shapes: &[(&str, &[usize])], dtype: DType) -> VarMap {
    let map = VarMap::new();
    {
        let mut data = map.data().lock().unwrap();
        for (i, (name, shape)) in shapes.iter().enumerate() {
            let var = Var::from_tensor(&tensor(shape, i as u64 + 1, 0.1, dtype)).unwrap();
            data.insert(name.to_string(), var);
        }
    }
    map
}

/// The Vars of a map in name order.
pub fn sorted_vars(map: &VarMap) -> Vec<(String, Var)> {
    let mut v: Vec<(String, Var)> = map
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Gradients for step `step` of every Var whose index `keep` accepts.
pub fn grads(vars: &[(String, Var)], step: u64, keep: impl Fn(usize) -> bool) -> GradStore {
    let mut store = GradStore::default();
    for (i, (_, var)) in vars.iter().enumerate() {
        if keep(i) {
            let g = tensor(var.dims(), 1000 * step + i as u64, 0.05, var.dtype());
            store.insert(var, g);
        }
    }
    store
}

/// A model's values as the reference steps them.
#[derive(Clone, Debug, PartialEq)]
pub enum Buf {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Buf {
    pub fn of(t: &Tensor) -> Buf {
        let t = t.flatten_all().unwrap();
        match t.dtype() {
            DType::F32 => Buf::F32(t.to_vec1().unwrap()),
            DType::BF16 => Buf::Bf16(t.to_vec1().unwrap()),
            DType::F16 => Buf::F16(t.to_vec1().unwrap()),
            d => panic!("{d:?}"),
        }
    }

    /// The bits, so that NaNs and signed zeros compare exactly.
    pub fn bits(&self) -> Vec<u32> {
        match self {
            Buf::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
            Buf::Bf16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
            Buf::F16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
        }
    }

    fn params(&mut self) -> ParamsIn<'_> {
        match self {
            Buf::F32(v) => ParamsIn::F32(v),
            Buf::Bf16(v) => ParamsIn::Bf16(v),
            Buf::F16(v) => ParamsIn::F16(v),
        }
    }

    fn grads(&self) -> Grads<'_> {
        match self {
            Buf::F32(v) => Grads::F32(v),
            Buf::Bf16(v) => Grads::Bf16(v),
            Buf::F16(v) => Grads::F16(v),
        }
    }
}

/// The bits of every Var.
pub fn var_bits(vars: &[(String, Var)]) -> Vec<Vec<u32>> {
    vars.iter().map(|(_, v)| Buf::of(v).bits()).collect()
}

/// lamb-std set up as `Config` says, with the layers of `vars` (the decay split's groups
/// both used, as in `SHAPES`).
pub fn reference(vars: &[(String, Var)], config: &Config) -> Lamb {
    let mut opt = if config.decay_split {
        Lamb::with_decay_split(config.lamb).unwrap()
    } else {
        Lamb::new(config.lamb).unwrap()
    };
    for g in 0..opt.group_count() {
        opt.set_precision(lamb_std::GroupId(g), config.precision)
            .unwrap();
    }
    opt.set_max_grad_norm(config.max_grad_norm).unwrap();
    opt.set_schedule(config.schedule).unwrap();
    opt.set_threads(config.threads).unwrap();
    for (name, var) in vars {
        if config.decay_split {
            opt.add_param(name.clone(), var.dims()).unwrap();
        } else {
            opt.add_layer(name.clone(), var.elem_count()).unwrap();
        }
    }
    opt
}

/// One reference step on `params` with the gradients in `grads` (`None`: no gradient).
pub fn reference_step(
    opt: &mut Lamb,
    params: &mut [Buf],
    grads: &[Option<Buf>],
    inv_loss_scale: f32,
) -> lamb_std::StepReport {
    let mut p: Vec<ParamsIn<'_>> = params.iter_mut().map(Buf::params).collect();
    let g: Vec<Option<Grads<'_>>> = grads.iter().map(|g| g.as_ref().map(Buf::grads)).collect();
    opt.step_mixed_scaled_some(&mut p, &g, inv_loss_scale)
        .unwrap()
}

/// The gradients of `store` for `vars`, as the reference takes them.
pub fn grad_bufs(vars: &[(String, Var)], store: &GradStore) -> Vec<Option<Buf>> {
    vars.iter()
        .map(|(_, v)| store.get(v).map(Buf::of))
        .collect()
}

/// Every layer's registration, moments (as stored), master copy and last report, and the
/// step counter, printed (`{:?}` of floats round-trips exactly).
pub fn state(opt: &Lamb) -> Vec<String> {
    let mut out: Vec<String> = (0..opt.layer_count())
        .map(|i| format!("{:?}", opt.layer(lamb_std::LayerId(i)).unwrap()))
        .collect();
    out.push(format!("step {}", opt.steps()));
    out
}
