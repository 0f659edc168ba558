//! The step, from the checks to phase 2.
//!
//! A step is atomic across the whole model. All checks run first; then phase 1 (norms)
//! runs over every layer, writing nothing; only if every layer's norms are finite does
//! phase 2 (apply) run. A NaN anywhere therefore skips the step for every layer.
//!
//! Phase 2 visits each thread's pieces in *reverse* order of phase 1, so the data phase 1
//! read last, which is what is still in cache, is the first phase 2 reads again. Where a
//! thread's share of the model fits in cache, phase 2 runs entirely from cache; where it
//! does not, the cache-sized tail still does. Doing phase 2 of each layer right after its
//! phase 1 would reuse more, but would write layers before knowing whether a later layer is
//! non-finite, and a step would no longer be all or nothing.
//!
//! The entry points take the model's tensors in several shapes (`&mut [f32]`, [`ParamsIn`],
//! gradients that may be absent); [`ParamSlot`] and [`GradSlot`] let one generic step read
//! them where they are, so a step allocates nothing to wrap them.

use std::sync::Mutex;

use lamb_core::layer::{CompactLayer, Grads, HalfMut, Params, Rounding};
use lamb_core::{
    BLOCK, Backend, Field, LambConfig, LambError, LayerNorms, LayerReport, NonFinite, StepScalars,
};

use super::group::Group;
use super::scratch::Scratch;
use super::state::LayerState;
use super::views::{ParamStorage, ParamsIn};
use super::{Lamb, Layer, out_of_memory, validate_group};
use crate::error::Error;
use crate::parallel::partition::{Piece, partition};
use crate::parallel::run::{Lists, RunError, Work, recycle, run};

/// The layer that made a step skip.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedLayer {
    /// Its index.
    pub index: usize,
    /// Its name.
    pub name: String,
}

/// What a call to [`Lamb::step`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// The step number (1-based) this call took, or would have taken if skipped.
    pub step: u64,
    /// `false` if the step was skipped for a non-finite value; nothing was written then.
    pub applied: bool,
    /// The first layer with a non-finite value, if any.
    pub skipped: Option<SkippedLayer>,
    /// Global L2 norm of the (unscaled) gradients, computed when clipping is on.
    pub grad_norm: Option<f64>,
    /// The factor applied to every gradient element (clipping × inverse loss scale).
    pub grad_scale: f32,
    /// The schedule's learning-rate factor at this step.
    pub lr_factor: f64,
}

/// A layer's parameters as an entry point takes them.
pub(crate) trait ParamSlot {
    /// The parameters, reborrowed.
    fn params_in(&mut self) -> ParamsIn<'_>;
    /// Their storage.
    fn storage(&self) -> ParamStorage;
    /// Their element count.
    fn count(&self) -> usize;
}

impl ParamSlot for &mut [f32] {
    fn params_in(&mut self) -> ParamsIn<'_> {
        ParamsIn::F32(self)
    }
    fn storage(&self) -> ParamStorage {
        ParamStorage::F32
    }
    fn count(&self) -> usize {
        self.len()
    }
}

impl ParamSlot for ParamsIn<'_> {
    fn params_in(&mut self) -> ParamsIn<'_> {
        match self {
            ParamsIn::F32(x) => ParamsIn::F32(x),
            ParamsIn::Bf16(x) => ParamsIn::Bf16(x),
            ParamsIn::F16(x) => ParamsIn::F16(x),
        }
    }
    fn storage(&self) -> ParamStorage {
        ParamsIn::storage(self)
    }
    fn count(&self) -> usize {
        self.len()
    }
}

/// A layer's gradient as an entry point takes it; `None`: the layer is not stepped.
pub(crate) trait GradSlot {
    /// The gradient, if the layer is stepped.
    fn grads(&self) -> Option<Grads<'_>>;
}

impl GradSlot for &[f32] {
    fn grads(&self) -> Option<Grads<'_>> {
        Some(Grads::F32(self))
    }
}

impl GradSlot for Grads<'_> {
    fn grads(&self) -> Option<Grads<'_>> {
        Some(*self)
    }
}

impl GradSlot for Option<Grads<'_>> {
    fn grads(&self) -> Option<Grads<'_>> {
        *self
    }
}

impl Lamb {
    /// One step over every layer: `params[i]` and `grads[i]` belong to layer `i`.
    pub fn step(
        &mut self,
        params: &mut [&mut [f32]],
        grads: &[&[f32]],
    ) -> Result<StepReport, Error> {
        self.step_slots(params, grads, 1.0)
    }

    /// One step with gradients multiplied by `inv_loss_scale` (mixed-precision loss
    /// scaling; folded into phase 1 with clipping, never a separate pass). With loss
    /// scaling, a non-finite gradient (overflow) skips the step: check
    /// [`StepReport::applied`] to lower the scale.
    pub fn step_scaled(
        &mut self,
        params: &mut [&mut [f32]],
        grads: &[&[f32]],
        inv_loss_scale: f32,
    ) -> Result<StepReport, Error> {
        self.step_slots(params, grads, inv_loss_scale)
    }

    /// One step with parameters and gradients in any storage (f32, bf16, f16); the state
    /// is stored as each group's [`Precision`](crate::Precision) says.
    pub fn step_mixed(
        &mut self,
        params: &mut [ParamsIn<'_>],
        grads: &[Grads<'_>],
    ) -> Result<StepReport, Error> {
        self.step_slots(params, grads, 1.0)
    }

    /// [`Lamb::step_mixed`] with loss scaling; see [`Lamb::step_scaled`].
    pub fn step_mixed_scaled(
        &mut self,
        params: &mut [ParamsIn<'_>],
        grads: &[Grads<'_>],
        inv_loss_scale: f32,
    ) -> Result<StepReport, Error> {
        self.step_slots(params, grads, inv_loss_scale)
    }

    /// [`Lamb::step_mixed_scaled`] over the layers whose gradient is `Some` (a frozen
    /// layer, or one unused this step). A layer with `None` is not stepped: its parameters
    /// are not read (any length, even empty, is accepted), and its moments, master copy and
    /// [`LayerView::last`](crate::LayerView::last) stay as they were; it adds nothing to the
    /// global gradient norm. The step counter is the optimizer's, so it advances for every
    /// layer, and a layer's next applied step uses the new count in its bias correction
    /// (like candle's AdamW, which keeps one counter too).
    ///
    /// ```
    /// use lamb_std::{Lamb, ParamsIn, lamb_core::{LambConfig, layer::Grads}};
    /// let mut opt = Lamb::new(LambConfig::paper());
    /// opt.add_layer("trained", 4)?;
    /// opt.add_layer("frozen", 2)?;
    /// let (mut w, mut f) = (vec![0.5f32; 4], vec![0.5f32; 2]);
    /// let g = [0.1f32; 4];
    /// let report = opt.step_mixed_scaled_some(
    ///     &mut [ParamsIn::F32(&mut w), ParamsIn::F32(&mut f)],
    ///     &[Some(Grads::F32(&g)), None],
    ///     1.0,
    /// )?;
    /// assert!(report.applied && w[0] < 0.5 && f == [0.5; 2]);
    /// # Ok::<(), lamb_std::Error>(())
    /// ```
    pub fn step_mixed_scaled_some(
        &mut self,
        params: &mut [ParamsIn<'_>],
        grads: &[Option<Grads<'_>>],
        inv_loss_scale: f32,
    ) -> Result<StepReport, Error> {
        self.step_slots(params, grads, inv_loss_scale)
    }

    /// Makes the partition for the current layers and thread count, if it is stale. Runs
    /// before a step writes anything, and replaces the plan whole: a step that is refused
    /// later leaves a valid, current plan behind.
    pub(super) fn ensure_plan(&mut self) {
        let s = &mut self.scratch;
        if s.plan_stale {
            s.plan = partition(self.layers.iter().map(|l| l.len), self.threads);
            s.plan_stale = false;
        }
    }

    /// A step of the layers whose gradient is present.
    fn step_slots<P: ParamSlot, G: GradSlot>(
        &mut self,
        params: &mut [P],
        grads: &[G],
        inv_loss_scale: f32,
    ) -> Result<StepReport, Error> {
        // The whole step in the default floating-point mode, whatever the caller's thread
        // is in (the kernels set it in the workers too): see `lamb_core::fpenv`.
        let _mode = lamb_core::fpenv::DefaultFpMode::enter();
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        let backend = self.backend.clone()?;
        self.check_inputs(params, grads)?;
        if !(inv_loss_scale.is_finite() && inv_loss_scale > 0.0) {
            return Err(Error::Config {
                group: None,
                source: LambError::InvalidHyperparameter {
                    field: Field::GradScale,
                    value: inv_loss_scale as f64,
                    expected: "finite and > 0 (inv_loss_scale)",
                },
            });
        }
        let t = crate::domain::next_step(self.step)?;
        let lr_factor = self.schedule.factor(t);
        self.step_configs(lr_factor)?;
        self.ensure_plan();
        let made = self.make_masters(params, grads)?;
        let step = StepArgs {
            backend,
            t,
            lr_factor,
            inv_loss_scale,
        };
        let result = self.step_with_masters(params, grads, step);
        // A master copy made for a step that was not applied is dropped: it holds the
        // model's values of a refused step (maybe a NaN), and the next step must take the
        // model's values then, not these.
        if !matches!(result, Ok(StepReport { applied: true, .. })) {
            for i in made {
                self.states[i].drop_master();
            }
        }
        result
    }

    /// The part of a step after the inputs were checked and the master copies made.
    fn step_with_masters<P: ParamSlot, G: GradSlot>(
        &mut self,
        params: &mut [P],
        grads: &[G],
        step: StepArgs,
    ) -> Result<StepReport, Error> {
        #[cfg(test)]
        let panic_in = self.panic_in;
        #[cfg(not(test))]
        let panic_in = None;
        let Lamb {
            layers,
            states,
            groups,
            scratch,
            pool,
            max_grad_norm,
            threads,
            poisoned,
            ..
        } = self;
        let Scratch {
            plan,
            block_norms,
            block_grad_sq,
            configs,
            scalars,
            norms,
            reports,
            grad_sq,
            work: work_alloc,
            lists: lists_alloc,
            ..
        } = scratch;
        let mut work: Vec<Work<'_>> = recycle(std::mem::take(work_alloc));
        let cut = Cut {
            plan,
            step: step.t,
            params,
            grads,
            layers,
            groups,
            states,
            block_norms,
            block_grad_sq,
        };
        let result = cut.split_into(&mut work).and_then(|()| {
            let mut lists: Lists<'_, '_> = recycle(std::mem::take(lists_alloc));
            split_lists(&mut work, (*threads).max(1), &mut lists);
            let phases = Phases {
                step,
                layers,
                groups,
                grads,
                pool: pool.as_ref(),
                max_grad_norm: *max_grad_norm,
                configs,
                panic_in,
            };
            let r = phases.run(&lists, scalars, norms, reports, grad_sq, poisoned);
            *lists_alloc = recycle(lists);
            r
        });
        *work_alloc = recycle(work);
        let report = result?;
        if report.applied {
            for (i, ((l, s), g)) in self
                .layers
                .iter_mut()
                .zip(&mut self.states)
                .zip(grads)
                .enumerate()
            {
                if g.grads().is_some() {
                    l.last = Some(self.scratch.reports[i]);
                    s.fix_storage(params[i].storage());
                }
            }
            self.step = step.t;
        }
        Ok(report)
    }

    /// Makes the f32 master copy of every half-precision layer whose group keeps one and
    /// that has none yet and is stepped, from the model's current values (exact: bf16/f16
    /// → f32), and returns the layers it made one for. The master then equals the model, so
    /// making it changes nothing even if the step is later refused. If the allocator has
    /// no memory for one, the copies made so far are dropped and the step fails with
    /// nothing changed.
    fn make_masters<P: ParamSlot, G: GradSlot>(
        &mut self,
        params: &mut [P],
        grads: &[G],
    ) -> Result<Vec<usize>, Error> {
        let mut made: Vec<usize> = Vec::new();
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let keeps = self.groups[self.layers[i].group].precision.master;
            let state = &mut self.states[i];
            if !keeps
                || state.master().is_some()
                || p.storage() == ParamStorage::F32
                || g.grads().is_none()
            {
                continue;
            }
            #[cfg(test)]
            if self.fail_master_of == Some(i) {
                for &j in &made {
                    self.states[j].drop_master();
                }
                // The size of a buffer no machine can allocate.
                let bytes = usize::MAX / 8 * 4;
                return Err(out_of_memory(
                    self.layers[i].name.clone(),
                    "master copy",
                    Some(bytes),
                ));
            }
            if let Err(e) = state.make_master(&p.params_in()) {
                for &j in &made {
                    self.states[j].drop_master();
                }
                let name = self.layers[i].name.clone();
                return Err(out_of_memory(name, "master copy", e.bytes()));
            }
            made.push(i);
        }
        Ok(made)
    }

    /// Every check that needs no kernel: counts, lengths, formats, aliasing, empty groups.
    fn check_inputs<P: ParamSlot, G: GradSlot>(
        &mut self,
        params: &[P],
        grads: &[G],
    ) -> Result<(), Error> {
        if params.len() != self.layers.len() || grads.len() != self.layers.len() {
            return Err(Error::LayerCount {
                layers: self.layers.len(),
                params: params.len(),
                grads: grads.len(),
            });
        }
        for (i, (l, state)) in self.layers.iter().zip(&self.states).enumerate() {
            // A layer that is not stepped is not read: any placeholder will do.
            let Some(g) = grads[i].grads() else {
                continue;
            };
            let (p, precision) = (&params[i], &self.groups[l.group].precision);
            check_layer(i, l, state, precision, p, &g)?;
        }
        check_aliasing(&self.layers, grads, &mut self.scratch.ranges)?;
        for (group, &count) in self.groups.iter().zip(&self.group_layers) {
            if count == 0 {
                return Err(Error::EmptyGroup(group.name.clone()));
            }
        }
        Ok(())
    }

    /// Each group's configuration for this step (scheduled, scaled and validated), into
    /// `scratch.configs`.
    fn step_configs(&mut self, lr_factor: f64) -> Result<(), Error> {
        let configs = &mut self.scratch.configs;
        configs.clear();
        for g in &self.groups {
            validate_group(g)?;
            let c = LambConfig {
                lr: g.config.lr * g.lr_scale * lr_factor,
                ..g.config
            };
            c.validate().map_err(|source| Error::Config {
                group: Some(g.name.clone()),
                source,
            })?;
            configs.push(c);
        }
        Ok(())
    }
}

/// Checks one stepped layer's inputs against its registration and state.
fn check_layer<P: ParamSlot>(
    i: usize,
    l: &Layer,
    state: &LayerState,
    precision: &crate::Precision,
    p: &P,
    g: &Grads<'_>,
) -> Result<(), Error> {
    for (buffer, len) in [
        (lamb_core::Buffer::Param, p.count()),
        (lamb_core::Buffer::Grad, g.len()),
    ] {
        if len != l.len {
            return Err(layer_error(
                i,
                l,
                LambError::LengthMismatch {
                    layer: i,
                    buffer,
                    expected: l.len,
                    found: len,
                },
            ));
        }
    }
    let found = p.storage();
    if found == ParamStorage::F16 && !precision.master {
        return Err(Error::NeedsMaster(l.name.clone()));
    }
    match state.storage() {
        Some(fixed) if fixed != found => Err(Error::StorageChanged {
            index: i,
            name: l.name.clone(),
            fixed,
            found,
        }),
        // Only a checkpoint load leaves a master copy with the storage free: the copy is of
        // bf16 or f16 parameters, and f32 ones would leave it stale.
        None if found == ParamStorage::F32 && state.master().is_some() => {
            Err(Error::MasterNeedsHalf {
                index: i,
                name: l.name.clone(),
            })
        }
        _ => Ok(()),
    }
}

/// Two gradients sharing memory is almost certainly a bug in the caller's bookkeeping.
/// `ranges` is reused from step to step.
fn check_aliasing<G: GradSlot>(
    layers: &[Layer],
    grads: &[G],
    ranges: &mut Vec<(usize, usize, usize)>,
) -> Result<(), Error> {
    ranges.clear();
    for (i, g) in grads.iter().enumerate() {
        let (start, bytes) = match g.grads() {
            None => continue,
            Some(Grads::F32(x)) => (x.as_ptr() as usize, x.len() * 4),
            Some(Grads::Bf16(x)) => (x.as_ptr() as usize, x.len() * 2),
            Some(Grads::F16(x)) => (x.as_ptr() as usize, x.len() * 2),
        };
        if bytes > 0 {
            ranges.push((start, start + bytes, i));
        }
    }
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(Error::AliasedBuffers {
                first: layers[w[0].2].name.clone(),
                second: layers[w[1].2].name.clone(),
            });
        }
    }
    Ok(())
}

/// A kernel's refusal of layer `i`, with the layer's index and name.
fn layer_error(i: usize, l: &Layer, source: LambError) -> Error {
    Error::Layer {
        index: i,
        name: l.name.clone(),
        source,
    }
}

/// The scalars of one step.
#[derive(Clone, Copy)]
struct StepArgs {
    backend: Backend,
    /// The step number.
    t: u64,
    lr_factor: f64,
    inv_loss_scale: f32,
}

/// What [`Cut::split_into`] cuts into pieces: the step's inputs and the optimizer's
/// buffers, borrowed apart.
struct Cut<'a, P, G> {
    plan: &'a [Piece],
    step: u64,
    params: &'a mut [P],
    grads: &'a [G],
    layers: &'a [Layer],
    groups: &'a [Group],
    states: &'a mut [LayerState],
    block_norms: &'a mut [LayerNorms],
    block_grad_sq: &'a mut [f64],
}

impl<'a, P: ParamSlot, G: GradSlot> Cut<'a, P, G> {
    /// Cuts the step's buffers into pieces, in plan order (so each thread's pieces are
    /// consecutive), appended to `out`.
    fn split_into(self, out: &mut Vec<Work<'a>>) -> Result<(), Error> {
        let Cut {
            plan,
            step,
            params,
            grads,
            layers,
            groups,
            states,
            block_norms: mut norms_rest,
            block_grad_sq: mut gsq_rest,
        } = self;
        let mut cursor = 0;
        let all = params.iter_mut().zip(grads).zip(layers.iter().zip(states));
        for (i, ((p, g), (layer, state))) in all.enumerate() {
            let blocks = layer.len.div_ceil(BLOCK);
            let (norms, nr) = std::mem::take(&mut norms_rest).split_at_mut(blocks);
            let (gsq, gr) = std::mem::take(&mut gsq_rest).split_at_mut(blocks);
            (norms_rest, gsq_rest) = (nr, gr);
            let Some(grads) = g.grads() else {
                // Not stepped: no pieces, so its state and block sums are left alone.
                while plan.get(cursor).is_some_and(|piece| piece.layer == i) {
                    cursor += 1;
                }
                continue;
            };
            let rounding = groups[layer.group].precision.rounding;
            // The same seeds for every piece of the layer: the hash also takes the element's
            // index, so the bits do not depend on how the layer was cut.
            let (moments, master) = state.lend(Rounding::Stochastic {
                seed: mix(MOMENTS_SALT ^ mix(step) ^ mix(!(i as u64))),
            });
            let Some(params) = params_of(p.params_in(), master, seeded(rounding, step, i)) else {
                // `check_inputs` refused f16 without a master, and `make_masters` made one.
                return Err(Error::NeedsMaster(layer.name.clone()));
            };
            let whole = CompactLayer {
                params,
                grads,
                moments,
            };
            let pieces = Pieces {
                layer: i,
                len: layer.len,
                group: layer.group,
                norms,
                gsq,
            };
            cursor = pieces
                .cut(whole, plan, cursor, out)
                .map_err(|e| layer_error(i, layer, e))?;
        }
        Ok(())
    }
}

/// One layer's buffers on their way into pieces.
struct Pieces<'a> {
    layer: usize,
    len: usize,
    group: usize,
    norms: &'a mut [LayerNorms],
    gsq: &'a mut [f64],
}

impl<'a> Pieces<'a> {
    /// Cuts `rest` into the plan's pieces of this layer from `cursor` on; returns the
    /// cursor after them.
    fn cut(
        self,
        mut rest: CompactLayer<'a>,
        plan: &[Piece],
        mut cursor: usize,
        out: &mut Vec<Work<'a>>,
    ) -> Result<usize, LambError> {
        let Pieces {
            layer,
            len,
            group,
            mut norms,
            mut gsq,
        } = self;
        let mut done = 0;
        while let Some(piece) = plan.get(cursor).filter(|piece| piece.layer == layer) {
            cursor += 1;
            let n = piece.end - piece.start;
            let nb = n.div_ceil(BLOCK);
            let (head, tail) = rest.split_at(n).map_err(|e| e.in_layer(layer))?;
            rest = tail;
            let (nh, nt) = std::mem::take(&mut norms).split_at_mut(nb);
            let (qh, qt) = std::mem::take(&mut gsq).split_at_mut(nb);
            (norms, gsq) = (nt, qt);
            out.push(Work {
                layer,
                group,
                thread: piece.thread,
                data: head,
                index0: done,
                norms: nh,
                grad_sq: qh,
            });
            done += n;
        }
        // The plan is made from the layers it is used with (`Lamb::ensure_plan`).
        debug_assert_eq!(done, len, "the plan does not cover layer {layer}");
        Ok(cursor)
    }
}

/// The core's parameter view of a layer's parameters and master copy.
fn params_of<'a>(
    p: ParamsIn<'a>,
    master: Option<&'a mut [f32]>,
    rounding: Rounding,
) -> Option<Params<'a>> {
    Some(match (p, master) {
        (ParamsIn::F32(x), _) => Params::F32(x),
        (ParamsIn::Bf16(x), Some(master)) => Params::Master {
            master,
            model: HalfMut::Bf16(x),
        },
        (ParamsIn::F16(x), Some(master)) => Params::Master {
            master,
            model: HalfMut::F16(x),
        },
        (ParamsIn::Bf16(x), None) => Params::Bf16 { data: x, rounding },
        (ParamsIn::F16(_), None) => return None,
    })
}

/// A group's rounding of in-place bf16 parameters for layer `i` at `step`: a stochastic
/// seed is mixed with the step and the layer index.
fn seeded(rounding: Rounding, step: u64, i: usize) -> Rounding {
    match rounding {
        Rounding::Nearest => Rounding::Nearest,
        Rounding::Stochastic { seed } => Rounding::Stochastic {
            seed: mix(seed ^ mix(step) ^ mix(!(i as u64))),
        },
    }
}

/// Mixed into the seeds of bf16 moments' stochastic rounding.
const MOMENTS_SALT: u64 = 0x6d6f_6d65_6e74_7321; // "moments!"

/// SplitMix64's finaliser: spreads a seed's bits.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One list per thread of the plan (`threads`, or more if the plan has more), each the
/// consecutive pieces of `work` of that thread.
fn split_lists<'w, 'a>(work: &'w mut [Work<'a>], threads: usize, lists: &mut Lists<'w, 'a>) {
    let count = work.last().map_or(0, |w| w.thread + 1).max(threads);
    let mut rest = work;
    for t in 0..count {
        let n = rest.iter().take_while(|w| w.thread == t).count();
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
        rest = tail;
        lists.push(Mutex::new(head));
    }
}

/// The phases of one step over its piece lists, with what they read.
struct Phases<'s, G> {
    step: StepArgs,
    layers: &'s [Layer],
    groups: &'s [Group],
    grads: &'s [G],
    pool: Option<&'s rayon::ThreadPool>,
    max_grad_norm: Option<f64>,
    configs: &'s [LambConfig],
    /// Test builds: panic in this phase of this layer.
    panic_in: Option<(&'static str, usize)>,
}

impl<G: GradSlot> Phases<'_, G> {
    /// Clipping, phase 1, the plan per layer and phase 2. On a panic in phase 2 the
    /// optimizer is marked `poisoned`.
    fn run(
        &self,
        lists: &Lists<'_, '_>,
        scalars: &mut Vec<StepScalars>,
        norms: &mut Vec<LayerNorms>,
        reports: &mut Vec<LayerReport>,
        grad_sq: &mut Vec<f64>,
        poisoned: &mut bool,
    ) -> Result<StepReport, Error> {
        let s = self.step;
        let (grad_norm, grad_scale) = match self.clip(lists, grad_sq)? {
            Clip::Scale(norm, scale) => (norm, scale),
            Clip::Skipped(report) => return report,
        };
        scalars.clear();
        for (c, g) in self.configs.iter().zip(self.groups) {
            let sc = StepScalars::new(c, s.t, grad_scale).map_err(|source| Error::Config {
                group: Some(g.name.clone()),
                source,
            })?;
            scalars.push(sc);
        }
        // Phase 1: norms, nothing written.
        self.phase(lists, "norms", "norms", false, |w| {
            w.norms(s.backend, &scalars[w.group])
        })?;
        // Per layer in block order (the lists are in plan order, which is block order).
        norms.clear();
        norms.resize(self.layers.len(), LayerNorms::default());
        for_each_piece(lists, |w| {
            norms[w.layer] = w.norms.iter().fold(norms[w.layer], |a, &b| a + b);
        });
        reports.clear();
        for (i, (l, &n)) in self.layers.iter().zip(norms.iter()).enumerate() {
            let report = LayerReport::plan(&self.configs[l.group], n);
            if report.skipped && self.grads[i].grads().is_some() {
                return self.skip(i, grad_norm, grad_scale);
            }
            reports.push(report);
        }
        // Phase 2: apply, each thread walking its pieces backwards (see the module docs).
        let applied = self.phase(lists, "apply", "apply", true, |w| {
            w.apply(s.backend, &scalars[w.group], reports[w.layer].step_size)
        });
        if applied.is_err() {
            *poisoned = true;
        }
        applied?;
        Ok(StepReport {
            step: s.t,
            applied: true,
            skipped: None,
            grad_norm,
            grad_scale,
            lr_factor: s.lr_factor,
        })
    }

    /// Global gradient-norm clipping: one read of g, only when clipping is on. The norm
    /// and the gradient scale, or the report of a step skipped for a non-finite norm.
    fn clip(&self, lists: &Lists<'_, '_>, grad_sq: &mut Vec<f64>) -> Result<Clip, Error> {
        let s = self.step;
        let Some(max_norm) = self.max_grad_norm else {
            return Ok(Clip::Scale(None, s.inv_loss_scale));
        };
        self.phase(lists, "grad_norm", "norms", false, |w| w.grad_sq(s.backend))?;
        // Per layer in block order, then layers in order: independent of the thread count.
        grad_sq.clear();
        grad_sq.resize(self.layers.len(), 0.0);
        for_each_piece(lists, |w| {
            grad_sq[w.layer] = w.grad_sq.iter().fold(grad_sq[w.layer], |a, b| a + b);
        });
        if let Some(i) = grad_sq.iter().position(|s| !s.is_finite()) {
            return Ok(Clip::Skipped(self.skip(i, None, s.inv_loss_scale)));
        }
        let norm = grad_sq.iter().fold(0.0f64, |a, b| a + b).sqrt() * s.inv_loss_scale as f64;
        let clip = 1.0 / (norm / max_norm).max(1.0);
        let grad_scale = (s.inv_loss_scale as f64 * clip) as f32;
        if grad_scale <= 0.0 {
            // The norm is so large that the scale underflows f32: as good as non-finite.
            return Ok(Clip::Skipped(self.skip(0, Some(norm), 0.0)));
        }
        Ok(Clip::Scale(Some(norm), grad_scale))
    }

    /// Runs `f` over every piece (see [`run`]); `fault` names the phase for fault
    /// injection in tests, `phase` the phase an error reports.
    fn phase<F>(
        &self,
        lists: &Lists<'_, '_>,
        fault: &str,
        phase: &'static str,
        reverse: bool,
        f: F,
    ) -> Result<(), Error>
    where
        F: Fn(&mut Work<'_>) -> Result<(), LambError> + Sync,
    {
        let panic_in = self.panic_in;
        run(self.pool, lists, reverse, |w| {
            if panic_in == Some((fault, w.layer)) {
                panic!("injected fault in layer {}", w.layer);
            }
            f(w)
        })
        .map_err(|e| match e {
            RunError::Kernel(source, i) => layer_error(i, &self.layers[i], source),
            RunError::Panic(message) => Error::WorkerPanicked { phase, message },
        })
    }

    /// The report (or error, per the layer's group policy) of a step skipped at layer
    /// `index`.
    fn skip(
        &self,
        index: usize,
        grad_norm: Option<f64>,
        grad_scale: f32,
    ) -> Result<StepReport, Error> {
        let layers = self.layers;
        let layer = &layers[index.min(layers.len().saturating_sub(1))];
        match self.configs[layer.group].non_finite {
            NonFinite::Error => Err(Error::Layer {
                index,
                name: layer.name.clone(),
                source: LambError::NonFinite { layer: index },
            }),
            NonFinite::Skip => Ok(StepReport {
                step: self.step.t,
                applied: false,
                skipped: Some(SkippedLayer {
                    index,
                    name: layer.name.clone(),
                }),
                grad_norm,
                grad_scale,
                lr_factor: self.step.lr_factor,
            }),
        }
    }
}

/// What clipping decided.
enum Clip {
    /// The global gradient norm (when clipping is on) and the gradient scale.
    Scale(Option<f64>, f32),
    /// The step is skipped: its report or error.
    Skipped(Result<StepReport, Error>),
}

/// Calls `f` on every piece, in plan order.
fn for_each_piece(lists: &Lists<'_, '_>, mut f: impl FnMut(&Work<'_>)) {
    for list in lists {
        // Poisoned only by a panic in a phase, which returned before this is called.
        if let Ok(list) = list.lock() {
            list.iter().for_each(&mut f);
        }
    }
}
