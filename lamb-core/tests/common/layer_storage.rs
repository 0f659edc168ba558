//! One layer's storage in every format lamb-core's compact step takes (parameters, their
//! model copy, gradients, moments), as owned buffers a test fills and then lends to a step
//! as a `CompactLayer`; and every stored bit, for "same bits" and "nothing written"
//! comparisons. Shared by the compact-storage, bad-value and precision-reference tests.

// Each including test uses part of this file.
#![allow(dead_code)]

use half::{bf16, f16};
use lamb_core::codec::QBLOCK;
use lamb_core::layer::{CompactLayer, Grads, HalfMut, Moments, Params, Rounding};

/// Parameter storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PFmt {
    F32,
    Bf16,
    Bf16Sr,
    MasterBf16,
    MasterF16,
}

/// Gradient storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GFmt {
    F32,
    Bf16,
    F16,
}

/// Moment storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MFmt {
    F32,
    /// bf16, round to nearest even.
    Bf16,
    /// bf16, stochastic rounding.
    Bf16Sr,
    Q8,
}

/// Parameters (f32, bf16, f16 model copy) and moments (f32, bf16, 8-bit codes and their
/// absmax scales) of one layer.
#[derive(Clone, Debug)]
pub struct Storage {
    pub p32: Vec<f32>,
    pub pb: Vec<bf16>,
    pub ph: Vec<f16>,
    pub m32: Vec<f32>,
    pub v32: Vec<f32>,
    pub mb: Vec<bf16>,
    pub vb: Vec<bf16>,
    pub mq: Vec<u8>,
    pub vq: Vec<u8>,
    pub ma: Vec<f32>,
    pub va: Vec<f32>,
}

/// Gradients of one step in every format.
#[derive(Clone, Debug)]
pub struct GradBufs {
    pub g32: Vec<f32>,
    pub gb: Vec<bf16>,
    pub gh: Vec<f16>,
}

impl Storage {
    /// Zero parameters (in every storage) and moments.
    pub fn zeroed(n: usize) -> Storage {
        Storage {
            p32: vec![0.0; n],
            pb: vec![bf16::ZERO; n],
            ph: vec![f16::ZERO; n],
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

    pub fn layer<'a>(
        &'a mut self,
        p: PFmt,
        grads: Grads<'a>,
        mo: MFmt,
        seed: u64,
    ) -> CompactLayer<'a> {
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
    pub fn bits(&self) -> Vec<u32> {
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
}

impl GradBufs {
    pub fn new(g: Vec<f32>) -> GradBufs {
        GradBufs {
            gb: g.iter().map(|&x| bf16::from_f32(x)).collect(),
            gh: g.iter().map(|&x| f16::from_f32(x)).collect(),
            g32: g,
        }
    }
    pub fn grads(&self, f: GFmt) -> Grads<'_> {
        match f {
            GFmt::F32 => Grads::F32(&self.g32),
            GFmt::Bf16 => Grads::Bf16(&self.gb),
            GFmt::F16 => Grads::F16(&self.gh),
        }
    }
}
