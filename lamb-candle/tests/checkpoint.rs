//! Checkpoints: a run saved and resumed (into a fresh optimizer over a fresh model) goes on
//! bit for bit as the one that never stopped; the Var names are in the file, and another
//! model's checkpoint is refused with the optimizer unchanged.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use common::*;
use lamb_candle::{Config, Lamb};
use lamb_std::lamb_core::{LambConfig, Schedule};
use lamb_std::{Precision, StateFormat};

fn config() -> Config {
    Config {
        lamb: LambConfig::timm(),
        max_grad_norm: Some(1.0),
        schedule: Schedule::WarmupCosine {
            warmup: 2,
            total: 20,
            end: 0.1,
        },
        threads: 2,
        precision: Precision {
            moments: StateFormat::Q8,
            compact_min_len: 1024,
            ..Precision::default()
        },
        ..Config::default()
    }
}

/// A copy of `map` (the model a resumed run reloads).
fn copy(map: &VarMap) -> VarMap {
    let out = VarMap::new();
    {
        let mut data = out.data().lock().unwrap();
        for (name, var) in sorted_vars(map) {
            let t = var.as_tensor().copy().unwrap();
            data.insert(name, candle_core::Var::from_tensor(&t).unwrap());
        }
    }
    out
}

#[test]
fn a_resumed_run_is_bit_identical() {
    for dtype in [DType::F32, DType::BF16] {
        let map = varmap(dtype);
        let vars = sorted_vars(&map);
        let mut opt = Lamb::from_varmap(&map, config()).unwrap();
        for step in 0..3 {
            let _ = opt
                .step_report(&grads(&vars, step, |i| step != 1 || i != 0))
                .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opt.safetensors");
        opt.save(&path).unwrap();

        let map2 = copy(&map);
        let vars2 = sorted_vars(&map2);
        let mut resumed = Lamb::from_varmap(&map2, config()).unwrap();
        resumed.load(&path).unwrap();
        assert_eq!(resumed.inner().steps(), 3);
        // The file names the Vars.
        let bytes = std::fs::read(&path).unwrap();
        assert!(String::from_utf8_lossy(&bytes).contains(r#"\"name\":\"enc.weight\""#));
        for step in 3..6 {
            let a = opt.step_report(&grads(&vars, step, |_| true)).unwrap();
            let b = resumed.step_report(&grads(&vars2, step, |_| true)).unwrap();
            assert_eq!(a, b);
            assert_eq!(var_bits(&vars), var_bits(&vars2), "{dtype:?} step {step}");
        }
        // Checkpoints carry no loss-scale or learning-rate state of the adapter: equal
        // state means equal futures.
        assert_eq!(state(opt.inner()), state(resumed.inner()));
    }
}

#[test]
fn another_models_checkpoint_is_refused_and_changes_nothing() {
    let map = varmap(DType::F32);
    let vars = sorted_vars(&map);
    let mut opt = Lamb::from_varmap(&map, config()).unwrap();
    let _ = opt.step_report(&grads(&vars, 0, |_| true)).unwrap();
    let bytes = opt.to_checkpoint_bytes().unwrap();

    // Same sizes, one Var renamed.
    let mut shapes = SHAPES.to_vec();
    shapes[4].0 = "norm.scale";
    let other_map = named_varmap(&shapes, DType::F32);
    let mut other = Lamb::from_varmap(&other_map, config()).unwrap();
    let other_vars = sorted_vars(&other_map);
    let _ = other.step_report(&grads(&other_vars, 5, |_| true)).unwrap();
    let before = state(other.inner());
    let e = other.load_checkpoint_bytes(&bytes).unwrap_err();
    assert!(e.to_string().contains("norm.weight"), "{e}");
    assert_eq!(state(other.inner()), before);
}

#[test]
fn a_candle_nn_model_trains_with_backward_step() {
    // The few lines a candle user writes: a VarMap, candle_nn layers, backward_step.
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let l1 = candle_nn::linear(8, 16, vb.pp("l1")).unwrap();
    let l2 = candle_nn::linear(16, 1, vb.pp("l2")).unwrap();
    let mut opt = Lamb::from_varmap(
        &map,
        Config::new(LambConfig {
            lr: 0.02,
            ..LambConfig::timm()
        }),
    )
    .unwrap();
    let names: Vec<&str> = opt.vars().map(|(n, _)| n).collect();
    assert_eq!(names, ["l1.bias", "l1.weight", "l2.bias", "l2.weight"]);
    assert_eq!(opt.inner().group_count(), 2);
    let x = Tensor::from_vec(values(64 * 8, 1, 1.0), (64, 8), &Device::Cpu).unwrap();
    let y = x.sum_keepdim(1).unwrap().tanh().unwrap();
    let loss_of = || {
        let h = l1.forward(&x).unwrap().relu().unwrap();
        candle_nn::loss::mse(&l2.forward(&h).unwrap(), &y).unwrap()
    };
    let first = loss_of().to_scalar::<f32>().unwrap();
    for _ in 0..200 {
        opt.backward_step(&loss_of()).unwrap();
    }
    let last = loss_of().to_scalar::<f32>().unwrap();
    assert!(last < first * 0.2, "loss {first} -> {last}");
    assert_eq!(opt.inner().steps(), 200);
}
