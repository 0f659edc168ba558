//! PyTorch interop of checkpoints, with files made by the Python `safetensors` and
//! `torch` packages from a real timm `Lamb` (`scripts/checkpoint/generate.py`, data in
//! `tests/data/checkpoint/`):
//!
//! - `timm_state.safetensors`, timm's `state_dict()` after 3 steps of a small model, loads
//!   with [`Lamb::load_torch_state`] (moments bit for bit, hyperparameters mapped), and lamb
//!   then continues steps 4 and 5 as timm did;
//! - `lamb_from_timm.safetensors`, lamb's checkpoint right after that load, still loads (the
//!   format stays readable) and holds exactly that state. `generate.py --verify` loads the
//!   same file into a timm `Lamb` and checks that timm continues bit for bit.
//!
//! `LAMB_UPDATE_CHECKPOINT_DATA=1` rewrites `lamb_from_timm.safetensors` (step 2 of
//! `scripts/checkpoint/generate.sh`).

use std::collections::HashMap;
use std::path::PathBuf;

use lamb_std::lamb_core::{Adaptation, LambConfig};
use lamb_std::{GroupId, Lamb, LayerId};
use safetensors::{Dtype, SafeTensors};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/checkpoint")
        .join(name)
}

/// Tensors by name: (shape, values).
type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// The f32 tensors of a safetensors file, and its metadata.
fn read_f32(name: &str) -> (Tensors, HashMap<String, String>) {
    let bytes = std::fs::read(data(name)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, md) = SafeTensors::read_metadata(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            assert_eq!(t.dtype(), Dtype::F32, "{n}");
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (n, (t.shape().to_vec(), v))
        })
        .collect();
    (tensors, md.metadata().clone().unwrap_or_default())
}

struct Run {
    k: u64,
    n: u64,
    names: Vec<String>,
    t: Tensors,
}

impl Run {
    fn load() -> Run {
        let (t, md) = read_f32("timm_run.safetensors");
        Run {
            k: md["K"].parse().unwrap(),
            n: md["N"].parse().unwrap(),
            names: serde_json::from_str(&md["names"]).unwrap(),
            t,
        }
    }
    fn get(&self, key: &str) -> &[f32] {
        &self.t[key].1
    }
}

/// The lamb side of the Python script's model: timm's defaults and decay split, built in the
/// model's parameter order (decay first here, where timm lists no_decay first: the mapping
/// is by name).
fn optimizer(run: &Run) -> Lamb {
    let mut opt = Lamb::with_decay_split(LambConfig::timm()).unwrap();
    for name in &run.names {
        opt.add_param(name.clone(), &run.t[&format!("params.{name}")].0)
            .unwrap();
    }
    opt
}

fn rel_l2(a: &[f32], e: &[f32]) -> f64 {
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(e) {
        d += (x as f64 - y as f64).powi(2);
        n += (y as f64).powi(2);
    }
    if n == 0.0 { d.sqrt() } else { (d / n).sqrt() }
}

/// The loaded moments are the timm state's, bit for bit, each under its parameter's name.
fn check_loaded_moments(opt: &Lamb) {
    let (state, md) = read_f32("timm_state.safetensors");
    let groups: serde_json::Value = serde_json::from_str(&md["param_groups"]).unwrap();
    for g in groups.as_array().unwrap() {
        let ids = g["params"].as_array().unwrap();
        let names = g["param_names"].as_array().unwrap();
        for (id, name) in ids.iter().zip(names) {
            let l = opt
                .layer(opt.layer_id(name.as_str().unwrap()).unwrap())
                .unwrap();
            assert_eq!(l.m, state[&format!("state.{id}.exp_avg")].1, "{name}");
            assert_eq!(l.v, state[&format!("state.{id}.exp_avg_sq")].1, "{name}");
        }
    }
}

/// timm's hyperparameters, mapped onto the two groups and the clipping.
fn check_mapped_hyperparameters(opt: &Lamb) {
    let decay = opt.group(GroupId(0)).unwrap();
    let no_decay = opt.group(GroupId(1)).unwrap();
    assert_eq!(
        (decay.name.as_str(), no_decay.name.as_str()),
        ("decay", "no_decay")
    );
    assert_eq!((decay.config.lr, decay.config.weight_decay), (1e-2, 1e-2));
    assert_eq!(
        (no_decay.config.lr, no_decay.config.weight_decay),
        (1e-2, 0.0)
    );
    // always_adapt = False: no trust ratio without weight decay, as timm.
    assert_eq!(no_decay.config.adaptation, Adaptation::WhenDecayed);
    assert!(!no_decay.config.adapts());
    assert_eq!(opt.max_grad_norm(), Some(1.0));
}

/// lamb's own checkpoint of the loaded state (`after_load`) loads to the same state as the
/// committed file, with timm's parameters.
fn check_lamb_checkpoint_of_loaded_state(run: &Run, after_load: Result<Vec<u8>, lamb_std::Error>) {
    let after_load = after_load.unwrap();
    let path = data("lamb_from_timm.safetensors");
    if std::env::var_os("LAMB_UPDATE_CHECKPOINT_DATA").is_some() {
        lamb_std::checkpoint::write_atomic(&path, &after_load).unwrap();
        println!("wrote {}", path.display());
    }
    let snapshot = |opt: &Lamb| {
        let mut s = vec![format!("{} {:?}", opt.steps(), opt.max_grad_norm())];
        for g in 0..opt.group_count() {
            s.push(format!("{:?}", opt.group(GroupId(g)).unwrap()));
        }
        for i in 0..opt.layer_count() {
            let l = opt.layer(LayerId(i)).unwrap();
            s.push(format!("{} {:?} {:?}", l.name, l.m, l.v));
        }
        s
    };
    let mut expected = optimizer(run);
    expected.load_checkpoint_bytes(&after_load).unwrap();
    let mut committed = optimizer(run);
    let mut p: Vec<Vec<f32>> = run.names.iter().map(|_| Vec::new()).collect();
    for (i, x) in p.iter_mut().enumerate() {
        *x = vec![0.0; committed.layer(LayerId(i)).unwrap().len];
    }
    let mut pp: Vec<&mut [f32]> = p.iter_mut().map(|x| x.as_mut_slice()).collect();
    committed.load_with_params(&path, &mut pp).unwrap();
    assert_eq!(snapshot(&committed), snapshot(&expected));
    for (i, name) in run.names.iter().enumerate() {
        assert_eq!(p[i], run.get(&format!("params.{name}")), "{name}");
    }
}

#[test]
fn a_timm_state_loads_and_lamb_continues_as_timm_did() {
    let run = Run::load();
    let mut opt = optimizer(&run);
    opt.load_torch_state(data("timm_state.safetensors"))
        .unwrap();
    assert_eq!(opt.steps(), run.k);

    check_loaded_moments(&opt);
    check_mapped_hyperparameters(&opt);

    // Steps K+1..N with timm's gradients from timm's params after K steps.
    let mut params: Vec<Vec<f32>> = run
        .names
        .iter()
        .map(|n| run.get(&format!("params.{n}")).to_vec())
        .collect();
    let after_load = opt
        .to_checkpoint_bytes_with_params(&params.iter().map(|p| p.as_slice()).collect::<Vec<_>>());
    for t in run.k + 1..=run.n {
        let g: Vec<&[f32]> = run
            .names
            .iter()
            .map(|n| run.get(&format!("grad.{t}.{n}")))
            .collect();
        let mut p: Vec<&mut [f32]> = params.iter_mut().map(|x| x.as_mut_slice()).collect();
        assert!(opt.step(&mut p, &g).unwrap().applied);
    }
    // Same tolerances as lamb-core's timm reference test (tests/reference.rs).
    for (i, name) in run.names.iter().enumerate() {
        let l = opt.layer(LayerId(i)).unwrap();
        let errs = [
            rel_l2(&params[i], run.get(&format!("final.{name}"))),
            rel_l2(l.m, run.get(&format!("final_exp_avg.{name}"))),
            rel_l2(l.v, run.get(&format!("final_exp_avg_sq.{name}"))),
        ];
        println!(
            "{name:12} params {:.1e}  exp_avg {:.1e}  exp_avg_sq {:.1e}",
            errs[0], errs[1], errs[2]
        );
        assert!(
            errs[0] <= 2e-6 && errs[1] <= 1e-5 && errs[2] <= 1e-5,
            "{name}: {errs:?}"
        );
    }

    check_lamb_checkpoint_of_loaded_state(&run, after_load);
}

/// A PyTorch state whose moments cannot be lamb's (a NaN, a negative second moment) is
/// refused by the moment check, naming the tensor and the element, with nothing loaded.
#[test]
fn a_torch_state_with_bad_moments_is_refused_by_name() {
    let run = Run::load();
    let clean = std::fs::read(data("timm_state.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&clean).unwrap();
    for (tensor, value, want) in [
        (
            "state.0.exp_avg_sq",
            -1.0f32,
            "exp_avg_sq[2] = -1.0: must be finite and >= 0",
        ),
        (
            "state.0.exp_avg",
            f32::NAN,
            "exp_avg[2] = NaN: must be finite",
        ),
    ] {
        let data = st.tensor(tensor).unwrap().data();
        let at = data.as_ptr() as usize - clean.as_ptr() as usize + 2 * 4;
        let mut bytes = clean.clone();
        bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
        let mut opt = optimizer(&run);
        let e = opt.load_torch_state_bytes(&bytes).unwrap_err().to_string();
        assert!(e.contains(want), "{tensor}: {e}");
        assert_eq!(opt.steps(), 0, "{tensor}: nothing loaded");
    }
}
