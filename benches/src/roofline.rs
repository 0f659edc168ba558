//! Memory-roofline loops: plain Rust loops over slices that the compiler vectorizes, with
//! exactly the traffic of the kernels they are compared to and trivial arithmetic.
//!
//! | loop            | passes                                         | bytes/element |
//! |-----------------|------------------------------------------------|---------------|
//! | [`Roofline::same44`] | read p,g,m,v + reduce; read p,g,m,v, write m,v,p | 16 + 28 = 44 |
//! | [`Roofline::design40`] | read p,g,m,v, write m,v + reduce; read m,v,p, write p | 24 + 16 = 40 |
//! | [`Roofline::rw43`] | read p,g,m,v, write m,v,p (single-pass Adam)   | 28            |
//! | [`Roofline::read4`] | pass A of `same44` alone: read p,g,m,v + reduce | 16           |
//! | [`Roofline::sum_sq`] | read g + sum of squares (a clipping norm pass)  | 4            |
//! | [`Roofline::scale`] | read g, write s·g (`clip_grad_norm_`'s scale)   | 8            |
//! | [`copy`]        | `dst.copy_from_slice(src)` (memcpy)             | 8             |
//!
//! `same44` is the roofline of lamb-core's step (phase 1 `norms` writes nothing, phase 2
//! `apply` writes m, v, p). `design40` is the 40 B plan of ARCHITECTURE.md's design notes (moments written in pass 1).
//! `read4`, `rw43`, `sum_sq` and `scale` are the pieces the interleaved runner's roofline
//! workers (`crate::roof_model`) put together per tensor and thread, so that a whole model's
//! step has a same-run floor.
//! No `black_box` inside the loops: the functions are `#[inline(never)]` and take slices,
//! so the compiler can neither skip a pass nor merge two calls.
//!
//! Each loop is compiled three times (baseline x86-64 / AVX2 / AVX-512F through
//! `#[target_feature]`) and [`Roofline::detect`] picks the widest this CPU runs, so that
//! cache-resident sizes are not held back by SSE2 code either. Reductions use 16 f32 lane
//! partials so that they vectorize (a single f32 accumulator would not: FP addition is not
//! associative).
//!
//! The arithmetic is contractive (`x ← x/2 + …`), so repeating a loop millions of times keeps
//! every value bounded and normal: no denormal slow paths, no overflow. `scale` is contractive
//! when its caller makes it so (`s = 1/‖g‖` keeps g at norm 1 step after step).

const L: usize = 16;

/// Pass A of `same44`: read 4 arrays, write nothing, reduce to one number.
#[inline(always)]
fn read4_reduce(p: &[f32], g: &[f32], m: &[f32], v: &[f32]) -> f32 {
    let mut acc = [0.0f32; L];
    let n = p.len() / L * L;
    for i in n..p.len() {
        acc[0] += (p[i] + g[i]) + (m[i] + v[i]);
    }
    let (p, g, m, v) = (&p[..n], &g[..n], &m[..n], &v[..n]);
    for (((p, g), m), v) in p
        .chunks_exact(L)
        .zip(g.chunks_exact(L))
        .zip(m.chunks_exact(L))
        .zip(v.chunks_exact(L))
    {
        for j in 0..L {
            acc[j] += (p[j] + g[j]) + (m[j] + v[j]);
        }
    }
    acc.iter().sum()
}

/// Pass B of `same44` and the whole of `rw43`: read p, g, m, v; write m, v, p.
///
/// p moves by the sum `m + v`, not the difference: m and v converge to the same value (2g),
/// so a difference would vanish and p would halve towards zero through the denormals within
/// a few hundred repetitions (a whole-model worker steps that many times); with the sum, p
/// converges to about 2g, as normal as g.
#[inline(always)]
fn read4_write3(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    let n = p.len();
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    for i in 0..n {
        let gi = g[i];
        let mi = 0.5 * m[i] + gi;
        let vi = 0.5 * v[i] + gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = 0.5 * p[i] + 0.25 * (mi + vi);
    }
}

/// Sum of squares with 16 lane partials (read 4 B/element, write nothing).
#[inline(always)]
fn sum_squares(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; L];
    let n = x.len() / L * L;
    for &e in &x[n..] {
        acc[0] += e * e;
    }
    for c in x[..n].chunks_exact(L) {
        for j in 0..L {
            acc[j] += c[j] * c[j];
        }
    }
    acc.iter().sum()
}

/// `x ← s·x` in place (read and write 4 B/element).
#[inline(always)]
fn scale_in_place(x: &mut [f32], s: f32) {
    for e in x {
        *e *= s;
    }
}

/// Pass 1 of `design40`: read p, g, m, v; write m, v; reduce.
#[inline(always)]
fn read4_write2_reduce(p: &[f32], g: &[f32], m: &mut [f32], v: &mut [f32]) -> f32 {
    let mut acc = [0.0f32; L];
    let n = p.len() / L * L;
    for i in n..p.len() {
        let mi = 0.5 * m[i] + g[i];
        let vi = 0.5 * v[i] + g[i];
        m[i] = mi;
        v[i] = vi;
        acc[0] += p[i] + (mi - vi);
    }
    let (p, g, m, v) = (&p[..n], &g[..n], &mut m[..n], &mut v[..n]);
    for (((p, g), m), v) in p
        .chunks_exact(L)
        .zip(g.chunks_exact(L))
        .zip(m.chunks_exact_mut(L))
        .zip(v.chunks_exact_mut(L))
    {
        for j in 0..L {
            let mj = 0.5 * m[j] + g[j];
            let vj = 0.5 * v[j] + g[j];
            m[j] = mj;
            v[j] = vj;
            acc[j] += p[j] + (mj - vj);
        }
    }
    acc.iter().sum()
}

/// Pass 2 of `design40`: read m, v, p; write p.
#[inline(always)]
fn read3_write1(p: &mut [f32], m: &[f32], v: &[f32]) {
    let n = p.len();
    let (m, v) = (&m[..n], &v[..n]);
    for i in 0..n {
        p[i] = 0.5 * p[i] + 0.25 * (m[i] - v[i]);
    }
}

/// Signature of a roofline loop over `(p, g, m, v)`; returns the reduction (0 if none).
pub type LoopFn = fn(&mut [f32], &[f32], &mut [f32], &mut [f32]) -> f32;

/// Signature of a read-only loop over `(p, g, m, v)` returning its reduction.
pub type ReadFn = fn(&[f32], &[f32], &[f32], &[f32]) -> f32;

macro_rules! variants {
    ($modname:ident $(, $feature:literal)*) => {
        mod $modname {
            use super::*;

            $(#[target_feature(enable = $feature)])*
            #[inline(never)]
            pub(super) fn same44(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) -> f32 {
                let r = read4_reduce(p, g, m, v);
                read4_write3(p, g, m, v);
                r
            }

            $(#[target_feature(enable = $feature)])*
            #[inline(never)]
            pub(super) fn design40(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) -> f32 {
                let r = read4_write2_reduce(p, g, m, v);
                read3_write1(p, m, v);
                r
            }

            $(#[target_feature(enable = $feature)])*
            #[inline(never)]
            pub(super) fn rw43(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) -> f32 {
                read4_write3(p, g, m, v);
                0.0
            }

            $(#[target_feature(enable = $feature)])*
            #[inline(never)]
            pub(super) fn read4(p: &[f32], g: &[f32], m: &[f32], v: &[f32]) -> f32 {
                read4_reduce(p, g, m, v)
            }

            $(#[target_feature(enable = $feature)])*
            #[inline(never)]
            pub(super) fn sum_sq(x: &[f32]) -> f32 {
                sum_squares(x)
            }

            $(#[target_feature(enable = $feature)])*
            #[inline(never)]
            pub(super) fn scale(x: &mut [f32], s: f32) {
                scale_in_place(x, s)
            }
        }
    };
}

variants!(base);
#[cfg(target_arch = "x86_64")]
variants!(avx2, "avx2");
#[cfg(target_arch = "x86_64")]
variants!(avx512, "avx512f");

/// The roofline loops compiled for the widest vector ISA this CPU supports.
#[derive(Clone, Copy)]
pub struct Roofline {
    /// Which compilation is in use: `avx512f`, `avx2` or `baseline`.
    pub isa: &'static str,
    same44: LoopFn,
    design40: LoopFn,
    rw43: LoopFn,
    read4: ReadFn,
    sum_sq: fn(&[f32]) -> f32,
    scale: fn(&mut [f32], f32),
}

impl Roofline {
    /// Picks the widest compilation the CPU runs.
    pub fn detect() -> Roofline {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Roofline {
                    isa: "avx512f",
                    // SAFETY (for the six closures): AVX-512F was detected just above.
                    same44: |p, g, m, v| unsafe { avx512::same44(p, g, m, v) },
                    design40: |p, g, m, v| unsafe { avx512::design40(p, g, m, v) },
                    rw43: |p, g, m, v| unsafe { avx512::rw43(p, g, m, v) },
                    read4: |p, g, m, v| unsafe { avx512::read4(p, g, m, v) },
                    sum_sq: |x| unsafe { avx512::sum_sq(x) },
                    scale: |x, s| unsafe { avx512::scale(x, s) },
                };
            }
            if std::is_x86_feature_detected!("avx2") {
                return Roofline {
                    isa: "avx2",
                    // SAFETY (for the six closures): AVX2 was detected just above.
                    same44: |p, g, m, v| unsafe { avx2::same44(p, g, m, v) },
                    design40: |p, g, m, v| unsafe { avx2::design40(p, g, m, v) },
                    rw43: |p, g, m, v| unsafe { avx2::rw43(p, g, m, v) },
                    read4: |p, g, m, v| unsafe { avx2::read4(p, g, m, v) },
                    sum_sq: |x| unsafe { avx2::sum_sq(x) },
                    scale: |x, s| unsafe { avx2::scale(x, s) },
                };
            }
        }
        Roofline {
            isa: "baseline",
            same44: base::same44,
            design40: base::design40,
            rw43: base::rw43,
            read4: base::read4,
            sum_sq: base::sum_sq,
            scale: base::scale,
        }
    }

    /// Read p, g, m, v and reduce; then read p, g, m, v and write m, v, p (44 B/element).
    #[inline]
    pub fn same44(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) -> f32 {
        (self.same44)(p, g, m, v)
    }

    /// Read p, g, m, v, write m, v and reduce; then read m, v, p and write p (40 B/element).
    #[inline]
    pub fn design40(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) -> f32 {
        (self.design40)(p, g, m, v)
    }

    /// Read p, g, m, v and write m, v, p in one pass (28 B/element).
    #[inline]
    pub fn rw43(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) -> f32 {
        (self.rw43)(p, g, m, v)
    }

    /// Read p, g, m, v and reduce, writing nothing (16 B/element): `same44`'s first pass.
    #[inline]
    pub fn read4(&self, p: &[f32], g: &[f32], m: &[f32], v: &[f32]) -> f32 {
        (self.read4)(p, g, m, v)
    }

    /// Sum of the squares of `x` (4 B/element), in 16 f32 lane partials.
    #[inline]
    pub fn sum_sq(&self, x: &[f32]) -> f32 {
        (self.sum_sq)(x)
    }

    /// `x ← s·x` in place (8 B/element). Stays bounded over repetitions only when the caller
    /// keeps it so, e.g. `s = 1/‖x‖` (the norm then stays 1).
    #[inline]
    pub fn scale(&self, x: &mut [f32], s: f32) {
        (self.scale)(x, s)
    }
}

/// `dst ← src` with the platform memcpy (8 B/element; glibc may use non-temporal stores
/// for very large copies, which is part of what "copy" means on this machine).
#[inline(never)]
pub fn copy(dst: &mut [f32], src: &[f32]) {
    dst.copy_from_slice(src);
}

/// Bytes per element each workload moves, by the model in the module docs.
pub mod bytes {
    /// lamb-core's step: phase 1 reads 4 arrays, phase 2 reads 4 and writes 3.
    pub const LAMB: u64 = 44;
    /// The same-traffic roofline loop.
    pub const SAME44: u64 = 44;
    /// The 40 B two passes (ARCHITECTURE.md, Design notes).
    pub const DESIGN40: u64 = 40;
    /// Single-pass read-4/write-3.
    pub const RW43: u64 = 28;
    /// Read-4 reduction alone (`same44`'s first pass).
    pub const READ4: u64 = 16;
    /// Sum of squares of one array.
    pub const SUM_SQ: u64 = 4;
    /// In-place scale of one array.
    pub const SCALE: u64 = 8;
    /// memcpy.
    pub const COPY: u64 = 8;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_compilation_agrees() {
        let n = 1000 + 7;
        let init = |k: f32| {
            (0..n)
                .map(|i| (i as f32 * 0.37 + k).sin())
                .collect::<Vec<_>>()
        };
        let run = |f: LoopFn| {
            let (mut p, g, mut m, mut v) = (init(0.0), init(1.0), init(2.0), init(3.0));
            let r = f(&mut p, &g, &mut m, &mut v);
            (r.to_bits(), p, m, v)
        };
        let best = Roofline::detect();
        // Same source, same operation order: every compilation gives the same bits.
        assert_eq!(run(best.same44), run(base::same44));
        assert_eq!(run(best.design40), run(base::design40));
        assert_eq!(run(best.rw43), run(base::rw43));
        let read = |f: ReadFn| f(&init(0.0), &init(1.0), &init(2.0), &init(3.0)).to_bits();
        assert_eq!(read(best.read4), read(base::read4));
        let sum_sq = |f: fn(&[f32]) -> f32| f(&init(1.0)).to_bits();
        assert_eq!(sum_sq(best.sum_sq), sum_sq(base::sum_sq));
        let scale = |f: fn(&mut [f32], f32)| {
            let mut x = init(1.0);
            f(&mut x, 0.37);
            x
        };
        assert_eq!(scale(best.scale), scale(base::scale));
    }

    #[test]
    fn the_pieces_do_what_they_say() {
        let roof = Roofline::detect();
        let x: Vec<f32> = (1..=37).map(|i| i as f32).collect();
        // 1² + … + 37² = 37·38·75/6, exact in f32.
        assert_eq!(roof.sum_sq(&x), 17575.0);
        let ones = vec![1.0f32; 37];
        assert_eq!(roof.read4(&x, &ones, &ones, &ones), 703.0 + 3.0 * 37.0);
        let mut y = x.clone();
        roof.scale(&mut y, 0.5);
        assert!(y.iter().zip(&x).all(|(a, b)| *a == 0.5 * b));
    }

    #[test]
    fn repeated_steps_stay_normal() {
        // The whole-model workers repeat rw43 hundreds of times on the same arrays; with
        // p moved by m − v, most of p was subnormal after 120 repetitions.
        let roof = Roofline::detect();
        let init = |scale: f32, k: f32| {
            (0..1000)
                .map(|i| scale * (i as f32 * 0.37 + k).sin())
                .collect::<Vec<_>>()
        };
        let (mut p, g) = (init(0.05, 0.0), init(0.01, 1.0));
        let (mut m, mut v) = (init(0.01, 2.0), init(0.01, 3.0));
        for _ in 0..1000 {
            roof.rw43(&mut p, &g, &mut m, &mut v);
        }
        let odd = p
            .iter()
            .chain(&m)
            .chain(&v)
            .filter(|x| !x.is_normal())
            .count();
        assert_eq!(odd, 0, "values not normal after 1000 repetitions");
    }
}
