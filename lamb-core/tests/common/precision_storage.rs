//! Owned storage of one layer in every format of the precision reference, decoders written
//! here (not lamb-core's codecs), and one lamb-core step on that storage.

use half::{bf16, f16};
use lamb_core::codec::QBLOCK;
use lamb_core::{Backend, LambConfig, LayerReport};

pub use crate::layer_storage::{GradBufs, Storage};
use crate::precision_data::{GFmt, MFmt, Manifest, MomentState, PFmt, ParamState, State};

/// The configuration of every step: the paper preset with lr 1e-2.
pub fn config() -> LambConfig {
    LambConfig {
        lr: 1e-2,
        ..LambConfig::paper()
    }
}

// Decoding, written here (not lamb-core's codecs).

pub fn dec_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

pub fn dec_f16(b: u16) -> f32 {
    f16::from_bits(b).to_f32()
}

/// `absmax · value(code)`, the product rounded once to f32.
pub fn dec_q8(code: u8, absmax: f32, table: &[f32], signed: bool) -> f32 {
    let idx = if signed { code & 0x7f } else { code } as usize;
    let mag = (table[idx] as f64 * absmax as f64) as f32;
    if signed && code & 0x80 != 0 {
        -mag
    } else {
        mag
    }
}

/// The code nearest to `y >= 0` in `table`, ties to the even code; beyond the last entry,
/// the last.
pub fn nearest_code(y: f64, table: &[f32]) -> usize {
    let hi = table.partition_point(|&t| (t as f64) <= y);
    if hi == 0 {
        return 0;
    }
    let lo = hi - 1;
    if hi == table.len() {
        return lo;
    }
    let mid = (table[lo] as f64 + table[hi] as f64) / 2.0;
    if y > mid || (y == mid && lo % 2 == 1) {
        hi
    } else {
        lo
    }
}

/// bf16/f16 bits as a signed ordinal: adjacent values differ by 1, ±0 are both 0.
pub fn ord16(bits: u16) -> i64 {
    let mag = (bits & 0x7fff) as i64;
    if bits & 0x8000 != 0 { -mag } else { mag }
}

pub fn half_value(k: i64, f16_fmt: bool) -> f64 {
    let mag = k.unsigned_abs() as u16;
    let v = if f16_fmt { dec_f16(mag) } else { dec_bf16(mag) } as f64;
    if k < 0 { -v } else { v }
}

// Owned storage of one layer (`layer_storage.rs`), as the reference reads and writes it.

impl GradBufs {
    pub fn decoded(&self, f: GFmt) -> Vec<f32> {
        match f {
            GFmt::F32 => self.g32.clone(),
            GFmt::Bf16 => self.gb.iter().map(|x| dec_bf16(x.to_bits())).collect(),
            GFmt::F16 => self.gh.iter().map(|x| dec_f16(x.to_bits())).collect(),
        }
    }
}

/// A model copy no step should leave in place: NaN (a missing write cannot go unnoticed).
pub const POISON_BF16: u16 = 0x7fc1;
pub const POISON_F16: u16 = 0x7e01;

impl Storage {
    /// Zero parameters and moments with a poisoned model copy.
    pub fn empty(n: usize) -> Storage {
        Storage {
            pb: vec![bf16::from_bits(POISON_BF16); n],
            ph: vec![f16::from_bits(POISON_F16); n],
            ..Storage::zeroed(n)
        }
    }

    /// The state before step 1: params from the recipe, zero moments.
    pub fn initial(init: &[f32], p: PFmt) -> Storage {
        let mut s = Storage::empty(init.len());
        match p {
            PFmt::Bf16 | PFmt::Bf16Sr => {
                s.pb = init.iter().map(|&x| bf16::from_f32(x)).collect();
            }
            _ => s.p32 = init.to_vec(),
        }
        s
    }

    /// The reference's stored state (the model copy poisoned: it is write-only).
    pub fn from_state(st: &State) -> Storage {
        let n = match &st.params {
            ParamState::F32(p) => p.len(),
            ParamState::Bf16(p) => p.len(),
            ParamState::Master { master, .. } => master.len(),
        };
        let mut s = Storage::empty(n);
        match &st.params {
            ParamState::F32(p) => s.p32 = p.clone(),
            ParamState::Bf16(p) => s.pb = p.iter().map(|&b| bf16::from_bits(b)).collect(),
            ParamState::Master { master, .. } => s.p32 = master.clone(),
        }
        match &st.moments {
            MomentState::F32 { m, v } => {
                s.m32 = m.clone();
                s.v32 = v.clone();
            }
            MomentState::Bf16 { m, v } => {
                s.mb = m.iter().map(|&b| bf16::from_bits(b)).collect();
                s.vb = v.iter().map(|&b| bf16::from_bits(b)).collect();
            }
            MomentState::Q8 {
                m,
                v,
                m_absmax,
                v_absmax,
            } => {
                s.mq = m.clone();
                s.vq = v.clone();
                s.ma = m_absmax.clone();
                s.va = v_absmax.clone();
            }
        }
        s
    }

    /// Params, m and v decoded to f32 (the master for master combinations).
    pub fn decoded(&self, p: PFmt, mo: MFmt, man: &Manifest) -> [Vec<f32>; 3] {
        let params = match p {
            PFmt::Bf16 | PFmt::Bf16Sr => self.pb.iter().map(|x| dec_bf16(x.to_bits())).collect(),
            _ => self.p32.clone(),
        };
        let (m, v) = match mo {
            MFmt::F32 => (self.m32.clone(), self.v32.clone()),
            MFmt::Bf16 | MFmt::Bf16Sr => (
                self.mb.iter().map(|x| dec_bf16(x.to_bits())).collect(),
                self.vb.iter().map(|x| dec_bf16(x.to_bits())).collect(),
            ),
            MFmt::Q8 => (
                (0..self.mq.len())
                    .map(|i| dec_q8(self.mq[i], self.ma[i / QBLOCK], &man.m_table, true))
                    .collect(),
                (0..self.vq.len())
                    .map(|i| dec_q8(self.vq[i], self.va[i / QBLOCK], &man.v_table, false))
                    .collect(),
            ),
        };
        [params, m, v]
    }
}

/// The storage formats of one run of a layer.
#[derive(Clone, Copy, Debug)]
pub struct Fmts {
    pub p: PFmt,
    pub g: GFmt,
    pub m: MFmt,
}

/// One step of lamb-core on `s`.
pub fn lamb_step(
    backend: Backend,
    s: &mut Storage,
    f: Fmts,
    g: &GradBufs,
    seed: u64,
    step: u64,
) -> LayerReport {
    let cfg = config();
    let mut layer = s.layer(f.p, g.grads(f.g), f.m, seed);
    let r = backend
        .step_layer_compact(&cfg, step, 1.0, &mut layer)
        .unwrap_or_else(|e| panic!("step {step}: {e}"));
    assert!(!r.skipped, "step {step} skipped");
    r
}
