//! # lamb-mpi
//!
//! Data-parallel LAMB across machines over MPI, with the optimizer state sharded across
//! the ranks (ZeRO stage 1). Every rank holds the full parameters; each rank keeps the
//! optimizer state (moments, 8-bit scales, master copies) of one shard of the model only,
//! about 1/N of lamb-std's. Parameters and state after a step are **bit-identical** to
//! single-process [`lamb_std::Lamb`] at every world size, and checkpoints are lamb-std's
//! own files, loadable at any world size and by lamb-std.
//!
//! ```no_run
//! use lamb_mpi::{DistLamb, Gradients, Model};
//! use lamb_std::lamb_core::LambConfig;
//!
//! let universe = mpi::initialize().expect("MPI initialized once");
//! let world = universe.world();
//! lamb_mpi::abort_on_panic();
//! let mut model = Model::with_decay_split(LambConfig::nvlamb());
//! model.add_param("fc.weight", &[64, 784]);
//! model.add_param("fc.bias", &[64]);
//! model.set_max_grad_norm(Some(1.0));
//! let mut opt = DistLamb::new(&world, model)?; // collective: every rank calls it
//!
//! let (mut w, mut b) = (vec![0.01f32; 64 * 784], vec![0.0f32; 64]);
//! let (gw, gb) = (vec![0.001f32; 64 * 784], vec![0.001f32; 64]); // this rank's micro-batch
//! let report = opt.step_f32(&mut [&mut w, &mut b], &[&gw, &gb], Gradients::Local)?;
//! assert!(report.applied);
//! opt.save("ckpt.safetensors")?; // one lamb-std file, whatever the world size
//! # Ok::<(), lamb_mpi::Error>(())
//! ```
//!
//! ## Shards
//!
//! The layers are laid end to end and cut into N contiguous shards on block boundaries
//! (1024 elements of a layer, or a layer's end), balanced by elements: a big layer may
//! span ranks. Every block of the norms lies on one rank.
//!
//! ## One step ([`DistLamb::step`])
//!
//! 1. The ranks agree that every rank's inputs pass lamb-std's checks (counts, lengths,
//!    storage, configurations, step domain), and allocate master copies of their shard.
//! 2. Gradients: [`Gradients::Local`] averages each rank's own gradients with a
//!    reduce-scatter (every rank gets the sum of its shard, padded to the largest, and
//!    divides it by N); [`Gradients::Averaged`] reads the caller's already all-reduced
//!    gradients in place.
//! 3. With clipping on, Σg² of every block of every shard is all-gathered, and every rank
//!    adds them per layer in block order, then the layers in order: lamb-std's global
//!    norm, bit for bit. A non-finite value on any rank is seen by every rank, and every
//!    rank skips the step (nothing written anywhere).
//! 4. Phase 1 on the shard (nothing written); every block's Σp², Σu² (and ranges) are
//!    all-gathered and added per layer **in block order**, so every rank computes every
//!    layer's trust ratio exactly as single-process lamb-std does, whatever N. A
//!    non-finite norm skips the step on every rank.
//! 5. Phase 2 on the shard; the updated parameters are all-gathered to every rank in their
//!    own storage (a bf16 model copy as bf16).
//!
//! Bytes per rank per step: (N−1)/N·4 B per parameter for the reduce-scatter, (N−1)/N·4
//! (f32) or ·2 (bf16) for the all-gather, and 48 B per block of 1024 for the norms'
//! partials (docs/distributed.md has the measurements and a projection).
//!
//! ## No deadlocks
//!
//! Every collective call ([`DistLamb::new`], [`DistLamb::step`], [`DistLamb::save`],
//! [`DistLamb::load`]) runs its local checks first, then the ranks agree: if any rank
//! refused, **every** rank returns the same [`Error::Refused`], naming the lowest such
//! rank and its reason (the layer and value), and nothing changed on any rank. Ranks
//! whose layer tables differ are found by [`DistLamb::new`] from a digest, which then
//! reports the first difference from rank 0's ([`Error::LayerTable`]). A rank that dies
//! (killed, or a panic) cannot take part in a collective again: MPI's own failure handling
//! ends the job (`mpirun` kills the other ranks when one exits abnormally), and
//! [`abort_on_panic`] makes a panic call `MPI_Abort` at once instead of leaving the others
//! waiting.
//!
//! ## Checkpoints
//!
//! [`DistLamb::save`] gathers the shards on rank 0, which writes **one** file in
//! lamb-std's format (the same bytes single-process [`lamb_std::Lamb::save`] writes for
//! that state) atomically. [`DistLamb::load`] reads such a file at any world size, and
//! [`lamb_std::Lamb::load`] reads it in one process; the other way round too.
#![deny(missing_docs)]

mod agree;
mod checks;
mod dist;
mod error;
mod exchange;
mod model;
mod shard;
mod state;
mod step;
mod wire;
mod work;

pub use dist::DistLamb;
pub use error::Error;
pub use model::Model;
pub use step::Gradients;

/// Makes a panic on this rank end the whole MPI job at once (`MPI_Abort` on the world
/// communicator, after the panic message is printed), instead of leaving the other ranks
/// waiting in a collective for a rank that will never come. Call it after MPI is
/// initialized.
pub fn abort_on_panic() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        // SAFETY: MPI_Abort takes the world communicator, valid once MPI is initialized
        // (the caller's precondition), and does not return.
        unsafe {
            mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 101);
        }
    }));
}
