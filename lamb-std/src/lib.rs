//! # lamb-std
//!
//! The LAMB optimizer users hold: owned, huge-page-backed state; parameter groups;
//! global gradient clipping and loss scaling folded into the kernels; learning-rate
//! schedules; a thread pool that splits layers on reduction-block boundaries so that results
//! are bit-identical for every thread count. Re-exports [`lamb_core`].
//!
//! ```
//! use lamb_std::{Lamb, lamb_core::{LambConfig, Schedule}};
//!
//! let mut opt = Lamb::with_decay_split(LambConfig::nvlamb())?;
//! let w_id = opt.add_param("encoder.weight", &[64, 32])?;
//! let b_id = opt.add_param("encoder.bias", &[64])?;
//! opt.set_max_grad_norm(Some(1.0))?;
//! opt.set_schedule(Schedule::WarmupPoly { warmup: 10, total: 1000, power: 1.0, end: 0.0 })?;
//! opt.set_threads(2)?;
//!
//! let mut w = vec![0.1f32; 64 * 32];
//! let mut b = vec![0.0f32; 64];
//! let gw = vec![0.01f32; 64 * 32];
//! let gb = vec![0.01f32; 64];
//! let report = opt.step_bound(
//!     &mut [(w_id, &mut w[..]), (b_id, &mut b[..])],
//!     &[(w_id, &gw[..]), (b_id, &gb[..])],
//! )?;
//! assert!(report.applied && report.grad_norm.is_some());
//! # Ok::<(), lamb_std::Error>(())
//! ```
#![deny(missing_docs)]

pub use lamb_core;

// Not public API: the state's buffers. The benches measure over the same buffers, through
// the `bench-internals` feature (benches/README.md, "Buffers"), which nothing else enables.
#[cfg(not(feature = "bench-internals"))]
mod buffer;
#[cfg(feature = "bench-internals")]
#[doc(hidden)]
pub mod buffer;
pub mod checkpoint;
pub mod domain;
mod error;
mod optimizer;
mod parallel;

pub use domain::MAX_STEP;
pub use error::Error;
pub use optimizer::{
    Group, GroupId, Lamb, LayerId, LayerKey, LayerView, ParamStorage, ParamsIn, Precision,
    SkippedLayer, StateFormat, StateView, StepReport, moments_rounding, params_rounding,
};

/// The code blocks of the crate's README, run as doctests so that they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
