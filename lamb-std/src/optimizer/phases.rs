//! The phases of one step over its piece lists: clipping (Σg², each thread backwards),
//! phase 1 (norms, nothing written), the plan of each layer, phase 2 (apply, each thread
//! backwards). See the [step's module docs](super::step) for why a step is all or nothing.
//!
//! # Directions
//!
//! Each pass visits a thread's pieces in the direction that starts where the previous pass
//! ended, so that what is still in cache is read first: the clipping pass walks backwards
//! (ending at the thread's first piece), phase 1 forwards (starting there, with that
//! gradient still in cache), phase 2 backwards. Block sums are added in block order
//! afterwards, never in completion order, so the direction changes no bit.
//!
//! # Why phase 1 writes nothing, even when the gradients are known to be finite
//!
//! Phase 1 could write the new m and v when it computes them (phase 2 would then read m, v,
//! p and write p: 40 B per f32 element instead of 44; with clipping 44 instead of 48), and a
//! layer that fits in cache could run its two phases back to back. Both are valid only if
//! nothing after the write can refuse the step, or if the old m and v can be restored. What
//! can refuse a step after phase 1 of a layer has run:
//!
//! 1. a non-finite g in any *later* layer (the clipping pass, or a loss-scale check, rules
//!    this out: after it, Σg² of every layer is finite, so every g is; without clipping
//!    nothing has looked at g yet);
//! 2. a non-finite ‖p‖ or ‖u‖ of any layer, including the ones already written: p may hold
//!    a NaN or an infinity the caller put there, and a finite g does not make u or the
//!    norms finite (m/(√v+ε) + λp overflows f32 for large but finite m, p or λ);
//! 3. the range of a half-precision parameter format (`ParamFormat`): a step that could take
//!    a parameter past bf16/f16 range is refused, which depends on the step size, which
//!    depends on ‖p‖ and ‖u‖ of the layer;
//! 4. for a layer's own back-to-back phases: nothing new, but 2 and 3 of every *later* layer.
//!
//! A finite Σg² settles only 1. Items 2 and 3 are known only once phase 1 has read p, m and
//! v of every layer, which is the pass that would write. And the old moments cannot be
//! restored from the new ones: m' = β1·m + (1−β1)·g is rounded, so two old values of m
//! can give the same m' and g cannot tell them apart; keeping a copy costs more bytes than
//! the write saves. So writing in phase 1 would trade "a refused step changes nothing" for
//! 4 B per element, and is not done: phase 1 writes only its block sums, whatever was
//! checked before it.

use lamb_core::{Backend, LambConfig, LambError, LayerNorms, LayerReport, NonFinite, StepScalars};

use super::Layer;
use super::group::Group;
use super::views::{GradSlot, SkippedLayer, StepReport};
use crate::error::Error;
use crate::parallel::run::{Lists, RunError, Work, run};

/// The scalars of one step.
#[derive(Clone, Copy)]
pub(super) struct StepArgs {
    pub(super) backend: Backend,
    /// The step number.
    pub(super) t: u64,
    pub(super) lr_factor: f64,
    pub(super) inv_loss_scale: f32,
}

/// The phases of one step over its piece lists, with what they read.
pub(super) struct Phases<'s, G> {
    pub(super) step: StepArgs,
    pub(super) layers: &'s [Layer],
    pub(super) groups: &'s [Group],
    pub(super) grads: &'s [G],
    pub(super) pool: Option<&'s rayon::ThreadPool>,
    pub(super) max_grad_norm: Option<f64>,
    pub(super) configs: &'s [LambConfig],
    /// Test builds: panic in this phase of this layer.
    pub(super) panic_in: Option<(&'static str, usize)>,
}

impl<G: GradSlot> Phases<'_, G> {
    /// Clipping, phase 1, the plan per layer and phase 2. On a panic in phase 2 the
    /// optimizer is marked `poisoned`.
    pub(super) fn run(
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
        // Backwards, so that phase 1 (forwards) starts on gradients still in cache.
        self.phase(lists, "grad_norm", "norms", true, |w| w.grad_sq(s.backend))?;
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
            RunError::Kernel(source, i) => self.layers[i].error(i, source),
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
                source: LambError::NonFinite {},
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
