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
pub use scalars::{LayerNorms, StepScalars};
pub use schedule::Schedule;
