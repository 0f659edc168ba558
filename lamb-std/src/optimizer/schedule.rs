//! Learning-rate settings beyond the groups' configurations: [`Lamb::set_lr`] (every
//! group's base rate at once) and custom schedules ([`Lamb::set_lr_schedule`], a closure,
//! which replaces the built-in [`Schedule`](lamb_core::Schedule) of
//! [`Lamb::set_schedule`] until that is called again).

use std::sync::Arc;

use lamb_core::LambConfig;

use super::group::{CustomSchedule, Group};
use super::{Lamb, validate_group};
use crate::error::Error;

impl Lamb {
    /// A learning-rate schedule of your own: `factor(t)` multiplies every group's
    /// `lr × lr_scale` at step `t` (1-based), like the built-in [`Schedule`]s. It replaces
    /// the schedule of [`Lamb::set_schedule`] until that is called again (the last call of
    /// either wins). The factor is checked at each step before anything is written: a
    /// factor that is NaN, infinite or negative refuses the step with
    /// [`Error::InvalidLrFactor`] naming the step, and nothing changes.
    ///
    /// A closure cannot be saved as data: [`Lamb::save`] refuses while a custom schedule is
    /// set. To checkpoint, save with a built-in schedule, and after loading call
    /// `set_lr_schedule` again (a lamb checkpoint load replaces the schedule with the
    /// file's; a PyTorch state load keeps the optimizer's, custom or not).
    ///
    /// ```
    /// use lamb_std::{Error, Lamb, lamb_core::LambConfig};
    /// let mut opt = Lamb::new(LambConfig { lr: 0.01, ..LambConfig::paper() })?;
    /// opt.add_layer("w", 4)?;
    /// // Step decay: halve the rate every 100 steps; the step is refused at step 3.
    /// opt.set_lr_schedule(|t| if t == 3 { f64::NAN } else { 0.5f64.powi((t / 100) as i32) });
    /// let mut w = vec![0.5f32; 4];
    /// let report = opt.step(&mut [&mut w], &[&[0.1; 4]])?;
    /// assert_eq!(report.lr_factor, 1.0);
    /// let _ = opt.step(&mut [&mut w], &[&[0.1; 4]])?;
    /// let before = w.clone();
    /// let e = opt.step(&mut [&mut w], &[&[0.1; 4]]).unwrap_err();
    /// assert!(matches!(e, Error::InvalidLrFactor { step: 3, .. }));
    /// assert_eq!((w, opt.steps()), (before, 2));
    /// # Ok::<(), lamb_std::Error>(())
    /// ```
    pub fn set_lr_schedule(&mut self, factor: impl Fn(u64) -> f64 + Send + Sync + 'static) {
        self.custom_schedule = Some(CustomSchedule(Arc::new(factor)));
    }

    /// Whether a custom schedule ([`Lamb::set_lr_schedule`]) is in use instead of
    /// [`Lamb::schedule`].
    pub fn has_custom_schedule(&self) -> bool {
        self.custom_schedule.is_some()
    }

    /// The schedule's factor at step `t`, checked (a custom factor may be anything).
    pub(super) fn lr_factor(&self, t: u64) -> Result<f64, Error> {
        let Some(custom) = &self.custom_schedule else {
            return Ok(self.schedule.factor(t));
        };
        let factor = (custom.0)(t);
        if factor.is_finite() && factor >= 0.0 {
            Ok(factor)
        } else {
            Err(Error::InvalidLrFactor { step: t, factor })
        }
    }

    /// Sets every group's base learning rate (`config.lr`; each group's `lr_scale` and the
    /// schedule still apply on top). Checked by the rules of [`Lamb::set_group`] for every
    /// group first: if one refuses, no group changes.
    ///
    /// ```
    /// use lamb_std::{GroupId, Lamb, lamb_core::LambConfig};
    /// let mut opt = Lamb::with_decay_split(LambConfig::paper())?;
    /// opt.set_lr(3e-4)?;
    /// assert_eq!(opt.group(GroupId(0))?.config.lr, 3e-4);
    /// assert_eq!(opt.group(GroupId(1))?.config.lr, 3e-4);
    /// assert!(opt.set_lr(f64::NAN).is_err());
    /// assert_eq!(opt.group(GroupId(1))?.config.lr, 3e-4);
    /// # Ok::<(), lamb_std::Error>(())
    /// ```
    pub fn set_lr(&mut self, lr: f64) -> Result<(), Error> {
        for (i, old) in self.groups.iter().enumerate() {
            let group = Group {
                config: LambConfig { lr, ..old.config },
                ..old.clone()
            };
            validate_group(&group)?;
            let states = (self.layers.iter().zip(&self.states))
                .filter(|(l, _)| l.group == i)
                .map(|(l, s)| (l.name.as_str(), s.view()));
            crate::domain::check_group_state(self.step, &old.config, &group.config, states)?;
        }
        for g in &mut self.groups {
            g.config.lr = lr;
        }
        Ok(())
    }
}
