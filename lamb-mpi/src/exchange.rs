//! The step's bulk collectives (the crate docs, "One step", 2 to 5): the gradients'
//! reduce-scatter; the all-gathers of every block's partials (Σg², phase 1's sums), laid
//! end to end in block order and added per layer as lamb-std adds them; the clipping norm
//! from the gathered Σg²; the parameters' all-gather. Each counts the bytes it sends and
//! the time it waits.

use std::time::{Duration, Instant};

use lamb_std::lamb_core::{BLOCK, LayerNorms};
use lamb_std::{ParamStorage, ParamsIn};
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::topology::SimpleCommunicator;
use mpi::traits::CommunicatorCollectives;

use crate::dist::DistLamb;
use crate::shard::Shards;
use crate::wire::{decode, pack, prefix_sums, unpack};
use crate::work::Skip;

/// The communicator, the shards and the traffic counters, borrowed apart from the shard
/// state that the work items hold during the phases.
pub(crate) struct BlockGathers<'a> {
    pub(crate) comm: &'a SimpleCommunicator,
    pub(crate) world: usize,
    pub(crate) shards: &'a Shards,
    pub(crate) bytes_sent: &'a mut u64,
    pub(crate) comm_time: &'a mut Duration,
    /// Every rank's words of every block, in block order (reused by the step's gathers).
    pub(crate) all: Vec<u64>,
}

impl BlockGathers<'_> {
    /// Gathers every rank's `mine` (`per` words for each block of its shard) into
    /// `self.all`, in block order.
    fn gather(&mut self, mine: &[u64], per: i32) {
        self.all.clear();
        self.all.resize(self.shards.total_blocks * per as usize, 0);
        let c: Vec<i32> = (self.shards.blocks.iter())
            .map(|b| b.1 as i32 * per)
            .collect();
        let d: Vec<i32> = (self.shards.blocks.iter())
            .map(|b| b.0 as i32 * per)
            .collect();
        let mut part = PartitionMut::new(&mut self.all[..], &c[..], &d[..]);
        let t = Instant::now();
        self.comm.all_gather_varcount_into(mine, &mut part);
        *self.comm_time += t.elapsed();
        *self.bytes_sent += (self.world as u64 - 1) * mine.len() as u64 * 8;
    }

    /// Every layer's Σg² (of `layers`: length, group), from every rank's Σg² per block
    /// (`mine`: f64 bits), added in block order.
    pub(crate) fn layer_grad_sq(&mut self, mine: &[u64], layers: &[(usize, usize)]) -> Vec<f64> {
        self.gather(mine, 1);
        (0..layers.len())
            .map(|l| {
                let b = self.shards.layer_block[l];
                let n = layers[l].0.div_ceil(BLOCK);
                self.all[b..b + n]
                    .iter()
                    .fold(0.0f64, |a, &x| a + f64::from_bits(x))
            })
            .collect()
    }

    /// Every layer's phase-1 norms, from every rank's sums per block (`mine`: five words
    /// each, `wire::encode`), added in block order.
    pub(crate) fn layer_norms(
        &mut self,
        mine: &[u64],
        layers: &[(usize, usize)],
    ) -> Vec<LayerNorms> {
        self.gather(mine, 5);
        (layers.iter().enumerate())
            .map(|(l, &(len, _))| {
                let b = self.shards.layer_block[l];
                (b..b + len.div_ceil(BLOCK))
                    .map(|k| decode(&self.all[5 * k..5 * k + 5]))
                    .fold(LayerNorms::default(), |a, n| a + n)
            })
            .collect()
    }
}

/// The global gradient norm from every layer's Σg² (`sums`), and the gradient scale that
/// clips it to `max_norm`, as lamb-std computes them; a non-finite sum, or a scale that
/// is not positive, skips the step.
pub(crate) fn clipping(sums: &[f64], max_norm: f64) -> Result<(Option<f64>, f32), Skip> {
    if let Some(i) = sums.iter().position(|s| !s.is_finite()) {
        return Err(Skip {
            layer: i,
            grad_norm: None,
            grad_scale: 1.0,
        });
    }
    let norm = sums.iter().fold(0.0f64, |a, b| a + b).sqrt() * 1.0f32 as f64;
    let clip = 1.0 / (norm / max_norm).max(1.0);
    let grad_scale = (1.0f32 as f64 * clip) as f32;
    if grad_scale <= 0.0 {
        return Err(Skip {
            layer: 0,
            grad_norm: Some(norm),
            grad_scale: 0.0,
        });
    }
    Ok((Some(norm), grad_scale))
}

impl DistLamb {
    /// Averages the ranks' gradients into this rank's chunk of `scratch.recv`: each rank's
    /// shard laid out in its chunk of `scratch.send` (padded to the largest shard), a
    /// reduce-scatter of sums, a division by N (exact when the sum is N times a
    /// representable value).
    pub(crate) fn reduce_scatter(&mut self, grads: &[&[f32]]) {
        let largest = self.scratch.recv.len();
        let s = &mut self.scratch;
        for (r, pieces) in self.shards.pieces.iter().enumerate() {
            let a = self.shards.elems[r].0;
            for p in pieces {
                let at = r * largest + self.shards.layer_flat[p.layer] + p.start - a;
                s.send[at..at + p.len].copy_from_slice(&grads[p.layer][p.start..p.start + p.len]);
            }
        }
        let t = Instant::now();
        self.comm
            .reduce_scatter_block_into(&s.send[..], &mut s.recv[..], SystemOperation::sum());
        self.comm_time += t.elapsed();
        self.bytes_sent += (self.world as u64 - 1) * largest as u64 * 4;
        let n = self.world as f32;
        let mine = self.shards.elems[self.rank].1;
        s.recv[..mine].iter_mut().for_each(|x| *x /= n);
    }

    /// The updated parameters, to every rank: this rank's pieces in their storage
    /// (`storages`; 16-bit units, two per f32), gathered in rank order, which is the
    /// layers' order, and unpacked into `params`.
    pub(crate) fn gather_params(&mut self, params: &mut [ParamsIn<'_>], storages: &[ParamStorage]) {
        let units = |l: usize| {
            if storages[l] == ParamStorage::F32 {
                2
            } else {
                1
            }
        };
        let out = &mut self.scratch.out;
        out.clear();
        for p in &self.shards.pieces[self.rank] {
            pack(&params[p.layer], p.start..p.start + p.len, out);
        }
        let counts: Vec<i32> = (self.shards.pieces.iter())
            .map(|ps| ps.iter().map(|p| p.len * units(p.layer)).sum::<usize>() as i32)
            .collect();
        let displs: Vec<i32> = prefix_sums(&counts);
        let all_params = &mut self.scratch.all_params;
        all_params.resize(counts.iter().map(|&c| c as usize).sum(), 0);
        {
            let mut part = PartitionMut::new(&mut all_params[..], &counts[..], &displs[..]);
            let t = Instant::now();
            self.comm.all_gather_varcount_into(&out[..], &mut part);
            self.comm_time += t.elapsed();
        }
        self.bytes_sent += (self.world as u64 - 1) * out.len() as u64 * 2;
        let mut at = 0;
        for (l, p) in params.iter_mut().enumerate() {
            let n = self.model.layers()[l].1 * units(l);
            unpack(p, &all_params[at..at + n]);
            at += n;
        }
    }
}
