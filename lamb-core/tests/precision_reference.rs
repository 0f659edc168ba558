//! Compact storage against a float64 NumPy reference of the same quantisation schemes
//! (`tests/data/precision/`, made by `scripts/reference/precision.py`).
//!
//! Every combination of params {f32, bf16 nearest, bf16 stochastic, f32 master + bf16 copy,
//! f32 master + f16 copy} × grads {the params' half format, f32} × moments {f32, bf16
//! nearest, bf16 stochastic, 8-bit blockwise} runs 5 steps of the LAMB paper preset (lr 1e-2) on 5 layers (lengths
//! 1, 255, 256 zero-initialised, 257, 777).
//!
//! # Method
//!
//! Each step of `Backend::Scalar.step_layer_compact` starts from the reference's stored
//! state after the previous step (step 1: the recipe inputs, zero moments), so each
//! comparison sees one step of f32 arithmetic against one step of float64, never an
//! accumulated drift. (A free-running 5-step trajectory is compared too, loosely.)
//! `Backend::detect()` runs the same steps and must give the same bits as `Scalar`.
//!
//! Where lamb-core's f32 value and the reference's float64 value fall on either side of a
//! rounding boundary, their codes differ by one, legitimately. To tell that apart from a
//! wrong scheme, the test also runs a *shadow* step: the same inputs decoded to an f32
//! master copy and f32 moments, which gives lamb-core's exact f32 values before encoding
//! (the decoded inputs are identical, so the arithmetic is bit for bit the compact run's).
//! Then, per element:
//!
//! 1. **Encoding (exact).** lamb-core's stored codes are exactly the scheme applied to its
//!    own f32 values: bf16/f16 round to nearest even (the `half` crate), stochastic
//!    rounding with the reference's hash, the 8-bit absmax of the block's new values and
//!    the code nearest to `|x|/absmax` in the *reference's* code table, ties to even.
//! 2. **Against the reference (tolerance).** Codes are equal, or they differ and every
//!    rounding boundary between them lies within `tol` of lamb-core's f32 value (the
//!    midpoints of bf16/f16 values or of 8-bit codes in `|x|/absmax`; for stochastic
//!    rounding the threshold `|a| + (1 − r/2^16)·q` that the draw r sets between the two
//!    candidates). In practice that is one code (one bf16/f16 ulp, one 8-bit code, one
//!    stochastic-rounding step) apart at a value right at a boundary; more than one code
//!    only where codes are finer than `tol` (a bf16 m that almost cancels to 0). f32
//!    values (f32 params, masters, f32 moments, absmax) must be within `tol`, the trust
//!    ratio within the bound `tol` implies for `‖u‖`.
//!
//! `tol` bounds lamb-core's f32 result against the exact float64 value of the same step
//! from the same decoded inputs: `TOL_ULPS · 2^-24 · s`, with `s` the magnitude the
//! result is computed from (see [`Scales`]): `s_m = |β1·m| + |β3·g|` for m,
//! `s_v = β2·v + (1−β2)·g²` for v, `|p| + lr·r·s_u` for p with `s_u = (s_m/(1−β1^t)) /
//! (√v̂ + ε) + λ|p|` the scale of u. Each f32 operation contributes at most
//! 2^-24 relative to its result (and the f32 hyperparameters 0.9, 0.999, 1e-6, 0.01 are
//! within 2^-24 of the float64 ones), so the update chains (≈ 5 roundings for m and v,
//! ≈ 12 for p, the trust ratio included) stay below 16 units: `TOL_ULPS` = 32 leaves a
//! factor 2 and is printed against the measured worst case. A wrong code table, rounding
//! direction, absmax block or missing master copy moves codes where lamb-core's value is
//! far from any boundary (up to half a code step, i.e. 2^15 f32 ulps for bf16), so it
//! cannot hide under this tolerance; the identical-code fraction is also required to be
//! at least [`MIN_IDENTICAL`]. The free-running trajectory (lamb-core alone for 5 steps
//! from the same inputs) must end within [`free_run_bounds`] of the reference. Run with `--nocapture` for the measured agreement, and see
//! `tests/data/precision/README.md` for mutations of the reference that this test catches.

#[path = "common/precision_data.rs"]
mod precision_data;
#[path = "common/reference_data.rs"]
#[allow(dead_code)] // this test uses the recipes only
mod reference_data;

use half::{bf16, f16};
use lamb_core::codec::{QBLOCK, q8_m_decode, q8_v_decode, stochastic_bits};
use lamb_core::layer::{CompactLayer, Grads, HalfMut, Moments, Params, Rounding};
use lamb_core::{Backend, LambConfig, LayerReport, StepScalars};
use precision_data::{Combo, GFmt, MFmt, Manifest, MomentState, PFmt, ParamState, State, load};

/// 2^-24: the unit roundoff of f32.
const U: f64 = 1.0 / 16_777_216.0;
/// The error bound of one f32 step against float64, in units of `2^-24 · scale`.
const TOL_ULPS: f64 = 32.0;
/// Smallest fraction of codes identical to the reference's, per coded quantity and
/// combination: a backstop, the per-element rule is the real check. Codes differ only at a
/// value within `tol` of a boundary: ~0.03 % of values with f32 gradients, but more with
/// gradients of few significant bits. With bf16/f16 gradients and bf16 moments,
/// `0.9·m + 0.1·g` is often exactly a short binary number (whenever `9·m + g` has a factor
/// 5), which can lie exactly on a bf16 midpoint; float64's `1 − 0.9` (just below 0.1) and
/// f32's `0.1` (just above) then round it to opposite sides. Measured minimum 0.9815 (m,
/// f16 gradients), 0.9906 with bf16 gradients.
const MIN_IDENTICAL: f64 = 0.97;

fn config() -> LambConfig {
    LambConfig {
        lr: 1e-2,
        ..LambConfig::paper()
    }
}

// ---------------------------------------------------------------------------------------
// Decoding, written here (not lamb-core's codecs).

fn dec_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

fn dec_f16(b: u16) -> f32 {
    f16::from_bits(b).to_f32()
}

/// `absmax · value(code)`, the product rounded once to f32.
fn dec_q8(code: u8, absmax: f32, table: &[f32], signed: bool) -> f32 {
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
fn nearest_code(y: f64, table: &[f32]) -> usize {
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
fn ord16(bits: u16) -> i64 {
    let mag = (bits & 0x7fff) as i64;
    if bits & 0x8000 != 0 { -mag } else { mag }
}

fn half_value(k: i64, f16_fmt: bool) -> f64 {
    let mag = k.unsigned_abs() as u16;
    let v = if f16_fmt { dec_f16(mag) } else { dec_bf16(mag) } as f64;
    if k < 0 { -v } else { v }
}

// ---------------------------------------------------------------------------------------
// Owned storage of one layer.

#[derive(Clone, Debug)]
struct Storage {
    p32: Vec<f32>,
    pb: Vec<bf16>,
    ph: Vec<f16>,
    m32: Vec<f32>,
    v32: Vec<f32>,
    mb: Vec<bf16>,
    vb: Vec<bf16>,
    mq: Vec<u8>,
    vq: Vec<u8>,
    ma: Vec<f32>,
    va: Vec<f32>,
}

/// Gradients of one step in every format.
struct GradBufs {
    g32: Vec<f32>,
    gb: Vec<bf16>,
    gh: Vec<f16>,
}

impl GradBufs {
    fn new(g: Vec<f32>) -> GradBufs {
        GradBufs {
            gb: g.iter().map(|&x| bf16::from_f32(x)).collect(),
            gh: g.iter().map(|&x| f16::from_f32(x)).collect(),
            g32: g,
        }
    }
    fn grads(&self, f: GFmt) -> Grads<'_> {
        match f {
            GFmt::F32 => Grads::F32(&self.g32),
            GFmt::Bf16 => Grads::Bf16(&self.gb),
            GFmt::F16 => Grads::F16(&self.gh),
        }
    }
    fn decoded(&self, f: GFmt) -> Vec<f32> {
        match f {
            GFmt::F32 => self.g32.clone(),
            GFmt::Bf16 => self.gb.iter().map(|x| dec_bf16(x.to_bits())).collect(),
            GFmt::F16 => self.gh.iter().map(|x| dec_f16(x.to_bits())).collect(),
        }
    }
}

/// A model copy no step should leave in place: NaN (a missing write cannot go unnoticed).
const POISON_BF16: u16 = 0x7fc1;
const POISON_F16: u16 = 0x7e01;

impl Storage {
    fn empty(n: usize) -> Storage {
        Storage {
            p32: vec![0.0; n],
            pb: vec![bf16::from_bits(POISON_BF16); n],
            ph: vec![f16::from_bits(POISON_F16); n],
            m32: vec![0.0; n],
            v32: vec![0.0; n],
            mb: vec![bf16::ZERO; n],
            vb: vec![bf16::ZERO; n],
            mq: vec![0; n],
            vq: vec![0; n],
            ma: vec![0.0; n.div_ceil(QBLOCK)],
            va: vec![0.0; n.div_ceil(QBLOCK)],
        }
    }

    /// The state before step 1: params from the recipe, zero moments.
    fn initial(init: &[f32], p: PFmt) -> Storage {
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
    fn from_state(st: &State) -> Storage {
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

    fn layer<'a>(&'a mut self, p: PFmt, grads: Grads<'a>, mo: MFmt, seed: u64) -> CompactLayer<'a> {
        CompactLayer {
            params: match p {
                PFmt::F32 => Params::F32(&mut self.p32),
                PFmt::Bf16 => Params::Bf16 {
                    data: &mut self.pb,
                    rounding: Rounding::Nearest,
                },
                PFmt::Bf16Sr => Params::Bf16 {
                    data: &mut self.pb,
                    rounding: Rounding::Stochastic { seed },
                },
                PFmt::MasterBf16 => Params::Master {
                    master: &mut self.p32,
                    model: HalfMut::Bf16(&mut self.pb),
                },
                PFmt::MasterF16 => Params::Master {
                    master: &mut self.p32,
                    model: HalfMut::F16(&mut self.ph),
                },
            },
            grads,
            moments: match mo {
                MFmt::F32 => Moments::F32 {
                    m: &mut self.m32,
                    v: &mut self.v32,
                },
                MFmt::Bf16 => Moments::Bf16 {
                    m: &mut self.mb,
                    v: &mut self.vb,
                    rounding: Rounding::Nearest,
                },
                MFmt::Bf16Sr => Moments::Bf16 {
                    m: &mut self.mb,
                    v: &mut self.vb,
                    rounding: Rounding::Stochastic { seed },
                },
                MFmt::Q8 => Moments::Q8 {
                    m: &mut self.mq,
                    v: &mut self.vq,
                    m_absmax: &mut self.ma,
                    v_absmax: &mut self.va,
                },
            },
        }
    }

    /// Every stored bit (NaN-safe equality).
    fn bits(&self) -> Vec<u32> {
        let f = |x: &Vec<f32>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let mut out = [&self.p32, &self.m32, &self.v32, &self.ma, &self.va]
            .into_iter()
            .flat_map(f)
            .collect::<Vec<_>>();
        out.extend(
            self.pb
                .iter()
                .chain(&self.mb)
                .chain(&self.vb)
                .map(|x| x.to_bits() as u32),
        );
        out.extend(self.ph.iter().map(|x| x.to_bits() as u32));
        out.extend(self.mq.iter().chain(&self.vq).map(|&x| x as u32));
        out
    }

    /// Params, m and v decoded to f32 (the master for master combinations).
    fn decoded(&self, p: PFmt, mo: MFmt, man: &Manifest) -> [Vec<f32>; 3] {
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

/// One step of lamb-core on `s`.
#[allow(clippy::too_many_arguments)]
fn lamb_step(
    backend: Backend,
    s: &mut Storage,
    p: PFmt,
    g: &GradBufs,
    gf: GFmt,
    mo: MFmt,
    seed: u64,
    step: u64,
) -> LayerReport {
    let cfg = config();
    let mut layer = s.layer(p, g.grads(gf), mo, seed);
    let r = backend
        .step_layer_compact(&cfg, step, 1.0, &mut layer)
        .unwrap_or_else(|e| panic!("step {step}: {e}"));
    assert!(!r.skipped, "step {step} skipped");
    r
}

// ---------------------------------------------------------------------------------------
// Tolerances and tallies.

/// Per-element magnitudes that bound lamb-core's f32 rounding error (module docs).
struct Scales {
    p: Vec<f64>,
    u: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl Scales {
    /// From the decoded inputs, lamb-core's pre-encoding f32 results (the shadow step) and
    /// its step size.
    fn new(
        s: &StepScalars,
        step_size: f32,
        inputs: &[Vec<f32>; 3],
        g: &[f32],
        shadow: &[Vec<f32>; 3],
    ) -> Scales {
        let [p, m, v] = inputs;
        let [_, _, v_new] = shadow;
        let n = p.len();
        let f = |x: f32| x as f64;
        let mut out = Scales {
            p: Vec::with_capacity(n),
            u: Vec::with_capacity(n),
            m: Vec::with_capacity(n),
            v: Vec::with_capacity(n),
        };
        for i in 0..n {
            let gi = f(g[i]) * f(s.grad_scale);
            out.m
                .push((f(s.beta1) * f(m[i])).abs() + (f(s.beta3) * gi).abs());
            out.v
                .push(f(s.beta2) * f(v[i]) + f(s.one_minus_beta2) * gi * gi);
            // u's scale: m's scale carried through m̂/(√v̂ + ε) (v has no cancellation,
            // so its own relative error stays a few units), plus λ|p|.
            let sm = *out.m.last().unwrap();
            let d = (f(v_new[i]) * f(s.inv_bias2)).sqrt() + f(s.eps);
            let su = sm * f(s.inv_bias1) / d + f(s.weight_decay) * f(p[i]).abs();
            out.u.push(su);
            out.p.push(f(p[i]).abs() + f(step_size) * su);
        }
        out
    }
}

/// Agreement of one stored quantity with the reference.
#[derive(Clone, Debug, Default)]
struct Tally {
    n: usize,
    identical: usize,
    /// Different codes, lamb-core's value within `tol` of every boundary between them
    /// (f32 quantities: different values within `tol`).
    adjacent: usize,
    /// Violations.
    bad: usize,
    max_dist: u64,
    /// Max `|y − boundary| / tol` over the adjacent pairs (must stay ≤ 1).
    max_slack: f64,
    /// f32 quantities: max `|lamb − reference| / (2^-24 · scale)`.
    max_err_units: f64,
    /// Decoded values: Σ(lamb − ref)², Σ ref².
    diff2: f64,
    norm2: f64,
    /// Stochastic rounding: max distance of lamb-core's value to the threshold, in f32
    /// ulps, at the elements whose result differs; and how many elements lie within `tol`
    /// of their threshold (could differ).
    sr_margin_ulps: f64,
    sr_at_risk: usize,
    /// Elements within one f32 ulp of their threshold.
    sr_within_ulp: usize,
    /// The tolerance at each element, in f32 ulps of its value.
    sr_tol_ulps: Vec<f64>,
}

impl Tally {
    fn identical_fraction(&self) -> f64 {
        if self.n == 0 {
            1.0
        } else {
            self.identical as f64 / self.n as f64
        }
    }
    fn rel_l2(&self) -> f64 {
        if self.norm2 == 0.0 {
            self.diff2.sqrt()
        } else {
            (self.diff2 / self.norm2).sqrt()
        }
    }
    fn l2(&mut self, lamb: f32, reference: f32) {
        let d = lamb as f64 - reference as f64;
        self.diff2 += d * d;
        self.norm2 += reference as f64 * reference as f64;
    }
    fn merge(&mut self, o: &Tally) {
        self.n += o.n;
        self.identical += o.identical;
        self.adjacent += o.adjacent;
        self.bad += o.bad;
        self.max_dist = self.max_dist.max(o.max_dist);
        self.max_slack = self.max_slack.max(o.max_slack);
        self.max_err_units = self.max_err_units.max(o.max_err_units);
        self.diff2 += o.diff2;
        self.norm2 += o.norm2;
        self.sr_margin_ulps = self.sr_margin_ulps.max(o.sr_margin_ulps);
        self.sr_at_risk += o.sr_at_risk;
        self.sr_within_ulp += o.sr_within_ulp;
        self.sr_tol_ulps.extend(&o.sr_tol_ulps);
    }
    fn summary(&self, coded: bool) -> String {
        if self.n == 0 {
            return "-".into();
        }
        if coded {
            format!(
                "{:.4} {:>3} {:.2}",
                self.identical_fraction(),
                self.adjacent,
                self.max_slack
            )
        } else {
            let err = format!("{:.1}u", self.max_err_units);
            format!("{:.4} {err:>8}", self.identical_fraction())
        }
    }
}

/// Where failures are recorded (the first few in full, all counted).
struct Failures {
    list: Vec<String>,
    count: usize,
}

impl Failures {
    fn add(&mut self, msg: String) {
        self.count += 1;
        if self.list.len() < 40 {
            self.list.push(msg);
        }
    }
}

/// An f32 value against the reference's: within `tol_units · 2^-24 · scale`.
fn check_close(
    t: &mut Tally,
    fails: &mut Failures,
    what: &str,
    lamb: f32,
    reference: f32,
    scale: f64,
) {
    t.n += 1;
    t.l2(lamb, reference);
    let units = (lamb as f64 - reference as f64).abs() / (U * scale.max(f64::MIN_POSITIVE));
    if lamb.to_bits() == reference.to_bits() {
        t.identical += 1;
    } else if units <= TOL_ULPS {
        t.adjacent += 1;
    } else {
        t.bad += 1;
        fails.add(format!(
            "{what}: lamb {lamb:e} vs reference {reference:e}: {units:.1} units of 2^-24·{scale:e} > {TOL_ULPS}"
        ));
    }
    if units.is_finite() {
        t.max_err_units = t.max_err_units.max(units);
    }
}

/// Codes (as signed ordinals) against the reference's: equal, or every boundary between
/// them within `tol` of lamb-core's pre-encoding value `y` (lamb-core's code is the one
/// nearest to `y`, checked exactly elsewhere, so it is enough to check the boundary next to
/// the reference's code; `boundary(k)` is the boundary between codes k and k + 1). Adjacent
/// codes are the usual case; more than one code apart happens only where the codes are
/// finer than the tolerance (a value that almost cancels to 0, in bf16).
#[allow(clippy::too_many_arguments)]
fn check_grid(
    t: &mut Tally,
    fails: &mut Failures,
    what: &str,
    lamb: i64,
    reference: i64,
    y: f64,
    boundary: impl Fn(i64) -> Option<f64>,
    tol: f64,
) {
    t.n += 1;
    let dist = lamb.abs_diff(reference);
    t.max_dist = t.max_dist.max(dist);
    if dist == 0 {
        t.identical += 1;
        return;
    }
    let b = if reference > lamb {
        boundary(reference - 1)
    } else {
        boundary(reference)
    };
    match b {
        Some(b) if (y - b).abs() <= tol => {
            t.adjacent += 1;
            t.max_slack = t.max_slack.max((y - b).abs() / tol);
        }
        _ => {
            t.bad += 1;
            fails.add(format!(
                "{what}: lamb code {lamb} vs reference {reference} (distance {dist}); lamb's \
                 value {y:e}, boundary {b:?}, tolerance {tol:e}"
            ));
        }
    }
}

/// The stochastic-rounding draws of element `i`'s m and v under a layer's seed: the
/// streams of `Moments::Bf16` (the constants as documented, written out here).
fn moment_draws(seed: u64, i: usize) -> (u32, u32) {
    const M_STREAM: u64 = 0x6d5f_7374_7265_616d; // "m_stream"
    const V_STREAM: u64 = 0x765f_7374_7265_616d; // "v_stream"
    (
        stochastic_bits(seed ^ M_STREAM, i as u64) & 0xffff,
        stochastic_bits(seed ^ V_STREAM, i as u64) & 0xffff,
    )
}

/// A stochastically rounded bf16 against the reference's: lamb-core's f32 value `y` and
/// the reference's float64 value round with the same draw, so their results are equal, or
/// they are the two candidates (toward zero and one ulp away) and the threshold
/// `|a| + (1 − draw/2^16)·q` the draw sets between them lies within `tol` of `y`.
#[allow(clippy::too_many_arguments)]
fn check_sr(
    t: &mut Tally,
    fails: &mut Failures,
    what: &str,
    y: f32,
    ours: u16,
    reference: u16,
    draw: u32,
    tol: f64,
) {
    let a_bits = (y.to_bits() >> 16) as u16;
    let a = ord16(a_bits);
    let away = if y.is_sign_negative() { a - 1 } else { a + 1 };
    let a_mag = half_value(a, false).abs();
    let q = half_value(away, false).abs() - a_mag;
    let thr = a_mag + (1.0 - draw as f64 / 65536.0) * q;
    let ulp32 = q / 65536.0;
    let margin = ((y as f64).abs() - thr).abs();
    t.sr_tol_ulps.push(tol / ulp32);
    if margin <= tol {
        t.sr_at_risk += 1;
    }
    if margin <= ulp32 {
        t.sr_within_ulp += 1;
    }
    let (lo, rf) = (ord16(ours), ord16(reference));
    t.l2(dec_bf16(ours), dec_bf16(reference));
    let pair_ok = (lo == a || lo == away) && (rf == a || rf == away);
    if lo != rf && pair_ok {
        t.sr_margin_ulps = t.sr_margin_ulps.max(margin / ulp32);
    }
    let sign = if y.is_sign_negative() { -1.0 } else { 1.0 };
    check_grid(
        t,
        fails,
        what,
        lo,
        rf,
        y as f64,
        |_| pair_ok.then_some(sign * thr),
        tol,
    );
}

/// All tallies of one combination.
#[derive(Default)]
struct ComboStats {
    param: Tally,
    model: Tally,
    m: Tally,
    v: Tally,
    absmax: Tally,
    ratio_max_rel: f64,
    /// The same in units of 2^-24·(1 + ‖scale_u‖/‖u‖).
    ratio_max_units: f64,
    /// Decoded-state relative L2 (teacher-forced), max over steps and tensors.
    dec_p: f64,
    dec_m: f64,
    dec_v: f64,
    /// Free-running trajectory, final state: relative L2 of the change of p, of m, of v.
    free_dp: f64,
    free_m: f64,
    free_v: f64,
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let mut t = Tally::default();
    for (&x, &y) in a.iter().zip(b) {
        t.l2(x, y);
    }
    t.rel_l2()
}

// ---------------------------------------------------------------------------------------
// One step: lamb-core from the reference state, checked against the next reference state.

/// Checks lamb-core's encoding of its own f32 values (exact) and everything against the
/// reference (tolerances). `input` is the state the step started from.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)] // parallel arrays by index
fn check_step(
    man: &Manifest,
    combo: &Combo,
    where_: &str,
    input: &Storage,
    out: &Storage,
    shadow: &Storage,
    report: &LayerReport,
    g: &[f32],
    seed: u64,
    step: u64,
    reference: &State,
    st: &mut ComboStats,
    fails: &mut Failures,
) {
    let (pf, mf) = (combo.params, combo.moments);
    let n = g.len();
    let scalars = StepScalars::new(&config(), step, 1.0).unwrap();
    let inputs = input.decoded(pf, mf, man);
    let sh = [shadow.p32.clone(), shadow.m32.clone(), shadow.v32.clone()];
    let sc = Scales::new(&scalars, report.step_size, &inputs, g, &sh);
    let ours = out.decoded(pf, mf, man);
    let theirs = Storage::from_state(reference).decoded(pf, mf, man);
    st.dec_p = st.dec_p.max(rel_l2(&ours[0], &theirs[0]));
    st.dec_m = st.dec_m.max(rel_l2(&ours[1], &theirs[1]));
    st.dec_v = st.dec_v.max(rel_l2(&ours[2], &theirs[2]));

    // Trust ratio: ‖u‖'s error is at most ‖TOL_ULPS·2^-24·scale_u‖ (plus a few roundings
    // of the norms and of the f32 report).
    let rel = (report.trust_ratio as f64 - reference.trust_ratio).abs() / reference.trust_ratio;
    let u_scale = sc.u.iter().map(|x| x * x).sum::<f64>().sqrt();
    let bound = TOL_ULPS * U * (1.0 + u_scale / report.update_norm as f64);
    st.ratio_max_rel = st.ratio_max_rel.max(rel);
    st.ratio_max_units = st.ratio_max_units.max(rel / bound * TOL_ULPS);
    if rel > bound {
        fails.add(format!(
            "{where_}: trust ratio {} vs reference {} (rel {rel:e} > {bound:e})",
            report.trust_ratio, reference.trust_ratio
        ));
    }

    // -- 1. lamb-core's encoding of its own f32 values, exactly.
    let mut self_fail = |what: &str, i: usize, detail: String| {
        fails.add(format!("{where_}: ENCODING {what}[{i}]: {detail}"));
    };
    for i in 0..n {
        let y = shadow.p32[i];
        match pf {
            PFmt::F32 => {
                if out.p32[i].to_bits() != y.to_bits() {
                    self_fail("param", i, format!("{} != f32 result {y}", out.p32[i]));
                }
            }
            PFmt::Bf16 => {
                if out.pb[i].to_bits() != bf16::from_f32(y).to_bits() {
                    self_fail("param", i, format!("{} is not RNE({y:e})", out.pb[i]));
                }
            }
            PFmt::Bf16Sr => {
                let r = stochastic_bits(seed, i as u64) & 0xffff;
                let expect = (y.to_bits().wrapping_add(r) >> 16) as u16;
                if out.pb[i].to_bits() != expect {
                    self_fail("param", i, format!("{} is not SR({y:e}, {r})", out.pb[i]));
                }
            }
            PFmt::MasterBf16 | PFmt::MasterF16 => {
                let model = if pf == PFmt::MasterBf16 {
                    (out.pb[i].to_bits(), bf16::from_f32(y).to_bits())
                } else {
                    (out.ph[i].to_bits(), f16::from_f32(y).to_bits())
                };
                if out.p32[i].to_bits() != y.to_bits() || model.0 != model.1 {
                    self_fail(
                        "master/model",
                        i,
                        format!("{}/{:#06x} for {y:e}", out.p32[i], model.0),
                    );
                }
            }
        }
    }
    match mf {
        MFmt::F32 => {
            if out.m32 != shadow.m32 || out.v32 != shadow.v32 {
                self_fail("m/v", 0, "f32 moments differ from the f32 step".into());
            }
        }
        MFmt::Bf16 => {
            for i in 0..n {
                if out.mb[i] != bf16::from_f32(shadow.m32[i])
                    || out.vb[i] != bf16::from_f32(shadow.v32[i])
                {
                    self_fail("m/v", i, "not RNE of the f32 values".into());
                }
            }
        }
        MFmt::Bf16Sr => {
            for i in 0..n {
                let (rm, rv) = moment_draws(seed, i);
                let sr = |y: f32, r: u32| (y.to_bits().wrapping_add(r) >> 16) as u16;
                if out.mb[i].to_bits() != sr(shadow.m32[i], rm)
                    || out.vb[i].to_bits() != sr(shadow.v32[i], rv)
                {
                    self_fail("m/v", i, "not SR of the f32 values".into());
                }
            }
        }
        MFmt::Q8 => {
            for b in 0..n.div_ceil(QBLOCK) {
                let r = b * QBLOCK..((b + 1) * QBLOCK).min(n);
                let am = shadow.m32[r.clone()]
                    .iter()
                    .fold(0f32, |a, x| a.max(x.abs()));
                let av = shadow.v32[r.clone()]
                    .iter()
                    .fold(0f32, |a, x| a.max(x.abs()));
                if out.ma[b] != am || out.va[b] != av {
                    self_fail(
                        "absmax",
                        b,
                        format!("{}/{} != {am}/{av}", out.ma[b], out.va[b]),
                    );
                }
                for i in r {
                    let (x, w) = (shadow.m32[i], shadow.v32[i]);
                    let mut cm = if am > 0.0 {
                        nearest_code((x.abs() / am) as f64, &man.m_table) as u8
                    } else {
                        0
                    };
                    if x.is_sign_negative() && cm != 0 {
                        cm |= 0x80;
                    }
                    let cv = if av > 0.0 {
                        nearest_code((w.abs() / av) as f64, &man.v_table) as u8
                    } else {
                        0
                    };
                    if out.mq[i] != cm || out.vq[i] != cv {
                        self_fail(
                            "q8 code",
                            i,
                            format!("{}/{} != nearest {cm}/{cv}", out.mq[i], out.vq[i]),
                        );
                    }
                    // lamb-core's own decoder agrees with the table.
                    if q8_m_decode(out.mq[i], out.ma[b]).to_bits()
                        != dec_q8(out.mq[i], out.ma[b], &man.m_table, true).to_bits()
                        || q8_v_decode(out.vq[i], out.va[b]).to_bits()
                            != dec_q8(out.vq[i], out.va[b], &man.v_table, false).to_bits()
                    {
                        self_fail("q8 decode", i, "lamb-core decodes differently".into());
                    }
                }
            }
        }
    }

    // -- 2. Against the reference.
    let tol = |scale: f64| TOL_ULPS * U * scale;
    let bf16_mid = |k: i64| Some((half_value(k, false) + half_value(k + 1, false)) / 2.0);
    let f16_mid = |k: i64| Some((half_value(k, true) + half_value(k + 1, true)) / 2.0);
    let w = |what: &str, i: usize| format!("{where_}: {what}[{i}]");
    match (&reference.params, pf) {
        (ParamState::F32(r), _) => {
            for i in 0..n {
                check_close(
                    &mut st.param,
                    fails,
                    &w("param", i),
                    out.p32[i],
                    r[i],
                    sc.p[i],
                );
            }
        }
        (ParamState::Bf16(r), PFmt::Bf16) => {
            for i in 0..n {
                st.param.l2(dec_bf16(out.pb[i].to_bits()), dec_bf16(r[i]));
                check_grid(
                    &mut st.param,
                    fails,
                    &w("param", i),
                    ord16(out.pb[i].to_bits()),
                    ord16(r[i]),
                    shadow.p32[i] as f64,
                    bf16_mid,
                    tol(sc.p[i]),
                );
            }
        }
        (ParamState::Bf16(r), PFmt::Bf16Sr) => {
            for i in 0..n {
                let draw = stochastic_bits(seed, i as u64) & 0xffff;
                check_sr(
                    &mut st.param,
                    fails,
                    &w("param (stochastic)", i),
                    shadow.p32[i],
                    out.pb[i].to_bits(),
                    r[i],
                    draw,
                    tol(sc.p[i]),
                );
            }
        }
        (ParamState::Master { master, model }, _) => {
            let f16_fmt = pf == PFmt::MasterF16;
            for i in 0..n {
                check_close(
                    &mut st.param,
                    fails,
                    &w("master", i),
                    out.p32[i],
                    master[i],
                    sc.p[i],
                );
                let ours = if f16_fmt {
                    out.ph[i].to_bits()
                } else {
                    out.pb[i].to_bits()
                };
                let dec = |b: u16| if f16_fmt { dec_f16(b) } else { dec_bf16(b) };
                st.model.l2(dec(ours), dec(model[i]));
                check_grid(
                    &mut st.model,
                    fails,
                    &w("model copy", i),
                    ord16(ours),
                    ord16(model[i]),
                    out.p32[i] as f64,
                    |k| if f16_fmt { f16_mid(k) } else { bf16_mid(k) },
                    tol(sc.p[i]),
                );
            }
        }
        _ => unreachable!(),
    }
    match &reference.moments {
        MomentState::F32 { m, v } => {
            for i in 0..n {
                check_close(&mut st.m, fails, &w("m", i), out.m32[i], m[i], sc.m[i]);
                check_close(&mut st.v, fails, &w("v", i), out.v32[i], v[i], sc.v[i]);
            }
        }
        MomentState::Bf16 { m, v } if mf == MFmt::Bf16Sr => {
            for i in 0..n {
                let (rm, rv) = moment_draws(seed, i);
                check_sr(
                    &mut st.m,
                    fails,
                    &w("m (stochastic)", i),
                    shadow.m32[i],
                    out.mb[i].to_bits(),
                    m[i],
                    rm,
                    tol(sc.m[i]),
                );
                check_sr(
                    &mut st.v,
                    fails,
                    &w("v (stochastic)", i),
                    shadow.v32[i],
                    out.vb[i].to_bits(),
                    v[i],
                    rv,
                    tol(sc.v[i]),
                );
            }
        }
        MomentState::Bf16 { m, v } => {
            for i in 0..n {
                st.m.l2(dec_bf16(out.mb[i].to_bits()), dec_bf16(m[i]));
                st.v.l2(dec_bf16(out.vb[i].to_bits()), dec_bf16(v[i]));
                let (ym, yv) = (shadow.m32[i] as f64, shadow.v32[i] as f64);
                let (om, ov) = (ord16(out.mb[i].to_bits()), ord16(out.vb[i].to_bits()));
                check_grid(
                    &mut st.m,
                    fails,
                    &w("m", i),
                    om,
                    ord16(m[i]),
                    ym,
                    bf16_mid,
                    tol(sc.m[i]),
                );
                check_grid(
                    &mut st.v,
                    fails,
                    &w("v", i),
                    ov,
                    ord16(v[i]),
                    yv,
                    bf16_mid,
                    tol(sc.v[i]),
                );
            }
        }
        MomentState::Q8 {
            m,
            v,
            m_absmax,
            v_absmax,
        } => {
            for b in 0..n.div_ceil(QBLOCK) {
                let r = b * QBLOCK..((b + 1) * QBLOCK).min(n);
                for (is_m, codes, ref_codes, am, ref_am, scale, table) in [
                    (
                        true,
                        &out.mq,
                        m,
                        out.ma[b],
                        m_absmax[b],
                        &sc.m,
                        &man.m_table,
                    ),
                    (
                        false,
                        &out.vq,
                        v,
                        out.va[b],
                        v_absmax[b],
                        &sc.v,
                        &man.v_table,
                    ),
                ] {
                    let t = if is_m { &mut st.m } else { &mut st.v };
                    let name = if is_m { "m" } else { "v" };
                    // absmax: f32 values, error bound of the block's largest scale (plus
                    // the reference's rounding of its float64 absmax to f32).
                    let blk_scale = r.clone().map(|i| scale[i]).fold(0.0, f64::max);
                    let am_scale = blk_scale + ref_am as f64;
                    check_close(
                        &mut st.absmax,
                        fails,
                        &format!("{where_}: {name}_absmax[{b}]"),
                        am,
                        ref_am,
                        am_scale,
                    );
                    let am_err = tol(am_scale);
                    let signed_value = |k: i64| {
                        let v = table[k.unsigned_abs() as usize] as f64;
                        if k < 0 { -v } else { v }
                    };
                    let boundary = |k: i64| {
                        let top = if is_m { 0x78 } else { 248 };
                        (k < top && (is_m || k >= 0))
                            .then(|| (signed_value(k) + signed_value(k + 1)) / 2.0)
                    };
                    let ord = |c: u8| -> i64 {
                        if is_m {
                            let mag = (c & 0x7f) as i64;
                            if c & 0x80 != 0 { -mag } else { mag }
                        } else {
                            c as i64
                        }
                    };
                    let x_of = |i: usize| if is_m { shadow.m32[i] } else { shadow.v32[i] };
                    for i in r.clone() {
                        let x = x_of(i);
                        t.l2(
                            dec_q8(codes[i], am, table, is_m),
                            dec_q8(ref_codes[i], ref_am, table, is_m),
                        );
                        // y as lamb-core computes it (f32 division), signed for m.
                        let ya = if am > 0.0 { (x.abs() / am) as f64 } else { 0.0 };
                        let y = if is_m && x.is_sign_negative() {
                            -ya
                        } else {
                            ya
                        };
                        let tol_y = if am > 0.0 {
                            (tol(scale[i]) + ya * am_err) / am as f64 + 2.0 * U * ya
                        } else {
                            0.0
                        };
                        check_grid(
                            t,
                            fails,
                            &format!("{where_}: {name} code[{i}]"),
                            ord(codes[i]),
                            ord(ref_codes[i]),
                            y,
                            boundary,
                            tol_y,
                        );
                    }
                }
            }
        }
    }
}

/// Runs one combination: the teacher-forced steps (Scalar, detect, shadow) and the
/// free-running trajectory.
fn run_combo(man: &Manifest, combo: &Combo, fails: &mut Failures) -> ComboStats {
    let mut st = ComboStats::default();
    let (pf, gf, mf) = (combo.params, combo.grads, combo.moments);
    let detect = Backend::detect();
    for (k, spec) in man.tensors.iter().enumerate() {
        let init = spec.init.materialize(spec.len);
        let mut free = Storage::initial(&init, pf);
        for step in 1..=man.steps {
            let where_ = format!("{} / {} / step {step}", combo.name, spec.name);
            let seed = spec.sr_seeds[step as usize - 1];
            let g = GradBufs::new(spec.grads[step as usize - 1].materialize(spec.len));
            let input = if step == 1 {
                Storage::initial(&init, pf)
            } else {
                Storage::from_state(&combo.states[k][step as usize - 2])
            };
            let mut out = input.clone();
            let report = lamb_step(Backend::Scalar, &mut out, pf, &g, gf, mf, seed, step);
            if detect != Backend::Scalar {
                let mut out2 = input.clone();
                let r2 = lamb_step(detect, &mut out2, pf, &g, gf, mf, seed, step);
                if out2.bits() != out.bits() || r2 != report {
                    fails.add(format!("{where_}: {detect:?} differs from Scalar"));
                }
            }
            // The shadow step: the same decoded inputs in f32 storage.
            let [p_in, m_in, v_in] = input.decoded(pf, mf, man);
            let mut shadow = Storage::empty(spec.len);
            shadow.p32 = p_in;
            shadow.m32 = m_in;
            shadow.v32 = v_in;
            let gd = g.decoded(gf);
            let sr = lamb_step(
                Backend::Scalar,
                &mut shadow,
                PFmt::MasterBf16,
                &g,
                gf,
                MFmt::F32,
                seed,
                step,
            );
            if sr != report {
                fails.add(format!(
                    "{where_}: the shadow step saw other norms ({sr:?} vs {report:?})"
                ));
                continue;
            }
            check_step(
                man,
                combo,
                &where_,
                &input,
                &out,
                &shadow,
                &report,
                &gd,
                seed,
                step,
                &combo.states[k][step as usize - 1],
                &mut st,
                fails,
            );
            lamb_step(Backend::Scalar, &mut free, pf, &g, gf, mf, seed, step);
        }
        // Free-running 5 steps against the reference's final state.
        let last = Storage::from_state(&combo.states[k][man.steps as usize - 1]);
        let ours = free.decoded(pf, mf, man);
        let theirs = last.decoded(pf, mf, man);
        let start = Storage::initial(&init, pf).decoded(pf, mf, man);
        let d = |x: &[f32]| -> Vec<f32> {
            x.iter()
                .zip(&start[0])
                .map(|(&a, &b)| (a as f64 - b as f64) as f32)
                .collect()
        };
        st.free_dp = st.free_dp.max(rel_l2(&d(&ours[0]), &d(&theirs[0])));
        st.free_m = st.free_m.max(rel_l2(&ours[1], &theirs[1]));
        st.free_v = st.free_v.max(rel_l2(&ours[2], &theirs[2]));
    }
    st
}

/// The relative L2 bounds of the free-running trajectory after 5 steps (change of p, m, v),
/// by moment storage: an 8-bit code is 1/16 of its value, a bf16 value 2^-9, and a one-code
/// difference at one step shifts the rest of the trajectory a little.
fn free_run_bounds(p: PFmt, mo: MFmt) -> [f64; 3] {
    let p_bound = match p {
        PFmt::Bf16 | PFmt::Bf16Sr => 2e-2,
        _ => 5e-3,
    };
    let m_bound = match mo {
        MFmt::F32 => 1e-5,
        MFmt::Bf16 | MFmt::Bf16Sr | MFmt::Q8 => 1e-2,
    };
    [p_bound, m_bound, m_bound]
}

#[test]
fn compact_storage_matches_float64_reference() {
    let mut man = load();
    println!(
        "\n== compact storage vs the float64 NumPy reference ({}; {}; {} steps; data {})",
        man.hyperparameters,
        man.versions,
        man.steps,
        man.dir.display()
    );
    if let Some(m) = &man.mutation {
        println!("!! this reference was generated with --mutate {m}: the test must fail");
    }
    let h = &man.hyperparameters;
    let cfg = config();
    for (key, ours) in [
        ("lr", cfg.lr),
        ("beta1", cfg.beta1),
        ("beta2", cfg.beta2),
        ("eps", cfg.eps),
        ("weight_decay", cfg.weight_decay),
        ("grad_scale", 1.0),
    ] {
        assert_eq!(h[key].as_f64(), Some(ours), "hyperparameter {key}");
    }
    assert_eq!(h["bias_correction"], "f64");
    assert_eq!(h["eps_mode"], "outside_sqrt");
    assert_eq!(h["ratio_rule"], "zero_norm_is_one");
    assert_eq!(man.qblock, QBLOCK);

    let mut fails = Failures {
        list: vec![],
        count: 0,
    };
    // The reference's code tables and hash are lamb-core's.
    println!(
        "code tables: m sign+E4M3 bias {} ({} codes), v E5M3 bias {} ({} codes)",
        man.m_bias,
        man.m_table.len(),
        man.v_bias,
        man.v_table.len()
    );
    for (c, &val) in man.m_table.iter().enumerate() {
        let c = c as u8;
        if q8_m_decode(c, 1.0) != val || (c > 0 && q8_m_decode(c | 0x80, 1.0) != -val) {
            fails.add(format!(
                "m code {c:#04x}: lamb-core {} vs reference {val:e}",
                q8_m_decode(c, 1.0)
            ));
        }
    }
    for (c, &val) in man.v_table.iter().enumerate() {
        if q8_v_decode(c as u8, 1.0) != val {
            fails.add(format!(
                "v code {c}: lamb-core {} vs reference {val:e}",
                q8_v_decode(c as u8, 1.0)
            ));
        }
    }
    if fails.count > 0 {
        // Recorded as failures. The comparisons below must decode the reference's codes
        // the way lamb-core decodes its own (the shadow step reproduces lamb-core's
        // decoding), so they go on with lamb-core's tables: a reference written with
        // another table then also shows as code disagreements.
        println!(
            "!! the reference's code tables differ from lamb-core's ({} codes)",
            fails.count
        );
        man.m_table = (0..man.m_table.len())
            .map(|c| q8_m_decode(c as u8, 1.0))
            .collect();
        man.v_table = (0..man.v_table.len())
            .map(|c| q8_v_decode(c as u8, 1.0))
            .collect();
    }
    for &(seed, index, bits) in &man.stochastic_bits {
        if stochastic_bits(seed, index) != bits {
            fails.add(format!(
                "stochastic_bits({seed:#x}, {index}): lamb-core {} vs reference {bits}",
                stochastic_bits(seed, index)
            ));
        }
    }

    println!(
        "backends: Scalar (compared) and {:?} (must be bit-identical to Scalar)",
        Backend::detect()
    );
    println!(
        "columns: identical-code fraction, # one code apart at a boundary, max |y−boundary|/tol \
         (≤ 1); f32 quantities: identical fraction, max error in 2^-24·scale units (tol \
         {TOL_ULPS}). teacher: max rel L2 of decoded p/m/v after one step; free: rel L2 of \
         Δp/m/v after 5 free-running steps"
    );
    println!(
        "{:<44} {:>17} {:>17} {:>17} {:>17} {:>15} {:>8} {:>26} {:>26}",
        "combination",
        "params",
        "model copy",
        "m",
        "v",
        "absmax",
        "ratio",
        "teacher p/m/v",
        "free Δp/m/v"
    );
    let mut sr_rows = vec![];
    let mut total = ComboStats::default();
    for combo in &man.combos {
        let before = fails.count;
        let st = run_combo(&man, combo, &mut fails);
        let coded_p = !matches!(combo.params, PFmt::F32 | PFmt::MasterBf16 | PFmt::MasterF16);
        let coded_m = combo.moments != MFmt::F32;
        println!(
            "{:<44} {:>17} {:>17} {:>17} {:>17} {:>15} {:>8.1e} {:>8.1e} {:>8.1e} {:>8.1e} {:>8.1e} {:>8.1e} {:>8.1e}{}",
            combo.name,
            st.param.summary(coded_p),
            st.model.summary(true),
            st.m.summary(coded_m),
            st.v.summary(coded_m),
            st.absmax.summary(false),
            st.ratio_max_rel,
            st.dec_p,
            st.dec_m,
            st.dec_v,
            st.free_dp,
            st.free_m,
            st.free_v,
            if fails.count > before {
                format!("  <- {} FAILURES", fails.count - before)
            } else {
                String::new()
            }
        );
        for (name, t) in [
            ("params", &st.param),
            ("model copy", &st.model),
            ("m", &st.m),
            ("v", &st.v),
        ] {
            let coded = match name {
                "params" => coded_p,
                "model copy" => true,
                _ => coded_m,
            };
            if coded && t.n > 0 && t.identical_fraction() < MIN_IDENTICAL {
                fails.add(format!(
                    "{}: only {:.4} of the {name} codes are identical (< {MIN_IDENTICAL})",
                    combo.name,
                    t.identical_fraction()
                ));
            }
        }
        let bounds = free_run_bounds(combo.params, combo.moments);
        for (name, got, bound) in [
            ("Δp", st.free_dp, bounds[0]),
            ("m", st.free_m, bounds[1]),
            ("v", st.free_v, bounds[2]),
        ] {
            if got > bound {
                fails.add(format!(
                    "{}: free-running 5 steps, rel L2 of {name} {got:e} > {bound:e}",
                    combo.name
                ));
            }
        }
        if combo.params == PFmt::Bf16Sr {
            sr_rows.push((format!("{} [params]", combo.name), st.param.clone()));
        }
        if combo.moments == MFmt::Bf16Sr {
            sr_rows.push((format!("{} [m]", combo.name), st.m.clone()));
            sr_rows.push((format!("{} [v]", combo.name), st.v.clone()));
        }
        total.param.merge(&st.param);
        total.model.merge(&st.model);
        total.m.merge(&st.m);
        total.v.merge(&st.v);
        total.absmax.merge(&st.absmax);
        total.ratio_max_rel = total.ratio_max_rel.max(st.ratio_max_rel);
        total.ratio_max_units = total.ratio_max_units.max(st.ratio_max_units);
    }
    println!(
        "\nstochastic rounding (bf16 params, bf16 moments): lamb-core's bits against the reference's \
         (same hash, float64 pre-rounding value):"
    );
    println!(
        "{:<44} {:>8} {:>9} {:>7} {:>7} {:>13} {:>8} {:>8}",
        "combination",
        "elements",
        "identical",
        "±1 ulp",
        "other",
        "max margin",
        "at risk",
        "≤ 1 ulp"
    );
    for (name, t) in &sr_rows {
        let mut tols = t.sr_tol_ulps.clone();
        tols.sort_by(f64::total_cmp);
        println!(
            "{:<44} {:>8} {:>9} {:>7} {:>7} {:>13} {:>8} {:>8}   (tol median {:.1}, 99th pct {:.1} f32 ulps)",
            name,
            t.n,
            t.identical,
            t.adjacent,
            t.bad,
            if t.adjacent == 0 {
                "-".to_string()
            } else {
                format!("{:.2} ulp", t.sr_margin_ulps)
            },
            t.sr_at_risk,
            t.sr_within_ulp,
            tols[tols.len() / 2],
            tols[tols.len() * 99 / 100],
        );
    }
    println!(
        "(margin: distance of lamb-core's f32 value to the threshold |a| + (1 − r/2^16)·q of its \
         draw, in f32 ulps, at the elements that differ; at risk: elements within tol of it; \
         ≤ 1 ulp: within one f32 ulp of it)"
    );
    println!(
        "\nall combinations (identical / all, then differing within tolerance): params {}/{}, {}; model copies {}/{}, {}; m \
         {}/{}, {}; v {}/{}, {}; max slack {:.3}; max f32 error {:.2} units (tol {TOL_ULPS}); \
         max trust-ratio rel error {:.1e} ({:.2} units of its bound's scale)",
        total.param.identical,
        total.param.n,
        total.param.adjacent,
        total.model.identical,
        total.model.n,
        total.model.adjacent,
        total.m.identical,
        total.m.n,
        total.m.adjacent,
        total.v.identical,
        total.v.n,
        total.v.adjacent,
        [&total.param, &total.model, &total.m, &total.v]
            .iter()
            .map(|t| t.max_slack)
            .fold(0.0, f64::max),
        [&total.param, &total.m, &total.v, &total.absmax]
            .iter()
            .map(|t| t.max_err_units)
            .fold(0.0, f64::max),
        total.ratio_max_rel,
        total.ratio_max_units,
    );
    if fails.count > 0 {
        println!("\n{} FAILURES (first {}):", fails.count, fails.list.len());
        for f in &fails.list {
            println!("  {f}");
        }
        panic!(
            "{} disagreements with the float64 reference (run with --nocapture)",
            fails.count
        );
    }
}
