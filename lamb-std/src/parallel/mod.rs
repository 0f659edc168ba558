//! How a step's work is shared among threads: [`partition`] cuts the layers into pieces on
//! block boundaries, [`run`] runs each thread's pieces on the pool.

pub(crate) mod partition;
pub(crate) mod run;
