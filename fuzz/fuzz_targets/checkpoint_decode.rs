//! Decoding checkpoints from bytes (`lamb_std::checkpoint`): `Lamb::load_checkpoint_bytes`,
//! `load_checkpoint_bytes_with_params` and `load_torch_state_bytes` either refuse, leaving
//! the optimizer (and the parameters) exactly as they were, or load a valid state; never a
//! panic, whatever the bytes.
//!
//! The bytes are arbitrary, or a real checkpoint of an arbitrary small model (1-4 layers,
//! tricky names, f32/bf16/8-bit moments, master copies, clipping, schedules, 0-3 steps
//! taken) in lamb's format or as a PyTorch (timm) state, then edited: JSON edits anywhere
//! in the safetensors header or inside its `lamb.meta` / `param_groups` documents, byte
//! flips, truncation, extension; with the XXH64 checksum recomputed after the edits or not
//! (so that the decoder's later checks are reached, not only the checksum). The optimizer
//! loaded into is the source's model or a different one (lengths, names, precision, layer
//! count).
//!
//! Checked:
//! - `Err` ⇒ the target's snapshot (moments, masters, step, groups, reports) and the
//!   parameters passed are bit for bit as before;
//! - `Ok` of an unedited lamb checkpoint into the same model ⇒ the state equals the
//!   source's bit for bit (reports excepted, which a load clears), and the parameters too;
//! - `Ok` of anything ⇒ a valid state, in the step domain (`lamb_std::domain`, its rules
//!   written out here from its docs): the step counter at most `MAX_STEP` (2^53); every
//!   group's configuration validates, its lr scale is finite and ≥ 0 and `lr × lr_scale`
//!   finite in f32; clipping off or finite and ≥ f32::MIN_POSITIVE; the schedule validates;
//!   moments finite (v ≥ 0, 8-bit scales finite and ≥ 0) and able to take the next step
//!   (with a zero gradient, that step's bias-corrected m̂ and denominator √v̂ + ε are finite
//!   in f32); master copies finite; the state saves, and the saved bytes load into a fresh
//!   optimizer of the same model giving the same state; a step on it neither panics nor
//!   poisons, and the step counter never passes `MAX_STEP` (at it, a step is
//!   `Error::StepLimit`).
#![no_main]

use arbitrary::Arbitrary;
use lamb_core::codec::{QBLOCK, q8_m_decode, q8_v_decode};
use lamb_core::half::bf16;
use lamb_core::layer::{Grads, Rounding};
use lamb_core::{Adaptation, BiasCorrection, LambConfig, StepScalars};
use lamb_fuzz::state::{State, snapshot};
use lamb_fuzz::{ConfigSpec, F64, Few, Rng, ScheduleSpec, bytes_of, known_bugs_skipped};
use lamb_std::{
    Error, Group, GroupId, Lamb, LayerId, LayerView, MAX_STEP, ParamsIn, Precision, StateFormat,
    StateView,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

#[path = "checkpoint_decode/checks.rs"]
mod checks;
#[path = "checkpoint_decode/files.rs"]
mod files;
use checks::{check_valid, without_reports};
use files::{apply_byte_edits, apply_json_edits, fix_checksum, torch_state};

const TRICKY_NAMES: [&str; 12] = [
    "lamb.checksum",
    "\"lamb.checksum\"",
    "__metadata__",
    "a\"b",
    "back\\slash",
    "",
    " ",
    "state.0.exp_avg",
    "param.x",
    "fc.bias",
    "ünï\u{1F600}",
    "nul\0byte",
];

#[derive(Arbitrary, Debug, Clone)]
enum NameSpec {
    Plain,
    Tricky(u8),
    Any([u8; 6]),
}

#[derive(Arbitrary, Debug, Clone)]
struct LayerSpec {
    /// 0..=600 elements (8-bit moments come in blocks of 256).
    len: u16,
    name: NameSpec,
    /// The model holds bf16 parameters (a master copy is made where the group keeps one).
    bf16_params: bool,
}

#[derive(Arbitrary, Debug, Clone)]
struct PrecisionSpec {
    /// f32, bf16, 8-bit.
    moments: u8,
    /// compact_min_len = (k mod 3) * 128.
    min_len: u8,
    master: bool,
    stochastic: Option<u64>,
}

#[derive(Arbitrary, Debug, Clone)]
struct ModelSpec {
    decay_split: bool,
    config: ConfigSpec,
    layers: Few<LayerSpec, 4>,
    precision: [Option<PrecisionSpec>; 2],
    max_grad_norm: Option<F64>,
    schedule: ScheduleSpec,
    /// Steps taken before saving, 0..=3.
    steps: u8,
    seed: u64,
}

/// How the optimizer loaded into differs from the source's.
#[derive(Arbitrary, Debug, Clone)]
enum Mismatch {
    None,
    Len { layer: u8, delta: i8 },
    Name { layer: u8 },
    DropLayer,
    ExtraLayer,
    Precision(PrecisionSpec),
    Split,
}

#[derive(Arbitrary, Debug, Clone)]
enum JsonVal {
    Null,
    Bool(bool),
    Int(i32),
    U64(u64),
    Float(F64),
    Str(u8),
    AnyStr([u8; 4]),
    EmptyArray,
    EmptyObject,
}

const STRINGS: [&str; 28] = [
    "f32",
    "bf16",
    "q8_e4m3",
    "q8_e5m3",
    "inf",
    "-inf",
    "nan",
    "constant",
    "warmup_poly",
    "warmup_cosine",
    "always",
    "when_decayed",
    "never",
    "skip",
    "error",
    "off",
    "f64",
    "outside_sqrt",
    "inside_sqrt",
    "zero_norm_is_one",
    "eps_denominator",
    "nearest",
    "stochastic",
    "",
    "lamb-checkpoint",
    "1",
    "2",
    "xxh64:0000000000000000",
];

impl JsonVal {
    fn get(&self) -> Value {
        match self {
            JsonVal::Null => Value::Null,
            JsonVal::Bool(b) => json!(b),
            JsonVal::Int(i) => json!(i),
            JsonVal::U64(u) => json!(u),
            JsonVal::Float(x) => {
                let x = x.get();
                serde_json::Number::from_f64(x).map_or_else(|| json!(format!("{x}")), Value::Number)
            }
            JsonVal::Str(i) => json!(STRINGS[*i as usize % STRINGS.len()]),
            JsonVal::AnyStr(b) => json!(String::from_utf8_lossy(b)),
            JsonVal::EmptyArray => json!([]),
            JsonVal::EmptyObject => json!({}),
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum JsonOp {
    Replace(JsonVal),
    Remove,
    /// Adds key `STRINGS[k]` (or `"x"`) to the object at the path (or its parent).
    AddKey(u8, JsonVal),
}

#[derive(Arbitrary, Debug, Clone)]
struct JsonEdit {
    /// The safetensors header itself, or the JSON document inside it (`lamb.meta`, or
    /// `param_groups` for a PyTorch state).
    inner: bool,
    /// Which node (depth-first index, modulo the node count).
    pick: u16,
    op: JsonOp,
}

#[derive(Arbitrary, Debug, Clone)]
enum ByteEdit {
    Flip { pos: u32, bit: u8, header: bool },
    Set { pos: u32, value: u8, header: bool },
    Truncate(u32),
    Append(u8),
}

#[derive(Arbitrary, Debug, Clone)]
struct Edits {
    json: Few<JsonEdit, 3>,
    bytes: Few<ByteEdit, 2>,
    fix_checksum: bool,
}

impl Edits {
    fn is_empty(&self) -> bool {
        self.json.is_empty() && self.bytes.is_empty()
    }
}

#[derive(Arbitrary, Debug, Clone)]
struct TorchSpec {
    /// Per-group `step` (timm) as this value, or none.
    group_step: Option<F64>,
    /// `state.{i}.step` tensors: none, F32, F64, I64, I32.
    tensor_step: u8,
    /// Groups carry `param_names`.
    names: bool,
    /// Moments shaped `[len / 2, 2]` where even.
    two_d: bool,
}

#[derive(Arbitrary, Debug, Clone)]
enum Source {
    /// A lamb checkpoint (`to_checkpoint_bytes[_with_params]`), edited.
    Lamb { with_params: bool, edits: Edits },
    /// A PyTorch (timm) state built from the source's moments, edited.
    Torch { torch: TorchSpec, edits: Edits },
    /// Arbitrary bytes.
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    model: ModelSpec,
    /// `None`: the target is the source's model.
    mismatch: Option<Mismatch>,
    /// Steps the target takes before loading (so a refused load has state to keep).
    target_steps: u8,
    /// Load with the other format's loader than the source's (must be refused). For raw
    /// bytes: `false`, `true` pick the lamb loader (with or without parameters) or torch's.
    cross: bool,
    /// With `cross` and raw bytes: load_checkpoint_bytes_with_params instead of
    /// load_checkpoint_bytes.
    with_params: bool,
    source: Source,
}

/// A model: its spec, as the target's differs from the source's.
#[derive(Clone, Debug)]
struct Model {
    decay_split: bool,
    config: LambConfig,
    layers: Vec<(String, usize, bool)>,
    precision: [Option<Precision>; 2],
    max_grad_norm: Option<f64>,
    schedule: lamb_core::Schedule,
}

fn precision(p: &PrecisionSpec) -> Precision {
    Precision {
        moments: [StateFormat::F32, StateFormat::Bf16, StateFormat::Q8][p.moments as usize % 3],
        compact_min_len: (p.min_len % 3) as usize * 128,
        master: p.master,
        rounding: p
            .stochastic
            .map_or(Rounding::Nearest, |seed| Rounding::Stochastic { seed }),
    }
}

impl Model {
    fn from_spec(s: &ModelSpec) -> Model {
        let mut layers: Vec<(String, usize, bool)> = Vec::new();
        for (i, l) in s.layers.iter().enumerate() {
            let name = match &l.name {
                NameSpec::Plain => format!("layer{i}"),
                NameSpec::Tricky(k) => TRICKY_NAMES[*k as usize % TRICKY_NAMES.len()].to_string(),
                NameSpec::Any(b) => String::from_utf8_lossy(b).into_owned(),
            };
            if layers.iter().all(|(n, ..)| *n != name) {
                layers.push((name, l.len as usize % 601, l.bf16_params));
            }
        }
        Model {
            decay_split: s.decay_split,
            config: s.config.build(),
            layers,
            precision: [
                s.precision[0].as_ref().map(precision),
                s.precision[1].as_ref().map(precision),
            ],
            max_grad_norm: s.max_grad_norm.map(F64::get),
            schedule: s.schedule.build(),
        }
    }

    fn mismatched(&self, m: &Mismatch) -> Model {
        let mut t = self.clone();
        let n = t.layers.len();
        match m {
            Mismatch::None => {}
            Mismatch::Len { layer, delta } if n > 0 => {
                let l = &mut t.layers[*layer as usize % n];
                l.1 = (l.1 as isize + (*delta as isize % 3).max(-(l.1 as isize))) as usize;
            }
            Mismatch::Name { layer } if n > 0 => t.layers[*layer as usize % n].0.push('~'),
            Mismatch::DropLayer => {
                t.layers.pop();
            }
            Mismatch::ExtraLayer => t.layers.push(("extra".into(), 3, false)),
            Mismatch::Precision(p) => t.precision[0] = Some(precision(p)),
            Mismatch::Split => t.decay_split = !t.decay_split,
            _ => {}
        }
        t
    }

    /// A fresh optimizer with this model's layers (settings that fail are left out, as the
    /// same calls fail for every optimizer of the model); `None` if the configuration is
    /// refused (`Lamb::new` checks it).
    fn build(&self) -> Option<Lamb> {
        let mut opt = if self.decay_split {
            Lamb::with_decay_split(self.config)
        } else {
            Lamb::new(self.config)
        }
        .ok()?;
        for (g, p) in self.precision.iter().enumerate() {
            if let Some(p) = p {
                let _ = opt.set_precision(GroupId(g), *p);
            }
        }
        for (i, (name, len, _)) in self.layers.iter().enumerate() {
            let g = GroupId(i % opt.group_count());
            opt.add_layer_to(g, name.clone(), *len)
                .expect("unique names, existing group");
        }
        let _ = opt.set_max_grad_norm(self.max_grad_norm);
        let _ = opt.set_schedule(self.schedule);
        Some(opt)
    }

    /// The model's parameters: f32 values, and which layers hold bf16.
    fn params(&self, seed: u64) -> Vec<Vec<f32>> {
        let mut r = Rng::new(seed);
        self.layers
            .iter()
            .map(|(_, len, bf)| {
                (0..*len)
                    .map(|_| {
                        let x = r.unit();
                        if *bf { bf16::from_f32(x).to_f32() } else { x }
                    })
                    .collect()
            })
            .collect()
    }

    /// Takes `steps` steps on `opt` with finite gradients; `params` are updated in place.
    fn steps(&self, opt: &mut Lamb, params: &mut [Vec<f32>], steps: u8, seed: u64) {
        let mut r = Rng::new(seed ^ 0x5eed);
        for _ in 0..steps % 4 {
            let grads: Vec<Vec<f32>> = params
                .iter()
                .map(|p| p.iter().map(|_| r.unit() * 0.1).collect())
                .collect();
            let mut halves: Vec<Vec<bf16>> = params
                .iter()
                .map(|p| p.iter().map(|&x| bf16::from_f32(x)).collect())
                .collect();
            let result = {
                let mut p_in: Vec<ParamsIn<'_>> = params
                    .iter_mut()
                    .zip(&mut halves)
                    .zip(&self.layers)
                    .map(|((p, h), (_, _, bf))| {
                        if *bf {
                            ParamsIn::Bf16(h)
                        } else {
                            ParamsIn::F32(p)
                        }
                    })
                    .collect();
                let g: Vec<Grads<'_>> = grads.iter().map(|g| Grads::F32(g)).collect();
                opt.step_mixed(&mut p_in, &g)
            };
            if let Err(e @ (Error::WorkerPanicked { .. } | Error::Poisoned)) = &result {
                panic!("a step panicked: {e}");
            }
            for ((p, h), (_, _, bf)) in params.iter_mut().zip(&halves).zip(&self.layers) {
                if *bf {
                    p.iter_mut().zip(h).for_each(|(x, y)| *x = y.to_f32());
                }
            }
        }
    }
}

/// `LAMB_FUZZ_STATS=1`: print one line per input (run the binary on corpus files to see
/// which checks of the decoder a corpus reaches).
fn stats() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("LAMB_FUZZ_STATS").is_some())
}

fuzz_target!(|input: Input| {
    let source_model = Model::from_spec(&input.model);
    let Some(mut source) = source_model.build() else {
        // An invalid configuration: nothing to save or load.
        return;
    };
    let mut source_params = source_model.params(input.model.seed);
    source_model.steps(
        &mut source,
        &mut source_params,
        input.model.steps,
        input.model.seed,
    );

    let (bytes, pristine) = match &input.source {
        Source::Lamb { with_params, edits } => {
            let refs: Vec<&[f32]> = source_params.iter().map(Vec::as_slice).collect();
            let saved = if *with_params {
                source.to_checkpoint_bytes_with_params(&refs)
            } else {
                source.to_checkpoint_bytes()
            };
            let Ok(saved) = saved else {
                // Not saveable (an invalid configuration): nothing to load.
                return;
            };
            let mut b = apply_json_edits(saved, &edits.json, "lamb.meta");
            apply_byte_edits(&mut b, &edits.bytes);
            if edits.fix_checksum {
                fix_checksum(&mut b);
            }
            (b, edits.is_empty())
        }
        Source::Torch { torch, edits } => {
            let mut b = apply_json_edits(
                torch_state(&source, &source_model, torch),
                &edits.json,
                "param_groups",
            );
            apply_byte_edits(&mut b, &edits.bytes);
            (b, false)
        }
        Source::Raw(b) => (b.clone(), false),
    };
    let same_model = matches!(input.mismatch, None | Some(Mismatch::None));
    let target_model = source_model.mismatched(input.mismatch.as_ref().unwrap_or(&Mismatch::None));
    let Some(mut target) = target_model.build() else {
        return;
    };
    let mut target_params = target_model.params(input.model.seed ^ 1);
    target_model.steps(
        &mut target,
        &mut target_params,
        input.target_steps,
        !input.model.seed,
    );

    let before = snapshot(&target);
    let params_before: Vec<Vec<u8>> = target_params.iter().map(|p| bytes_of(p)).collect();
    // 0: load_checkpoint_bytes, 1: load_checkpoint_bytes_with_params, 2: load_torch_state_bytes.
    let lamb_loader = if input.with_params { 1 } else { 0 };
    let loader = match (&input.source, input.cross) {
        (Source::Lamb { with_params, .. }, false) => *with_params as u8,
        (Source::Lamb { .. }, true) | (Source::Raw(_), true) => 2,
        (Source::Torch { .. }, false) => 2,
        (Source::Torch { .. }, true) | (Source::Raw(_), false) => lamb_loader,
    };
    let result = match loader {
        0 => target.load_checkpoint_bytes(&bytes),
        1 => {
            let mut refs: Vec<&mut [f32]> =
                target_params.iter_mut().map(Vec::as_mut_slice).collect();
            target.load_checkpoint_bytes_with_params(&bytes, &mut refs)
        }
        _ => target.load_torch_state_bytes(&bytes),
    };
    let params_after: Vec<Vec<u8>> = target_params.iter().map(|p| bytes_of(p)).collect();
    if stats() {
        let kind = match &input.source {
            Source::Lamb { edits, .. } if edits.is_empty() => "lamb-unedited",
            Source::Lamb { .. } => "lamb",
            Source::Torch { edits, .. } if edits.is_empty() => "torch-unedited",
            Source::Torch { .. } => "torch",
            Source::Raw(_) => "raw",
        };
        let what = match &result {
            Ok(()) => "ok".to_string(),
            Err(e) => e.to_string().chars().take(60).collect(),
        };
        eprintln!(
            "STATS {kind} loader={loader} pristine={pristine} same={same_model} layers={} -> {what}",
            target.layer_count()
        );
    }

    match &result {
        Err(e) => {
            assert!(
                !matches!(e, Error::WorkerPanicked { .. } | Error::Poisoned),
                "{e}"
            );
            assert!(
                !(pristine && same_model && !input.cross),
                "an unedited checkpoint was refused by an optimizer of the same model: {e}"
            );
            assert!(
                snapshot(&target) == before,
                "a refused load ({e}) changed the optimizer"
            );
            assert!(
                params_after == params_before,
                "a refused load ({e}) changed the parameters"
            );
        }
        Ok(()) => {
            if pristine && same_model && loader != 2 {
                assert!(
                    without_reports(snapshot(&target)) == without_reports(snapshot(&source)),
                    "an unedited checkpoint loaded into the same model gave another state"
                );
                if loader == 1 {
                    let want: Vec<Vec<u8>> = source_params.iter().map(|p| bytes_of(p)).collect();
                    assert!(
                        params_after == want,
                        "load_with_params restored other parameters"
                    );
                }
            }
            check_valid(&target, &before);
            // A loaded state saves (if every group's configuration is valid, which a
            // PyTorch state need not make it), and loads back identically into a fresh
            // optimizer.
            let all_valid = (0..target.group_count()).all(|g| {
                target
                    .group(GroupId(g))
                    .is_ok_and(|g| g.config.validate().is_ok())
            });
            if !all_valid {
                return;
            }
            let saved = target
                .to_checkpoint_bytes()
                .unwrap_or_else(|e| panic!("a loaded state does not save: {e}"));
            let mut again = target_model.build().expect("built once already");
            again
                .load_checkpoint_bytes(&saved)
                .unwrap_or_else(|e| panic!("a loaded state, saved, does not load again: {e}"));
            assert!(
                without_reports(snapshot(&again)) == without_reports(snapshot(&target)),
                "save → load of a loaded state is not the identity"
            );
            // And it steps without panicking, and the counter never passes MAX_STEP.
            let at_limit = target.steps() == MAX_STEP;
            target_model.steps(&mut target, &mut target_params, 1, 7);
            assert!(target.steps() <= MAX_STEP);
            if at_limit {
                assert_eq!(target.steps(), MAX_STEP, "a step past MAX_STEP");
            }
        }
    }
});
