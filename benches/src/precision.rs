//! The storage combinations of the `precision` bench and what each one costs in memory:
//! bytes of optimizer state per parameter, and bytes one step moves per element.
//!
//! Shared by `benches/precision.rs` (which measures them) and `bin/precision-table.rs`
//! (which turns criterion's results into the README table), so both use one model.

use lamb_core::codec::QBLOCK;

/// How the model's parameters are stored (gradients come in the same half format, f32 for
/// f32 parameters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamFmt {
    /// f32 in place.
    F32,
    /// bf16 in place, round to nearest even.
    Bf16,
    /// bf16 in place, stochastic rounding.
    Bf16Sr,
    /// bf16 model copy + f32 master copy.
    MasterBf16,
    /// f16 model copy + f32 master copy.
    MasterF16,
}

/// How the moments are stored (bf16 rounds stochastically, as `lamb_std` does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MomentFmt {
    /// f32 m and v.
    F32,
    /// bf16 m and v, stochastic rounding.
    Bf16,
    /// 8-bit blockwise m and v.
    Q8,
}

/// One storage combination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Combo {
    /// Parameters (and gradients).
    pub params: ParamFmt,
    /// Moments.
    pub moments: MomentFmt,
}

/// Every combination the bench measures: 5 parameter formats × 3 moment formats.
pub fn combos() -> Vec<Combo> {
    let ps = [
        ParamFmt::F32,
        ParamFmt::Bf16,
        ParamFmt::Bf16Sr,
        ParamFmt::MasterBf16,
        ParamFmt::MasterF16,
    ];
    let ms = [MomentFmt::F32, MomentFmt::Bf16, MomentFmt::Q8];
    ps.iter()
        .flat_map(|&params| ms.iter().map(move |&moments| Combo { params, moments }))
        .collect()
}

impl ParamFmt {
    /// Short name used in bench ids.
    pub fn name(self) -> &'static str {
        match self {
            ParamFmt::F32 => "f32",
            ParamFmt::Bf16 => "bf16",
            ParamFmt::Bf16Sr => "bf16-sr",
            ParamFmt::MasterBf16 => "bf16+master",
            ParamFmt::MasterF16 => "f16+master",
        }
    }
    /// Bytes of the gradient per element.
    pub fn grad_bytes(self) -> f64 {
        match self {
            ParamFmt::F32 => 4.0,
            _ => 2.0,
        }
    }
    /// Bytes of the parameter the kernel reads per element (the master where there is one).
    pub fn read_bytes(self) -> f64 {
        match self {
            ParamFmt::Bf16 | ParamFmt::Bf16Sr => 2.0,
            _ => 4.0,
        }
    }
    /// Bytes written per element: the parameter, plus the model copy after a master.
    pub fn write_bytes(self) -> f64 {
        match self {
            ParamFmt::F32 => 4.0,
            ParamFmt::Bf16 | ParamFmt::Bf16Sr => 2.0,
            ParamFmt::MasterBf16 | ParamFmt::MasterF16 => 6.0,
        }
    }
    /// Optimizer-held bytes per element: the f32 master copy.
    pub fn state_bytes(self) -> f64 {
        match self {
            ParamFmt::MasterBf16 | ParamFmt::MasterF16 => 4.0,
            _ => 0.0,
        }
    }
}

impl MomentFmt {
    /// Short name used in bench ids.
    pub fn name(self) -> &'static str {
        match self {
            MomentFmt::F32 => "f32",
            MomentFmt::Bf16 => "bf16",
            MomentFmt::Q8 => "q8",
        }
    }
    /// Bytes of m and v per element (8-bit: the codes plus the two absmax per block).
    pub fn bytes(self) -> f64 {
        match self {
            MomentFmt::F32 => 8.0,
            MomentFmt::Bf16 => 4.0,
            MomentFmt::Q8 => 2.0 + 8.0 / QBLOCK as f64,
        }
    }
}

impl Combo {
    /// The bench function id, e.g. `params=bf16+master moments=q8`.
    pub fn id(self) -> String {
        format!(
            "params={} moments={}",
            self.params.name(),
            self.moments.name()
        )
    }

    /// Bytes of optimizer state per parameter (what `Lamb::bytes_per_param` reports).
    pub fn state_bytes(self) -> f64 {
        self.moments.bytes() + self.params.state_bytes()
    }

    /// Bytes one step moves per element: phase 1 reads p, g, m, v; phase 2 reads them again
    /// and writes p (and the model copy), m, v.
    pub fn traffic_bytes(self) -> f64 {
        let read = self.params.read_bytes() + self.params.grad_bytes() + self.moments.bytes();
        2.0 * read + self.params.write_bytes() + self.moments.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_all_f32_combination_is_the_kernels_44_bytes() {
        let c = Combo {
            params: ParamFmt::F32,
            moments: MomentFmt::F32,
        };
        assert_eq!(c.traffic_bytes(), crate::roofline::bytes::LAMB as f64);
        assert_eq!(c.state_bytes(), 8.0);
        assert_eq!(combos().len(), 15);
    }
}
