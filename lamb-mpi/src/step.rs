//! The distributed step (see the crate docs, "One step"): checks agreed by all ranks;
//! gradients reduce-scattered (or read in place); the global gradient norm and phase 1's
//! norms from per-block partials gathered from every rank and added in block order, so
//! that every rank computes the trust ratios lamb-std computes, bit for bit; phase 2 on
//! this rank's shard; the parameters all-gathered.

use lamb_std::lamb_core::fpenv::DefaultFpMode;
use lamb_std::lamb_core::layer::{CompactLayer, Grads, HalfMut, Params};
use lamb_std::lamb_core::{
    BLOCK, Backend, Buffer, LambConfig, LambError, LayerNorms, LayerReport, NonFinite, StepScalars,
};
use lamb_std::{
    GroupId, ParamStorage, ParamsIn, SkippedLayer, StepReport, moments_rounding, params_rounding,
};
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::traits::CommunicatorCollectives;
use rayon::prelude::*;
use std::time::Instant;

use crate::agree::agreed;
use crate::dist::DistLamb;
use crate::error::Error;
use crate::shard::Piece;
use crate::state::zeros;
use crate::wire::{decode, encode, pack, params_len, prefix_sums, storage_digest, unpack};

/// How the gradients given to [`DistLamb::step`] were reduced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gradients {
    /// Each rank's own (its micro-batch's): the step averages them across ranks with a
    /// reduce-scatter (each rank receives the sum over ranks of its shard and divides it
    /// by N).
    Local,
    /// Already averaged across ranks by the caller's framework (all-reduced), the same on
    /// every rank: each rank reads its shard in place, and nothing is sent for them. The
    /// ranks' copies are taken to be equal: a non-finite value is found by the rank that
    /// owns its element (and then skips the step on every rank), a difference outside a
    /// rank's shard is not seen.
    Averaged,
}

/// One block-aligned part of this rank's shard, stepped by one thread.
struct Work<'a> {
    layer: usize,
    group: usize,
    data: CompactLayer<'a>,
    /// The index in the layer of the part's element 0 (stochastic rounding).
    index0: usize,
    norms: Vec<LayerNorms>,
    gsq: Vec<f64>,
}

/// What the checks of a step found.
struct Prepared {
    t: u64,
    lr_factor: f64,
    configs: Vec<LambConfig>,
}

impl DistLamb {
    /// One step of every layer. Collective: every rank calls it with the full parameters
    /// (`params[i]` is layer `i`'s, the same on every rank; f32, bf16 or f16) and
    /// gradients (`grads[i]`, f32), reduced as `gradients` says. On return every rank holds
    /// the same updated parameters and the same report; a step skipped for a non-finite
    /// value anywhere (on any rank's gradients) is skipped on every rank, and nothing is
    /// written anywhere. A bad input on any rank is the same [`Error::Refused`] on every
    /// rank, naming the rank and the layer, with nothing written anywhere.
    pub fn step(
        &mut self,
        params: &mut [ParamsIn<'_>],
        grads: &[&[f32]],
        gradients: Gradients,
    ) -> Result<StepReport, Error> {
        let _mode = DefaultFpMode::enter();
        // The storage of every layer must be rank 0's, or the gathers would not match.
        let mine = storage_digest(params);
        let mut all = vec![0u64; self.world];
        self.comm.all_gather_into(&mine, &mut all[..]);
        let prepared = self.prepare(params, grads, gradients, mine == all[0]);
        let prepared = agreed(&self.comm, prepared)?;
        let made = self.make_masters(params);
        let mine = made.clone().unwrap_or_default();
        let made = match agreed(&self.comm, made) {
            Ok(made) => made,
            Err(e) => {
                // Another rank could not make its copies: drop this rank's.
                for k in mine {
                    self.states[k].master = None;
                }
                return Err(e);
            }
        };
        let result = self.run(params, grads, gradients, prepared);
        if !matches!(result, Ok(StepReport { applied: true, .. })) {
            for &k in &made {
                self.states[k].master = None;
            }
        }
        result
    }

    /// [`DistLamb::step`] of f32 parameters.
    pub fn step_f32(
        &mut self,
        params: &mut [&mut [f32]],
        grads: &[&[f32]],
        gradients: Gradients,
    ) -> Result<StepReport, Error> {
        let mut p: Vec<ParamsIn<'_>> = params.iter_mut().map(|x| ParamsIn::F32(x)).collect();
        self.step(&mut p, grads, gradients)
    }

    /// This rank's checks (those of lamb-std's step) and the step's configurations.
    fn prepare(
        &mut self,
        params: &[ParamsIn<'_>],
        grads: &[&[f32]],
        gradients: Gradients,
        same_storage: bool,
    ) -> Result<Prepared, String> {
        let layers = self.model.layers();
        if params.len() != layers.len() || grads.len() != layers.len() {
            return Err(lamb_std::Error::LayerCount {
                layers: layers.len(),
                params: params.len(),
                grads: grads.len(),
            }
            .to_string());
        }
        for (i, (name, len, group)) in layers.iter().enumerate() {
            let layer_error = |source| {
                lamb_std::Error::Layer {
                    index: i,
                    name: name.clone(),
                    source,
                }
                .to_string()
            };
            for (buffer, found) in [
                (Buffer::Param, params_len(&params[i])),
                (Buffer::Grad, grads[i].len()),
            ] {
                if found != *len {
                    return Err(layer_error(LambError::LengthMismatch {
                        buffer,
                        expected: *len,
                        found,
                    }));
                }
            }
            let found = params[i].storage();
            let precision = self
                .settings
                .group(GroupId(*group))
                .map_err(|e| e.to_string())?
                .precision;
            if found == ParamStorage::F16 && !precision.master {
                return Err(lamb_std::Error::NeedsMaster(name.clone()).to_string());
            }
            match self.storage[i] {
                Some(fixed) if fixed != found => {
                    return Err(lamb_std::Error::StorageChanged {
                        index: i,
                        name: name.clone(),
                        fixed,
                        found,
                    }
                    .to_string());
                }
                None if found == ParamStorage::F32 && self.masters[i] => {
                    return Err(lamb_std::Error::MasterNeedsHalf {
                        index: i,
                        name: name.clone(),
                    }
                    .to_string());
                }
                _ => {}
            }
        }
        if !same_storage {
            return Err(
                "the parameters' storage (f32, bf16, f16 per layer) differs from rank 0's".into(),
            );
        }
        for g in 0..self.settings.group_count() {
            if !layers.iter().any(|l| l.2 == g) {
                let name = self
                    .settings
                    .group(GroupId(g))
                    .map_err(|e| e.to_string())?
                    .name
                    .clone();
                return Err(lamb_std::Error::EmptyGroup(name).to_string());
            }
        }
        let t = match self.step.checked_add(1) {
            Some(t) if t <= lamb_std::MAX_STEP => t,
            _ => return Err(lamb_std::Error::StepLimit { step: self.step }.to_string()),
        };
        let lr_factor = self.settings.schedule().factor(t);
        let mut configs = Vec::new();
        for g in 0..self.settings.group_count() {
            let group = self.settings.group(GroupId(g)).map_err(|e| e.to_string())?;
            let c = LambConfig {
                lr: group.config.lr * group.lr_scale * lr_factor,
                ..group.config
            };
            c.validate().map_err(|source| {
                lamb_std::Error::Config {
                    group: Some(group.name.clone()),
                    source,
                }
                .to_string()
            })?;
            configs.push(c);
        }
        if gradients == Gradients::Local && self.world > 1 {
            let largest = self.shards.elems.iter().map(|e| e.1).max().unwrap_or(0);
            let s = &mut self.scratch;
            if s.recv.len() != largest {
                let oom = |b| crate::state::oom("(reduce-scatter buffers)", b).to_string();
                s.send = zeros(largest * self.world).map_err(oom)?;
                s.recv = zeros(largest).map_err(oom)?;
            }
        }
        Ok(Prepared {
            t,
            lr_factor,
            configs,
        })
    }

    /// Makes the master copies of this rank's pieces of half-precision layers that keep
    /// one and have none yet; returns the pieces it made them for. On a failed
    /// allocation the copies made are dropped again.
    fn make_masters(&mut self, params: &[ParamsIn<'_>]) -> Result<Vec<usize>, String> {
        let mut wanted = Vec::new();
        for (k, p) in self.shards.pieces[self.rank].iter().enumerate() {
            let group = self.model.layers()[p.layer].2;
            let keeps = (self
                .settings
                .group(GroupId(group))
                .map_err(|e| e.to_string())?)
            .precision
            .master;
            if keeps && !self.masters[p.layer] && params[p.layer].storage() != ParamStorage::F32 {
                wanted.push(k);
            }
        }
        for (n, &k) in wanted.iter().enumerate() {
            let p = self.shards.pieces[self.rank][k];
            let Ok(mut master) = zeros::<f32>(p.len) else {
                for &j in &wanted[..n] {
                    self.states[j].master = None;
                }
                let name = &self.model.layers()[p.layer].0;
                return Err(crate::state::oom(name, 4 * p.len).to_string());
            };
            let r = p.start..p.start + p.len;
            match &params[p.layer] {
                ParamsIn::F32(x) => master.copy_from_slice(&x[r]),
                ParamsIn::Bf16(x) => master
                    .iter_mut()
                    .zip(&x[r])
                    .for_each(|(o, h)| *o = h.to_f32()),
                ParamsIn::F16(x) => master
                    .iter_mut()
                    .zip(&x[r])
                    .for_each(|(o, h)| *o = h.to_f32()),
            }
            self.states[k].master = Some(master);
        }
        Ok(wanted)
    }

    /// The step after the checks: gradients, norms, plans, apply, gather.
    fn run(
        &mut self,
        params: &mut [ParamsIn<'_>],
        grads: &[&[f32]],
        gradients: Gradients,
        prepared: Prepared,
    ) -> Result<StepReport, Error> {
        let Prepared {
            t,
            lr_factor,
            configs,
        } = prepared;
        let (me, world) = (self.rank, self.world);
        // One rank: the average is the rank's own gradients (x / 1 = x), and phase 2 wrote
        // the caller's parameters in place: nothing to exchange.
        let exchange = world > 1;
        let reduced = gradients == Gradients::Local && exchange;
        if reduced {
            self.reduce_scatter(grads);
        }
        let all_pieces = self.shards.pieces.clone();
        let pieces = all_pieces[me].clone();
        let (shard_start, _) = self.shards.elems[me];
        let chunk = match self.threads {
            1 => usize::MAX,
            n => (self.shards.blocks[me].1.div_ceil(2 * n)).max(1) * BLOCK,
        };
        // Every layer's group and whether the model copy is f32, known to all ranks.
        let layers: Vec<(usize, usize)> = self.model.layers().iter().map(|l| (l.1, l.2)).collect();
        let storages: Vec<ParamStorage> = params.iter().map(ParamsIn::storage).collect();
        let layer_flat = self.shards.layer_flat.clone();
        let counts: Vec<i32> = self.shards.blocks.iter().map(|b| b.1 as i32).collect();
        let displs: Vec<i32> = self.shards.blocks.iter().map(|b| b.0 as i32).collect();
        let total_blocks = self.shards.total_blocks;
        let layer_block = self.shards.layer_block.clone();
        let mut precisions = Vec::new();
        for g in 0..self.settings.group_count() {
            precisions.push(
                self.settings
                    .group(GroupId(g))
                    .map_err(Error::Optimizer)?
                    .precision,
            );
        }
        let max_grad_norm = self.settings.max_grad_norm();
        let names: Vec<String> = self.model.layers().iter().map(|l| l.0.clone()).collect();
        let group_names: Vec<String> = (0..self.settings.group_count())
            .map(|g| {
                self.settings
                    .group(GroupId(g))
                    .map_or_else(|_| format!("{g}"), |x| x.name.clone())
            })
            .collect();
        let skip =
            |index: usize, grad_norm: Option<f64>, grad_scale: f32| -> Result<StepReport, Error> {
                let group = layers.get(index).map_or(0, |l| l.1);
                let name = names.get(index).cloned().unwrap_or_default();
                match configs[group].non_finite {
                    NonFinite::Error => Err(Error::Optimizer(lamb_std::Error::Layer {
                        index,
                        name,
                        source: LambError::NonFinite {},
                    })),
                    NonFinite::Skip => Ok(StepReport {
                        step: t,
                        applied: false,
                        skipped: Some(SkippedLayer { index, name }),
                        grad_norm,
                        grad_scale,
                        lr_factor,
                    }),
                }
            };
        let DistLamb {
            comm,
            states,
            scratch,
            pool,
            backend,
            bytes_sent,
            comm_time,
            ..
        } = self;
        let comm_time = std::cell::Cell::from_mut(comm_time);
        let backend = *backend;
        let pool = pool.as_ref();
        let recv = &scratch.recv;
        // The pieces' gradients: this rank's chunk of the reduce-scatter, or the caller's.
        let piece_grads: Vec<&[f32]> = pieces
            .iter()
            .map(|p| {
                if reduced {
                    let at = layer_flat[p.layer] + p.start - shard_start;
                    &recv[at..at + p.len]
                } else {
                    &grads[p.layer][p.start..p.start + p.len]
                }
            })
            .collect();
        let built = build_works(
            &pieces,
            states,
            params,
            &piece_grads,
            &layers,
            &precisions,
            t,
            chunk,
        );
        let mut works = agreed(comm, built)?;
        let gathered = |mine: &[u64], per: i32, all: &mut Vec<u64>, sent: &mut u64| {
            all.clear();
            all.resize(total_blocks * per as usize, 0);
            let c: Vec<i32> = counts.iter().map(|c| c * per).collect();
            let d: Vec<i32> = displs.iter().map(|d| d * per).collect();
            let mut part = PartitionMut::new(&mut all[..], &c[..], &d[..]);
            let t = Instant::now();
            comm.all_gather_varcount_into(mine, &mut part);
            comm_time.set(comm_time.get() + t.elapsed());
            *sent += (world as u64 - 1) * mine.len() as u64 * 8;
        };
        let mut all = Vec::new();
        // Global gradient-norm clipping, from every block's Σg², in block order.
        let (grad_norm, grad_scale) = match max_grad_norm {
            None => (None, 1.0f32),
            Some(max_norm) => {
                let r = run_works(pool, &mut works, |w| w.grad_sq(backend));
                agreed(comm, r.map_err(|(l, e)| layer_error(&names, l, e)))?;
                let mine: Vec<u64> = works
                    .iter()
                    .flat_map(|w| w.gsq.iter().map(|x| x.to_bits()))
                    .collect();
                gathered(&mine, 1, &mut all, bytes_sent);
                let sums: Vec<f64> = (0..layers.len())
                    .map(|l| {
                        let b = layer_block[l];
                        let n = layers[l].0.div_ceil(BLOCK);
                        all[b..b + n]
                            .iter()
                            .fold(0.0f64, |a, &x| a + f64::from_bits(x))
                    })
                    .collect();
                if let Some(i) = sums.iter().position(|s| !s.is_finite()) {
                    return skip(i, None, 1.0);
                }
                let norm = sums.iter().fold(0.0f64, |a, b| a + b).sqrt() * 1.0f32 as f64;
                let clip = 1.0 / (norm / max_norm).max(1.0);
                let grad_scale = (1.0f32 as f64 * clip) as f32;
                if grad_scale <= 0.0 {
                    return skip(0, Some(norm), 0.0);
                }
                (Some(norm), grad_scale)
            }
        };
        let mut scalars = Vec::new();
        for (g, c) in configs.iter().enumerate() {
            let s = StepScalars::new(c, t, grad_scale).map_err(|source| {
                Error::Optimizer(lamb_std::Error::Config {
                    group: group_names.get(g).cloned(),
                    source,
                })
            })?;
            scalars.push(s);
        }
        // Phase 1 on this rank's shard; every block's sums gathered, added in block order.
        let r = run_works(pool, &mut works, |w| w.norms(backend, &scalars[w.group]));
        agreed(comm, r.map_err(|(l, e)| layer_error(&names, l, e)))?;
        let mine: Vec<u64> = works
            .iter()
            .flat_map(|w| w.norms.iter().flat_map(encode))
            .collect();
        gathered(&mine, 5, &mut all, bytes_sent);
        let mut reports: Vec<LayerReport> = Vec::with_capacity(layers.len());
        for (l, &(len, group)) in layers.iter().enumerate() {
            let b = layer_block[l];
            let norms = (b..b + len.div_ceil(BLOCK))
                .map(|k| decode(&all[5 * k..5 * k + 5]))
                .fold(LayerNorms::default(), |a, n| a + n);
            let report = LayerReport::plan(&configs[group], norms);
            if report.skipped {
                return skip(l, grad_norm, grad_scale);
            }
            reports.push(report);
        }
        // Phase 2 on this rank's shard.
        let r = run_works(pool, &mut works, |w| {
            w.apply(backend, &scalars[w.group], reports[w.layer].step_size)
        });
        agreed(comm, r.map_err(|(l, e)| layer_error(&names, l, e)))?;
        drop(works);
        // The updated parameters, to every rank: this rank's pieces in their storage
        // (16-bit units, two per f32), gathered in rank order, which is the layers' order.
        let units = |l: usize| {
            if storages[l] == ParamStorage::F32 {
                2
            } else {
                1
            }
        };
        if exchange {
            let out = &mut scratch.out;
            out.clear();
            for p in &pieces {
                pack(&params[p.layer], p.start..p.start + p.len, out);
            }
            let counts: Vec<i32> = (all_pieces.iter())
                .map(|ps| ps.iter().map(|p| p.len * units(p.layer)).sum::<usize>() as i32)
                .collect();
            let displs: Vec<i32> = prefix_sums(&counts);
            let all_params = &mut scratch.all_params;
            all_params.resize(counts.iter().map(|&c| c as usize).sum(), 0);
            {
                let mut part = PartitionMut::new(&mut all_params[..], &counts[..], &displs[..]);
                let t = Instant::now();
                comm.all_gather_varcount_into(&out[..], &mut part);
                comm_time.set(comm_time.get() + t.elapsed());
            }
            *bytes_sent += (world as u64 - 1) * out.len() as u64 * 2;
            let mut at = 0;
            for (l, p) in params.iter_mut().enumerate() {
                let n = layers[l].0 * units(l);
                unpack(p, &all_params[at..at + n]);
                at += n;
            }
        }
        for (l, &(_, group)) in layers.iter().enumerate() {
            self.storage[l] = Some(storages[l]);
            if storages[l] != ParamStorage::F32 && precisions[group].master {
                self.masters[l] = true;
            }
        }
        self.step = t;
        Ok(StepReport {
            step: t,
            applied: true,
            skipped: None,
            grad_norm,
            grad_scale,
            lr_factor,
        })
    }
}

/// Runs `f` over every work item, on the pool if there is one; the first failure, with its
/// layer.
fn run_works<F>(
    pool: Option<&rayon::ThreadPool>,
    works: &mut [Work<'_>],
    f: F,
) -> Result<(), (usize, LambError)>
where
    F: Fn(&mut Work<'_>) -> Result<(), LambError> + Sync,
{
    let one = |w: &mut Work<'_>| f(w).map_err(|e| (w.layer, e));
    match pool {
        None => works.iter_mut().try_for_each(one),
        Some(pool) => pool.install(|| works.par_iter_mut().try_for_each(one)),
    }
}

impl Work<'_> {
    /// Phase 1 of this part.
    fn norms(&mut self, b: Backend, s: &StepScalars) -> Result<(), LambError> {
        b.norms_blocks_compact(s, &self.data, &mut self.norms)
    }

    /// Phase 2 of this part.
    fn apply(&mut self, b: Backend, s: &StepScalars, step_size: f32) -> Result<(), LambError> {
        b.apply_compact(s, step_size, &mut self.data, self.index0)
    }

    /// Σg² of each block of this part.
    fn grad_sq(&mut self, b: Backend) -> Result<(), LambError> {
        let Grads::F32(g) = self.data.grads else {
            return Ok(());
        };
        for (k, slot) in self.gsq.iter_mut().enumerate() {
            *slot = b.sum_squares(&g[k * BLOCK..((k + 1) * BLOCK).min(g.len())])?;
        }
        Ok(())
    }
}

/// This rank's pieces as work items, cut into parts of at most `chunk` elements (a
/// multiple of [`BLOCK`]).
#[allow(clippy::too_many_arguments)]
fn build_works<'a>(
    pieces: &[Piece],
    states: &'a mut [crate::state::PieceState],
    params: &'a mut [ParamsIn<'_>],
    grads: &[&'a [f32]],
    layers: &[(usize, usize)],
    precisions: &[lamb_std::Precision],
    t: u64,
    chunk: usize,
) -> Result<Vec<Work<'a>>, String> {
    let mut works = Vec::new();
    let mut by_layer = params.iter_mut().enumerate();
    for ((p, state), g) in pieces.iter().zip(states.iter_mut()).zip(grads) {
        let Some((_, pin)) = by_layer.find(|(i, _)| *i == p.layer) else {
            return Err(format!("layer {} has no parameters", p.layer));
        };
        let group = layers[p.layer].1;
        let r = p.start..p.start + p.len;
        let (moments, master) = state.lend(moments_rounding(t, p.layer));
        let params = match (pin, master) {
            (ParamsIn::F32(x), _) => Params::F32(&mut x[r]),
            (ParamsIn::Bf16(x), Some(master)) => Params::Master {
                master,
                model: HalfMut::Bf16(&mut x[r]),
            },
            (ParamsIn::F16(x), Some(master)) => Params::Master {
                master,
                model: HalfMut::F16(&mut x[r]),
            },
            (ParamsIn::Bf16(x), None) => Params::Bf16 {
                data: &mut x[r],
                rounding: params_rounding(precisions[group].rounding, t, p.layer),
            },
            (ParamsIn::F16(_), None) => {
                return Err(format!("layer {}: f16 without a master copy", p.layer));
            }
        };
        let mut rest = CompactLayer {
            params,
            grads: Grads::F32(g),
            moments,
        };
        let (mut index0, mut left) = (p.start, p.len);
        loop {
            let n = left.min(chunk);
            let (head, tail) = rest.split_at(n).map_err(|e| e.to_string())?;
            let blocks = n.div_ceil(BLOCK);
            works.push(Work {
                layer: p.layer,
                group,
                data: head,
                index0,
                norms: vec![LayerNorms::default(); blocks],
                gsq: vec![0.0; blocks],
            });
            (index0, left, rest) = (index0 + n, left - n, tail);
            if left == 0 {
                break;
            }
        }
    }
    Ok(works)
}

/// A kernel's refusal of layer `l`, as text.
fn layer_error(names: &[String], l: usize, source: LambError) -> String {
    lamb_std::Error::Layer {
        index: l,
        name: names.get(l).cloned().unwrap_or_default(),
        source,
    }
    .to_string()
}

impl DistLamb {
    /// Averages the ranks' gradients into this rank's chunk of `scratch.recv`: each rank's
    /// shard laid out in its chunk of `scratch.send` (padded to the largest shard), a
    /// reduce-scatter of sums, a division by N (exact when the sum is N times a
    /// representable value).
    fn reduce_scatter(&mut self, grads: &[&[f32]]) {
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
}
