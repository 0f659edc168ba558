//! The two phases of lamb-core's step written once over `pulp`'s generic [`Simd`] trait,
//! as a baseline for the hand-written kernels.
//!
//! Element-wise it is lamb-core's scalar reference (`lamb-core/src/kernels/scalar.rs`)
//! operation for operation: separate multiplies and adds (no FMA), IEEE `sqrt` and `/`, the
//! `u + (d − d)` overflow poison in phase 1. So phase 2 writes the same bits as lamb-core
//! given the same step size. The one difference is the reduction: a natural pulp kernel
//! keeps one register of f32 partial sums per block of [`BLOCK`] elements (blocks added in
//! f64), its width the ISA's, where lamb-core always uses 16 f32 lanes (element `i` to lane
//! `i % 16`); the norms therefore agree to f32 rounding, not bit for bit. The traffic is lamb-core's: phase 1 reads
//! p, g, m, v (16 B/element), phase 2 reads them and writes m, v, p (28 B).

use lamb_core::{BLOCK, LayerNorms, StepScalars};
use pulp::{Simd, WithSimd};

/// Which pulp instruction-set level to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// `pulp::Arch::new()`: the best level pulp detects (x86-64-v4 = AVX-512 here, with
    /// this crate's `x86-v4` feature).
    Best,
    /// x86-64-v3 (AVX2 + FMA), for a like-for-like comparison with lamb-core's AVX2.
    #[cfg(target_arch = "x86_64")]
    V3,
}

impl Level {
    /// Short name for reports: the level pulp actually dispatches to.
    pub fn name(self) -> &'static str {
        match self {
            Level::Best => match pulp::Arch::new() {
                #[cfg(target_arch = "x86_64")]
                pulp::Arch::V4(_) => "v4",
                #[cfg(target_arch = "x86_64")]
                pulp::Arch::V3(_) => "v3",
                _ => "best",
            },
            #[cfg(target_arch = "x86_64")]
            Level::V3 => "v3",
        }
    }

    /// `Some(self)` if the CPU supports it.
    pub fn checked(self) -> Option<Level> {
        match self {
            Level::Best => Some(self),
            #[cfg(target_arch = "x86_64")]
            Level::V3 => pulp::x86::V3::try_new().map(|_| self),
        }
    }

    fn run<Op: WithSimd>(self, op: Op) -> Op::Output {
        match self {
            Level::Best => pulp::Arch::new().dispatch(op),
            #[cfg(target_arch = "x86_64")]
            Level::V3 => {
                let simd = pulp::x86::V3::try_new().expect("x86-64-v3 not supported");
                Simd::vectorize(simd, op)
            }
        }
    }
}

/// The step scalars splatted for one `Simd`.
#[derive(Clone, Copy)]
struct K<S: Simd> {
    grad_scale: S::f32s,
    beta1: S::f32s,
    beta3: S::f32s,
    beta2: S::f32s,
    one_minus_beta2: S::f32s,
    inv_bias1: S::f32s,
    inv_bias2: S::f32s,
    eps: S::f32s,
    eps_inside_sqrt: bool,
    weight_decay: S::f32s,
}

impl<S: Simd> K<S> {
    #[inline(always)]
    fn new(simd: S, s: &StepScalars) -> Self {
        K {
            grad_scale: simd.splat_f32s(s.grad_scale),
            beta1: simd.splat_f32s(s.beta1),
            beta3: simd.splat_f32s(s.beta3),
            beta2: simd.splat_f32s(s.beta2),
            one_minus_beta2: simd.splat_f32s(s.one_minus_beta2),
            inv_bias1: simd.splat_f32s(s.inv_bias1),
            inv_bias2: simd.splat_f32s(s.inv_bias2),
            eps: simd.splat_f32s(s.eps),
            eps_inside_sqrt: s.eps_inside_sqrt,
            weight_decay: simd.splat_f32s(s.weight_decay),
        }
    }

    /// lamb-core's element update (the order of `LambConfig`'s docs) and its denominator,
    /// on a vector.
    #[inline(always)]
    fn update(
        &self,
        simd: S,
        p: S::f32s,
        g: S::f32s,
        m: S::f32s,
        v: S::f32s,
    ) -> (S::f32s, S::f32s, S::f32s, S::f32s) {
        let g = simd.mul_f32s(g, self.grad_scale);
        let m = simd.add_f32s(simd.mul_f32s(self.beta1, m), simd.mul_f32s(self.beta3, g));
        let v = simd.add_f32s(
            simd.mul_f32s(self.beta2, v),
            simd.mul_f32s(self.one_minus_beta2, simd.mul_f32s(g, g)),
        );
        let m_hat = simd.mul_f32s(m, self.inv_bias1);
        let v_hat = simd.mul_f32s(v, self.inv_bias2);
        let denom = if self.eps_inside_sqrt {
            simd.sqrt_f32s(simd.add_f32s(v_hat, self.eps))
        } else {
            simd.add_f32s(simd.sqrt_f32s(v_hat), self.eps)
        };
        let u = simd.add_f32s(
            simd.div_f32s(m_hat, denom),
            simd.mul_f32s(self.weight_decay, p),
        );
        (m, v, u, denom)
    }

    /// One row of phase 1: adds p² and (u + (d − d))² to the partial sums.
    #[inline(always)]
    fn row_norms(
        &self,
        simd: S,
        (acc_p, acc_u): (S::f32s, S::f32s),
        p: S::f32s,
        g: S::f32s,
        m: S::f32s,
        v: S::f32s,
    ) -> (S::f32s, S::f32s) {
        let (_, _, u, d) = self.update(simd, p, g, m, v);
        let u = simd.add_f32s(u, simd.sub_f32s(d, d));
        (
            simd.add_f32s(acc_p, simd.mul_f32s(p, p)),
            simd.add_f32s(acc_u, simd.mul_f32s(u, u)),
        )
    }
}

struct Norms<'a> {
    s: &'a StepScalars,
    p: &'a [f32],
    g: &'a [f32],
    m: &'a [f32],
    v: &'a [f32],
}

impl WithSimd for Norms<'_> {
    type Output = LayerNorms;

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> LayerNorms {
        let k = K::<S>::new(simd, self.s);
        let mut total = LayerNorms::default();
        let blocks = self
            .p
            .chunks(BLOCK)
            .zip(self.g.chunks(BLOCK))
            .zip(self.m.chunks(BLOCK))
            .zip(self.v.chunks(BLOCK));
        for (((p, g), m), v) in blocks {
            let (ph, pt) = S::as_simd_f32s(p);
            let (gh, gt) = S::as_simd_f32s(g);
            let (mh, mt) = S::as_simd_f32s(m);
            let (vh, vt) = S::as_simd_f32s(v);
            let mut acc_p = simd.splat_f32s(0.0);
            let mut acc_u = simd.splat_f32s(0.0);
            // Not a closure: a closure is a function of its own without the target features
            // of `with_simd`, and once the compiler declines to inline it (it has two call
            // sites) every SIMD operation in it becomes an out-of-line call.
            for i in 0..ph.len() {
                (acc_p, acc_u) = k.row_norms(simd, (acc_p, acc_u), ph[i], gh[i], mh[i], vh[i]);
            }
            if !pt.is_empty() {
                // Zero padding: u = 0/ε + λ·0 = 0, adds nothing.
                (acc_p, acc_u) = k.row_norms(
                    simd,
                    (acc_p, acc_u),
                    simd.partial_load_f32s(pt),
                    simd.partial_load_f32s(gt),
                    simd.partial_load_f32s(mt),
                    simd.partial_load_f32s(vt),
                );
            }
            total = total
                + LayerNorms {
                    param_sq: simd.reduce_sum_f32s(acc_p) as f64,
                    update_sq: simd.reduce_sum_f32s(acc_u) as f64,
                    ..LayerNorms::default()
                };
        }
        total
    }
}

struct Apply<'a> {
    s: &'a StepScalars,
    step: f32,
    p: &'a mut [f32],
    g: &'a [f32],
    m: &'a mut [f32],
    v: &'a mut [f32],
}

impl WithSimd for Apply<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let k = K::<S>::new(simd, self.s);
        let step = simd.splat_f32s(self.step);
        let (ph, pt) = S::as_mut_simd_f32s(self.p);
        let (gh, gt) = S::as_simd_f32s(self.g);
        let (mh, mt) = S::as_mut_simd_f32s(self.m);
        let (vh, vt) = S::as_mut_simd_f32s(self.v);
        let n = ph.len();
        let (gh, mh, vh) = (&gh[..n], &mut mh[..n], &mut vh[..n]);
        for i in 0..n {
            let pv = ph[i];
            let (mv, vv, u, _) = k.update(simd, pv, gh[i], mh[i], vh[i]);
            mh[i] = mv;
            vh[i] = vv;
            ph[i] = simd.sub_f32s(pv, simd.mul_f32s(step, u));
        }
        if !pt.is_empty() {
            let pv = simd.partial_load_f32s(pt);
            let (mv, vv, u, _) = k.update(
                simd,
                pv,
                simd.partial_load_f32s(gt),
                simd.partial_load_f32s(mt),
                simd.partial_load_f32s(vt),
            );
            simd.partial_store_f32s(mt, mv);
            simd.partial_store_f32s(vt, vv);
            simd.partial_store_f32s(pt, simd.sub_f32s(pv, simd.mul_f32s(step, u)));
        }
    }
}

/// Phase 1: Σp² and Σu² of one layer. Panics if the lengths differ.
pub fn norms(
    level: Level,
    s: &StepScalars,
    p: &[f32],
    g: &[f32],
    m: &[f32],
    v: &[f32],
) -> LayerNorms {
    assert!(g.len() == p.len() && m.len() == p.len() && v.len() == p.len());
    level.run(Norms { s, p, g, m, v })
}

/// Phase 2: writes m, v and `p − step·u`. Panics if the lengths differ.
pub fn apply(
    level: Level,
    s: &StepScalars,
    step: f32,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    assert!(g.len() == p.len() && m.len() == p.len() && v.len() == p.len());
    level.run(Apply {
        s,
        step,
        p,
        g,
        m,
        v,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use lamb_core::{Backend, LambConfig, LayerReport};

    fn data(n: usize, k: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.731 + k).sin()) * 0.5)
            .collect()
    }

    #[test]
    fn matches_lamb_core() {
        let cfg = LambConfig::paper();
        let s = StepScalars::new(&cfg, 3, 1.0).unwrap();
        let mut levels = vec![Level::Best];
        #[cfg(target_arch = "x86_64")]
        levels.extend(Level::V3.checked());
        for level in levels {
            for n in [0, 1, 5, 15, 16, 17, 100, 1023, 1024, 1025, 3000] {
                let (p0, g) = (data(n, 0.0), data(n, 1.0));
                let (m0, v0) = (
                    data(n, 2.0),
                    data(n, 3.0).iter().map(|x| x * x).collect::<Vec<f32>>(),
                );
                let want = Backend::Scalar.norms(&s, &p0, &g, &m0, &v0).unwrap();
                let got = norms(level, &s, &p0, &g, &m0, &v0);
                let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1e-30);
                assert!(close(got.param_sq, want.param_sq), "{level:?} {n}");
                assert!(close(got.update_sq, want.update_sq), "{level:?} {n}");

                let step = LayerReport::plan(&cfg, want).step_size;
                let (mut p1, mut m1, mut v1) = (p0.clone(), m0.clone(), v0.clone());
                Backend::Scalar
                    .apply(&s, step, &mut p1, &g, &mut m1, &mut v1)
                    .unwrap();
                let (mut p2, mut m2, mut v2) = (p0.clone(), m0.clone(), v0.clone());
                apply(level, &s, step, &mut p2, &g, &mut m2, &mut v2);
                let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&p1), bits(&p2), "{level:?} {n}");
                assert_eq!(bits(&m1), bits(&m2), "{level:?} {n}");
                assert_eq!(bits(&v1), bits(&v2), "{level:?} {n}");
            }
        }
    }
}
