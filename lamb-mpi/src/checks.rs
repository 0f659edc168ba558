//! A step's local checks, before anything is sent or written (the crate docs, "One step",
//! 1): the checks of lamb-std's step (counts, lengths, storage, empty groups, the step
//! domain, the scheduled configurations), the reduce-scatter's buffers, and the master
//! copies of this rank's shard. Each returns its refusal as text, for `agreed`.

use lamb_std::domain::{check_storage, group_config, next_step};
use lamb_std::lamb_core::{Buffer, LambConfig, LambError};
use lamb_std::{GroupId, ParamStorage, ParamsIn};

use crate::dist::DistLamb;
use crate::state::{oom, zeros};
use crate::wire::params_len;

/// What the checks of a step found.
pub(crate) struct Prepared {
    pub(crate) t: u64,
    pub(crate) lr_factor: f64,
    pub(crate) configs: Vec<LambConfig>,
}

impl DistLamb {
    /// This rank's checks (those of lamb-std's step) and the step's configurations; with
    /// `reduced` (the gradients will be reduce-scattered), the reduce-scatter's buffers.
    pub(crate) fn prepare(
        &mut self,
        params: &[ParamsIn<'_>],
        grads: &[&[f32]],
        reduced: bool,
        same_storage: bool,
    ) -> Result<Prepared, String> {
        self.check_layers(params, grads)?;
        if !same_storage {
            return Err(
                "the parameters' storage (f32, bf16, f16 per layer) differs from rank 0's".into(),
            );
        }
        self.check_groups_used()?;
        let t = next_step(self.step).map_err(|e| e.to_string())?;
        let lr_factor = self.settings.schedule().factor(t);
        let configs = self.step_configs(lr_factor)?;
        if reduced {
            self.reduce_buffers()?;
        }
        Ok(Prepared {
            t,
            lr_factor,
            configs,
        })
    }

    /// The layer count, and every layer's lengths and storage.
    fn check_layers(&self, params: &[ParamsIn<'_>], grads: &[&[f32]]) -> Result<(), String> {
        let layers = self.model.layers();
        if params.len() != layers.len() || grads.len() != layers.len() {
            return Err(lamb_std::Error::LayerCount {
                layers: layers.len(),
                params: params.len(),
                grads: grads.len(),
            }
            .to_string());
        }
        for i in 0..layers.len() {
            self.check_layer(i, &params[i], grads[i])?;
        }
        Ok(())
    }

    /// Layer `i`'s lengths; its storage against its group's precision and the storage
    /// fixed by earlier steps.
    fn check_layer(&self, i: usize, params: &ParamsIn<'_>, grads: &[f32]) -> Result<(), String> {
        let (name, len, group) = &self.model.layers()[i];
        let layer_error = |source| {
            lamb_std::Error::Layer {
                index: i,
                name: name.clone(),
                source,
            }
            .to_string()
        };
        for (buffer, found) in [
            (Buffer::Param, params_len(params)),
            (Buffer::Grad, grads.len()),
        ] {
            if found != *len {
                return Err(layer_error(LambError::LengthMismatch {
                    buffer,
                    expected: *len,
                    found,
                }));
            }
        }
        let keeps_master = (self.settings.group(GroupId(*group)))
            .map_err(|e| e.to_string())?
            .precision
            .master;
        let (fixed, has_master) = (self.storage[i], self.masters[i]);
        check_storage(params.storage(), i, name, fixed, keeps_master, has_master)
            .map_err(|e| e.to_string())
    }

    /// Every group has a layer (lamb-std refuses a step with an empty group).
    fn check_groups_used(&self) -> Result<(), String> {
        let layers = self.model.layers();
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
        Ok(())
    }

    /// Every group's configuration at this step (its learning rate scaled by the group's
    /// scale and the schedule's `lr_factor`), validated.
    fn step_configs(&self, lr_factor: f64) -> Result<Vec<LambConfig>, String> {
        (0..self.settings.group_count())
            .map(|g| {
                let group = self.settings.group(GroupId(g))?;
                group_config(group, lr_factor)
            })
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())
    }

    /// The reduce-scatter's buffers, sized for the largest shard (allocated once, here,
    /// so that a failed allocation is a refusal agreed before any collective).
    fn reduce_buffers(&mut self) -> Result<(), String> {
        let largest = self.shards.elems.iter().map(|e| e.1).max().unwrap_or(0);
        let s = &mut self.scratch;
        if s.recv.len() != largest {
            let oom = |b| oom("(reduce-scatter buffers)", b).to_string();
            s.send = zeros(largest * self.world).map_err(oom)?;
            s.recv = zeros(largest).map_err(oom)?;
        }
        Ok(())
    }

    /// Makes the master copies of this rank's pieces of half-precision layers that keep
    /// one and have none yet; returns the pieces it made them for. On a failed
    /// allocation the copies made are dropped again.
    pub(crate) fn make_masters(&mut self, params: &[ParamsIn<'_>]) -> Result<Vec<usize>, String> {
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
                return Err(oom(name, 4 * p.len).to_string());
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
}
