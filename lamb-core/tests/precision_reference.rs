//! Compact storage against a float64 NumPy reference of the same quantisation schemes
//! (`tests/data/precision/`, made by `scripts/reference/precision.py`).
//!
//! Every combination of params {f32, bf16 nearest, bf16 stochastic, f32 master + bf16 copy,
//! f32 master + f16 copy} × grads {the params' half format, f32} × moments {f32, bf16
//! nearest, bf16 stochastic, 8-bit blockwise} runs 5 steps of the LAMB paper preset (lr
//! 1e-2) on 5 layers (lengths 1, 255, 256 zero-initialised, 257, 777).
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
//! result is computed from (see [`Scales`](precision_check::Scales)): `s_m = |β1·m| + |β3·g|` for m,
//! `s_v = β2·v + (1−β2)·g²` for v, `|p| + lr·r·s_u` for p with `s_u = (s_m/(1−β1^t)) /
//! (√v̂ + ε) + λ|p|` the scale of u. Each f32 operation contributes at most
//! 2^-24 relative to its result (and the f32 hyperparameters 0.9, 0.999, 1e-6, 0.01 are
//! within 2^-24 of the float64 ones), so the update chains (≈ 5 roundings for m and v,
//! ≈ 12 for p, the trust ratio included) stay below 16 units: `TOL_ULPS` = 32 leaves a
//! factor 2 and is printed against the measured worst case. A wrong code table, rounding
//! direction, absmax block or missing master copy moves codes where lamb-core's value is
//! far from any boundary (up to half a code step, i.e. 2^15 f32 ulps for bf16), so it
//! cannot hide under this tolerance; the identical-code fraction is also required to be
//! at least [`MIN_IDENTICAL`](precision_check::MIN_IDENTICAL). The free-running trajectory (lamb-core alone for 5 steps
//! from the same inputs) must end within [`free_run_bounds`] of the reference. Run with
//! `--nocapture` for the measured agreement, and see `tests/data/precision/README.md` for mutations of the reference that this test catches.

//!
//! The parts: `common/precision_data.rs` reads the reference, `common/layer_storage.rs`
//! holds one layer in every format, `common/precision_storage.rs` decodes it and runs
//! lamb-core's step on it,
//! `common/precision_check.rs` has the tolerances and the per-element checks, and
//! `common/precision_step.rs` checks one step; this file runs the combinations and reports.

#[path = "common/layer_storage.rs"]
mod layer_storage;
#[path = "common/precision_check.rs"]
mod precision_check;
#[path = "common/precision_data.rs"]
mod precision_data;
#[path = "common/precision_step.rs"]
mod precision_step;
#[path = "common/precision_storage.rs"]
mod precision_storage;
#[path = "common/reference_data.rs"]
#[allow(dead_code)] // this test uses the recipes only
mod reference_data;

use lamb_core::Backend;
use lamb_core::codec::{QBLOCK, q8_m_decode, q8_v_decode, stochastic_bits};
use precision_check::{ComboStats, Failures, MIN_IDENTICAL, TOL_ULPS, Tally, rel_l2};
use precision_data::{Combo, MFmt, Manifest, PFmt, TensorSpec, load};
use precision_step::{StepCase, check_step};
use precision_storage::{Fmts, GradBufs, Storage, config, lamb_step};

/// Runs one combination: the teacher-forced steps (Scalar, detect, shadow) and the
/// free-running trajectory.
fn run_combo(man: &Manifest, combo: &Combo, fails: &mut Failures) -> ComboStats {
    let mut st = ComboStats::default();
    let f = Fmts {
        p: combo.params,
        g: combo.grads,
        m: combo.moments,
    };
    for (k, spec) in man.tensors.iter().enumerate() {
        let init = spec.init.materialize(spec.len);
        let mut free = Storage::initial(&init, f.p);
        for step in 1..=man.steps {
            let seed = spec.sr_seeds[step as usize - 1];
            let g = GradBufs::new(spec.grads[step as usize - 1].materialize(spec.len));
            let input = if step == 1 {
                Storage::initial(&init, f.p)
            } else {
                Storage::from_state(&combo.states[k][step as usize - 2])
            };
            let at = Tensor {
                k,
                spec,
                step,
                seed,
            };
            if run_step(man, combo, &at, &input, &g, &mut st, fails) {
                lamb_step(Backend::Scalar, &mut free, f, &g, seed, step);
            }
        }
        // Free-running 5 steps against the reference's final state.
        let last = Storage::from_state(&combo.states[k][man.steps as usize - 1]);
        let ours = free.decoded(f.p, f.m, man);
        let theirs = last.decoded(f.p, f.m, man);
        let start = Storage::initial(&init, f.p).decoded(f.p, f.m, man);
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

/// Tensor `k` (`spec`) at step `step`, whose stochastic-rounding seed is `seed`.
struct Tensor<'a> {
    k: usize,
    spec: &'a TensorSpec,
    step: u64,
    seed: u64,
}

/// One teacher-forced step from `input`: Scalar, the detected backend (the same bits), the
/// shadow step, and the checks against the reference. `false` (the failure recorded) where
/// the shadow step saw other norms: nothing else of this step can be checked.
fn run_step(
    man: &Manifest,
    combo: &Combo,
    at: &Tensor,
    input: &Storage,
    g: &GradBufs,
    st: &mut ComboStats,
    fails: &mut Failures,
) -> bool {
    let (pf, gf, mf) = (combo.params, combo.grads, combo.moments);
    let f = Fmts {
        p: pf,
        g: gf,
        m: mf,
    };
    let (step, seed) = (at.step, at.seed);
    let where_ = format!("{} / {} / step {step}", combo.name, at.spec.name);
    let mut out = input.clone();
    let report = lamb_step(Backend::Scalar, &mut out, f, g, seed, step);
    let detect = Backend::detect();
    if detect != Backend::Scalar {
        let mut out2 = input.clone();
        let r2 = lamb_step(detect, &mut out2, f, g, seed, step);
        if out2.bits() != out.bits() || r2 != report {
            fails.add(format!("{where_}: {detect:?} differs from Scalar"));
        }
    }
    // The shadow step: the same decoded inputs in f32 storage.
    let [p_in, m_in, v_in] = input.decoded(pf, mf, man);
    let mut shadow = Storage::empty(at.spec.len);
    shadow.p32 = p_in;
    shadow.m32 = m_in;
    shadow.v32 = v_in;
    let gd = g.decoded(gf);
    let shadow_f = Fmts {
        p: PFmt::MasterBf16,
        g: gf,
        m: MFmt::F32,
    };
    let sr = lamb_step(Backend::Scalar, &mut shadow, shadow_f, g, seed, step);
    if sr != report {
        fails.add(format!(
            "{where_}: the shadow step saw other norms ({sr:?} vs {report:?})"
        ));
        return false;
    }
    let case = StepCase {
        man,
        combo,
        where_: &where_,
        input,
        out: &out,
        shadow: &shadow,
        report: &report,
        g: &gd,
        seed,
        step,
        reference: &combo.states[at.k][step as usize - 1],
    };
    check_step(&case, st, fails);
    true
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
    check_hyperparameters(&man);
    let mut fails = Failures {
        list: vec![],
        count: 0,
    };
    check_codecs(&mut man, &mut fails);
    print_header();
    let mut sr_rows = vec![];
    let mut total = ComboStats::default();
    for combo in &man.combos {
        let before = fails.count;
        let st = run_combo(&man, combo, &mut fails);
        print_combo(combo, &st, fails.count - before);
        check_combo(combo, &st, &mut fails);
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
    print_stochastic_rounding(&sr_rows);
    print_totals(&total);
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

/// The reference was computed with this test's hyperparameters and block size.
fn check_hyperparameters(man: &Manifest) {
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
}

/// The reference's code tables and hash are lamb-core's. Where the tables differ, the
/// comparisons go on with lamb-core's.
fn check_codecs(man: &mut Manifest, fails: &mut Failures) {
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
}

fn print_header() {
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
}

/// Whether the parameters and the moments of `combo` are stored as codes (not f32).
fn coded(combo: &Combo) -> (bool, bool) {
    let coded_p = !matches!(combo.params, PFmt::F32 | PFmt::MasterBf16 | PFmt::MasterF16);
    (coded_p, combo.moments != MFmt::F32)
}

/// One row of the table: the combination's agreement, and its new failures.
fn print_combo(combo: &Combo, st: &ComboStats, new_failures: usize) {
    let (coded_p, coded_m) = coded(combo);
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
        if new_failures > 0 {
            format!("  <- {new_failures} FAILURES")
        } else {
            String::new()
        }
    );
}

/// The backstops of one combination: enough identical codes, and the free-running
/// trajectory within its bounds.
fn check_combo(combo: &Combo, st: &ComboStats, fails: &mut Failures) {
    let (coded_p, coded_m) = coded(combo);
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
}

fn print_stochastic_rounding(sr_rows: &[(String, Tally)]) {
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
    for (name, t) in sr_rows {
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
}

fn print_totals(total: &ComboStats) {
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
}
