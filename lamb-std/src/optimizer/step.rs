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
//! them where they are, so a step allocates nothing to wrap them. The files beside this
//! one: `cut.rs` cuts the buffers into pieces, `phases.rs` runs the phases over them.

use lamb_core::layer::Grads;
use lamb_core::{Field, LambError};

use super::cut::{Cut, split_lists};
use super::phases::{Phases, StepArgs};
use super::scratch::Scratch;
use super::state::LayerState;
use super::views::{GradSlot, ParamSlot, ParamStorage, ParamsIn, StepReport};
use super::{Lamb, Layer, out_of_memory};
use crate::error::Error;
use crate::parallel::partition::partition;
use crate::parallel::run::{Lists, Work, recycle};

impl Lamb {
    /// One step over every layer, bound **by position**: `params[i]` and `grads[i]` belong
    /// to layer `i`, in registration order. A tensor whose length is not its layer's is
    /// refused, but two layers of the same length passed in swapped order cannot be told
    /// apart by position: the step is applied, each with the other's moments. Prefer
    /// [`Lamb::step_bound`], which takes each tensor with its layer's id or name and refuses
    /// such a swap; the positional calls suit adapters that bind tensors to layers
    /// themselves.
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
    /// let mut opt = Lamb::new(LambConfig::paper())?;
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
    pub(super) fn step_slots<P: ParamSlot, G: GradSlot>(
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
        let lr_factor = self.lr_factor(t)?;
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
            self.record_applied(params, grads, step.t);
        }
        Ok(report)
    }

    /// After an applied step: each stepped layer keeps its report and the storage its
    /// parameters now have, and the optimizer counts the step.
    fn record_applied<P: ParamSlot, G: GradSlot>(&mut self, params: &[P], grads: &[G], t: u64) {
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
        self.step = t;
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
            configs.push(crate::domain::group_config(g, lr_factor)?);
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
            return Err(l.error(
                i,
                LambError::LengthMismatch {
                    buffer,
                    expected: l.len,
                    found: len,
                },
            ));
        }
    }
    crate::domain::check_storage(
        p.storage(),
        i,
        &l.name,
        state.storage(),
        precision.master,
        state.master().is_some(),
    )
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
