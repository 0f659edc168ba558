//! [`Lamb`]: construction from Vars or a `VarMap`, the step, learning rate, checkpoints.

use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Layout, Storage, Tensor, Var};
use candle_nn::{Optimizer, VarMap};
use lamb_std::lamb_core::LambConfig;
use lamb_std::lamb_core::layer::Grads;
use lamb_std::{GroupId, ParamsIn, StepReport};

use crate::slot::{Slot, storage_key};
use crate::{Config, Error, nest};

/// The LAMB optimizer for candle Vars: a [`candle_nn::Optimizer`] that updates the Vars
/// in place through [`lamb_std::Lamb`]. See the [crate docs](crate) for an example.
///
/// Layer `i` of the inner [`lamb_std::Lamb`] is Var `i`, registered under the Var's name
/// ([`Lamb::from_varmap`], [`Lamb::from_named_vars`]) or `var.{i}` ([`Optimizer::new`]),
/// so checkpoints carry the names and refuse another model.
pub struct Lamb {
    opt: lamb_std::Lamb,
    slots: Vec<Slot>,
    /// `(storage key, slot index)`, sorted: finds the Var whose storage a gradient shares.
    keys: Vec<(usize, usize)>,
    loss_scale: f32,
    /// Threads that carry the in-place nesting past the caller's share of levels.
    helpers: nest::Helpers,
    /// A learning rate `set_learning_rate` could not apply (see [`Error::LearningRate`]).
    bad_lr: Option<f64>,
    last: Option<StepReport>,
}

impl std::fmt::Debug for Lamb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lamb")
            .field(
                "vars",
                &self.slots.iter().map(|s| &s.name).collect::<Vec<_>>(),
            )
            .field("steps", &self.opt.steps())
            .field("learning_rate", &self.learning_rate())
            .field("loss_scale", &self.loss_scale)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl Optimizer for Lamb {
    type Config = Config;

    /// An optimizer over `vars`, named `var.0`, `var.1`, ... in this order. Refuses a Var
    /// that is not f32, bf16 or f16, not on the CPU, or not contiguous, and two Vars
    /// sharing a storage, naming them.
    fn new(vars: Vec<Var>, config: Config) -> candle_core::Result<Lamb> {
        let named = vars
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("var.{i}"), v))
            .collect();
        Ok(Lamb::from_named_vars(named, config)?)
    }

    /// One step over every Var that has a gradient in `grads`; see [`Lamb::step_report`].
    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        // candle's trait has no way to return the report: a skipped step is visible
        // through `step_report`, which callers who scale the loss use instead.
        let _report = self.step_report(grads)?;
        Ok(())
    }

    /// The base learning rate (`Config::lamb.lr`, or the last one set); the schedule's
    /// factor and the groups' multipliers apply on top of it.
    fn learning_rate(&self) -> f64 {
        match (self.bad_lr, self.opt.group(GroupId(0))) {
            (Some(lr), _) => lr,
            (None, Ok(g)) => g.config.lr,
            (None, Err(_)) => f64::NAN,
        }
    }

    /// Sets the base learning rate of every group. A rate lamb refuses (negative, NaN,
    /// infinite) changes nothing and makes the next steps return
    /// [`Error::LearningRate`] until a valid one is set.
    fn set_learning_rate(&mut self, lr: f64) {
        let valid = (0..self.opt.group_count()).all(|g| {
            self.opt
                .group(GroupId(g))
                .is_ok_and(|g| LambConfig { lr, ..g.config }.validate().is_ok())
        });
        if !valid {
            self.bad_lr = Some(lr);
            return;
        }
        self.bad_lr = None;
        for g in 0..self.opt.group_count() {
            if let Ok(group) = self.opt.group(GroupId(g)) {
                let (config, lr_scale) = (LambConfig { lr, ..group.config }, group.lr_scale);
                // Validated above; the other fields were valid when set.
                let _ = self.opt.set_group(GroupId(g), config, lr_scale);
            }
        }
    }
}

impl Lamb {
    /// An optimizer over every Var of `varmap`, registered under its name in name order
    /// (so the order, and with it the checkpoint, does not depend on the map's hashing).
    /// With [`Config::decay_split`] the names pick the group: `*.bias` and 1-D Vars get no
    /// weight decay and no trust ratio. Vars added to the map later are not optimized.
    pub fn from_varmap(varmap: &VarMap, config: Config) -> Result<Lamb, Error> {
        let named: Vec<(String, Var)> = {
            let data = varmap
                .data()
                .lock()
                .map_err(|_| Error::Candle("the VarMap's mutex is poisoned".into()))?;
            data.iter().map(|(n, v)| (n.clone(), v.clone())).collect()
        };
        let mut named = named;
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Lamb::from_named_vars(named, config)
    }

    /// An optimizer over `vars`, layer `i` being `vars[i]` under its name. Refuses a Var
    /// that is not f32, bf16 or f16 (f16 also needs `precision.master`), not on the CPU,
    /// or not contiguous; two Vars sharing a storage; a name given twice; a bad setting.
    pub fn from_named_vars(vars: Vec<(String, Var)>, config: Config) -> Result<Lamb, Error> {
        if !(config.loss_scale.is_finite() && config.loss_scale > 0.0) {
            return Err(Error::LossScale(config.loss_scale));
        }
        let slots = vars
            .into_iter()
            .map(|(name, var)| Slot::new(name, var, &config))
            .collect::<Result<Vec<_>, _>>()?;
        let mut keys: Vec<(usize, usize)> =
            slots.iter().enumerate().map(|(i, s)| (s.key, i)).collect();
        keys.sort_unstable();
        if let Some(w) = keys.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(Error::SharedVars {
                first: slots[w[0].1].name.clone(),
                second: slots[w[1].1].name.clone(),
            });
        }
        Ok(Lamb {
            opt: build(&slots, &config)?,
            helpers: nest::Helpers::for_vars(slots.len())?,
            slots,
            keys,
            loss_scale: config.loss_scale,
            bad_lr: None,
            last: None,
        })
    }

    /// One step over every Var that has a gradient in `grads`, all or nothing, with
    /// lamb-std's whole-model semantics: global clipping and loss scaling over the Vars
    /// stepped, and a non-finite gradient anywhere skipping the step for every Var (`Ok`
    /// with `applied == false` under `NonFinite::Skip`, `Err` under `NonFinite::Error`).
    ///
    /// A Var with no gradient (frozen, or unused by this loss) is not stepped: it is not
    /// even locked, and its moments stay as they are; the step counter, which is the
    /// optimizer's, advances (as candle's AdamW does).
    ///
    /// Refused, naming the Var, with nothing written: a gradient of another dtype or shape
    /// than its Var, not contiguous (call `.contiguous()` on it, a copy), not on the CPU, or
    /// sharing a Var's storage; a Var whose storage changed under it since construction.
    ///
    /// The Vars' storages are write-locked, and the gradients' read-locked, for the
    /// duration of the step: do not run the model on other threads meanwhile.
    pub fn step_report(&mut self, grads: &GradStore) -> Result<StepReport, Error> {
        if let Some(lr) = self.bad_lr {
            return Err(Error::LearningRate(lr));
        }
        if self.slots.is_empty() {
            return Ok(self.nothing_to_step());
        }
        let found: Vec<Option<&Tensor>> = self.slots.iter().map(|s| grads.get(&s.var)).collect();
        for (slot, grad) in self.slots.iter().zip(&found) {
            if let Some(g) = grad {
                check_grad(slot, g)?;
            }
        }
        // Read-lock the gradients before any Var is write-locked. A gradient stored in a
        // Var's own storage is refused here: write-locking that Var while this read lock
        // is held would never return.
        let mut guards = Vec::with_capacity(found.len());
        for (i, g) in found.iter().enumerate() {
            let Some(g) = g else { continue };
            let (storage, layout) = g.storage_and_layout();
            let key = storage_key(&storage);
            if let Ok(k) = self.keys.binary_search_by_key(&key, |&(k, _)| k) {
                let owner = self.keys[k].1;
                let var = &self.slots[owner].name;
                let what = if owner == i {
                    "it is the Var's own storage (a gradient must be a tensor of its own)"
                        .to_string()
                } else {
                    format!("it is the storage of Var '{var}'")
                };
                return Err(Error::grad(&self.slots[i].name, what));
            }
            guards.push((i, storage, layout));
        }
        let mut grad_slices: Vec<Option<Grads<'_>>> = vec![None; self.slots.len()];
        for (i, storage, layout) in &guards {
            grad_slices[*i] = Some(grad_slice(&self.slots[*i], storage, layout)?);
        }
        let present: Vec<bool> = grad_slices.iter().map(Option::is_some).collect();

        let inv_loss_scale = 1.0 / self.loss_scale;
        let opt = &mut self.opt;
        let mut result = None;
        let mut last = |params: &mut [ParamsIn<'_>]| {
            result = Some(opt.step_mixed_scaled_some(params, &grad_slices, inv_loss_scale));
        };
        nest::with_params_mut(&self.slots, &present, &self.helpers, &mut last)?;
        drop(guards);
        let report = result.ok_or_else(|| Error::Candle("the step did not run".into()))??;
        self.last = Some(report.clone());
        Ok(report)
    }

    /// The report of a step with no Vars.
    fn nothing_to_step(&self) -> StepReport {
        StepReport {
            step: self.opt.steps(),
            applied: false,
            skipped: None,
            grad_norm: None,
            grad_scale: 1.0 / self.loss_scale,
            lr_factor: 1.0,
        }
    }

    /// What the last step did: whether it was applied (`false` after an overflow under
    /// loss scaling), the global gradient norm, the learning-rate factor.
    pub fn last_report(&self) -> Option<&StepReport> {
        self.last.as_ref()
    }

    /// The loss scale the gradients are divided by.
    pub fn loss_scale(&self) -> f32 {
        self.loss_scale
    }

    /// Sets the loss scale (finite and > 0), e.g. halved after a skipped step.
    pub fn set_loss_scale(&mut self, loss_scale: f32) -> Result<(), Error> {
        if !(loss_scale.is_finite() && loss_scale > 0.0) {
            return Err(Error::LossScale(loss_scale));
        }
        self.loss_scale = loss_scale;
        Ok(())
    }

    /// The Vars, in layer order, with their names.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.slots.iter().map(|s| (s.name.as_str(), &s.var))
    }

    /// The lamb-std optimizer underneath: steps, groups, per-layer state and reports.
    pub fn inner(&self) -> &lamb_std::Lamb {
        &self.opt
    }

    /// The lamb-std optimizer underneath, to change settings (schedule, clipping, groups,
    /// threads). Adding layers to it makes every later step fail with a count mismatch.
    pub fn inner_mut(&mut self) -> &mut lamb_std::Lamb {
        &mut self.opt
    }

    /// Saves the optimizer state (moments, master copies, step counter, settings, the
    /// Vars' names) atomically as a lamb-std checkpoint. The Vars themselves are the
    /// model's: save them with candle (`VarMap::save`).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        Ok(self.opt.save(path)?)
    }

    /// Loads a checkpoint of [`Lamb::save`] (or of lamb-std, with the same layer names and
    /// sizes). Refused, with this optimizer unchanged, if it is of another model.
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<(), Error> {
        self.opt.load(path)?;
        self.last = None;
        Ok(())
    }

    /// [`Lamb::save`] into bytes.
    pub fn to_checkpoint_bytes(&self) -> Result<Vec<u8>, Error> {
        Ok(self.opt.to_checkpoint_bytes()?)
    }

    /// [`Lamb::load`] from bytes.
    pub fn load_checkpoint_bytes(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.opt.load_checkpoint_bytes(bytes)?;
        self.last = None;
        Ok(())
    }
}

/// The registered lamb-std optimizer for `slots`.
fn build(slots: &[Slot], config: &Config) -> Result<lamb_std::Lamb, lamb_std::Error> {
    let configure = |opt: &mut lamb_std::Lamb| -> Result<(), lamb_std::Error> {
        for g in 0..opt.group_count() {
            opt.set_precision(GroupId(g), config.precision)?;
        }
        opt.set_max_grad_norm(config.max_grad_norm)?;
        opt.set_schedule(config.schedule)?;
        opt.set_threads(config.threads)
    };
    let single = |lamb: LambConfig| -> Result<lamb_std::Lamb, lamb_std::Error> {
        let mut opt = lamb_std::Lamb::new(lamb)?;
        configure(&mut opt)?;
        for s in slots {
            opt.add_layer(s.name.clone(), s.len)?;
        }
        Ok(opt)
    };
    if !config.decay_split {
        return single(config.lamb);
    }
    let mut opt = lamb_std::Lamb::with_decay_split(config.lamb)?;
    configure(&mut opt)?;
    for s in slots {
        opt.add_param(s.name.clone(), &s.shape)?;
    }
    // lamb-std refuses to step with an empty group: where every Var fell on one side,
    // keep that group alone.
    let used: Vec<bool> = (0..opt.group_count())
        .map(|g| {
            (0..slots.len()).any(|i| {
                opt.layer(lamb_std::LayerId(i))
                    .is_ok_and(|l| l.group == GroupId(g))
            })
        })
        .collect();
    match used.iter().position(|&u| u) {
        Some(g) if used.iter().filter(|&&u| u).count() == 1 => {
            single(opt.group(GroupId(g))?.config)
        }
        _ => Ok(opt),
    }
}

/// Checks a gradient against its Var without locking either.
fn check_grad(slot: &Slot, g: &Tensor) -> Result<(), Error> {
    if !g.device().is_cpu() {
        return Err(Error::grad(
            &slot.name,
            format!("it is on {:?}, the Var on the CPU", g.device().location()),
        ));
    }
    if g.dtype() != slot.dtype {
        return Err(Error::grad(
            &slot.name,
            format!(
                "its dtype is {}, the Var's {}",
                g.dtype().as_str(),
                slot.dtype.as_str()
            ),
        ));
    }
    if g.dims() != slot.shape.as_slice() {
        return Err(Error::grad(
            &slot.name,
            format!("its shape is {:?}, the Var's {:?}", g.dims(), slot.shape),
        ));
    }
    if !g.layout().is_contiguous() {
        return Err(Error::grad(
            &slot.name,
            "it is not contiguous; pass grad.contiguous()? (a copy)",
        ));
    }
    Ok(())
}

/// The gradient's elements in its (read-locked) storage.
fn grad_slice<'a>(slot: &Slot, storage: &'a Storage, layout: &Layout) -> Result<Grads<'a>, Error> {
    let bad = || Error::grad(&slot.name, "its storage does not hold its elements");
    let (start, end) = layout.contiguous_offsets().ok_or_else(bad)?;
    let g = match storage {
        Storage::Cpu(CpuStorage::F32(v)) if slot.dtype == DType::F32 => {
            v.get(start..end).map(Grads::F32)
        }
        Storage::Cpu(CpuStorage::BF16(v)) if slot.dtype == DType::BF16 => {
            v.get(start..end).map(Grads::Bf16)
        }
        Storage::Cpu(CpuStorage::F16(v)) if slot.dtype == DType::F16 => {
            v.get(start..end).map(Grads::F16)
        }
        _ => None,
    };
    g.ok_or_else(bad)
}
