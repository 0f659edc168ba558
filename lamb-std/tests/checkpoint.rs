//! Checkpoints: exact resume for every state precision, refusal of every
//! mismatch and of every corruption, with the optimizer left untouched. The PyTorch
//! loader's mapping on hand-made state files, random mutations and the header's JSON are
//! `checkpoint_layout.rs`, the crash test `checkpoint_crash.rs`, the interop test with a
//! real timm file `checkpoint_torch.rs`.

use std::collections::HashMap;
use std::time::Instant;

#[path = "common/checkpoint_model.rs"]
mod checkpoint_model;
#[path = "common/checkpoint_state.rs"]
mod checkpoint_state;
mod common;

use lamb_std::lamb_core::{LambConfig, Schedule};
use lamb_std::{Error, GroupId, Lamb, LayerId, Precision, StateFormat, StateView};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use checkpoint_model::*;
use checkpoint_state::{refused, resign, snapshot, stepped};

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

/// An optimizer with `layers` (name, length, group) in `groups` (the first is the default
/// group), stepped once where every group has a layer.
fn build(layers: &[(&str, usize, usize)], groups: &[&str]) -> Lamb {
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
}

/// The same model with 8-bit moments is refused.
fn refuse_another_precision(bytes: &[u8], ok: &[(&str, usize, usize)]) {
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
    for &(name, len, g) in ok {
        q8.add_layer_to(GroupId(g), name, len).unwrap();
    }
    refused(&mut q8, bytes, "group 'default': checkpoint has precision");
}

/// Bytes that are no lamb checkpoint are refused.
fn refuse_non_checkpoints(ok: &[(&str, usize, usize)]) {
    // Not checkpoints.
    let mut opt = build(ok, &["default", "slow"]);
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

#[test]
fn another_model_is_refused_saying_what_differs() {
    let mut saved = Lamb::new(LambConfig::paper()).unwrap();
    saved.add_layer("encoder.3.ffn.w1", 2359296 / 4096).unwrap();
    saved.add_layer("encoder.3.ffn.b1", 3).unwrap();
    let g2 = saved.add_group("slow", LambConfig::paper(), 0.1).unwrap();
    saved.add_layer_to(g2, "head", 2).unwrap();
    stepped(&mut saved);
    let bytes = saved.to_checkpoint_bytes().unwrap();

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

    refuse_another_precision(&bytes, &ok);
    refuse_non_checkpoints(&ok);
}

/// An edit of `lamb.meta`.
type Edit = Box<dyn Fn(&mut serde_json::Value)>;

/// Edits of a two-layer checkpoint's `lamb.meta` whose values the load must refuse, each
/// with what the refusal says.
fn bad_meta_edits() -> Vec<(Edit, &'static str)> {
    vec![
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
    ]
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
    let cases = bad_meta_edits();
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
