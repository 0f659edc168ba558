//! Collective agreement: every rank calls these at the same point with its local outcome,
//! and every rank leaves with the same answer. This is what keeps a rank from returning
//! early while the others wait in a collective (the crate docs, "No deadlocks").

use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};

use crate::error::Error;

/// Agrees on the outcomes of all ranks: `Ok` if every rank's `local` is `Ok`, else the
/// lowest failing rank and its message, on every rank.
pub(crate) fn agree(
    comm: &SimpleCommunicator,
    local: Result<(), String>,
) -> Result<(), (usize, String)> {
    let rank = comm.rank() as u64;
    let mine = if local.is_err() { rank } else { u64::MAX };
    let mut first = u64::MAX;
    comm.all_reduce_into(&mine, &mut first, SystemOperation::min());
    if first == u64::MAX {
        return Ok(());
    }
    let mut message = match local {
        Err(m) if first == rank => m.into_bytes(),
        _ => Vec::new(),
    };
    let message = broadcast_bytes(comm, first as usize, &mut message);
    Err((
        first as usize,
        String::from_utf8_lossy(message).into_owned(),
    ))
}

/// Sends `bytes` of rank `root` to every rank (the others' `bytes` are replaced).
pub(crate) fn broadcast_bytes<'a>(
    comm: &SimpleCommunicator,
    root: usize,
    bytes: &'a mut Vec<u8>,
) -> &'a [u8] {
    let process = comm.process_at_rank(root as i32);
    let mut len = bytes.len() as u64;
    process.broadcast_into(&mut len);
    bytes.resize(len as usize, 0);
    process.broadcast_into(&mut bytes[..]);
    bytes
}

/// FNV-1a, 64 bits: the digest of a layer table (not a defence against an adversary, a
/// check that ranks registered the same model).
pub(crate) fn digest(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Agrees on a local result: the value where every rank succeeded, else the same
/// [`Error::Refused`] on every rank.
pub(crate) fn agreed<T>(comm: &SimpleCommunicator, local: Result<T, String>) -> Result<T, Error> {
    let flag = local.as_ref().map(|_| ()).map_err(Clone::clone);
    match (agree(comm, flag), local) {
        (Ok(()), Ok(v)) => Ok(v),
        (Err((rank, what)), _) => Err(Error::Refused { rank, what }),
        // `agree` is Ok only if every rank's result, this one's included, is Ok.
        (Ok(()), Err(what)) => Err(Error::Refused {
            rank: comm.rank() as usize,
            what,
        }),
    }
}
