//! This rank's shard as work items for the kernels: what the step knows of every layer
//! ([`StepFacts`]), the pieces cut into block-aligned parts ([`build_works`]), the
//! phases run over them on the pool ([`Works`]), and what a non-finite value makes of the
//! step ([`StepFacts::skipped`]).

use lamb_std::lamb_core::layer::{CompactLayer, Grads, HalfMut, Params};
use lamb_std::lamb_core::{
    BLOCK, Backend, LambConfig, LambError, LayerNorms, LayerReport, NonFinite, StepScalars,
};
use lamb_std::{
    GroupId, ParamStorage, ParamsIn, Precision, SkippedLayer, StepReport, moments_rounding,
    params_rounding,
};
use rayon::prelude::*;

use crate::checks::Prepared;
use crate::dist::DistLamb;
use crate::error::Error;
use crate::shard::Piece;
use crate::state::PieceState;
use crate::wire::encode;

/// What a step knows of every layer and group, the same on every rank, taken before the
/// shard is lent out to the work items.
pub(crate) struct StepFacts {
    pub(crate) t: u64,
    /// Elements per work item: a multiple of [`BLOCK`], or `usize::MAX` (one per piece).
    pub(crate) chunk: usize,
    /// Every layer's length and group.
    pub(crate) layers: Vec<(usize, usize)>,
    pub(crate) names: Vec<String>,
    /// Every layer's parameter storage at this step.
    pub(crate) storages: Vec<ParamStorage>,
    /// Every group's precision and name.
    pub(crate) precisions: Vec<Precision>,
    pub(crate) group_names: Vec<String>,
}

/// A non-finite value found by the step (which then writes nothing): its layer, and the
/// clipping figures known when it was found.
pub(crate) struct Skip {
    pub(crate) layer: usize,
    pub(crate) grad_norm: Option<f64>,
    pub(crate) grad_scale: f32,
}

impl DistLamb {
    /// The facts of step `t` with `params`.
    pub(crate) fn step_facts(&self, params: &[ParamsIn<'_>], t: u64) -> Result<StepFacts, Error> {
        let chunk = match self.threads {
            1 => usize::MAX,
            n => (self.shards.blocks[self.rank].1.div_ceil(2 * n)).max(1) * BLOCK,
        };
        let mut precisions = Vec::new();
        for g in 0..self.settings.group_count() {
            precisions.push(
                self.settings
                    .group(GroupId(g))
                    .map_err(Error::Optimizer)?
                    .precision,
            );
        }
        let group_names = (0..self.settings.group_count())
            .map(|g| {
                self.settings
                    .group(GroupId(g))
                    .map_or_else(|_| format!("{g}"), |x| x.name.clone())
            })
            .collect();
        Ok(StepFacts {
            t,
            chunk,
            layers: self.model.layers().iter().map(|l| (l.1, l.2)).collect(),
            names: self.model.layers().iter().map(|l| l.0.clone()).collect(),
            storages: params.iter().map(ParamsIn::storage).collect(),
            precisions,
            group_names,
        })
    }
}

impl StepFacts {
    /// A kernel's refusal of layer `l`, as text.
    pub(crate) fn layer_error(&self, (l, source): (usize, LambError)) -> String {
        lamb_std::Error::Layer {
            index: l,
            name: self.names.get(l).cloned().unwrap_or_default(),
            source,
        }
        .to_string()
    }

    /// Every group's scalars at this step, with the clipping's `grad_scale`.
    pub(crate) fn scalars(
        &self,
        configs: &[LambConfig],
        grad_scale: f32,
    ) -> Result<Vec<StepScalars>, Error> {
        let mut scalars = Vec::new();
        for (g, c) in configs.iter().enumerate() {
            let s = StepScalars::new(c, self.t, grad_scale).map_err(|source| {
                Error::Optimizer(lamb_std::Error::Config {
                    group: self.group_names.get(g).cloned(),
                    source,
                })
            })?;
            scalars.push(s);
        }
        Ok(scalars)
    }

    /// Every layer's plan from its norms; the first layer whose plan skips the step.
    pub(crate) fn plan(
        &self,
        configs: &[LambConfig],
        norms: &[LayerNorms],
    ) -> Result<Vec<LayerReport>, usize> {
        let mut reports: Vec<LayerReport> = Vec::with_capacity(self.layers.len());
        for (l, &(_, group)) in self.layers.iter().enumerate() {
            let report = LayerReport::plan(&configs[group], norms[l]);
            if report.skipped {
                return Err(l);
            }
            reports.push(report);
        }
        Ok(reports)
    }

    /// The step skipped for a non-finite value, or refused, as the layer's group's
    /// [`NonFinite`] policy says.
    pub(crate) fn skipped(&self, prepared: &Prepared, skip: Skip) -> Result<StepReport, Error> {
        let index = skip.layer;
        let group = self.layers.get(index).map_or(0, |l| l.1);
        let name = self.names.get(index).cloned().unwrap_or_default();
        match prepared.configs[group].non_finite {
            NonFinite::Error => Err(Error::Optimizer(lamb_std::Error::Layer {
                index,
                name,
                source: LambError::NonFinite {},
            })),
            NonFinite::Skip => Ok(StepReport {
                step: prepared.t,
                applied: false,
                skipped: Some(SkippedLayer { index, name }),
                grad_norm: skip.grad_norm,
                grad_scale: skip.grad_scale,
                lr_factor: prepared.lr_factor,
            }),
        }
    }
}

/// One block-aligned part of this rank's shard, stepped by one thread.
pub(crate) struct Work<'a> {
    layer: usize,
    group: usize,
    data: CompactLayer<'a>,
    /// The index in the layer of the part's element 0 (stochastic rounding).
    index0: usize,
    norms: Vec<LayerNorms>,
    gsq: Vec<f64>,
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

/// This rank's pieces (`pieces`, their `states` and gradients `grads`) as work items, cut
/// into parts of at most `facts.chunk` elements.
pub(crate) fn build_works<'a>(
    pieces: &[Piece],
    states: &'a mut [PieceState],
    params: &'a mut [ParamsIn<'_>],
    grads: &[&'a [f32]],
    facts: &StepFacts,
) -> Result<Vec<Work<'a>>, String> {
    let t = facts.t;
    let mut works = Vec::new();
    let mut by_layer = params.iter_mut().enumerate();
    for ((p, state), g) in pieces.iter().zip(states.iter_mut()).zip(grads) {
        let Some((_, pin)) = by_layer.find(|(i, _)| *i == p.layer) else {
            return Err(format!("layer {} has no parameters", p.layer));
        };
        let group = facts.layers[p.layer].1;
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
                rounding: params_rounding(facts.precisions[group].rounding, t, p.layer),
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
            let n = left.min(facts.chunk);
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

/// The work items of a step and where they run: the phases over them, and their
/// per-block results as the words the ranks gather.
pub(crate) struct Works<'a> {
    pub(crate) items: Vec<Work<'a>>,
    pub(crate) pool: Option<&'a rayon::ThreadPool>,
    pub(crate) backend: Backend,
}

impl Works<'_> {
    /// Σg² of every block; the first failure, with its layer.
    pub(crate) fn grad_sq(&mut self) -> Result<(), (usize, LambError)> {
        let b = self.backend;
        run_works(self.pool, &mut self.items, |w| w.grad_sq(b))
    }

    /// Phase 1 of every part with its group's `scalars`.
    pub(crate) fn norms(&mut self, scalars: &[StepScalars]) -> Result<(), (usize, LambError)> {
        let b = self.backend;
        run_works(self.pool, &mut self.items, |w| {
            w.norms(b, &scalars[w.group])
        })
    }

    /// Phase 2 of every part with its group's `scalars` and its layer's step size.
    pub(crate) fn apply(
        &mut self,
        scalars: &[StepScalars],
        reports: &[LayerReport],
    ) -> Result<(), (usize, LambError)> {
        let b = self.backend;
        run_works(self.pool, &mut self.items, |w| {
            w.apply(b, &scalars[w.group], reports[w.layer].step_size)
        })
    }

    /// Every block's Σg², in block order, as the bits of an f64 each.
    pub(crate) fn grad_sq_words(&self) -> Vec<u64> {
        (self.items.iter())
            .flat_map(|w| w.gsq.iter().map(|x| x.to_bits()))
            .collect()
    }

    /// Every block's phase-1 sums, in block order, five words each (`wire::encode`).
    pub(crate) fn norms_words(&self) -> Vec<u64> {
        (self.items.iter())
            .flat_map(|w| w.norms.iter().flat_map(encode))
            .collect()
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
