//! [`DistLamb`]: set-up (checks agreed by all ranks, layer-table digest, shards, state),
//! getters, and checkpoints. The step is in `step.rs` (and the files it calls:
//! `checks.rs`, `work.rs`, `exchange.rs`).

use std::path::Path;

use lamb_std::lamb_core::{BLOCK, Backend};
use lamb_std::{GroupId, Lamb, LayerId, ParamStorage};
use mpi::datatype::PartitionMut;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};

use crate::agree::{agree, agreed, broadcast_bytes, digest};
use crate::error::Error;
use crate::model::Model;
use crate::shard::Shards;
use crate::state::{LayerAssembly, PieceState, layer_format, oom};

/// Data-parallel LAMB over an MPI communicator, with the optimizer state sharded across
/// ranks (ZeRO stage 1). See the [crate docs](crate).
pub struct DistLamb {
    pub(crate) comm: SimpleCommunicator,
    pub(crate) rank: usize,
    pub(crate) world: usize,
    pub(crate) model: Model,
    /// The checked groups, clipping and schedule (a lamb-std optimizer without layers).
    pub(crate) settings: Lamb,
    pub(crate) shards: Shards,
    /// The state of this rank's pieces (parallel to `shards.pieces[rank]`).
    pub(crate) states: Vec<PieceState>,
    /// Per layer, alike on every rank: the parameters' storage fixed by the first applied
    /// step, and whether the layer has master copies.
    pub(crate) storage: Vec<Option<ParamStorage>>,
    pub(crate) masters: Vec<bool>,
    pub(crate) step: u64,
    pub(crate) pool: Option<rayon::ThreadPool>,
    pub(crate) threads: usize,
    pub(crate) backend: Backend,
    /// Bytes this rank sent in the collectives of steps (see [`DistLamb::bytes_sent`]).
    pub(crate) bytes_sent: u64,
    /// Time in the steps' bulk collectives (see [`DistLamb::comm_seconds`]).
    pub(crate) comm_time: std::time::Duration,
    pub(crate) scratch: crate::state::Scratch,
}

impl DistLamb {
    /// A distributed optimizer of `model` over (a duplicate of) `comm`. Collective: every
    /// rank of `comm` calls it with its own `Model`, which must be the same.
    ///
    /// Every rank checks its model as lamb-std would (groups, configurations, clipping,
    /// schedule, layer groups, names and sizes); then the ranks compare digests of their
    /// layer tables, and where they differ report the first difference from rank 0's
    /// ([`Error::LayerTable`]); then each rank allocates the state of its shard. A
    /// failure on any rank is returned by every rank ([`Error::Refused`]).
    pub fn new(comm: &impl Communicator, model: Model) -> Result<DistLamb, Error> {
        let comm = comm.duplicate();
        let (rank, world) = (comm.rank() as usize, comm.size() as usize);
        let settings = check_model(&model);
        let settings = agreed(&comm, settings)?;
        check_same_table(&comm, &model)?;
        let lens: Vec<usize> = model.layers().iter().map(|l| l.1).collect();
        let shards = Shards::new(&lens, world);
        let states = allocate(&model, &settings, &shards.pieces[rank]);
        let states = agreed(&comm, states)?;
        let n = model.layers().len();
        Ok(DistLamb {
            comm,
            rank,
            world,
            model,
            settings,
            shards,
            states,
            storage: vec![None; n],
            masters: vec![false; n],
            step: 0,
            pool: None,
            threads: 1,
            backend: Backend::detect(),
            bytes_sent: 0,
            comm_time: std::time::Duration::ZERO,
            scratch: Default::default(),
        })
    }

    /// Threads of this rank's kernels (1: the calling thread; 0: one per core). Local: each
    /// rank may choose its own; the results are bit-identical for every count.
    pub fn set_threads(&mut self, threads: usize) -> Result<(), lamb_std::Error> {
        let n = match threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n.min(Lamb::max_threads()),
        };
        self.pool = if n == 1 {
            None
        } else {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build();
            Some(pool.map_err(|e| lamb_std::Error::ThreadPool(e.to_string()))?)
        };
        self.threads = n;
        Ok(())
    }

    /// This rank's index.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The model this optimizer was made for.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The elements of the model this rank owns the state of: `(first, count)` in the
    /// layers laid end to end.
    pub fn shard(&self) -> (usize, usize) {
        self.shards.elems[self.rank]
    }

    /// Bytes of optimizer state this rank holds (moments, 8-bit scales, master copies),
    /// counted as [`Lamb::bytes_per_param`] counts them: about 1/N of lamb-std's.
    pub fn state_bytes(&self) -> usize {
        self.states.iter().map(PieceState::bytes).sum()
    }

    /// Bytes this rank has sent in the collectives of all steps so far, counted at the
    /// calls as a bandwidth-optimal (ring or direct) algorithm sends them: (N−1) chunks of
    /// the reduce-scatter's buffer, and this rank's part of each all-gather to the N−1
    /// others. Not measured on the wire, where MPI's algorithm and headers decide.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Seconds this rank has spent in the bulk collectives of all steps so far (the
    /// gradients' reduce-scatter, the gathers of the block partials and of the parameters),
    /// waiting for slower ranks included: a step's time less this is its computation and
    /// copies.
    pub fn comm_seconds(&self) -> f64 {
        self.comm_time.as_secs_f64()
    }

    /// The groups' current settings (lamb-std's view, without layers): configurations, lr
    /// multipliers, clipping and schedule, as given or as loaded from a checkpoint.
    pub fn settings(&self) -> &Lamb {
        &self.settings
    }

    /// Saves the whole optimizer state as **one** lamb-std checkpoint file, the file
    /// single-process lamb-std writes for the same state (byte for byte): every rank
    /// sends its shard to rank 0, which assembles the layers and writes the file
    /// atomically ([`Lamb::save`]). Collective; an error on rank 0 is returned by every
    /// rank. `path` matters on rank 0 only. Rank 0 needs memory for the whole state
    /// twice over while it saves.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        let mut mine = Vec::new();
        for s in &self.states {
            s.to_bytes(&mut mine);
        }
        let words = to_words(&mine);
        let count = words.len() as i32;
        let mut counts = vec![0i32; self.world];
        self.comm.all_gather_into(&count, &mut counts[..]);
        let root = self.comm.process_at_rank(0);
        let local = if self.rank == 0 {
            let displs: Vec<i32> = counts
                .iter()
                .scan(0i32, |a, &c| {
                    let d = *a;
                    *a += c;
                    Some(d)
                })
                .collect();
            let total: usize = counts.iter().map(|&c| c as usize).sum();
            let mut all = vec![0u64; total];
            {
                let mut part = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
                root.gather_varcount_into_root(&words[..], &mut part);
            }
            let bytes: Vec<u8> = all.iter().flat_map(|w| w.to_le_bytes()).collect();
            let starts: Vec<usize> = displs.iter().map(|&d| d as usize * 8).collect();
            self.write_gathered(&bytes, &starts, path.as_ref())
                .map_err(|e| e.to_string())
        } else {
            root.gather_varcount_into(&words[..]);
            Ok(())
        };
        agreed(&self.comm, local)
    }

    /// Rank 0's part of [`DistLamb::save`]: assembles the layers from every rank's bytes
    /// (rank `r`'s from `starts[r]`) and writes the file.
    fn write_gathered(
        &self,
        bytes: &[u8],
        starts: &[usize],
        path: &Path,
    ) -> Result<(), lamb_std::Error> {
        let mut lamb = self.lamb_with_settings()?;
        let mut layers = Vec::with_capacity(self.model.layers().len());
        for (i, (name, len, group)) in self.model.layers().iter().enumerate() {
            let precision = lamb.group(GroupId(*group))?.precision;
            let a = LayerAssembly::new(layer_format(*len, &precision), *len)
                .map_err(|bytes| oom(name, bytes))?;
            debug_assert_eq!(layers.len(), i);
            layers.push(a);
        }
        for (r, pieces) in self.shards.pieces.iter().enumerate() {
            let mut at = starts[r];
            for p in pieces {
                let name = &self.model.layers()[p.layer].0;
                at += layers[p.layer]
                    .put(p.start, p.len, &bytes[at..])
                    .map_err(|bytes| oom(name, bytes))?;
            }
        }
        let views: Vec<_> = layers
            .iter()
            .map(|a| (a.view(), a.master.as_deref()))
            .collect();
        lamb.set_state(self.step, &views)?;
        lamb.save(path)
    }

    /// Loads a lamb-std checkpoint (written by [`DistLamb::save`] at any world size, or by
    /// single-process [`Lamb::save`]) into this optimizer, whose model must be the file's
    /// (everything [`Lamb::load`] checks). Collective: every rank reads the file (it must
    /// be readable by every rank, e.g. on a shared file system), checks it whole, and keeps
    /// its shard; if any rank refuses, every rank returns the same error and nothing
    /// changes anywhere. Each rank needs the whole state's memory twice over while it
    /// loads.
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<(), Error> {
        let local = self
            .model
            .to_lamb()
            .and_then(|mut lamb| lamb.load(path.as_ref()).map(|()| lamb));
        let lamb = agreed(&self.comm, local.map_err(|e| e.to_string()))?;
        // Checked whole: now replace. The groups' settings were checked by the load.
        let mut settings = self.settings.clone();
        let replaced = (|| {
            for g in 0..settings.group_count() {
                let group = lamb.group(GroupId(g))?;
                settings.set_group(GroupId(g), group.config, group.lr_scale)?;
            }
            settings.set_max_grad_norm(lamb.max_grad_norm())?;
            settings.set_schedule(lamb.schedule())
        })();
        // Every rank read the same file: the outcome is the same everywhere.
        replaced.map_err(Error::Optimizer)?;
        for (state, p) in self.states.iter_mut().zip(&self.shards.pieces[self.rank]) {
            // `to_lamb` registered every layer of the model, so this is always `Ok`.
            if let Ok(layer) = lamb.layer(LayerId(p.layer)) {
                state.copy_from_layer(layer.state, p.start);
                state.master = layer.master.map(|m| m[p.start..p.start + p.len].to_vec());
            }
        }
        for (i, has) in self.masters.iter_mut().enumerate() {
            *has = lamb.layer(LayerId(i)).is_ok_and(|l| l.master.is_some());
        }
        self.storage.iter_mut().for_each(|s| *s = None);
        self.settings = settings;
        self.step = lamb.steps();
        Ok(())
    }

    /// The single-process optimizer of this model with the current settings.
    fn lamb_with_settings(&self) -> Result<Lamb, lamb_std::Error> {
        let mut lamb = self.model.to_lamb()?;
        for g in 0..self.settings.group_count() {
            let group = self.settings.group(GroupId(g))?;
            lamb.set_group(GroupId(g), group.config, group.lr_scale)?;
        }
        lamb.set_max_grad_norm(self.settings.max_grad_norm())?;
        lamb.set_schedule(self.settings.schedule())?;
        Ok(lamb)
    }
}

/// This rank's checks of its model, as lamb-std would make them.
fn check_model(model: &Model) -> Result<Lamb, String> {
    let settings = model.settings().map_err(|e| e.to_string())?;
    let mut names = std::collections::HashSet::new();
    for (i, (name, len, group)) in model.layers().iter().enumerate() {
        if *group >= settings.group_count() {
            return Err(lamb_std::Error::UnknownGroup(*group).to_string()
                + &format!(" (layer {i} '{name}')"));
        }
        if !names.insert(name.as_str()) {
            return Err(lamb_std::Error::DuplicateName(name.clone()).to_string());
        }
        if len.checked_mul(4).is_none_or(|b| b > isize::MAX as usize) {
            return Err(lamb_std::Error::ShapeOverflow {
                name: name.clone(),
                shape: vec![*len],
            }
            .to_string());
        }
    }
    Ok(settings)
}

/// Compares the ranks' layer tables (a digest, then the first difference from rank 0's).
fn check_same_table(comm: &SimpleCommunicator, model: &Model) -> Result<(), Error> {
    let lines = model.describe();
    let text = lines.join("\n");
    let mine = digest(&text);
    let mut all = vec![0u64; comm.size() as usize];
    comm.all_gather_into(&mine, &mut all[..]);
    if all.iter().all(|&d| d == all[0]) {
        return Ok(());
    }
    let mut table = if comm.rank() == 0 {
        text.into_bytes()
    } else {
        Vec::new()
    };
    let theirs = String::from_utf8_lossy(broadcast_bytes(comm, 0, &mut table)).into_owned();
    let local = if mine == all[0] {
        Ok(())
    } else {
        Err(first_difference(
            &lines,
            &theirs.lines().collect::<Vec<_>>(),
        ))
    };
    match agree(comm, local) {
        Err((rank, what)) => Err(Error::LayerTable { rank, what }),
        Ok(()) => Ok(()),
    }
}

/// The first line where this rank's table differs from rank 0's.
fn first_difference(mine: &[String], rank0: &[&str]) -> String {
    for (k, line) in mine.iter().enumerate() {
        match rank0.get(k) {
            Some(r) if *r == line => continue,
            Some(r) => return format!("rank 0 has `{r}`, this rank has `{line}`"),
            None => return format!("rank 0 has no line {k}, this rank has `{line}`"),
        }
    }
    format!(
        "rank 0 has `{}`, this rank has nothing there",
        rank0.get(mine.len()).unwrap_or(&"")
    )
}

/// The zeroed state of this rank's pieces.
fn allocate(
    model: &Model,
    settings: &Lamb,
    pieces: &[crate::shard::Piece],
) -> Result<Vec<PieceState>, String> {
    let mut states = Vec::with_capacity(pieces.len());
    for p in pieces {
        let (name, len, group) = &model.layers()[p.layer];
        let precision = settings
            .group(GroupId(*group))
            .map_err(|e| e.to_string())?
            .precision;
        let s = PieceState::new(layer_format(*len, &precision), p.len)
            .map_err(|b| oom(name, b).to_string())?;
        states.push(s);
    }
    Ok(states)
}

/// Bytes padded to 8 and read as little-endian u64 words (MPI counts are `i32`: words
/// carry 8 times more than bytes would).
fn to_words(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .collect()
}

// Shards start on blocks, which must start on the 8-bit scales' blocks of QBLOCK elements.
const _: () = assert!(BLOCK.is_multiple_of(lamb_std::lamb_core::codec::QBLOCK));
