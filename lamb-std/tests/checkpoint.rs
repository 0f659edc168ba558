//! Checkpoints: exact resume for every state precision, refusal of every
//! mismatch and of every corruption, with the optimizer left untouched, and the PyTorch
//! loader's mapping on hand-made state files. The crash test is `checkpoint_crash.rs`, the
//! interop test with a real timm file `checkpoint_torch.rs`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

mod common;

use lamb_std::lamb_core::half::bf16;
use lamb_std::lamb_core::layer::{Grads, Rounding};
use lamb_std::lamb_core::{LambConfig, Schedule};
use lamb_std::{Error, GroupId, Lamb, LayerId, ParamsIn, Precision, StateFormat, StateView};
use rand::distr::Uniform;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------------------------------
// A small model, its gradients, and a full snapshot of everything a step depends on.

/// `n` values uniform in [−scale, scale).
fn uniform(rng: &mut SmallRng, n: usize, scale: f32) -> Vec<f32> {
    let dist = Uniform::new(-scale, scale).unwrap();
    (0..n).map(|_| rng.sample(dist)).collect()
}

/// (name, shape): with the decay split, 2-d tensors decay, biases and 1-d tensors do not.
const SHAPES: &[(&str, &[usize])] = &[
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
enum Variant {
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

const VARIANTS: [Variant; 4] = [
    Variant::F32,
    Variant::Bf16,
    Variant::Q8Master,
    Variant::Q8Stochastic,
];

impl Variant {
    fn precision(self) -> Precision {
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
    fn half_params(self) -> bool {
        matches!(self, Variant::Q8Master | Variant::Q8Stochastic)
    }
}

fn optimizer(variant: Variant, threads: usize) -> Lamb {
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
enum Model {
    F32(Vec<Vec<f32>>),
    Bf16(Vec<Vec<bf16>>),
}

impl Model {
    fn new(variant: Variant) -> Model {
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

    fn bits(&self) -> Vec<u32> {
        match self {
            Model::F32(p) => p.iter().flatten().map(|x| x.to_bits()).collect(),
            Model::Bf16(p) => p.iter().flatten().map(|x| x.to_bits() as u32).collect(),
        }
    }
}

/// Gradients of step `t` (1-based), the same in every run.
fn grads(t: u64) -> Vec<Vec<f32>> {
    let mut rng = SmallRng::seed_from_u64(1000 + t);
    SHAPES
        .iter()
        .map(|(_, s)| uniform(&mut rng, s.iter().product(), 0.02))
        .collect()
}

fn step(opt: &mut Lamb, model: &mut Model) {
    let g = grads(opt.steps() + 1);
    let gg: Vec<Grads<'_>> = g.iter().map(|x| Grads::F32(x)).collect();
    let mut pp: Vec<ParamsIn<'_>> = match model {
        Model::F32(p) => p.iter_mut().map(|x| ParamsIn::F32(x)).collect(),
        Model::Bf16(p) => p.iter_mut().map(|x| ParamsIn::Bf16(x)).collect(),
    };
    let report = opt.step_mixed(&mut pp, &gg).unwrap();
    assert!(report.applied);
}

/// Every bit of optimizer state: step, settings, every group, every layer's stored moments
/// (whatever their format) and master copy.
fn snapshot(opt: &Lamb) -> Vec<String> {
    let mut out = vec![
        format!("step {}", opt.steps()),
        format!("clip {:?}", opt.max_grad_norm().map(f64::to_bits)),
        format!("schedule {:?}", opt.schedule()),
    ];
    for g in 0..opt.group_count() {
        out.push(format!("group {:?}", opt.group(GroupId(g)).unwrap()));
    }
    for i in 0..opt.layer_count() {
        let l = opt.layer(LayerId(i)).unwrap();
        let f = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let b = |x: &[bf16]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        out.push(format!("layer {} {} {:?}", l.name, l.len, l.group));
        out.push(match l.state {
            StateView::F32 { m, v } => format!("f32 {:?} {:?}", f(m), f(v)),
            StateView::Bf16 { m, v } => format!("bf16 {:?} {:?}", b(m), b(v)),
            StateView::Q8 {
                m,
                v,
                m_absmax,
                v_absmax,
            } => format!("q8 {m:?} {v:?} {:?} {:?}", f(m_absmax), f(v_absmax)),
        });
        out.push(format!("master {:?}", l.master.map(f)));
    }
    out
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("checkpoint-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Saves optimizer and model (f32 params inside the checkpoint, half params beside it, as
/// a model checkpoint would hold them).
fn save(opt: &Lamb, model: &Model, path: &std::path::Path) -> Option<Model> {
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

fn load(
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

// ---------------------------------------------------------------------------------------
// (1) Resume.

/// N steps straight equal k steps, save, drop everything, load into a fresh optimizer and
/// N − k steps: bit for bit, params and state, for every state precision, with the resumed
/// run on another thread count.
#[test]
fn resume_is_bit_identical_to_an_uninterrupted_run() {
    const N: u64 = 6;
    let dir = temp_dir("resume");
    for variant in VARIANTS {
        let mut straight = optimizer(variant, 1);
        let mut straight_model = Model::new(variant);
        for _ in 0..N {
            step(&mut straight, &mut straight_model);
        }
        for k in [0, 1, 3, N] {
            let path = dir.join(format!("{variant:?}-{k}.safetensors"));
            let (saved_state, saved_model, kept) = {
                let mut opt = optimizer(variant, 1);
                let mut model = Model::new(variant);
                for _ in 0..k {
                    step(&mut opt, &mut model);
                }
                let kept = save(&opt, &model, &path);
                (snapshot(&opt), model.bits(), kept)
            }; // the first run is dropped here
            let (mut resumed, mut model) = load(variant, 2, &path, kept);
            assert_eq!(
                snapshot(&resumed),
                saved_state,
                "{variant:?}, k = {k}: load"
            );
            assert_eq!(model.bits(), saved_model, "{variant:?}, k = {k}: params");
            for _ in k..N {
                step(&mut resumed, &mut model);
            }
            assert_eq!(
                snapshot(&resumed),
                snapshot(&straight),
                "{variant:?}, k = {k}: state after {N} steps"
            );
            assert_eq!(
                model.bits(),
                straight_model.bits(),
                "{variant:?}, k = {k}: params after {N} steps"
            );
        }
        // The state is really in the format the variant asks for.
        let big = straight.layer(LayerId(0)).unwrap().state;
        match variant {
            Variant::F32 => assert!(matches!(big, StateView::F32 { .. })),
            Variant::Bf16 => assert!(matches!(big, StateView::Bf16 { .. })),
            _ => assert!(matches!(big, StateView::Q8 { .. })),
        }
        assert_eq!(
            straight.layer(LayerId(0)).unwrap().master.is_some(),
            variant == Variant::Q8Master
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bytes_and_file_round_trip_and_saving_twice_replaces() {
    let dir = temp_dir("bytes");
    let mut opt = optimizer(Variant::F32, 1);
    let mut model = Model::new(Variant::F32);
    step(&mut opt, &mut model);
    let path = dir.join("ckpt.safetensors");
    opt.save(&path).unwrap();
    let first = std::fs::read(&path).unwrap();
    // Same state, same decoded contents from the file and from the bytes.
    let bytes = opt.to_checkpoint_bytes().unwrap();
    let mut a = optimizer(Variant::F32, 1);
    a.load_checkpoint_bytes(&bytes).unwrap();
    let mut b = optimizer(Variant::F32, 1);
    b.load(&path).unwrap();
    assert_eq!(snapshot(&a), snapshot(&opt));
    assert_eq!(snapshot(&b), snapshot(&opt));
    // A second save replaces the first, and leaves no temporary file.
    step(&mut opt, &mut model);
    opt.save(&path).unwrap();
    assert_ne!(std::fs::read(&path).unwrap(), first);
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["ckpt.safetensors"]);
    b.load(&path).unwrap();
    assert_eq!(snapshot(&b), snapshot(&opt));
    // A file without parameters does not satisfy load_with_params.
    let mut p: Vec<Vec<f32>> = SHAPES
        .iter()
        .map(|(_, s)| vec![0.0; s.iter().product()])
        .collect();
    let mut pp: Vec<&mut [f32]> = p.iter_mut().map(|x| x.as_mut_slice()).collect();
    let e = b.load_with_params(&path, &mut pp).unwrap_err();
    assert!(e.to_string().contains("holds no parameters"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn loading_restores_hyperparameters_and_clears_poisoning() {
    let mut opt = optimizer(Variant::F32, 1);
    let mut model = Model::new(Variant::F32);
    step(&mut opt, &mut model);
    opt.set_group(
        GroupId(1),
        LambConfig {
            eps: 1e-8,
            param_norm_max: 10.0,
            ..opt.group(GroupId(1)).unwrap().config
        },
        0.25,
    )
    .unwrap();
    let bytes = opt.to_checkpoint_bytes().unwrap();
    let mut other = optimizer(Variant::F32, 1);
    other.set_max_grad_norm(None).unwrap();
    other.set_schedule(Schedule::Constant).unwrap();
    other.load_checkpoint_bytes(&bytes).unwrap();
    assert_eq!(
        other.group(GroupId(1)).unwrap(),
        opt.group(GroupId(1)).unwrap()
    );
    assert_eq!(other.max_grad_norm(), Some(1.0));
    assert_eq!(other.schedule(), opt.schedule());
    assert_eq!(snapshot(&other), snapshot(&opt));
    assert!(other.layer(LayerId(0)).unwrap().last.is_none());
}

/// An invalid group cannot be saved because it cannot exist: `Lamb::new` refuses it (as do
/// `add_group`, `set_group` and `set_lr`), so every optimizer that exists can be saved.
#[test]
fn saving_an_invalid_group_is_refused() {
    let e = Lamb::new(LambConfig {
        lr: f64::NAN,
        ..LambConfig::paper()
    })
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "group 'default': invalid lr = NaN: must be finite and >= 0"
    );
    let ok = Lamb::new(LambConfig::paper()).unwrap();
    let e = ok.to_checkpoint_bytes_with_params(&[&[1.0]]).unwrap_err();
    assert!(
        e.to_string()
            .contains("got 1 parameter tensors, the optimizer has 0 layers"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------
// Mismatches: refused with a message that says what differs, the optimizer unchanged.

/// Loads `bytes` into `opt`, expects an error containing `want`, and checks that nothing
/// changed.
fn refused(opt: &mut Lamb, bytes: &[u8], want: &str) {
    let before = snapshot(opt);
    let e = opt.load_checkpoint_bytes(bytes).unwrap_err();
    assert!(matches!(e, Error::Checkpoint { .. }), "{e:?}");
    assert!(e.to_string().contains(want), "expected {want:?} in: {e}");
    assert!(
        snapshot(opt) == before,
        "a refused load changed the optimizer"
    );
}

fn stepped(opt: &mut Lamb) {
    let mut p: Vec<Vec<f32>> = (0..opt.layer_count())
        .map(|i| vec![0.5; opt.layer(LayerId(i)).unwrap().len])
        .collect();
    let g: Vec<Vec<f32>> = p.iter().map(|x| vec![0.01; x.len()]).collect();
    let mut pp: Vec<&mut [f32]> = p.iter_mut().map(|x| x.as_mut_slice()).collect();
    let gg: Vec<&[f32]> = g.iter().map(|x| x.as_slice()).collect();
    let _ = opt.step(&mut pp, &gg).unwrap();
}

#[test]
fn another_model_is_refused_saying_what_differs() {
    let mut saved = Lamb::new(LambConfig::paper()).unwrap();
    saved.add_layer("encoder.3.ffn.w1", 2359296 / 4096).unwrap();
    saved.add_layer("encoder.3.ffn.b1", 3).unwrap();
    let g2 = saved.add_group("slow", LambConfig::paper(), 0.1).unwrap();
    saved.add_layer_to(g2, "head", 2).unwrap();
    stepped(&mut saved);
    let bytes = saved.to_checkpoint_bytes().unwrap();

    let build = |layers: &[(&str, usize, usize)], groups: &[&str]| {
        let mut opt = Lamb::new(LambConfig::paper()).unwrap();
        for g in &groups[1..] {
            opt.add_group(*g, LambConfig::paper(), 0.1).unwrap();
        }
        for &(name, len, g) in layers {
            opt.add_layer_to(GroupId(g), name, len).unwrap();
        }
        // A state to keep (where every group has a layer: a step needs that).
        if (0..opt.group_count())
            .all(|g| (0..opt.layer_count()).any(|i| opt.layer(LayerId(i)).unwrap().group.0 == g))
        {
            stepped(&mut opt);
        }
        opt
    };
    let ok = [
        ("encoder.3.ffn.w1", 576, 0),
        ("encoder.3.ffn.b1", 3, 0),
        ("head", 2, 1),
    ];
    let mut same = build(&ok, &["default", "slow"]);
    same.load_checkpoint_bytes(&bytes).unwrap();
    assert_eq!(snapshot(&same), snapshot(&saved));

    type Case<'a> = (&'a [(&'a str, usize, usize)], &'a [&'a str], &'a str);
    let cases: &[Case<'_>] = &[
        (
            &[("encoder.3.ffn.w1", 577, 0), ok[1], ok[2]],
            &["default", "slow"],
            "layer 'encoder.3.ffn.w1': checkpoint has 576 elements, model has 577",
        ),
        (
            &[ok[0], ok[1]],
            &["default", "slow"],
            "checkpoint has 3 layers, the optimizer has 2",
        ),
        (
            &[ok[0], ("encoder.3.ffn.bias", 3, 0), ok[2]],
            &["default", "slow"],
            "layer #1: checkpoint has 'encoder.3.ffn.b1', the optimizer has 'encoder.3.ffn.bias'",
        ),
        (
            &[ok[0], ("encoder.3.ffn.b1", 3, 1), ok[2]],
            &["default", "slow"],
            "layer 'encoder.3.ffn.b1': checkpoint puts it in group 'default', the optimizer in group 'slow'",
        ),
        (
            &ok,
            &["default", "fast"],
            "parameter group #1: checkpoint has 'slow', the optimizer has 'fast'",
        ),
        (
            &[ok[0], ok[1], ("head", 2, 0)],
            &["default"],
            "checkpoint has 2 parameter groups, the optimizer has 1",
        ),
    ];
    for (layers, groups, want) in cases {
        let mut opt = build(layers, groups);
        refused(&mut opt, &bytes, want);
    }

    // Another precision.
    let mut q8 = Lamb::new(LambConfig::paper()).unwrap();
    q8.set_precision(
        GroupId(0),
        Precision {
            moments: StateFormat::Q8,
            ..Precision::default()
        },
    )
    .unwrap();
    q8.add_group("slow", LambConfig::paper(), 0.1).unwrap();
    for &(name, len, g) in &ok {
        q8.add_layer_to(GroupId(g), name, len).unwrap();
    }
    refused(&mut q8, &bytes, "group 'default': checkpoint has precision");

    // Not checkpoints.
    let mut opt = build(&ok, &["default", "slow"]);
    refused(&mut opt, b"", "fewer than the 8 of the header length");
    refused(&mut opt, &[0xff; 64], "the header length field says");
    let mut other = HashMap::new();
    other.insert("format".to_string(), "pt".to_string());
    let plain = safetensors::serialize(
        [(
            "w",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &[0; 4])
                .unwrap(),
        )],
        Some(other),
    )
    .unwrap();
    refused(&mut opt, &plain, "not a lamb checkpoint: no 'lamb.format'");
}

/// Rewrites the `lamb.meta` JSON of a checkpoint and re-signs it (a well-formed file from a
/// "different writer"), to reach the checks behind the checksum.
fn resign(bytes: &[u8], edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let (_, md) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
    let mut metadata = md.metadata().clone().unwrap();
    let mut meta: serde_json::Value = serde_json::from_str(&metadata["lamb.meta"]).unwrap();
    edit(&mut meta);
    metadata.insert("lamb.meta".into(), meta.to_string());
    metadata.insert("lamb.checksum".into(), "xxh64:0000000000000000".into());
    let tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
    common::sign(safetensors::serialize(tensors, Some(metadata)).unwrap())
}

#[test]
fn bad_values_behind_a_valid_checksum_are_refused() {
    let mut saved = Lamb::new(LambConfig::paper()).unwrap();
    saved.add_layer("w", 5).unwrap();
    saved.add_layer("b", 2).unwrap();
    stepped(&mut saved);
    let bytes = saved.to_checkpoint_bytes().unwrap();
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    opt.add_layer("w", 5).unwrap();
    opt.add_layer("b", 2).unwrap();
    // The re-signing itself is faithful.
    opt.load_checkpoint_bytes(&resign(&bytes, |_| {})).unwrap();
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|m| m["groups"][0]["config"]["lr"] = "nan".into()),
            "group 'default': invalid lr = NaN",
        ),
        (
            Box::new(|m| m["groups"][0]["config"]["beta2"] = 1.0.into()),
            "group 'default': invalid beta2 = 1.0",
        ),
        (
            Box::new(|m| m["groups"][0]["lr_scale"] = "-inf".into()),
            "invalid lr_scale = -inf",
        ),
        (
            Box::new(|m| m["max_grad_norm"] = 0.0.into()),
            "invalid max_grad_norm = 0.0",
        ),
        (
            Box::new(|m| {
                m["schedule"] = serde_json::json!({"kind": "warmup_cosine", "warmup": 9, "total": 3, "end": 0.0})
            }),
            "schedule:",
        ),
        (
            Box::new(|m| m["step"] = 7.into()),
            "tensor 'state.0.step' is 1.0, but the checkpoint's step is 7",
        ),
        (
            Box::new(|m| m["layers"][0]["exp_avg"]["dtype"] = "f8".into()),
            "layer 'w': exp_avg is stored as \"f8\", which this version of lamb cannot read",
        ),
        (
            Box::new(|m| m["layers"][1]["exp_avg_sq"]["dtype"] = "bf16".into()),
            "layer 'b': checkpoint stores exp_avg_sq as \"bf16\", the optimizer as \"f32\"",
        ),
        (
            Box::new(|m| m["layers"][0]["master"] = true.into()),
            "missing tensor 'state.0.master'",
        ),
        (
            Box::new(|m| m["params"] = true.into()),
            "missing tensor 'param.w'",
        ),
        (
            Box::new(|m| m["groups"][0]["params"] = serde_json::json!([1, 0])),
            "its 'params' [1, 0]",
        ),
        (
            Box::new(|m| m["future"] = 1.into()),
            "unknown field `future`",
        ),
        (
            Box::new(|m| m["layers"][0]["len"] = (-1).into()),
            "bad 'lamb.meta'",
        ),
    ];
    for (edit, want) in cases {
        refused(&mut opt, &resign(&bytes, edit), want);
    }
    // A moment that is not finite (a tensor edit, re-signed).
    let mut nan = resign(&bytes, |_| {});
    let st = safetensors::SafeTensors::deserialize(&nan).unwrap();
    let v = st.tensor("state.1.exp_avg_sq").unwrap();
    let off = v.data().as_ptr() as usize - nan.as_ptr() as usize;
    nan[off + 4..off + 8].copy_from_slice(&(-1.0f32).to_le_bytes());
    let nan = resign(&nan, |_| {});
    refused(
        &mut opt,
        &nan,
        "layer 'b': exp_avg_sq[1] = -1.0: must be finite and >= 0",
    );
}

// ---------------------------------------------------------------------------------------
// (3) Corruption: every single-byte change and every truncation is refused.

#[test]
fn every_byte_flip_and_every_truncation_is_refused() {
    let mut saved = Lamb::with_decay_split(LambConfig::timm()).unwrap();
    saved.add_param("fc.weight", &[2, 3]).unwrap();
    saved.add_param("fc.bias", &[2]).unwrap();
    stepped(&mut saved);
    let bytes = saved
        .to_checkpoint_bytes_with_params(&[&[0.5; 6], &[0.0; 2]])
        .unwrap();
    let mut opt = Lamb::with_decay_split(LambConfig::timm()).unwrap();
    opt.add_param("fc.weight", &[2, 3]).unwrap();
    opt.add_param("fc.bias", &[2]).unwrap();
    let before = snapshot(&opt);
    opt.load_checkpoint_bytes(&bytes).unwrap();
    let loaded = snapshot(&opt);
    assert_ne!(loaded, before);
    opt.reset();

    let t = Instant::now();
    let mut buf = bytes.clone();
    let mut tried = 0usize;
    let mut reasons: HashMap<&'static str, usize> = HashMap::new();
    // Every bit of every byte, and every byte inverted.
    let masks = [0x01u8, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xff];
    for i in 0..buf.len() {
        for mask in masks {
            buf[i] ^= mask;
            let e = opt.load_checkpoint_bytes(&buf).unwrap_err().to_string();
            buf[i] ^= mask;
            tried += 1;
            let reason = if e.contains("checksum mismatch") {
                "checksum"
            } else if e.contains("safetensors") || e.contains("header") {
                "structure"
            } else {
                "metadata"
            };
            *reasons.entry(reason).or_default() += 1;
        }
    }
    assert_eq!(
        snapshot(&opt),
        snapshot(&{
            let mut o = Lamb::with_decay_split(LambConfig::timm()).unwrap();
            o.add_param("fc.weight", &[2, 3]).unwrap();
            o.add_param("fc.bias", &[2]).unwrap();
            o
        })
    );
    // Every truncation, and one byte too many.
    for n in 0..bytes.len() {
        assert!(
            opt.load_checkpoint_bytes(&bytes[..n]).is_err(),
            "truncated to {n}"
        );
        tried += 1;
    }
    let mut longer = bytes.clone();
    longer.push(b' ');
    assert!(opt.load_checkpoint_bytes(&longer).is_err());
    // Untouched, it still loads.
    opt.load_checkpoint_bytes(&bytes).unwrap();
    assert_eq!(snapshot(&opt), loaded);
    println!(
        "{} bytes: {tried} corrupted or truncated copies refused in {:.2?} ({reasons:?})",
        bytes.len(),
        t.elapsed()
    );
}

/// Hostile headers: the guard in front of the safetensors crate, and no panics.
#[test]
fn hostile_headers_are_refused_without_panicking() {
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    opt.add_layer("w", 3).unwrap();
    let file = |header: &str, data: usize| {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.resize(v.len() + data, 0);
        v
    };
    // Offsets that overflow usize in the crate's final length check (8 tensors of
    // 2^61 - 1 bytes end at 2^64 - 8, plus the header).
    let big = (1u128 << 61) - 1;
    let entries: Vec<String> = (0..8u128)
        .map(|k| {
            format!(
                r#""t{k}":{{"dtype":"U8","shape":[{big}],"data_offsets":[{},{}]}}"#,
                k * big,
                (k + 1) * big
            )
        })
        .collect();
    let e = opt
        .load_checkpoint_bytes(&file(&format!("{{{}}}", entries.join(",")), 16))
        .unwrap_err();
    assert!(e.to_string().contains("lie past the 16 bytes"), "{e}");
    for (header, want) in [
        ("[1,2]", "not a JSON object"),
        ("{\"a\":", "not JSON"),
        (
            r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            "not a valid safetensors file",
        ),
        (
            r#"{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            "no 'lamb.format'",
        ),
    ] {
        let e = opt.load_checkpoint_bytes(&file(header, 8)).unwrap_err();
        assert!(e.to_string().contains(want), "{header}: {e}");
    }
    // A header length beyond the file, and one beyond any sane size, allocate nothing.
    let mut v = u64::MAX.to_le_bytes().to_vec();
    v.extend_from_slice(b"{}");
    assert!(opt.load_checkpoint_bytes(&v).is_err());
    // Random bytes behind a plausible length.
    let mut rng = SmallRng::seed_from_u64(99);
    for n in 0..2000 {
        let len = n % 300;
        let mut v: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if len >= 8 {
            let h = (n % (len - 7)) as u64;
            v[..8].copy_from_slice(&h.to_le_bytes());
        }
        assert!(opt.load_checkpoint_bytes(&v).is_err());
        assert!(opt.load_torch_state_bytes(&v).is_err());
    }
}

#[test]
fn a_missing_or_oversized_file_is_an_error() {
    let dir = temp_dir("files");
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    opt.add_layer("w", 3).unwrap();
    let e = opt.load(dir.join("nope.safetensors")).unwrap_err();
    assert!(matches!(e, Error::Io { op: "open", .. }), "{e:?}");
    // A file larger than any checkpoint of this optimizer is refused before it is read.
    let big = dir.join("big.bin");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(200_000_000).unwrap();
    let e = opt.load(&big).unwrap_err();
    assert!(
        e.to_string()
            .contains("more than any checkpoint of this optimizer"),
        "{e}"
    );
    // A directory is not replaced by a file: refused before anything is written, saying
    // what it is, and no temporary file is left.
    let sub = dir.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let e = opt.save(&sub).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Io {
                op: "replace",
                kind: std::io::ErrorKind::IsADirectory,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .ends_with("sub': it is a directory, not a regular file"),
        "{e}"
    );
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["big.bin", "sub"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------
// The PyTorch layout, on hand-made files (the real timm file: checkpoint_torch.rs).

/// A PyTorch-layout file: `state.{i}.{key}` tensors and `param_groups` JSON.
fn torch_file(
    tensors: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)],
    groups: serde_json::Value,
) -> Vec<u8> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let mut md = HashMap::new();
    md.insert("param_groups".to_string(), groups.to_string());
    safetensors::serialize(views, Some(md)).unwrap()
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn timm_split() -> Lamb {
    let mut opt = Lamb::with_decay_split(LambConfig::timm()).unwrap();
    opt.add_param("a.weight", &[2, 2]).unwrap(); // decay
    opt.add_param("a.bias", &[2]).unwrap(); // no_decay
    opt.add_param("b.weight", &[1, 3]).unwrap(); // decay
    opt
}

/// timm's param_groups_weight_decay order: no_decay first. Indices follow the groups.
fn timm_groups(names: bool, step: serde_json::Value) -> serde_json::Value {
    let mut g0 = serde_json::json!({"params": [0], "weight_decay": 0.0, "lr": 0.01,
        "betas": [0.9, 0.99], "eps": 1e-8, "bias_correction": true, "grad_averaging": true,
        "max_grad_norm": 1.0, "trust_clip": false, "always_adapt": false, "caution": false,
        "decoupled_decay": false, "foreach": null, "step": step});
    let mut g1 = g0.clone();
    g1["params"] = serde_json::json!([1, 2]);
    g1["weight_decay"] = 0.05.into();
    g1["trust_clip"] = true.into();
    if names {
        g0["param_names"] = serde_json::json!(["a.bias"]);
        g1["param_names"] = serde_json::json!(["a.weight", "b.weight"]);
    }
    serde_json::json!([g0, g1])
}

fn torch_moments() -> Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let t = |n: &str, s: Vec<usize>, x: &[f32]| {
        (n.to_string(), safetensors::Dtype::F32, s, f32_bytes(x))
    };
    vec![
        t("state.0.exp_avg", vec![2], &[0.1, 0.2]),
        t("state.0.exp_avg_sq", vec![2], &[0.01, 0.02]),
        t("state.1.exp_avg", vec![2, 2], &[1.0, 2.0, 3.0, 4.0]),
        t("state.1.exp_avg_sq", vec![2, 2], &[1.5, 2.5, 3.5, 4.5]),
        t("state.2.exp_avg", vec![1, 3], &[-1.0, -2.0, -3.0]),
        t("state.2.exp_avg_sq", vec![1, 3], &[5.0, 6.0, 7.0]),
    ]
}

#[test]
fn torch_state_maps_by_name_across_reordered_groups() {
    let mut opt = timm_split();
    let file = torch_file(&torch_moments(), timm_groups(true, 3.0.into()));
    opt.load_torch_state_bytes(&file).unwrap();
    assert_eq!(opt.steps(), 3);
    let l = |i| opt.layer(LayerId(i)).unwrap();
    assert_eq!(l(0).m, [1.0, 2.0, 3.0, 4.0]); // a.weight ← torch 1
    assert_eq!(l(1).v, [0.01, 0.02]); // a.bias ← torch 0
    assert_eq!(l(2).m, [-1.0, -2.0, -3.0]); // b.weight ← torch 2
    let decay = opt.group(GroupId(0)).unwrap().config;
    let no_decay = opt.group(GroupId(1)).unwrap().config;
    assert_eq!(
        (decay.lr, decay.beta2, decay.eps, decay.weight_decay),
        (0.01, 0.99, 1e-8, 0.05)
    );
    assert_eq!(decay.ratio_max, 1.0);
    assert_eq!(
        (no_decay.weight_decay, no_decay.ratio_max),
        (0.0, f64::INFINITY)
    );
    assert_eq!(opt.max_grad_norm(), Some(1.0));

    // Without names, by position: torch group 0 is lamb group 0 ("decay") and has 1
    // parameter where lamb's has 2.
    let mut opt = timm_split();
    let e = opt
        .load_torch_state_bytes(&torch_file(
            &torch_moments(),
            timm_groups(false, 3.0.into()),
        ))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("param_groups[0] has 1 parameters, lamb group 'decay' has 2 layers"),
        "{e}"
    );

    // A lamb checkpoint is not a torch state, and the other way round.
    let e = opt.load_checkpoint_bytes(&file).unwrap_err();
    assert!(
        e.to_string()
            .contains("load it with Lamb::load_torch_state"),
        "{e}"
    );
    let lamb_file = opt.to_checkpoint_bytes().unwrap();
    let e = opt.load_torch_state_bytes(&lamb_file).unwrap_err();
    assert!(e.to_string().contains("load it with Lamb::load"), "{e}");
}

#[test]
fn torch_states_lamb_cannot_continue_are_refused() {
    let ok = torch_moments();
    let step_tensor = |i: usize, x: f32| {
        (
            format!("state.{i}.step"),
            safetensors::Dtype::F32,
            vec![],
            x.to_le_bytes().to_vec(),
        )
    };
    let mut with_steps = ok.clone();
    with_steps.push(step_tensor(1, 4.0));
    let mut cases: Vec<(Vec<u8>, &str)> = vec![
        (
            torch_file(&with_steps, timm_groups(true, 3.0.into())),
            "tensor 'state.1.step' is 4 but param_groups[0].step is 3",
        ),
        (
            torch_file(&ok[..5], timm_groups(true, 3.0.into())),
            "layer 'b.weight': the PyTorch state has exp_avg but no exp_avg_sq",
        ),
        (
            torch_file(&ok, timm_groups(true, 2.5.into())),
            "a step counter must be a whole number",
        ),
        (
            torch_file(&ok, timm_groups(true, serde_json::Value::Null)),
            "no step counter",
        ),
    ];
    let mut amsgrad = timm_groups(true, 1.0.into());
    amsgrad[1]["amsgrad"] = true.into();
    cases.push((torch_file(&ok, amsgrad), "'amsgrad' is on"));
    let mut decoupled = timm_groups(true, 1.0.into());
    decoupled[1]["decoupled_decay"] = true.into();
    cases.push((
        torch_file(&ok, decoupled),
        "'decoupled_decay' with weight decay 0.05",
    ));
    let mut unknown = timm_groups(true, 1.0.into());
    unknown[0]["param_names"] = serde_json::json!(["c.bias"]);
    cases.push((
        torch_file(&ok, unknown),
        "PyTorch parameter 'c.bias' (index 0) is not a layer",
    ));
    let mut short = ok.clone();
    short[4] = (
        "state.2.exp_avg".into(),
        safetensors::Dtype::F32,
        vec![2],
        f32_bytes(&[1.0, 2.0]),
    );
    cases.push((
        torch_file(&short, timm_groups(true, 1.0.into())),
        "layer 'b.weight': checkpoint has 2 elements, model has 3",
    ));
    let mut max_exp = ok.clone();
    max_exp.push((
        "state.0.max_exp_avg_sq".into(),
        safetensors::Dtype::F32,
        vec![2],
        f32_bytes(&[0.0, 0.0]),
    ));
    cases.push((
        torch_file(&max_exp, timm_groups(true, 1.0.into())),
        "state 'max_exp_avg_sq'",
    ));
    let mut infinite = ok.clone();
    infinite[1].3 = f32_bytes(&[0.01, f32::INFINITY]);
    cases.push((
        torch_file(&infinite, timm_groups(true, 1.0.into())),
        "layer 'a.bias': exp_avg_sq[1] = inf",
    ));
    for (file, want) in cases {
        let mut opt = timm_split();
        let before = snapshot(&opt);
        let e = opt.load_torch_state_bytes(&file).unwrap_err();
        assert!(e.to_string().contains(want), "expected {want:?} in: {e}");
        assert!(snapshot(&opt) == before);
    }
    // A state with no entries at all (a fresh torch optimizer) loads as step 0, zeros.
    let mut opt = timm_split();
    opt.load_torch_state_bytes(&torch_file(&ok, timm_groups(true, 5.0.into())))
        .unwrap();
    opt.load_torch_state_bytes(&torch_file(&[], timm_groups(true, serde_json::Value::Null)))
        .unwrap();
    assert_eq!(opt.steps(), 0);
    assert!(opt.layer(LayerId(0)).unwrap().m.iter().all(|&x| x == 0.0));
}

#[test]
fn an_optimizer_without_layers_round_trips() {
    let opt = Lamb::new(LambConfig::paper()).unwrap();
    let bytes = opt.to_checkpoint_bytes().unwrap();
    let mut other = Lamb::new(LambConfig::optax()).unwrap();
    other.load_checkpoint_bytes(&bytes).unwrap();
    assert_eq!(snapshot(&other), snapshot(&opt));
    let mut one = Lamb::new(LambConfig::paper()).unwrap();
    one.add_layer("w", 1).unwrap();
    refused(
        &mut one,
        &bytes,
        "checkpoint has 0 layers, the optimizer has 1",
    );
}

/// Random mutations of valid files, lamb's (checksummed) and PyTorch's (not: its JSON is
/// parsed as it is): always a clean result, never a panic, and a refused load changes
/// nothing. `LAMB_CHECKPOINT_MUTATIONS` sets the count (default 3000 per file).
#[test]
fn random_mutations_never_panic() {
    let rounds: usize = std::env::var("LAMB_CHECKPOINT_MUTATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let mut saved = timm_split();
    stepped(&mut saved);
    let lamb_file = saved.to_checkpoint_bytes().unwrap();
    let torch = torch_file(&torch_moments(), timm_groups(true, 3.0.into()));
    let torch_positional = torch_file(&torch_moments(), timm_groups(false, 3.0.into()));
    let mut rng = SmallRng::seed_from_u64(0xBADC0DE);
    let mut pick = |n: usize| rng.random_range(0..n.max(1));
    let mut accepted = 0;
    for (file, torch_api) in [
        (&lamb_file, false),
        (&torch, true),
        (&torch_positional, true),
    ] {
        for _ in 0..rounds {
            let mut b = file.clone();
            for _ in 0..1 + pick(4) {
                let i = pick(b.len());
                let json = b"0123456789[]{}\",:-.e ";
                match pick(4) {
                    0 => b[i] = pick(256) as u8,
                    1 => b[i] = json[pick(json.len())],
                    2 => {
                        b.remove(i);
                    }
                    _ => b.insert(i, json[pick(json.len())]),
                }
            }
            if b == *file {
                continue; // the mutations cancelled out
            }
            let mut opt = timm_split();
            let before = snapshot(&opt);
            let r = if torch_api {
                opt.load_torch_state_bytes(&b)
            } else {
                opt.load_checkpoint_bytes(&b)
            };
            match r {
                // The checksum leaves no mutation of a lamb file acceptable.
                Ok(()) => {
                    assert!(torch_api, "a mutated lamb checkpoint was accepted: {b:?}");
                    accepted += 1;
                }
                Err(_) => assert!(snapshot(&opt) == before),
            }
        }
    }
    println!(
        "{} mutated files, none of the lamb ones accepted, {accepted} of the PyTorch ones \
         (moment bytes or harmless JSON edits: they carry no checksum)",
        3 * rounds
    );
}

// ---------------------------------------------------------------------------------------
// The header as bytes: a writer other than lamb's may format it otherwise.

/// Rewrites a checkpoint's JSON header text with `edit` (padding it again to 8 bytes) and
/// signs the result with the library's own checksum definition.
fn with_header(bytes: &[u8], edit: impl Fn(&str) -> String) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap().trim_end();
    let mut header = edit(header).into_bytes();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&bytes[8 + n..]);
    common::sign(out)
}

#[test]
fn the_header_is_read_as_json_not_as_lamb_happens_to_write_it() {
    let mut saved = Lamb::new(LambConfig::paper()).unwrap();
    saved.add_layer("w", 5).unwrap();
    stepped(&mut saved);
    let bytes = saved.to_checkpoint_bytes().unwrap();
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    opt.add_layer("w", 5).unwrap();
    // Re-signing an unchanged header is faithful.
    opt.load_checkpoint_bytes(&with_header(&bytes, str::to_string))
        .unwrap();
    opt.reset();
    // Whitespace around the checksum's colon is JSON too.
    let spaced = with_header(&bytes, |h| {
        h.replace("\"lamb.checksum\":", "\"lamb.checksum\" \t: ")
    });
    opt.load_checkpoint_bytes(&spaced).unwrap();
    assert_eq!(opt.steps(), saved.steps());
    opt.reset();
    // Another format name or version, behind a valid checksum.
    for (from, to, want) in [
        (
            "\"lamb.format\":\"lamb-checkpoint\"",
            "\"lamb.format\":\"lamb-checkpoint-2\"",
            "not a lamb checkpoint: 'lamb.format' is \"lamb-checkpoint-2\"",
        ),
        (
            "\"lamb.version\":\"1\"",
            "\"lamb.version\":\"2\"",
            "format version \"2\"; this lamb reads version 1",
        ),
        // A second checksum entry, its key written with an escape (so the byte search
        // finds one entry and the JSON reader keeps the other): the checksum the
        // metadata holds is not the one that was verified.
        (
            "CHECKSUM_ENTRY",
            "CHECKSUM_ENTRY,\"lamb.\\u0063hecksum\":\"xxh64:0123456789abcdef\"",
            "is not written as lamb writes it",
        ),
    ] {
        let edited = with_header(&bytes, |h| {
            // The checksum entry as lamb writes it: key, colon, quoted 22 characters.
            let at = h.find("\"lamb.checksum\":\"").unwrap();
            let entry = &h[at..at + "\"lamb.checksum\":\"".len() + 23];
            let h = h.replace(entry, "CHECKSUM_ENTRY");
            assert!(h.contains(from), "{from} not in the header");
            h.replace(from, to).replace("CHECKSUM_ENTRY", entry)
        });
        let e = opt.load_checkpoint_bytes(&edited).unwrap_err().to_string();
        assert!(e.contains(want), "{to}: {e}");
        assert_eq!(opt.steps(), 0);
    }
}

/// 8-bit moments behind a valid checksum: a negative scale, or a code the encoder never
/// makes, is refused by name.
#[test]
fn bad_8_bit_moments_behind_a_valid_checksum_are_refused() {
    let q8 = Precision {
        moments: StateFormat::Q8,
        compact_min_len: 0,
        ..Precision::default()
    };
    let make = || {
        let mut opt = Lamb::new(LambConfig::paper()).unwrap();
        opt.set_precision(GroupId(0), q8).unwrap();
        opt.add_layer("w", 300).unwrap();
        opt
    };
    let mut saved = make();
    stepped(&mut saved);
    let bytes = saved.to_checkpoint_bytes().unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let offset =
        |name: &str| st.tensor(name).unwrap().data().as_ptr() as usize - bytes.as_ptr() as usize;
    let mut opt = make();
    for (name, patch, want) in [
        (
            "state.0.exp_avg.absmax",
            (-1.0f32).to_le_bytes().to_vec(),
            "exp_avg.absmax[0] = NaN: must be finite and >= 0",
        ),
        (
            "state.0.exp_avg",
            vec![0x7f],
            "has the 8-bit code 0x7f, beyond the largest",
        ),
        (
            "state.0.exp_avg_sq",
            vec![0xff],
            "has the 8-bit code 0xff, beyond the largest",
        ),
    ] {
        let mut edited = bytes.clone();
        let at = offset(name);
        edited[at..at + patch.len()].copy_from_slice(&patch);
        refused(&mut opt, &resign(&edited, |_| {}), want);
    }
}
