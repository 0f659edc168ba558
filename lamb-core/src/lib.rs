//! # lamb-core
//!
//! The LAMB optimizer's per-layer step for CPUs: `#![no_std]`, no allocation, and the same
//! bits on every backend and thread count.
//!
//! LAMB (You et al. 2019) is Adam with a per-layer *trust ratio*: each layer's update is
//! rescaled so that its size is proportional to the size of the layer's weights, which keeps
//! training stable at very large batch sizes.
//!
//! ```
//! use lamb_core::{step_layer, LambConfig};
//!
//! let config = LambConfig::optax();            // reproduce optax.lamb
//! let mut param = vec![0.5f32; 1000];
//! let grad = vec![0.01f32; 1000];
//! let (mut m, mut v) = (vec![0.0f32; 1000], vec![0.0f32; 1000]);
//! for step in 1..=3 {
//!     let report = step_layer(&config, step, &mut param, &grad, &mut m, &mut v)?;
//!     assert!(report.trust_ratio > 0.0);
//! }
//! # Ok::<(), lamb_core::LambError>(())
//! ```
//!
//! # The parts of a step
//!
//! One step of one layer: [`StepScalars::new`] rounds the configuration of step `t` to f32
//! once; phase 1 ([`Backend::norms`]) reads the layer and sums ‖p‖² and ‖u‖², writing
//! nothing; [`LayerReport::plan`] turns the sums into the trust ratio and the step size, or
//! refuses the step; phase 2 ([`Backend::apply`]) recomputes the same update and writes it.
//! [`step_layer`] and [`Backend::step_layer`] do all four, and on an error or a refused step
//! the layer is as it was. A [`Step`] holds the first part (the configuration and its
//! rounded scalars) for every layer of a step: [`Step::layer`] and
//! [`Backend::step_layer_with`] do the rest per layer, without recomputing the scalars. A layer's buffers are f32 ([`layer::F32Layer`]) or in compact
//! storage ([`layer::CompactLayer`]: bf16/f16 parameters and gradients, bf16 or 8-bit
//! moments, encoded and decoded by [`codec`]).
//!
//! # Same bits everywhere
//!
//! Every [`Backend`] computes each element with the same f32 operations in the same order,
//! with separate multiplies and adds (never FMA) and IEEE `sqrt` and `/`. Sums of squares are
//! f32 products added into [`LANES`] f32 lanes (element `i` of a block to lane `i % 16`),
//! folded in a fixed tree, and blocks of [`BLOCK`] elements are added in f64 in index order,
//! so a layer cut into block-aligned pieces (one per thread) sums to the same bits as the
//! whole. (f32 lanes because a microcontroller's FPU has no f64; a block sum that overflows
//! f32 refuses the step like any other non-finite value.)
//! The arithmetic runs in the default floating-point mode whatever the caller's ([`fpenv`]).
#![no_std]
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod codec;
mod config;
mod dispatch;
mod error;
pub mod fpenv;
mod kernels;
pub mod layer;
mod plan;
mod scalars;
mod schedule;

pub use config::{Adaptation, BiasCorrection, EpsMode, LambConfig, NonFinite, RatioRule};
pub use dispatch::{Backend, step_layer};
pub use error::{Buffer, Field, LambError};
pub use half;
pub use kernels::{BLOCK, LANES};
pub use plan::LayerReport;
pub use scalars::{LayerNorms, Step, StepScalars};
pub use schedule::Schedule;

/// The code blocks of the crate's README, run as doctests so that they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
