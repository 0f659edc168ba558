#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod config;
mod error;
mod nest;
mod optimizer;

pub use config::Config;
pub use error::Error;
pub use optimizer::Lamb;

pub use lamb_std;

/// The workspace README's code blocks, compiled and run as this crate's doctests (this
/// crate sees lamb-core, lamb-std, candle and itself, which those blocks use).
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct WorkspaceReadme;
