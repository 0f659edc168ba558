//! Reader of the compact-storage reference in `tests/data/precision/` (format documented in
//! the README.md there; written by `scripts/reference/precision.py`). The inputs are the
//! SplitMix64 recipes of `reference_data.rs`; every input is checked against the
//! manifest's checksums, in f32 and in the bf16/f16 roundings the combinations use.

use std::path::PathBuf;

use half::{bf16, f16};
use serde_json::Value;

use crate::reference_data::{Recipe, checksum};

/// The manifest format this reader understands.
pub const FORMAT: &str = "lamb-precision-reference-v1";

/// The data folder: `$LAMB_PRECISION_DATA` if set (e.g. a deliberately broken reference
/// from `precision.py --mutate`), else the committed `tests/data/precision`.
pub fn data_dir() -> PathBuf {
    match std::env::var_os("LAMB_PRECISION_DATA") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/precision"),
    }
}

pub use crate::layer_storage::{GFmt, MFmt, PFmt};

/// Stored parameters after a step.
#[derive(Clone, Debug)]
pub enum ParamState {
    F32(Vec<f32>),
    /// bf16 bit patterns.
    Bf16(Vec<u16>),
    /// f32 master and the bf16 or f16 bit patterns of the model's copy.
    Master {
        master: Vec<f32>,
        model: Vec<u16>,
    },
}

/// Stored moments after a step.
#[derive(Clone, Debug)]
pub enum MomentState {
    F32 {
        m: Vec<f32>,
        v: Vec<f32>,
    },
    /// bf16 bit patterns.
    Bf16 {
        m: Vec<u16>,
        v: Vec<u16>,
    },
    Q8 {
        m: Vec<u8>,
        v: Vec<u8>,
        m_absmax: Vec<f32>,
        v_absmax: Vec<f32>,
    },
}

/// The reference's stored state after one step.
#[derive(Clone, Debug)]
pub struct State {
    pub params: ParamState,
    pub moments: MomentState,
    /// The reference's trust ratio of the step (float64).
    pub trust_ratio: f64,
}

/// One layer's inputs.
#[derive(Debug)]
pub struct TensorSpec {
    pub name: String,
    pub len: usize,
    pub init: Recipe,
    /// Gradient recipe of steps 1..=steps.
    pub grads: Vec<Recipe>,
    /// Stochastic-rounding seed of steps 1..=steps.
    pub sr_seeds: Vec<u64>,
}

/// One storage combination: the reference state after every step of every tensor.
#[derive(Debug)]
pub struct Combo {
    pub name: String,
    pub params: PFmt,
    pub grads: GFmt,
    pub moments: MFmt,
    /// `states[tensor][step - 1]`.
    pub states: Vec<Vec<State>>,
}

/// The whole manifest with its blob decoded.
#[derive(Debug)]
pub struct Manifest {
    pub dir: PathBuf,
    pub steps: u64,
    pub mutation: Option<String>,
    pub versions: Value,
    pub hyperparameters: Value,
    pub qblock: usize,
    /// Value of every m code 0..=max (magnitude; bit 7 is the sign).
    pub m_table: Vec<f32>,
    /// Value of every v code 0..=max.
    pub v_table: Vec<f32>,
    pub m_bias: i64,
    pub v_bias: i64,
    /// `(seed, index, bits)` of the reference's `stochastic_bits`.
    pub stochastic_bits: Vec<(u64, u64, u32)>,
    pub tensors: Vec<TensorSpec>,
    pub combos: Vec<Combo>,
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("`{key}` is not a string in {v}"))
}

fn u64_of(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not an unsigned integer in {v}"))
}

/// `Σ (i + 1) · bits_i mod 2^64` over u16 bit patterns, as the manifest writes it.
pub fn u16_checksum(bits: &[u16]) -> String {
    let sum = bits.iter().enumerate().fold(0u64, |acc, (i, &b)| {
        acc.wrapping_add((i as u64 + 1).wrapping_mul(b as u64))
    });
    format!("{sum:016x}")
}

/// bf16 bits of an f32, round to nearest even (the `half` crate, not lamb-core's codec).
pub fn to_bf16_bits(x: &[f32]) -> Vec<u16> {
    x.iter().map(|&v| bf16::from_f32(v).to_bits()).collect()
}

/// f16 bits of an f32, round to nearest even (the `half` crate).
pub fn to_f16_bits(x: &[f32]) -> Vec<u16> {
    x.iter().map(|&v| f16::from_f32(v).to_bits()).collect()
}

struct Blob<'a>(&'a [u8]);

impl Blob<'_> {
    fn bytes(&self, off: &Value, n: usize) -> &[u8] {
        let off = off
            .as_u64()
            .unwrap_or_else(|| panic!("offset {off} is not an integer")) as usize;
        self.0
            .get(off..off + n)
            .unwrap_or_else(|| panic!("offset {off} + {n} bytes past the blob's end"))
    }
    fn f32s(&self, off: &Value, n: usize) -> Vec<f32> {
        self.bytes(off, 4 * n)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }
    fn u16s(&self, off: &Value, n: usize) -> Vec<u16> {
        self.bytes(off, 2 * n)
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect()
    }
    fn u8s(&self, off: &Value, n: usize) -> Vec<u8> {
        self.bytes(off, n).to_vec()
    }
}

fn parse_state(rec: &Value, blob: &Blob, p: PFmt, mo: MFmt, n: usize, qblock: usize) -> State {
    let params = match p {
        PFmt::F32 => ParamState::F32(blob.f32s(&rec["param"], n)),
        PFmt::Bf16 | PFmt::Bf16Sr => ParamState::Bf16(blob.u16s(&rec["param"], n)),
        PFmt::MasterBf16 | PFmt::MasterF16 => ParamState::Master {
            master: blob.f32s(&rec["master"], n),
            model: blob.u16s(&rec["model"], n),
        },
    };
    let moments = match mo {
        MFmt::F32 => MomentState::F32 {
            m: blob.f32s(&rec["m"], n),
            v: blob.f32s(&rec["v"], n),
        },
        MFmt::Bf16 | MFmt::Bf16Sr => MomentState::Bf16 {
            m: blob.u16s(&rec["m"], n),
            v: blob.u16s(&rec["v"], n),
        },
        MFmt::Q8 => MomentState::Q8 {
            m: blob.u8s(&rec["m"], n),
            v: blob.u8s(&rec["v"], n),
            m_absmax: blob.f32s(&rec["m_absmax"], n.div_ceil(qblock)),
            v_absmax: blob.f32s(&rec["v_absmax"], n.div_ceil(qblock)),
        },
    };
    let bits = u64::from_str_radix(str_of(rec, "trust_ratio_bits"), 16).expect("hex bits");
    State {
        params,
        moments,
        trust_ratio: f64::from_bits(bits),
    }
}

fn parse_table(v: &Value) -> Vec<f32> {
    let max = u64_of(v, "max_code") as usize;
    let vals: Vec<f32> = v["values_f32_bits"]
        .as_array()
        .expect("`values_f32_bits`")
        .iter()
        .map(|b| f32::from_bits(b.as_u64().expect("code value bits") as u32))
        .collect();
    assert_eq!(vals.len(), max + 1, "one value per code 0..=max_code");
    vals
}

/// A recipe of `reference_data.rs` from its JSON.
fn parse_recipe(v: &Value) -> Recipe {
    let int = |key: &str| -> i64 {
        v[key]
            .as_i64()
            .unwrap_or_else(|| panic!("recipe {v}: `{key}` is not an integer"))
    };
    match str_of(v, "pattern") {
        "zeros" => Recipe::Zeros,
        "uniform" => Recipe::Uniform {
            seed: int("seed") as u64,
            scale_log2: int("scale_log2") as i32,
        },
        "tiny_huge" => Recipe::TinyHuge {
            seed: int("seed") as u64,
            scale_log2: int("scale_log2") as i32,
            even_log2: int("even_log2") as i32,
            odd_log2: int("odd_log2") as i32,
        },
        other => panic!("unknown recipe pattern `{other}`"),
    }
}

/// Checks a recipe's checksums (f32 values and their bf16/f16 roundings) and parses it.
fn checked_recipe(r: &Value, len: usize, what: &str) -> Recipe {
    let recipe = parse_recipe(r);
    let x = recipe.materialize(len);
    assert_eq!(checksum(&x), str_of(r, "checksum"), "{what}: f32 inputs");
    assert_eq!(
        u16_checksum(&to_bf16_bits(&x)),
        str_of(r, "checksum_bf16"),
        "{what}: the bf16 rounding of the inputs differs from the reference's"
    );
    assert_eq!(
        u16_checksum(&to_f16_bits(&x)),
        str_of(r, "checksum_f16"),
        "{what}: the f16 rounding of the inputs differs from the reference's"
    );
    recipe
}

/// Loads `precision.json` and its blob from [`data_dir`].
pub fn load() -> Manifest {
    let dir = data_dir();
    let path = dir.join("precision.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let j: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()));
    assert_eq!(str_of(&j, "format"), FORMAT, "{}", path.display());
    let blob_path = dir.join(str_of(&j, "data_file"));
    let bytes = std::fs::read(&blob_path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", blob_path.display()));
    assert_eq!(
        bytes.len() as u64,
        u64_of(&j, "data_bytes"),
        "{} has the wrong size",
        blob_path.display()
    );
    let blob = Blob(&bytes);
    let steps = u64_of(&j, "steps");
    let qblock = u64_of(&j, "qblock") as usize;
    let tensors: Vec<TensorSpec> = j["tensors"]
        .as_array()
        .expect("`tensors`")
        .iter()
        .map(|t| parse_tensor(t, steps))
        .collect();
    let combos = j["combos"]
        .as_array()
        .expect("`combos`")
        .iter()
        .map(|c| parse_combo(c, &tensors, &blob, steps, qblock))
        .collect();
    let stochastic_bits = j["stochastic_bits"]
        .as_array()
        .expect("`stochastic_bits`")
        .iter()
        .map(|s| {
            (
                u64_of(s, "seed"),
                u64_of(s, "index"),
                u64_of(s, "bits") as u32,
            )
        })
        .collect();
    Manifest {
        dir,
        steps,
        mutation: j["mutation"].as_str().map(str::to_string),
        versions: j["versions"].clone(),
        hyperparameters: j["hyperparameters"].clone(),
        qblock,
        m_table: parse_table(&j["codes"]["m"]),
        v_table: parse_table(&j["codes"]["v"]),
        m_bias: j["codes"]["m"]["bias"].as_i64().expect("m bias"),
        v_bias: j["codes"]["v"]["bias"].as_i64().expect("v bias"),
        stochastic_bits,
        tensors,
        combos,
    }
}

/// One tensor of the manifest: its recipes (checked against the reference's checksums)
/// and stochastic-rounding seeds, one per step.
fn parse_tensor(t: &Value, steps: u64) -> TensorSpec {
    let name = str_of(t, "name").to_string();
    let len = u64_of(t, "len") as usize;
    let init = checked_recipe(&t["init"], len, &format!("{name} init"));
    let grads: Vec<Recipe> = t["grads"]
        .as_array()
        .expect("`grads`")
        .iter()
        .enumerate()
        .map(|(s, r)| checked_recipe(r, len, &format!("{name} grads of step {}", s + 1)))
        .collect();
    let sr_seeds: Vec<u64> = t["sr_seeds"]
        .as_array()
        .expect("`sr_seeds`")
        .iter()
        .map(|s| s.as_u64().expect("seed"))
        .collect();
    assert_eq!(grads.len() as u64, steps);
    assert_eq!(sr_seeds.len() as u64, steps);
    TensorSpec {
        name,
        len,
        init,
        grads,
        sr_seeds,
    }
}

/// One storage combination of the manifest: its formats and the reference's state after
/// each step of each tensor.
fn parse_combo(c: &Value, tensors: &[TensorSpec], blob: &Blob, steps: u64, qblock: usize) -> Combo {
    let params = match str_of(c, "params") {
        "f32" => PFmt::F32,
        "bf16" => PFmt::Bf16,
        "bf16_sr" => PFmt::Bf16Sr,
        "master_bf16" => PFmt::MasterBf16,
        "master_f16" => PFmt::MasterF16,
        o => panic!("unknown params format {o}"),
    };
    let grads = match str_of(c, "grads") {
        "f32" => GFmt::F32,
        "bf16" => GFmt::Bf16,
        "f16" => GFmt::F16,
        o => panic!("unknown grads format {o}"),
    };
    let moments = match str_of(c, "moments") {
        "f32" => MFmt::F32,
        "bf16" => MFmt::Bf16,
        "bf16_sr" => MFmt::Bf16Sr,
        "q8" => MFmt::Q8,
        o => panic!("unknown moments format {o}"),
    };
    let per_tensor = c["tensors"].as_array().expect("combo `tensors`");
    assert_eq!(per_tensor.len(), tensors.len());
    let states = per_tensor
        .iter()
        .zip(tensors)
        .map(|(steps_json, spec)| {
            let list = steps_json.as_array().expect("per-step records");
            assert_eq!(list.len() as u64, steps);
            list.iter()
                .map(|rec| parse_state(rec, blob, params, moments, spec.len, qblock))
                .collect()
        })
        .collect();
    Combo {
        name: str_of(c, "name").to_string(),
        params,
        grads,
        moments,
        states,
    }
}
