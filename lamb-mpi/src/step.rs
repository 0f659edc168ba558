//! The distributed step (see the crate docs, "One step"): checks agreed by all ranks
//! (`checks.rs`); gradients reduce-scattered (or read in place); the global gradient norm
//! and phase 1's norms from per-block partials gathered from every rank and added in block
//! order (`exchange.rs`), so that every rank computes the trust ratios lamb-std computes,
//! bit for bit; phase 2 on this rank's shard (`work.rs`); the parameters all-gathered.

use lamb_std::lamb_core::fpenv::DefaultFpMode;
use lamb_std::{ParamStorage, ParamsIn, StepReport};
use mpi::traits::CommunicatorCollectives;

use crate::agree::agreed;
use crate::checks::Prepared;
use crate::dist::DistLamb;
use crate::error::Error;
use crate::exchange::{BlockGathers, clipping};
use crate::wire::storage_digest;
use crate::work::{Skip, StepFacts, Works, build_works};

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
        // One rank: the average is the rank's own gradients (x / 1 = x): nothing to send.
        let reduced = gradients == Gradients::Local && self.world > 1;
        let prepared = self.prepare(params, grads, reduced, mine == all[0]);
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
        let result = self.run(params, grads, reduced, prepared);
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

    /// The step after the checks (the crate docs, "One step", 2 to 5); `reduced`: the
    /// gradients are each rank's own, averaged here by a reduce-scatter.
    fn run(
        &mut self,
        params: &mut [ParamsIn<'_>],
        grads: &[&[f32]],
        reduced: bool,
        prepared: Prepared,
    ) -> Result<StepReport, Error> {
        // 2. The gradients of this rank's shard: averaged, or the caller's read in place.
        if reduced {
            self.reduce_scatter(grads);
        }
        let facts = self.step_facts(params, prepared.t)?;
        let max_grad_norm = self.settings.max_grad_norm();
        let (built, mut gathers) = self.lend_shard(params, grads, reduced, &facts);
        let mut works = agreed(gathers.comm, built)?;
        // 3. Global gradient-norm clipping, from every block's Σg², in block order.
        let (grad_norm, grad_scale) = match max_grad_norm {
            None => (None, 1.0f32),
            Some(max_norm) => {
                let r = works.grad_sq().map_err(|e| facts.layer_error(e));
                agreed(gathers.comm, r)?;
                let sums = gathers.layer_grad_sq(&works.grad_sq_words(), &facts.layers);
                match clipping(&sums, max_norm) {
                    Ok(clip) => clip,
                    Err(skip) => return facts.skipped(&prepared, skip),
                }
            }
        };
        let scalars = facts.scalars(&prepared.configs, grad_scale)?;
        // 4. Phase 1 on this rank's shard; every block's sums gathered, added in block
        // order; every layer's plan.
        let r = works.norms(&scalars).map_err(|e| facts.layer_error(e));
        agreed(gathers.comm, r)?;
        let norms = gathers.layer_norms(&works.norms_words(), &facts.layers);
        let reports = match facts.plan(&prepared.configs, &norms) {
            Ok(reports) => reports,
            Err(layer) => {
                let skip = Skip {
                    layer,
                    grad_norm,
                    grad_scale,
                };
                return facts.skipped(&prepared, skip);
            }
        };
        // 5. Phase 2 on this rank's shard; the updated parameters to every rank (one
        // rank: phase 2 wrote the caller's parameters in place).
        let r = works
            .apply(&scalars, &reports)
            .map_err(|e| facts.layer_error(e));
        agreed(gathers.comm, r)?;
        drop(works);
        if self.world > 1 {
            self.gather_params(params, &facts.storages);
        }
        self.record(&facts);
        Ok(StepReport {
            step: facts.t,
            applied: true,
            skipped: None,
            grad_norm,
            grad_scale,
            lr_factor: prepared.lr_factor,
        })
    }

    /// Lends this rank's shard out: its pieces as work items (their gradients this rank's
    /// chunk of the reduce-scatter if `reduced`, else the caller's), and, apart from them,
    /// what the gathers of the phases' block partials need.
    fn lend_shard<'a>(
        &'a mut self,
        params: &'a mut [ParamsIn<'_>],
        grads: &[&'a [f32]],
        reduced: bool,
        facts: &StepFacts,
    ) -> (Result<Works<'a>, String>, BlockGathers<'a>) {
        let DistLamb {
            comm,
            rank,
            world,
            shards,
            states,
            scratch,
            pool,
            backend,
            bytes_sent,
            comm_time,
            ..
        } = self;
        let pieces = &shards.pieces[*rank];
        let shard_start = shards.elems[*rank].0;
        let recv = &scratch.recv;
        let piece_grads: Vec<&[f32]> = pieces
            .iter()
            .map(|p| {
                if reduced {
                    let at = shards.layer_flat[p.layer] + p.start - shard_start;
                    &recv[at..at + p.len]
                } else {
                    &grads[p.layer][p.start..p.start + p.len]
                }
            })
            .collect();
        let works = build_works(pieces, states, params, &piece_grads, facts).map(|items| Works {
            items,
            pool: pool.as_ref(),
            backend: *backend,
        });
        let gathers = BlockGathers {
            comm,
            world: *world,
            shards,
            bytes_sent,
            comm_time,
            all: Vec::new(),
        };
        (works, gathers)
    }

    /// Records an applied step: every layer's storage, fixed from now on, and its master
    /// copies where its group keeps them; the step count.
    fn record(&mut self, facts: &StepFacts) {
        for (l, &(_, group)) in facts.layers.iter().enumerate() {
            self.storage[l] = Some(facts.storages[l]);
            if facts.storages[l] != ParamStorage::F32 && facts.precisions[group].master {
                self.masters[l] = true;
            }
        }
        self.step = facts.t;
    }
}
