//! Cutting a step's buffers into pieces: each layer's parameters, gradient, moments and
//! block sums split at the plan's cuts ([`Cut::split_into`]), then one list per thread
//! ([`split_lists`]).

use std::sync::Mutex;

use lamb_core::layer::{CompactLayer, HalfMut, Params, Rounding};
use lamb_core::{BLOCK, LambError, LayerNorms};

use super::Layer;
use super::group::Group;
use super::rounding::{moments_rounding, params_rounding};
use super::state::LayerState;
use super::views::{GradSlot, ParamSlot, ParamsIn};
use crate::error::Error;
use crate::parallel::partition::Piece;
use crate::parallel::run::{Lists, Work};

/// What [`Cut::split_into`] cuts into pieces: the step's inputs and the optimizer's
/// buffers, borrowed apart.
pub(super) struct Cut<'a, P, G> {
    pub(super) plan: &'a [Piece],
    pub(super) step: u64,
    pub(super) params: &'a mut [P],
    pub(super) grads: &'a [G],
    pub(super) layers: &'a [Layer],
    pub(super) groups: &'a [Group],
    pub(super) states: &'a mut [LayerState],
    pub(super) block_norms: &'a mut [LayerNorms],
    pub(super) block_grad_sq: &'a mut [f64],
}

impl<'a, P: ParamSlot, G: GradSlot> Cut<'a, P, G> {
    /// Cuts the step's buffers into pieces, in plan order (so each thread's pieces are
    /// consecutive), appended to `out`.
    pub(super) fn split_into(self, out: &mut Vec<Work<'a>>) -> Result<(), Error> {
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
            let (moments, master) = state.lend(moments_rounding(step, i));
            let Some(params) = params_of(p.params_in(), master, params_rounding(rounding, step, i))
            else {
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
                .map_err(|e| layer.error(i, e))?;
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
            let (head, tail) = rest.split_at(n)?;
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

/// One list per thread of the plan (`threads`, or more if the plan has more), each the
/// consecutive pieces of `work` of that thread.
pub(super) fn split_lists<'w, 'a>(
    work: &'w mut [Work<'a>],
    threads: usize,
    lists: &mut Lists<'w, 'a>,
) {
    let count = work.last().map_or(0, |w| w.thread + 1).max(threads);
    let mut rest = work;
    for t in 0..count {
        let n = rest.iter().take_while(|w| w.thread == t).count();
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
        rest = tail;
        lists.push(Mutex::new(head));
    }
}
