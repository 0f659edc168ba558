//! Reader of the reference vectors in `tests/data/reference/` (the format is documented in
//! the README.md there) and the deterministic input generator shared with
//! `scripts/reference/generate.py`.

use std::path::PathBuf;

use serde_json::Value;

/// The manifest format this reader understands.
pub const FORMAT: &str = "lamb-reference-v1";

/// SplitMix64's increment.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The folder holding the manifests and blobs.
pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/reference")
}

/// One implementation's manifest with its outputs read from the blob.
#[derive(Debug)]
pub struct Reference {
    pub implementation: String,
    pub steps: u64,
    pub versions: Value,
    pub cases: Vec<Case>,
}

/// One case: hyperparameters, global clipping and tensors.
#[derive(Debug)]
pub struct Case {
    pub name: String,
    /// The hyperparameters as the implementation received them (its own names).
    pub hyperparameters: Value,
    /// Global gradient-norm clipping over all tensors of the case.
    pub max_grad_norm: Option<f64>,
    pub tensors: Vec<Tensor>,
    /// The whole case object, for implementation-specific fields.
    pub raw: Value,
}

/// One tensor: its input recipes and the expected outputs.
#[derive(Debug)]
pub struct Tensor {
    pub name: String,
    pub len: usize,
    pub init: Recipe,
    /// The gradient recipe of each step, step 1 first.
    pub grads: Vec<Recipe>,
    /// Params after the last step.
    pub param: Vec<f32>,
    /// First moment after the last step.
    pub exp_avg: Vec<f32>,
    /// Second moment after the last step.
    pub exp_avg_sq: Vec<f32>,
    /// Params after steps 1..steps-1 (empty for long tensors).
    pub param_after_step: Vec<Vec<f32>>,
}

/// How the values of an input tensor are generated.
#[derive(Clone, Debug, PartialEq)]
pub enum Recipe {
    Zeros,
    Uniform {
        seed: u64,
        scale_log2: i32,
    },
    TinyHuge {
        seed: u64,
        scale_log2: i32,
        even_log2: i32,
        odd_log2: i32,
    },
}

/// The first `n` outputs of SplitMix64 seeded with `seed`. Written out rather than taken
/// from `rand` like the other tests' random data: the inputs must be exactly those that
/// `scripts/reference/generate.py` fed to the reference implementations, whose outputs are
/// committed in `tests/data/`.
pub fn splitmix64(seed: u64, n: usize) -> impl Iterator<Item = u64> {
    let mut state = seed;
    (0..n).map(move |_| {
        state = state.wrapping_add(GOLDEN);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

/// `2^e` exactly (normal range only).
pub fn pow2(e: i32) -> f64 {
    assert!((-1022..=1023).contains(&e), "2^{e} out of the normal range");
    f64::from_bits(((e + 1023) as u64) << 52)
}

/// The value of a 64-bit draw: `((x >> 40) - 2^23) · 2^-23`, in `[-1, 1)` on a 2^-23 grid.
fn unit(x: u64) -> f64 {
    ((x >> 40) as i64 - (1 << 23)) as f64 * pow2(-23)
}

impl Recipe {
    fn parse(v: &Value) -> Recipe {
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

    /// The f32 tensor of this recipe (every value exact in f32).
    pub fn materialize(&self, n: usize) -> Vec<f32> {
        let (seed, scale, factor): (u64, f64, Box<dyn Fn(usize) -> f64>) = match *self {
            Recipe::Zeros => return vec![0.0; n],
            Recipe::Uniform { seed, scale_log2 } => (seed, pow2(scale_log2), Box::new(|_| 1.0)),
            Recipe::TinyHuge {
                seed,
                scale_log2,
                even_log2,
                odd_log2,
            } => (
                seed,
                pow2(scale_log2),
                Box::new(move |i| pow2(if i % 2 == 0 { even_log2 } else { odd_log2 })),
            ),
        };
        splitmix64(seed, n)
            .enumerate()
            .map(|(i, x)| {
                let value = unit(x) * scale * factor(i);
                let rounded = value as f32;
                assert_eq!(rounded as f64, value, "recipe value not exact in f32");
                rounded
            })
            .collect()
    }
}

/// `Σ (i + 1) · bits(x_i) mod 2^64` as 16 hex digits, the manifest's input checksum.
pub fn checksum(x: &[f32]) -> String {
    let sum = x.iter().enumerate().fold(0u64, |acc, (i, v)| {
        acc.wrapping_add((i as u64 + 1).wrapping_mul(v.to_bits() as u64))
    });
    format!("{sum:016x}")
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("`{key}` is not a string in {v}"))
}

/// `v[key]` as f64 (panics if absent or not a number).
pub fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` is not a number in {v}"))
}

/// `v[key]` as bool (panics if absent or not a bool).
pub fn flag(v: &Value, key: &str) -> bool {
    v[key]
        .as_bool()
        .unwrap_or_else(|| panic!("`{key}` is not a bool in {v}"))
}

fn read_f32s(blob: &[u8], offset: &Value, len: usize) -> Vec<f32> {
    let off = offset
        .as_u64()
        .unwrap_or_else(|| panic!("offset {offset} is not an integer")) as usize;
    assert_eq!(off % 4, 0, "misaligned offset {off}");
    let bytes = blob
        .get(off..off + 4 * len)
        .unwrap_or_else(|| panic!("offset {off} + {len} floats past the blob's end"));
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Loads `<implementation>.json` and its blob, and checks that the generator here
/// reproduces every input bit for bit (against the manifest's checksums).
pub fn load(implementation: &str) -> Reference {
    let dir = data_dir();
    let path = dir.join(format!("{implementation}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let manifest: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()));
    assert_eq!(str_of(&manifest, "format"), FORMAT, "{}", path.display());
    assert_eq!(str_of(&manifest, "implementation"), implementation);
    let blob_path = dir.join(str_of(&manifest, "data_file"));
    let blob = std::fs::read(&blob_path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", blob_path.display()));
    assert_eq!(
        Some(blob.len() as u64),
        manifest["data_bytes"].as_u64(),
        "{} has the wrong size",
        blob_path.display()
    );
    let steps = manifest["steps"].as_u64().expect("`steps`");
    let cases = manifest["cases"]
        .as_array()
        .expect("`cases`")
        .iter()
        .map(|c| parse_case(c, &blob, steps))
        .collect();
    Reference {
        implementation: implementation.to_string(),
        steps,
        versions: manifest["versions"].clone(),
        cases,
    }
}

fn parse_case(c: &Value, blob: &[u8], steps: u64) -> Case {
    let name = str_of(c, "name").to_string();
    let tensors = c["tensors"]
        .as_array()
        .expect("`tensors`")
        .iter()
        .map(|t| {
            let tname = str_of(t, "name").to_string();
            let len = t["len"].as_u64().expect("`len`") as usize;
            let check = |recipe_json: &Value| -> Recipe {
                let recipe = Recipe::parse(recipe_json);
                assert_eq!(
                    checksum(&recipe.materialize(len)),
                    str_of(recipe_json, "checksum"),
                    "case {name}, tensor {tname}: the input generator does not reproduce {recipe_json}"
                );
                recipe
            };
            let init = check(&t["init"]);
            let grads: Vec<Recipe> = t["grads"]
                .as_array()
                .expect("`grads`")
                .iter()
                .map(check)
                .collect();
            assert_eq!(grads.len() as u64, steps, "one grad recipe per step");
            let o = &t["outputs"];
            let param_after_step = match o.get("param_after_step") {
                None => Vec::new(),
                Some(list) => {
                    let list = list.as_array().expect("`param_after_step`");
                    assert_eq!(list.len() as u64, steps - 1);
                    list.iter().map(|off| read_f32s(blob, off, len)).collect()
                }
            };
            Tensor {
                param: read_f32s(blob, &o["param"], len),
                exp_avg: read_f32s(blob, &o["exp_avg"], len),
                exp_avg_sq: read_f32s(blob, &o["exp_avg_sq"], len),
                param_after_step,
                name: tname,
                len,
                init,
                grads,
            }
        })
        .collect();
    Case {
        hyperparameters: c["hyperparameters"].clone(),
        max_grad_norm: c["max_grad_norm"].as_f64(),
        tensors,
        raw: c.clone(),
        name,
    }
}
