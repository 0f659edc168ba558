//! The element checks of the precision reference test: tolerances (module docs of
//! `precision_reference.rs`), tallies of agreement, and the recorded failures.

use lamb_core::StepScalars;
use lamb_core::codec::stochastic_bits;

use crate::precision_storage::{dec_bf16, half_value, ord16};

/// 2^-24: the unit roundoff of f32.
pub const U: f64 = 1.0 / 16_777_216.0;
/// The error bound of one f32 step against float64, in units of `2^-24 · scale`.
pub const TOL_ULPS: f64 = 32.0;
/// Smallest fraction of codes identical to the reference's, per coded quantity and
/// combination: a backstop, the per-element rule is the real check. Codes differ only at a
/// value within `tol` of a boundary: ~0.03 % of values with f32 gradients, but more with
/// gradients of few significant bits. With bf16/f16 gradients and bf16 moments,
/// `0.9·m + 0.1·g` is often exactly a short binary number (whenever `9·m + g` has a factor
/// 5), which can lie exactly on a bf16 midpoint; float64's `1 − 0.9` (just below 0.1) and
/// f32's `0.1` (just above) then round it to opposite sides. Measured minimum 0.9815 (m,
/// f16 gradients), 0.9906 with bf16 gradients.
pub const MIN_IDENTICAL: f64 = 0.97;

/// Per-element magnitudes that bound lamb-core's f32 rounding error (module docs).
pub struct Scales {
    pub p: Vec<f64>,
    pub u: Vec<f64>,
    pub m: Vec<f64>,
    pub v: Vec<f64>,
}

impl Scales {
    /// From the decoded inputs, lamb-core's pre-encoding f32 results (the shadow step) and
    /// its step size.
    pub fn new(
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
pub struct Tally {
    pub n: usize,
    pub identical: usize,
    /// Different codes, lamb-core's value within `tol` of every boundary between them
    /// (f32 quantities: different values within `tol`).
    pub adjacent: usize,
    /// Violations.
    pub bad: usize,
    pub max_dist: u64,
    /// Max `|y − boundary| / tol` over the adjacent pairs (must stay ≤ 1).
    pub max_slack: f64,
    /// f32 quantities: max `|lamb − reference| / (2^-24 · scale)`.
    pub max_err_units: f64,
    /// Decoded values: Σ(lamb − ref)², Σ ref².
    pub diff2: f64,
    pub norm2: f64,
    /// Stochastic rounding: max distance of lamb-core's value to the threshold, in f32
    /// ulps, at the elements whose result differs; and how many elements lie within `tol`
    /// of their threshold (could differ).
    pub sr_margin_ulps: f64,
    pub sr_at_risk: usize,
    /// Elements within one f32 ulp of their threshold.
    pub sr_within_ulp: usize,
    /// The tolerance at each element, in f32 ulps of its value.
    pub sr_tol_ulps: Vec<f64>,
}

impl Tally {
    pub fn identical_fraction(&self) -> f64 {
        if self.n == 0 {
            1.0
        } else {
            self.identical as f64 / self.n as f64
        }
    }
    pub fn rel_l2(&self) -> f64 {
        if self.norm2 == 0.0 {
            self.diff2.sqrt()
        } else {
            (self.diff2 / self.norm2).sqrt()
        }
    }
    pub fn l2(&mut self, lamb: f32, reference: f32) {
        let d = lamb as f64 - reference as f64;
        self.diff2 += d * d;
        self.norm2 += reference as f64 * reference as f64;
    }
    pub fn merge(&mut self, o: &Tally) {
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
    pub fn summary(&self, coded: bool) -> String {
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
pub struct Failures {
    pub list: Vec<String>,
    pub count: usize,
}

impl Failures {
    pub fn add(&mut self, msg: String) {
        self.count += 1;
        if self.list.len() < 40 {
            self.list.push(msg);
        }
    }
}

/// An f32 value against the reference's: within `tol_units · 2^-24 · scale`.
pub fn check_close(
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

/// A code of lamb-core and the reference's (as signed ordinals), with lamb-core's value `y`
/// before encoding and the tolerance on `y`.
pub struct CodePair {
    pub lamb: i64,
    pub reference: i64,
    pub y: f64,
    pub tol: f64,
}

/// Codes against the reference's: equal, or every boundary between them within `tol` of
/// lamb-core's pre-encoding value `y` (lamb-core's code is the one nearest to `y`, checked
/// exactly elsewhere, so it is enough to check the boundary next to the reference's code;
/// `boundary(k)` is the boundary between codes k and k + 1). Adjacent codes are the usual
/// case; more than one code apart happens only where the codes are finer than the
/// tolerance (a value that almost cancels to 0, in bf16).
pub fn check_grid(
    t: &mut Tally,
    fails: &mut Failures,
    what: &str,
    pair: CodePair,
    boundary: impl Fn(i64) -> Option<f64>,
) {
    let CodePair {
        lamb,
        reference,
        y,
        tol,
    } = pair;
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
pub fn moment_draws(seed: u64, i: usize) -> (u32, u32) {
    const M_STREAM: u64 = 0x6d5f_7374_7265_616d; // "m_stream"
    const V_STREAM: u64 = 0x765f_7374_7265_616d; // "v_stream"
    (
        stochastic_bits(seed ^ M_STREAM, i as u64) & 0xffff,
        stochastic_bits(seed ^ V_STREAM, i as u64) & 0xffff,
    )
}

/// A stochastically rounded bf16 of lamb-core (`lamb`, from its f32 value `y`) and the
/// reference's, rounded with the same `draw`, and the tolerance on `y`.
pub struct SrPair {
    pub y: f32,
    pub lamb: u16,
    pub reference: u16,
    pub draw: u32,
    pub tol: f64,
}

/// A stochastically rounded bf16 against the reference's: lamb-core's f32 value `y` and
/// the reference's float64 value round with the same draw, so their results are equal, or
/// they are the two candidates (toward zero and one ulp away) and the threshold
/// `|a| + (1 − draw/2^16)·q` the draw sets between them lies within `tol` of `y`.
pub fn check_sr(t: &mut Tally, fails: &mut Failures, what: &str, pair: SrPair) {
    let SrPair {
        y,
        lamb: ours,
        reference,
        draw,
        tol,
    } = pair;
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
    let pair = CodePair {
        lamb: lo,
        reference: rf,
        y: y as f64,
        tol,
    };
    check_grid(t, fails, what, pair, |_| pair_ok.then_some(sign * thr));
}

/// All tallies of one combination.
#[derive(Default)]
pub struct ComboStats {
    pub param: Tally,
    pub model: Tally,
    pub m: Tally,
    pub v: Tally,
    pub absmax: Tally,
    pub ratio_max_rel: f64,
    /// The same in units of 2^-24·(1 + ‖scale_u‖/‖u‖).
    pub ratio_max_units: f64,
    /// Decoded-state relative L2 (teacher-forced), max over steps and tensors.
    pub dec_p: f64,
    pub dec_m: f64,
    pub dec_v: f64,
    /// Free-running trajectory, final state: relative L2 of the change of p, of m, of v.
    pub free_dp: f64,
    pub free_m: f64,
    pub free_v: f64,
}

pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let mut t = Tally::default();
    for (&x, &y) in a.iter().zip(b) {
        t.l2(x, y);
    }
    t.rel_l2()
}
