//! Every bad input is an `Err` naming the Var, with nothing written: no Var, no moment, no
//! step counter changes, and nothing hangs.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor, Var};
use candle_nn::{Optimizer, VarMap};
use common::*;
use lamb_candle::{Config, Error, Lamb};
use lamb_std::lamb_core::{LambConfig, NonFinite};

/// A model, its optimizer after one good step, and a snapshot to compare with.
struct Setup {
    vars: Vec<(String, Var)>,
    opt: Lamb,
    _map: VarMap,
    broken: Option<&'static str>,
}

impl Setup {
    fn new(non_finite: NonFinite) -> Setup {
        let map = varmap(DType::F32);
        let vars = sorted_vars(&map);
        let config = Config {
            lamb: LambConfig {
                non_finite,
                ..LambConfig::default()
            },
            threads: 2,
            ..Config::default()
        };
        let mut opt = Lamb::from_varmap(&map, config).unwrap();
        let _ = opt.step_report(&grads(&vars, 0, |_| true)).unwrap();
        Setup {
            vars,
            opt,
            _map: map,
            broken: None,
        }
    }

    fn snapshot(&self) -> (Vec<Vec<u32>>, Vec<String>) {
        // A Var whose storage was broken on purpose cannot be read (candle would panic).
        let readable: Vec<(String, Var)> = self
            .vars
            .iter()
            .filter(|(n, _)| Some(n.as_str()) != self.broken)
            .cloned()
            .collect();
        (var_bits(&readable), state(self.opt.inner()))
    }

    /// Steps with `store`, expecting an `Err` whose text contains `want`, then checks that
    /// nothing changed and that a good step still works.
    fn refuses(&mut self, store: &GradStore, want: &str) -> Error {
        let before = self.snapshot();
        let e = self.opt.step_report(store).unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
        assert!(self.snapshot() == before, "{e}: something was written");
        // Through the candle trait: the same text.
        let c = Optimizer::step(&mut self.opt, store).unwrap_err();
        assert!(c.to_string().contains(want), "{c}");
        assert!(self.snapshot() == before);
        e
    }

    fn var(&self, name: &str) -> &Var {
        &self.vars.iter().find(|(n, _)| n == name).unwrap().1
    }
}

#[test]
fn f64_integer_and_f16_without_master_vars_are_refused_at_construction() {
    let ok = Var::ones(4, DType::F32, &Device::Cpu).unwrap();
    for (dtype, config, want) in [
        (DType::F64, Config::default(), "Var 'bad': its dtype is f64"),
        (DType::U32, Config::default(), "Var 'bad': its dtype is u32"),
        (
            DType::F16,
            Config {
                precision: lamb_std::Precision {
                    master: false,
                    ..Default::default()
                },
                ..Config::default()
            },
            "Var 'bad': f16 Vars need an f32 master copy",
        ),
    ] {
        let bad = Var::ones((2, 3), dtype, &Device::Cpu).unwrap();
        let vars = vec![("ok".to_string(), ok.clone()), ("bad".to_string(), bad)];
        let e = Lamb::from_named_vars(vars, config).err().unwrap();
        assert!(e.to_string().contains(want), "{e}");
    }
    // Through the candle trait, the Var is named by its position.
    let f64_var = Var::ones(3, DType::F64, &Device::Cpu).unwrap();
    let e = Lamb::new(vec![ok, f64_var], Config::default())
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("Var 'var.1': its dtype is f64"),
        "{e}"
    );
}

#[test]
fn two_vars_sharing_a_storage_are_refused() {
    let a = Var::ones((3, 3), DType::F32, &Device::Cpu).unwrap();
    let b = Var::ones(5, DType::F32, &Device::Cpu).unwrap();
    // `Var::from_tensor` of a Var's tensor is that Var again.
    let alias = Var::from_tensor(a.as_tensor()).unwrap();
    let e = Lamb::new(vec![a, b, alias], Config::default())
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("Vars 'var.0' and 'var.2' share one storage"),
        "{e}"
    );
}

#[test]
fn a_bad_loss_scale_is_refused() {
    let a = Var::ones(3, DType::F32, &Device::Cpu).unwrap();
    for s in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let config = Config {
            loss_scale: s,
            ..Config::default()
        };
        let e = Lamb::new(vec![a.clone()], config).err().unwrap();
        assert!(e.to_string().contains("loss scale"), "{e}");
    }
    let mut opt = Lamb::new(vec![a], Config::default()).unwrap();
    assert_eq!(opt.set_loss_scale(0.0), Err(Error::LossScale(0.0)));
    assert_eq!(opt.loss_scale(), 1.0);
}

#[test]
fn a_gradient_of_the_wrong_shape_is_refused() {
    let mut s = Setup::new(NonFinite::Error);
    let mut store = grads(&s.vars, 1, |_| true);
    let w = s.var("head.weight").clone();
    store.insert(&w, tensor(&[48, 10], 9, 0.1, DType::F32));
    s.refuses(
        &store,
        "gradient of Var 'head.weight': its shape is [48, 10], the Var's [10, 48]",
    );
}

#[test]
fn a_gradient_of_the_wrong_dtype_is_refused() {
    let mut s = Setup::new(NonFinite::Error);
    let mut store = grads(&s.vars, 1, |_| true);
    let b = s.var("norm.weight").clone();
    store.insert(&b, tensor(&[48], 9, 0.1, DType::BF16));
    s.refuses(
        &store,
        "gradient of Var 'norm.weight': its dtype is bf16, the Var's f32",
    );
}

#[test]
fn a_non_contiguous_gradient_is_refused_with_the_fix() {
    let mut s = Setup::new(NonFinite::Error);
    let mut store = grads(&s.vars, 1, |_| true);
    let w = s.var("head.weight").clone();
    store.insert(&w, tensor(&[48, 10], 9, 0.1, DType::F32).t().unwrap());
    s.refuses(
        &store,
        "gradient of Var 'head.weight': it is not contiguous; pass grad.contiguous()?",
    );
}

/// Runs `f` on another thread and fails, rather than hangs, if it does not return.
fn within_a_minute<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(f()).unwrap());
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the step hung (a lock taken twice)")
}

#[test]
fn a_gradient_in_a_vars_own_storage_is_refused_without_deadlock() {
    within_a_minute(|| {
        let mut s = Setup::new(NonFinite::Error);
        let mut store = grads(&s.vars, 1, |_| true);
        let w = s.var("enc.weight").clone();
        store.insert(&w, w.as_tensor().clone());
        s.refuses(
            &store,
            "gradient of Var 'enc.weight': it is the Var's own storage",
        );
        // Another Var's storage, of the right shape.
        let mut store = grads(&s.vars, 1, |_| true);
        let (b, n) = (s.var("enc.bias").clone(), s.var("norm.weight").clone());
        store.insert(&b, n.as_tensor().clone());
        s.refuses(
            &store,
            "gradient of Var 'enc.bias': it is the storage of Var 'norm.weight'",
        );
    });
}

#[test]
fn one_gradient_for_two_vars_is_refused_without_deadlock() {
    within_a_minute(|| {
        let mut s = Setup::new(NonFinite::Error);
        let mut store = grads(&s.vars, 1, |_| true);
        let (b, n) = (s.var("enc.bias").clone(), s.var("norm.weight").clone());
        let shared = store.get(&b).unwrap().clone();
        store.insert(&n, shared);
        s.refuses(
            &store,
            "the gradients of layers 'enc.bias' and 'norm.weight' share memory",
        );
    });
}

/// Replaces a Var's storage in place, as a careless in-place op could.
struct Replace(CpuStorage);

impl InplaceOp1 for Replace {
    fn name(&self) -> &'static str {
        "replace"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        *storage = self.0.clone();
        Ok(())
    }
}

#[test]
fn a_var_whose_storage_changed_since_construction_is_refused() {
    for (replacement, want) in [
        (
            CpuStorage::F32(vec![0.5; 100]),
            "Var 'head.weight': its storage changed since the optimizer was built: it holds 100 f32 elements, the Var needs 480 f32 from offset 0",
        ),
        (
            CpuStorage::BF16(vec![Default::default(); 480]),
            "Var 'head.weight': its storage changed since the optimizer was built: it holds 480 bf16 elements, the Var needs 480 f32",
        ),
    ] {
        let mut s = Setup::new(NonFinite::Error);
        let store = grads(&s.vars, 1, |_| true);
        s.var("head.weight")
            .inplace_op1(&Replace(replacement))
            .unwrap();
        s.broken = Some("head.weight");
        // head.weight is the fourth Var: the three before it were locked when it was found.
        s.refuses(&store, want);
    }
}

#[test]
fn a_non_finite_gradient_is_an_error_or_a_skip_and_writes_nothing() {
    let nan_grads = |s: &Setup| {
        let mut store = grads(&s.vars, 1, |_| true);
        let mut g = values(480, 3, 0.1);
        g[17] = f32::NAN;
        let g = Tensor::from_vec(g, (10, 48), &Device::Cpu).unwrap();
        store.insert(s.var("head.weight"), g);
        store
    };
    let mut s = Setup::new(NonFinite::Error);
    s.refuses(&nan_grads(&s), "layer 'head.weight' (#3): non-finite value");

    let mut s = Setup::new(NonFinite::Skip);
    let store = nan_grads(&s);
    let before = s.snapshot();
    let r = s.opt.step_report(&store).unwrap();
    assert!(!r.applied, "{r:?}");
    assert_eq!(r.skipped.unwrap().name, "head.weight");
    assert!(!s.opt.last_report().unwrap().applied);
    assert!(s.snapshot() == before);
}

#[test]
fn an_invalid_learning_rate_stops_steps_until_a_valid_one() {
    let mut s = Setup::new(NonFinite::Error);
    let store = grads(&s.vars, 1, |_| true);
    s.opt.set_learning_rate(f64::NAN);
    assert!(s.opt.learning_rate().is_nan());
    s.refuses(
        &store,
        "learning rate NaN (from set_learning_rate) must be finite",
    );
    s.opt.set_learning_rate(-1.0);
    s.refuses(&store, "learning rate -1.0");
    s.opt.set_learning_rate(3e-3);
    assert_eq!(s.opt.learning_rate(), 3e-3);
    assert!(s.opt.step_report(&store).unwrap().applied);
    for g in 0..s.opt.inner().group_count() {
        let group = s.opt.inner().group(lamb_std::GroupId(g)).unwrap();
        assert_eq!(group.config.lr, 3e-3, "{}", group.name);
    }
}

#[test]
fn an_empty_optimizer_steps_without_error() {
    let mut opt = Lamb::empty(Config::default()).unwrap();
    opt.step(&GradStore::default()).unwrap();
    assert!(!opt.step_report(&GradStore::default()).unwrap().applied);
}
