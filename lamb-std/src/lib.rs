//! # lamb-std
//!
//! The optimizer users hold (work in progress: see the issues). Re-exports [`lamb_core`].
#![deny(missing_docs)]

pub use lamb_core;

pub mod buffer;
pub mod shapes;
