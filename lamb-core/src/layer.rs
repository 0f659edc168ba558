//! Views of one layer: how each of its buffers is stored (f32, or a compact format).
//!
//! All arithmetic stays f32 (the kernels); these types only say how each buffer is stored,
//! and [`crate::codec`] says exactly how a value is encoded and decoded. [`F32Layer`] is a
//! layer of four f32 buffers; [`CompactLayer`] is a layer whose parameters ([`Params`]),
//! gradients ([`Grads`]) and moments ([`Moments`]) each have their own storage: f32 or
//! compact (bf16/f16 parameters and gradients, bf16 and 8-bit moments).

use half::{bf16, f16};

use crate::codec::QBLOCK;
use crate::error::{Buffer, LambError};

/// One layer of f32 buffers, named so that they cannot be passed in the wrong order.
#[derive(Debug)]
pub struct F32Layer<'a> {
    /// Parameters, updated in place.
    pub param: &'a mut [f32],
    /// Gradients.
    pub grad: &'a [f32],
    /// First moment, updated in place.
    pub m: &'a mut [f32],
    /// Second moment, updated in place.
    pub v: &'a mut [f32],
}

/// How a layer's parameters are stored.
#[derive(Debug)]
pub enum Params<'a> {
    /// f32, updated in place.
    F32(&'a mut [f32]),
    /// bf16 updated in place, no master copy.
    Bf16 {
        /// The parameters.
        data: &'a mut [bf16],
        /// How the new value is rounded to bf16.
        rounding: Rounding,
    },
    /// An f32 master copy (the optimizer's), updated in place, and the model's half-precision
    /// copy, overwritten with the rounded master after the update.
    Master {
        /// The master copy.
        master: &'a mut [f32],
        /// The model's copy.
        model: HalfMut<'a>,
    },
}

/// A half-precision buffer.
#[derive(Debug)]
pub enum HalfMut<'a> {
    /// bfloat16.
    Bf16(&'a mut [bf16]),
    /// IEEE binary16.
    F16(&'a mut [f16]),
}

/// How bf16 parameters are rounded after the update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Rounding {
    /// To nearest, ties to even.
    #[default]
    Nearest,
    /// Stochastic: up with probability equal to the discarded fraction. The random bits are
    /// a hash of `seed` and the element's index in the layer, so the same seed gives the same
    /// bits on every backend and thread count. Vary the seed per step and layer.
    Stochastic {
        /// The seed.
        seed: u64,
    },
}

/// The format new parameter values are rounded to and stored in, which bounds how large
/// they may grow: a value past [`ParamFormat::finite_limit`] would be stored as infinity.
/// Phase 1 reports it ([`LayerNorms::param_format`](crate::LayerNorms::param_format)) with
/// the largest |p| and |u| of the layer, and [`LayerReport::plan`](crate::LayerReport::plan)
/// refuses a step that could reach that limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ParamFormat {
    /// f32 (also an f32 master copy without a model copy): bounded by the f32 range, which
    /// the plan checks on the norms.
    #[default]
    F32,
    /// IEEE binary16, rounded to nearest (an f16 model copy).
    F16,
    /// bfloat16 rounded to nearest (a bf16 model copy, or bf16 updated in place).
    Bf16,
    /// bfloat16 with stochastic rounding, which can round anything above `bf16::MAX` up.
    Bf16Stochastic,
}

impl ParamFormat {
    /// The largest f32 magnitude the format stores as a finite value, `None` for f32
    /// (where any finite f32 is stored as it is).
    ///
    /// ```
    /// use lamb_core::layer::ParamFormat;
    /// use half::{bf16, f16};
    /// let f16_limit = ParamFormat::F16.finite_limit().unwrap();
    /// assert!(f16::from_f32(f16_limit).is_finite());
    /// assert!(f16::from_f32(f16_limit.next_up()).is_infinite()); // 65520 ties away from f16::MAX
    /// assert_eq!(ParamFormat::Bf16Stochastic.finite_limit(), Some(bf16::MAX.to_f32()));
    /// assert_eq!(ParamFormat::F32.finite_limit(), None);
    /// ```
    pub const fn finite_limit(self) -> Option<f32> {
        match self {
            ParamFormat::F32 => None,
            // 65520 is halfway between f16::MAX (65504) and 2^16 and rounds (ties to even)
            // to infinity; everything below rounds to at most f16::MAX.
            ParamFormat::F16 => Some(f32::from_bits(65520.0f32.to_bits() - 1)),
            // Rounding adds 0x7fff (+1 for odd) below the kept 16 bits: 0x7f7f_7fff is the
            // last pattern that stays at bf16::MAX (0x7f7f, odd, so its tie goes up).
            ParamFormat::Bf16 => Some(f32::from_bits(0x7f7f_7fff)),
            // Stochastic rounding adds up to 0xffff: only bf16 values themselves are safe.
            ParamFormat::Bf16Stochastic => Some(f32::from_bits(0x7f7f_0000)),
        }
    }

    /// The more restrictive of two formats (the smaller limit).
    pub(crate) fn tighter(self, other: ParamFormat) -> ParamFormat {
        let limit = |f: ParamFormat| f.finite_limit().unwrap_or(f32::INFINITY);
        if limit(other) < limit(self) {
            other
        } else {
            self
        }
    }
}

/// How a layer's gradients are stored.
#[derive(Clone, Copy, Debug)]
pub enum Grads<'a> {
    /// f32.
    F32(&'a [f32]),
    /// bfloat16.
    Bf16(&'a [bf16]),
    /// IEEE binary16.
    F16(&'a [f16]),
}

/// How a layer's moments are stored.
#[derive(Debug)]
pub enum Moments<'a> {
    /// f32 (12 bytes of state per parameter with f32 params: 4 param + 8 moments).
    F32 {
        /// First moment.
        m: &'a mut [f32],
        /// Second moment.
        v: &'a mut [f32],
    },
    /// bfloat16 (4 bytes of moments per parameter).
    ///
    /// Use [`Rounding::Stochastic`]: bf16 keeps 8 significant bits, so with round to
    /// nearest `v·β2` rounds back to `v` whenever `(1 − β2)·v` is below half a bf16 ulp
    /// (`β2 > 1 − 2^-9`, e.g. 0.999), and a v that is not refreshed by a larger gradient
    /// never decays. Stochastic rounding keeps the expected stored value equal to the f32
    /// one, so v decays on average as it should.
    Bf16 {
        /// First moment.
        m: &'a mut [bf16],
        /// Second moment.
        v: &'a mut [bf16],
        /// How new values are rounded to bf16. Stochastic draws for element `i` are
        /// `stochastic_bits(seed ^ M_STREAM, i)` for m and `stochastic_bits(seed ^
        /// V_STREAM, i)` for v ([`M_STREAM`](crate::codec::M_STREAM),
        /// [`V_STREAM`](crate::codec::V_STREAM)), so one seed can serve the
        /// parameters and the moments of a layer without correlated draws.
        rounding: Rounding,
    },
    /// 8-bit blockwise (2 bytes + 8/[`QBLOCK`] per parameter).
    Q8 {
        /// First-moment codes (signed E4M3).
        m: &'a mut [u8],
        /// Second-moment codes (unsigned E5M3).
        v: &'a mut [u8],
        /// One absmax per block of m: `len.div_ceil(QBLOCK)` entries.
        m_absmax: &'a mut [f32],
        /// One absmax per block of v.
        v_absmax: &'a mut [f32],
    },
}

impl Params<'_> {
    /// The format the new values are rounded to: the model copy's for a master copy.
    pub fn format(&self) -> ParamFormat {
        match self {
            Params::F32(_) => ParamFormat::F32,
            Params::Bf16 {
                rounding: Rounding::Nearest,
                ..
            } => ParamFormat::Bf16,
            Params::Bf16 {
                rounding: Rounding::Stochastic { .. },
                ..
            } => ParamFormat::Bf16Stochastic,
            Params::Master {
                model: HalfMut::Bf16(_),
                ..
            } => ParamFormat::Bf16,
            Params::Master {
                model: HalfMut::F16(_),
                ..
            } => ParamFormat::F16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Params::F32(p) => p.len(),
            Params::Bf16 { data, .. } => data.len(),
            Params::Master { master, .. } => master.len(),
        }
    }
    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Grads<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Grads::F32(g) => g.len(),
            Grads::Bf16(g) => g.len(),
            Grads::F16(g) => g.len(),
        }
    }
    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One layer in compact storage: each buffer in its own format.
#[derive(Debug)]
pub struct CompactLayer<'a> {
    /// Parameters (and master copy).
    pub params: Params<'a>,
    /// Gradients.
    pub grads: Grads<'a>,
    /// Moments.
    pub moments: Moments<'a>,
}

impl<'a> CompactLayer<'a> {
    /// The layer's length, after checking that every buffer agrees with it.
    pub fn check(&self) -> Result<usize, LambError> {
        let n = self.params.len();
        if let Moments::Q8 {
            m_absmax, v_absmax, ..
        } = &self.moments
        {
            expect_len(Buffer::ExpAvgAbsmax, n.div_ceil(QBLOCK), m_absmax.len())?;
            expect_len(Buffer::ExpAvgSqAbsmax, n.div_ceil(QBLOCK), v_absmax.len())?;
        }
        expect_len(Buffer::Grad, n, self.grads.len())?;
        if let Params::Master { model, .. } = &self.params {
            expect_len(Buffer::ModelCopy, n, model.len())?;
        }
        let (m, v) = match &self.moments {
            Moments::F32 { m, v } => (m.len(), v.len()),
            Moments::Bf16 { m, v, .. } => (m.len(), v.len()),
            Moments::Q8 { m, v, .. } => (m.len(), v.len()),
        };
        expect_len(Buffer::ExpAvg, n, m)?;
        expect_len(Buffer::ExpAvgSq, n, v)?;
        Ok(n)
    }

    /// Splits into elements `[0, mid)` and `[mid, len)`, e.g. to hand pieces to threads.
    /// `mid` must be a multiple of [`QBLOCK`] (or the length). The second half's element 0
    /// is element `mid` of the layer: pass `index0 + mid` to
    /// [`Backend::apply_compact`](crate::Backend::apply_compact) for stochastic rounding.
    pub fn split_at(self, mid: usize) -> Result<(CompactLayer<'a>, CompactLayer<'a>), LambError> {
        let n = self.check()?;
        if mid > n || (!mid.is_multiple_of(QBLOCK) && mid != n) {
            return Err(LambError::MisalignedSplit { at: mid });
        }
        let (p0, p1) = self.params.split_at(mid);
        let (g0, g1) = self.grads.split_at(mid);
        let (m0, m1) = self.moments.split_at(mid);
        Ok((
            CompactLayer {
                params: p0,
                grads: g0,
                moments: m0,
            },
            CompactLayer {
                params: p1,
                grads: g1,
                moments: m1,
            },
        ))
    }
}

/// Checks that the four buffers of a layer of f32 buffers have the parameter's length `p`.
pub(crate) fn check_f32_lengths(p: usize, g: usize, m: usize, v: usize) -> Result<(), LambError> {
    expect_len(Buffer::Grad, p, g)?;
    expect_len(Buffer::ExpAvg, p, m)?;
    expect_len(Buffer::ExpAvgSq, p, v)
}

/// `Err(LengthMismatch)` naming `buffer` unless it has the `expected` length.
fn expect_len(buffer: Buffer, expected: usize, found: usize) -> Result<(), LambError> {
    if found == expected {
        return Ok(());
    }
    Err(LambError::LengthMismatch {
        buffer,
        expected,
        found,
    })
}

// The halves of each buffer for `CompactLayer::split_at`, which checked the lengths and `mid`.

impl<'a> Params<'a> {
    fn split_at(self, mid: usize) -> (Params<'a>, Params<'a>) {
        match self {
            Params::F32(x) => {
                let (a, b) = x.split_at_mut(mid);
                (Params::F32(a), Params::F32(b))
            }
            Params::Bf16 { data, rounding } => {
                let (a, b) = data.split_at_mut(mid);
                (
                    Params::Bf16 { data: a, rounding },
                    Params::Bf16 { data: b, rounding },
                )
            }
            Params::Master { master, model } => {
                let (a, b) = master.split_at_mut(mid);
                let (ma, mb) = model.split_at(mid);
                (
                    Params::Master {
                        master: a,
                        model: ma,
                    },
                    Params::Master {
                        master: b,
                        model: mb,
                    },
                )
            }
        }
    }
}

impl<'a> HalfMut<'a> {
    fn len(&self) -> usize {
        match self {
            HalfMut::Bf16(h) => h.len(),
            HalfMut::F16(h) => h.len(),
        }
    }

    fn split_at(self, mid: usize) -> (HalfMut<'a>, HalfMut<'a>) {
        match self {
            HalfMut::Bf16(h) => {
                let (x, y) = h.split_at_mut(mid);
                (HalfMut::Bf16(x), HalfMut::Bf16(y))
            }
            HalfMut::F16(h) => {
                let (x, y) = h.split_at_mut(mid);
                (HalfMut::F16(x), HalfMut::F16(y))
            }
        }
    }
}

impl<'a> Grads<'a> {
    fn split_at(self, mid: usize) -> (Grads<'a>, Grads<'a>) {
        match self {
            Grads::F32(x) => (Grads::F32(&x[..mid]), Grads::F32(&x[mid..])),
            Grads::Bf16(x) => (Grads::Bf16(&x[..mid]), Grads::Bf16(&x[mid..])),
            Grads::F16(x) => (Grads::F16(&x[..mid]), Grads::F16(&x[mid..])),
        }
    }
}

impl<'a> Moments<'a> {
    fn split_at(self, mid: usize) -> (Moments<'a>, Moments<'a>) {
        match self {
            Moments::F32 { m, v } => {
                let ((ma, mb), (va, vb)) = (m.split_at_mut(mid), v.split_at_mut(mid));
                (Moments::F32 { m: ma, v: va }, Moments::F32 { m: mb, v: vb })
            }
            Moments::Bf16 { m, v, rounding } => {
                let ((ma, mb), (va, vb)) = (m.split_at_mut(mid), v.split_at_mut(mid));
                (
                    Moments::Bf16 {
                        m: ma,
                        v: va,
                        rounding,
                    },
                    Moments::Bf16 {
                        m: mb,
                        v: vb,
                        rounding,
                    },
                )
            }
            Moments::Q8 {
                m,
                v,
                m_absmax,
                v_absmax,
            } => {
                let q = mid.div_ceil(QBLOCK);
                let ((ma, mb), (va, vb)) = (m.split_at_mut(mid), v.split_at_mut(mid));
                let ((sa, sb), (ta, tb)) = (m_absmax.split_at_mut(q), v_absmax.split_at_mut(q));
                (
                    Moments::Q8 {
                        m: ma,
                        v: va,
                        m_absmax: sa,
                        v_absmax: ta,
                    },
                    Moments::Q8 {
                        m: mb,
                        v: vb,
                        m_absmax: sb,
                        v_absmax: tb,
                    },
                )
            }
        }
    }
}
