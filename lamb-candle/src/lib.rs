#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod config;
mod error;
mod nest;
mod optimizer;
mod slot;

pub use config::Config;
pub use error::Error;
pub use optimizer::Lamb;

pub use lamb_std;
