//! Checkpoints in the PyTorch layout on hand-made files (the real timm file:
//! `checkpoint_torch.rs`), random mutations of valid files, and the header read as JSON
//! however another writer formats it.

use std::collections::HashMap;

#[path = "common/checkpoint_state.rs"]
mod checkpoint_state;
mod common;

use lamb_std::lamb_core::LambConfig;
use lamb_std::{GroupId, Lamb, LayerId, Precision, StateFormat};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use checkpoint_state::{refused, resign, snapshot, stepped};

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

/// PyTorch state files lamb cannot continue from, each with what the refusal says.
fn torch_states_to_refuse() -> Vec<(Vec<u8>, &'static str)> {
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
    let mut cases: Vec<(Vec<u8>, &'static str)> = vec![
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
    cases
}

#[test]
fn torch_states_lamb_cannot_continue_are_refused() {
    let ok = torch_moments();
    let cases = torch_states_to_refuse();
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
