//! Bound steps: every tensor a step takes names its layer, by [`LayerId`] or by registered
//! name, and a tensor passed for another layer is refused ([`Error::WrongLayer`]).
//!
//! The positional entry points ([`Lamb::step`] and the others) bind by position only:
//! `params[i]` is layer `i`'s. They refuse a tensor whose length is not its layer's, but two
//! layers of the same length passed in swapped order cannot be told apart by position, and
//! each would be stepped with the other's moments. [`Lamb::step_bound`] and
//! [`Lamb::step_bound_mixed`] take each tensor with its layer's key, so that the mistake
//! is an error naming both layers. The keys are checked, not used to reorder: the tensors
//! come in registration order, as in the positional calls, and the check costs a
//! comparison per tensor (no allocation, no hashing). Framework adapters that bind tensors
//! to layers themselves (lamb-candle binds by `Var`) can use the positional calls.

use lamb_core::layer::Grads;

use super::Lamb;
use super::group::LayerId;
use super::views::{GradSlot, ParamSlot, ParamStorage, ParamsIn, StepReport};
use crate::error::Error;

mod sealed {
    /// A key, seen from inside the crate.
    pub enum Key<'a> {
        Id(usize),
        Name(&'a str),
    }

    pub trait Sealed {
        fn key(&self) -> Key<'_>;
    }

    impl Sealed for super::LayerId {
        fn key(&self) -> Key<'_> {
            Key::Id(self.0)
        }
    }

    impl Sealed for &str {
        fn key(&self) -> Key<'_> {
            Key::Name(self)
        }
    }
}

use sealed::Key;

/// What the tensors of a bound step are tagged with: the [`LayerId`] that
/// [`Lamb::add_layer`] / [`Lamb::add_param`] returned, or the layer's registered name
/// (`&str`). Sealed: implemented for these two only.
pub trait LayerKey: sealed::Sealed {}

impl LayerKey for LayerId {}

impl LayerKey for &str {}

impl<K: LayerKey> ParamSlot for (K, &mut [f32]) {
    fn params_in(&mut self) -> ParamsIn<'_> {
        ParamsIn::F32(self.1)
    }
    fn storage(&self) -> ParamStorage {
        ParamStorage::F32
    }
    fn count(&self) -> usize {
        self.1.len()
    }
}

impl<K: LayerKey> ParamSlot for (K, ParamsIn<'_>) {
    fn params_in(&mut self) -> ParamsIn<'_> {
        self.1.params_in()
    }
    fn storage(&self) -> ParamStorage {
        self.1.storage()
    }
    fn count(&self) -> usize {
        ParamSlot::count(&self.1)
    }
}

impl<K: LayerKey> GradSlot for (K, &[f32]) {
    fn grads(&self) -> Option<Grads<'_>> {
        Some(Grads::F32(self.1))
    }
}

impl<K: LayerKey> GradSlot for (K, Grads<'_>) {
    fn grads(&self) -> Option<Grads<'_>> {
        Some(self.1)
    }
}

impl Lamb {
    /// One step over every layer, each tensor with its layer's key ([`LayerKey`]: the
    /// [`LayerId`] from registration, or the registered name), in registration order. A
    /// tensor keyed for another layer than the one registered at its position is refused
    /// with [`Error::WrongLayer`], naming both, and nothing is written; otherwise this is
    /// [`Lamb::step`].
    ///
    /// ```
    /// use lamb_std::{Error, Lamb, lamb_core::LambConfig};
    /// let mut opt = Lamb::new(LambConfig::paper())?;
    /// let q = opt.add_layer("attn.q", 4)?;
    /// let k = opt.add_layer("attn.k", 4)?;
    /// let (mut wq, mut wk) = (vec![0.5f32; 4], vec![-0.5f32; 4]);
    /// let (gq, gk) = (vec![0.1f32; 4], vec![0.2f32; 4]);
    /// let report = opt.step_bound(
    ///     &mut [(q, &mut wq[..]), (k, &mut wk[..])],
    ///     &[(q, &gq[..]), (k, &gk[..])],
    /// )?;
    /// assert!(report.applied);
    ///
    /// // Swapped: same lengths, so `step` could not tell; here it is an error.
    /// let e = opt.step_bound(
    ///     &mut [(k, &mut wk[..]), (q, &mut wq[..])],
    ///     &[(k, &gk[..]), (q, &gq[..])],
    /// ).unwrap_err();
    /// assert!(matches!(e, Error::WrongLayer { position: 0, .. }));
    ///
    /// // By name.
    /// let _ = opt.step_bound(
    ///     &mut [("attn.q", &mut wq[..]), ("attn.k", &mut wk[..])],
    ///     &[("attn.q", &gq[..]), ("attn.k", &gk[..])],
    /// )?;
    /// # Ok::<(), lamb_std::Error>(())
    /// ```
    pub fn step_bound<K: LayerKey>(
        &mut self,
        params: &mut [(K, &mut [f32])],
        grads: &[(K, &[f32])],
    ) -> Result<StepReport, Error> {
        self.check_keys(params.iter().map(|p| &p.0), "parameters")?;
        self.check_keys(grads.iter().map(|g| &g.0), "gradient")?;
        self.step_slots(params, grads, 1.0)
    }

    /// [`Lamb::step_bound`] with parameters and gradients in any storage and loss scaling:
    /// [`Lamb::step_mixed_scaled`] with each tensor keyed by its layer.
    pub fn step_bound_mixed<K: LayerKey>(
        &mut self,
        params: &mut [(K, ParamsIn<'_>)],
        grads: &[(K, Grads<'_>)],
        inv_loss_scale: f32,
    ) -> Result<StepReport, Error> {
        self.check_keys(params.iter().map(|p| &p.0), "parameters")?;
        self.check_keys(grads.iter().map(|g| &g.0), "gradient")?;
        self.step_slots(params, grads, inv_loss_scale)
    }

    /// Each key names the layer registered at its position (extra or missing tensors are
    /// left to the step's count check).
    fn check_keys<'k, K: LayerKey + 'k>(
        &self,
        keys: impl Iterator<Item = &'k K>,
        what: &'static str,
    ) -> Result<(), Error> {
        for (i, (key, layer)) in keys.zip(&self.layers).enumerate() {
            let found = match key.key() {
                Key::Id(j) if j == i => continue,
                Key::Name(n) if n == layer.name => continue,
                Key::Id(j) => match self.layers.get(j) {
                    Some(l) => format!("'{}' (#{j})", l.name),
                    None => format!("#{j} (no such layer)"),
                },
                Key::Name(n) => format!("'{n}'"),
            };
            return Err(Error::WrongLayer {
                position: i,
                what,
                registered: format!("'{}' (#{i})", layer.name),
                found,
            });
        }
        Ok(())
    }
}
