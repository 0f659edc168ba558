//! One step of the precision reference test: lamb-core from the reference's state, checked
//! against the reference's next state. First lamb-core's encoding of its own f32 values
//! (exact), then every stored value against the reference (tolerances).

use half::{bf16, f16};
use lamb_core::codec::{QBLOCK, q8_m_decode, q8_v_decode, stochastic_bits};
use lamb_core::{LayerReport, StepScalars};

use crate::precision_check::{
    CodePair, ComboStats, Failures, Scales, SrPair, TOL_ULPS, U, check_close, check_grid, check_sr,
    moment_draws, rel_l2,
};
use crate::precision_data::{Combo, MFmt, Manifest, MomentState, PFmt, ParamState, State};
use crate::precision_storage::{
    Storage, config, dec_bf16, dec_f16, dec_q8, half_value, nearest_code, ord16,
};

/// One step of one tensor of one combination, after lamb-core ran it.
pub struct StepCase<'a> {
    pub man: &'a Manifest,
    pub combo: &'a Combo,
    /// Where, for messages.
    pub where_: &'a str,
    /// The state the step started from.
    pub input: &'a Storage,
    /// lamb-core's state after the step.
    pub out: &'a Storage,
    /// The same step from the decoded inputs in f32 storage: lamb-core's values before
    /// encoding.
    pub shadow: &'a Storage,
    pub report: &'a LayerReport,
    /// The decoded gradients.
    pub g: &'a [f32],
    pub seed: u64,
    pub step: u64,
    /// The reference's state after the step.
    pub reference: &'a State,
}

impl StepCase<'_> {
    /// `where: what[i]`, for messages.
    fn at(&self, what: &str, i: usize) -> String {
        format!("{}: {what}[{i}]", self.where_)
    }

    /// Records a wrong encoding of lamb-core's own value.
    fn encoding_fail(&self, fails: &mut Failures, what: &str, i: usize, detail: String) {
        fails.add(format!("{}: ENCODING {what}[{i}]: {detail}", self.where_));
    }
}

/// Checks lamb-core's encoding of its own f32 values (exact) and everything against the
/// reference (tolerances).
pub fn check_step(c: &StepCase, st: &mut ComboStats, fails: &mut Failures) {
    let (pf, mf) = (c.combo.params, c.combo.moments);
    let scalars = StepScalars::new(&config(), c.step, 1.0).unwrap();
    let inputs = c.input.decoded(pf, mf, c.man);
    let sh = [
        c.shadow.p32.clone(),
        c.shadow.m32.clone(),
        c.shadow.v32.clone(),
    ];
    let sc = Scales::new(&scalars, c.report.step_size, &inputs, c.g, &sh);
    let ours = c.out.decoded(pf, mf, c.man);
    let theirs = Storage::from_state(c.reference).decoded(pf, mf, c.man);
    st.dec_p = st.dec_p.max(rel_l2(&ours[0], &theirs[0]));
    st.dec_m = st.dec_m.max(rel_l2(&ours[1], &theirs[1]));
    st.dec_v = st.dec_v.max(rel_l2(&ours[2], &theirs[2]));
    check_trust_ratio(c, &sc, st, fails);

    // -- 1. lamb-core's encoding of its own f32 values, exactly.
    check_param_encoding(c, fails);
    check_moment_encoding(c, fails);

    // -- 2. Against the reference.
    check_params(c, &sc, st, fails);
    check_moments(c, &sc, st, fails);
}

/// Trust ratio: ‖u‖'s error is at most ‖TOL_ULPS·2^-24·scale_u‖ (plus a few roundings of
/// the norms and of the f32 report).
fn check_trust_ratio(c: &StepCase, sc: &Scales, st: &mut ComboStats, fails: &mut Failures) {
    let (report, reference) = (c.report, c.reference);
    let rel = (report.trust_ratio as f64 - reference.trust_ratio).abs() / reference.trust_ratio;
    let u_scale = sc.u.iter().map(|x| x * x).sum::<f64>().sqrt();
    let bound = TOL_ULPS * U * (1.0 + u_scale / report.update_norm as f64);
    st.ratio_max_rel = st.ratio_max_rel.max(rel);
    st.ratio_max_units = st.ratio_max_units.max(rel / bound * TOL_ULPS);
    if rel > bound {
        fails.add(format!(
            "{}: trust ratio {} vs reference {} (rel {rel:e} > {bound:e})",
            c.where_, report.trust_ratio, reference.trust_ratio
        ));
    }
}

/// The stored parameters are exactly lamb-core's f32 values encoded.
fn check_param_encoding(c: &StepCase, fails: &mut Failures) {
    let (out, pf) = (c.out, c.combo.params);
    for (i, &y) in c.shadow.p32.iter().enumerate() {
        match pf {
            PFmt::F32 => {
                if out.p32[i].to_bits() != y.to_bits() {
                    let detail = format!("{} != f32 result {y}", out.p32[i]);
                    c.encoding_fail(fails, "param", i, detail);
                }
            }
            PFmt::Bf16 => {
                if out.pb[i].to_bits() != bf16::from_f32(y).to_bits() {
                    let detail = format!("{} is not RNE({y:e})", out.pb[i]);
                    c.encoding_fail(fails, "param", i, detail);
                }
            }
            PFmt::Bf16Sr => {
                let r = stochastic_bits(c.seed, i as u64) & 0xffff;
                let expect = (y.to_bits().wrapping_add(r) >> 16) as u16;
                if out.pb[i].to_bits() != expect {
                    let detail = format!("{} is not SR({y:e}, {r})", out.pb[i]);
                    c.encoding_fail(fails, "param", i, detail);
                }
            }
            PFmt::MasterBf16 | PFmt::MasterF16 => {
                let model = if pf == PFmt::MasterBf16 {
                    (out.pb[i].to_bits(), bf16::from_f32(y).to_bits())
                } else {
                    (out.ph[i].to_bits(), f16::from_f32(y).to_bits())
                };
                if out.p32[i].to_bits() != y.to_bits() || model.0 != model.1 {
                    let detail = format!("{}/{:#06x} for {y:e}", out.p32[i], model.0);
                    c.encoding_fail(fails, "master/model", i, detail);
                }
            }
        }
    }
}

/// The stored moments are exactly lamb-core's f32 values encoded.
fn check_moment_encoding(c: &StepCase, fails: &mut Failures) {
    let (out, shadow) = (c.out, c.shadow);
    let n = c.g.len();
    match c.combo.moments {
        MFmt::F32 => {
            if out.m32 != shadow.m32 || out.v32 != shadow.v32 {
                c.encoding_fail(
                    fails,
                    "m/v",
                    0,
                    "f32 moments differ from the f32 step".into(),
                );
            }
        }
        MFmt::Bf16 => {
            for i in 0..n {
                if out.mb[i] != bf16::from_f32(shadow.m32[i])
                    || out.vb[i] != bf16::from_f32(shadow.v32[i])
                {
                    c.encoding_fail(fails, "m/v", i, "not RNE of the f32 values".into());
                }
            }
        }
        MFmt::Bf16Sr => {
            for i in 0..n {
                let (rm, rv) = moment_draws(c.seed, i);
                let sr = |y: f32, r: u32| (y.to_bits().wrapping_add(r) >> 16) as u16;
                if out.mb[i].to_bits() != sr(shadow.m32[i], rm)
                    || out.vb[i].to_bits() != sr(shadow.v32[i], rv)
                {
                    c.encoding_fail(fails, "m/v", i, "not SR of the f32 values".into());
                }
            }
        }
        MFmt::Q8 => {
            for b in 0..n.div_ceil(QBLOCK) {
                check_q8_encoding(c, b, fails);
            }
        }
    }
}

/// Block `b` of 8-bit moments: the absmax of lamb-core's new values, the nearest codes of
/// the reference's table, and lamb-core's decoder agreeing with the table.
fn check_q8_encoding(c: &StepCase, b: usize, fails: &mut Failures) {
    let (out, shadow, man) = (c.out, c.shadow, c.man);
    let r = b * QBLOCK..((b + 1) * QBLOCK).min(c.g.len());
    let am = shadow.m32[r.clone()]
        .iter()
        .fold(0f32, |a, x| a.max(x.abs()));
    let av = shadow.v32[r.clone()]
        .iter()
        .fold(0f32, |a, x| a.max(x.abs()));
    if out.ma[b] != am || out.va[b] != av {
        let detail = format!("{}/{} != {am}/{av}", out.ma[b], out.va[b]);
        c.encoding_fail(fails, "absmax", b, detail);
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
            let detail = format!("{}/{} != nearest {cm}/{cv}", out.mq[i], out.vq[i]);
            c.encoding_fail(fails, "q8 code", i, detail);
        }
        // lamb-core's own decoder agrees with the table.
        if q8_m_decode(out.mq[i], out.ma[b]).to_bits()
            != dec_q8(out.mq[i], out.ma[b], &man.m_table, true).to_bits()
            || q8_v_decode(out.vq[i], out.va[b]).to_bits()
                != dec_q8(out.vq[i], out.va[b], &man.v_table, false).to_bits()
        {
            c.encoding_fail(
                fails,
                "q8 decode",
                i,
                "lamb-core decodes differently".into(),
            );
        }
    }
}

/// The tolerance of a value of scale `scale`.
fn tol(scale: f64) -> f64 {
    TOL_ULPS * U * scale
}

/// The boundary between bf16 ordinals `k` and `k + 1`.
fn bf16_mid(k: i64) -> Option<f64> {
    Some((half_value(k, false) + half_value(k + 1, false)) / 2.0)
}

/// The boundary between f16 ordinals `k` and `k + 1`.
fn f16_mid(k: i64) -> Option<f64> {
    Some((half_value(k, true) + half_value(k + 1, true)) / 2.0)
}

/// The stored parameters (and model copies) against the reference's.
#[allow(clippy::needless_range_loop)] // parallel arrays by index
fn check_params(c: &StepCase, sc: &Scales, st: &mut ComboStats, fails: &mut Failures) {
    let (out, shadow) = (c.out, c.shadow);
    let n = c.g.len();
    match (&c.reference.params, c.combo.params) {
        (ParamState::F32(r), _) => {
            for i in 0..n {
                let what = c.at("param", i);
                check_close(&mut st.param, fails, &what, out.p32[i], r[i], sc.p[i]);
            }
        }
        (ParamState::Bf16(r), PFmt::Bf16) => {
            for i in 0..n {
                st.param.l2(dec_bf16(out.pb[i].to_bits()), dec_bf16(r[i]));
                let pair = CodePair {
                    lamb: ord16(out.pb[i].to_bits()),
                    reference: ord16(r[i]),
                    y: shadow.p32[i] as f64,
                    tol: tol(sc.p[i]),
                };
                check_grid(&mut st.param, fails, &c.at("param", i), pair, bf16_mid);
            }
        }
        (ParamState::Bf16(r), PFmt::Bf16Sr) => {
            for i in 0..n {
                let pair = SrPair {
                    y: shadow.p32[i],
                    lamb: out.pb[i].to_bits(),
                    reference: r[i],
                    draw: stochastic_bits(c.seed, i as u64) & 0xffff,
                    tol: tol(sc.p[i]),
                };
                check_sr(&mut st.param, fails, &c.at("param (stochastic)", i), pair);
            }
        }
        (ParamState::Master { master, model }, _) => {
            check_master(c, sc, st, fails, (master, model.as_slice()));
        }
        _ => unreachable!(),
    }
}

/// The master copy (f32) and the model copy (bf16 or f16) against the reference's.
fn check_master(
    c: &StepCase,
    sc: &Scales,
    st: &mut ComboStats,
    fails: &mut Failures,
    (master, model): (&[f32], &[u16]),
) {
    let out = c.out;
    let f16_fmt = c.combo.params == PFmt::MasterF16;
    for i in 0..c.g.len() {
        let what = c.at("master", i);
        check_close(&mut st.param, fails, &what, out.p32[i], master[i], sc.p[i]);
        let ours = if f16_fmt {
            out.ph[i].to_bits()
        } else {
            out.pb[i].to_bits()
        };
        let dec = |b: u16| if f16_fmt { dec_f16(b) } else { dec_bf16(b) };
        st.model.l2(dec(ours), dec(model[i]));
        let pair = CodePair {
            lamb: ord16(ours),
            reference: ord16(model[i]),
            y: out.p32[i] as f64,
            tol: tol(sc.p[i]),
        };
        let mid = |k| if f16_fmt { f16_mid(k) } else { bf16_mid(k) };
        check_grid(&mut st.model, fails, &c.at("model copy", i), pair, mid);
    }
}

/// The stored moments against the reference's.
#[allow(clippy::needless_range_loop)] // parallel arrays by index
fn check_moments(c: &StepCase, sc: &Scales, st: &mut ComboStats, fails: &mut Failures) {
    let (out, shadow) = (c.out, c.shadow);
    let n = c.g.len();
    match &c.reference.moments {
        MomentState::F32 { m, v } => {
            for i in 0..n {
                check_close(&mut st.m, fails, &c.at("m", i), out.m32[i], m[i], sc.m[i]);
                check_close(&mut st.v, fails, &c.at("v", i), out.v32[i], v[i], sc.v[i]);
            }
        }
        MomentState::Bf16 { m, v } if c.combo.moments == MFmt::Bf16Sr => {
            for i in 0..n {
                let (rm, rv) = moment_draws(c.seed, i);
                let pair = SrPair {
                    y: shadow.m32[i],
                    lamb: out.mb[i].to_bits(),
                    reference: m[i],
                    draw: rm,
                    tol: tol(sc.m[i]),
                };
                check_sr(&mut st.m, fails, &c.at("m (stochastic)", i), pair);
                let pair = SrPair {
                    y: shadow.v32[i],
                    lamb: out.vb[i].to_bits(),
                    reference: v[i],
                    draw: rv,
                    tol: tol(sc.v[i]),
                };
                check_sr(&mut st.v, fails, &c.at("v (stochastic)", i), pair);
            }
        }
        MomentState::Bf16 { m, v } => {
            for i in 0..n {
                st.m.l2(dec_bf16(out.mb[i].to_bits()), dec_bf16(m[i]));
                st.v.l2(dec_bf16(out.vb[i].to_bits()), dec_bf16(v[i]));
                let (ym, yv) = (shadow.m32[i] as f64, shadow.v32[i] as f64);
                let (om, ov) = (ord16(out.mb[i].to_bits()), ord16(out.vb[i].to_bits()));
                let pair = CodePair {
                    lamb: om,
                    reference: ord16(m[i]),
                    y: ym,
                    tol: tol(sc.m[i]),
                };
                check_grid(&mut st.m, fails, &c.at("m", i), pair, bf16_mid);
                let pair = CodePair {
                    lamb: ov,
                    reference: ord16(v[i]),
                    y: yv,
                    tol: tol(sc.v[i]),
                };
                check_grid(&mut st.v, fails, &c.at("v", i), pair, bf16_mid);
            }
        }
        MomentState::Q8 { .. } => {
            for b in 0..n.div_ceil(QBLOCK) {
                check_q8_moments(c, sc, st, fails, b);
            }
        }
    }
}

/// Block `b` of both 8-bit moments against the reference's.
fn check_q8_moments(
    c: &StepCase,
    sc: &Scales,
    st: &mut ComboStats,
    fails: &mut Failures,
    b: usize,
) {
    let MomentState::Q8 {
        m,
        v,
        m_absmax,
        v_absmax,
    } = &c.reference.moments
    else {
        unreachable!("8-bit moments");
    };
    let out = c.out;
    let sides = [
        Q8Side {
            is_m: true,
            codes: &out.mq,
            ref_codes: m,
            am: out.ma[b],
            ref_am: m_absmax[b],
            scale: &sc.m,
            table: &c.man.m_table,
        },
        Q8Side {
            is_m: false,
            codes: &out.vq,
            ref_codes: v,
            am: out.va[b],
            ref_am: v_absmax[b],
            scale: &sc.v,
            table: &c.man.v_table,
        },
    ];
    for side in sides {
        check_q8_block(c, st, fails, b, side);
    }
}

/// One 8-bit moment (m or v) of one block: lamb-core's codes and absmax, and the
/// reference's.
struct Q8Side<'a> {
    is_m: bool,
    codes: &'a [u8],
    ref_codes: &'a [u8],
    am: f32,
    ref_am: f32,
    scale: &'a [f64],
    table: &'a [f32],
}

/// Block `b` of one 8-bit moment against the reference: the absmax within tolerance, then
/// each code equal or at a boundary within the tolerance that the absmax error widens.
fn check_q8_block(c: &StepCase, st: &mut ComboStats, fails: &mut Failures, b: usize, q: Q8Side) {
    let Q8Side {
        is_m,
        codes,
        ref_codes,
        am,
        ref_am,
        scale,
        table,
    } = q;
    let r = b * QBLOCK..((b + 1) * QBLOCK).min(c.g.len());
    let t = if is_m { &mut st.m } else { &mut st.v };
    let name = if is_m { "m" } else { "v" };
    // absmax: f32 values, error bound of the block's largest scale (plus the reference's
    // rounding of its float64 absmax to f32).
    let blk_scale = r.clone().map(|i| scale[i]).fold(0.0, f64::max);
    let am_scale = blk_scale + ref_am as f64;
    let what = format!("{}: {name}_absmax[{b}]", c.where_);
    check_close(&mut st.absmax, fails, &what, am, ref_am, am_scale);
    let am_err = tol(am_scale);
    let signed_value = |k: i64| {
        let v = table[k.unsigned_abs() as usize] as f64;
        if k < 0 { -v } else { v }
    };
    let boundary = |k: i64| {
        let top = if is_m { 0x78 } else { 248 };
        (k < top && (is_m || k >= 0)).then(|| (signed_value(k) + signed_value(k + 1)) / 2.0)
    };
    let ord = |c: u8| -> i64 {
        if is_m {
            let mag = (c & 0x7f) as i64;
            if c & 0x80 != 0 { -mag } else { mag }
        } else {
            c as i64
        }
    };
    let x_of = |i: usize| {
        if is_m {
            c.shadow.m32[i]
        } else {
            c.shadow.v32[i]
        }
    };
    for i in r {
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
        let pair = CodePair {
            lamb: ord(codes[i]),
            reference: ord(ref_codes[i]),
            y,
            tol: tol_y,
        };
        check_grid(
            t,
            fails,
            &format!("{}: {name} code[{i}]", c.where_),
            pair,
            boundary,
        );
    }
}
