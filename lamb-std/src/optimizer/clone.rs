//! [`Lamb::try_clone`] and the `Clone` and `Debug` impls of [`Lamb`]: a deep copy of the
//! state and settings with a thread pool of its own, and a summary without the buffers.

use lamb_core::BLOCK;

use super::scratch::Scratch;
use super::{Lamb, build_pool, out_of_memory};
use crate::error::Error;

impl Lamb {
    /// A deep copy: every layer's state (moments, master copies, fixed storage), the
    /// groups, settings, step counter and thread count, with a thread pool of its own. The
    /// copy steps bit-identically to the original from here on. Allocation failure, or an
    /// OS that refuses the threads, is an error ([`Error::OutOfMemory`],
    /// [`Error::ThreadPool`]); [`Clone::clone`] panics on them instead, as `Vec::clone`
    /// aborts.
    ///
    /// ```
    /// use lamb_std::{Lamb, lamb_core::LambConfig};
    /// let mut opt = Lamb::new(LambConfig::paper())?;
    /// opt.add_layer("w", 4)?;
    /// let mut w = vec![0.5f32; 4];
    /// let _ = opt.step(&mut [&mut w], &[&[0.1; 4]])?;
    /// let mut copy = opt.try_clone()?;
    /// let mut w2 = w.clone();
    /// let _ = opt.step(&mut [&mut w], &[&[0.2; 4]])?;
    /// let _ = copy.step(&mut [&mut w2], &[&[0.2; 4]])?;
    /// assert_eq!(w, w2);
    /// # Ok::<(), lamb_std::Error>(())
    /// ```
    pub fn try_clone(&self) -> Result<Lamb, Error> {
        let mut states = Vec::new();
        states
            .try_reserve_exact(self.states.len())
            .map_err(|_| out_of_memory("(all)".into(), "layer table", None))?;
        for (l, s) in self.layers.iter().zip(&self.states) {
            let copy = s
                .try_clone()
                .map_err(|e| out_of_memory(l.name.clone(), "state copy", e.bytes()))?;
            states.push(copy);
        }
        let mut scratch = Scratch::default();
        for l in &self.layers {
            let blocks = l.len.div_ceil(BLOCK);
            if let Err(bytes) = scratch.reserve_layer(blocks) {
                return Err(out_of_memory(l.name.clone(), "block sums", bytes));
            }
            scratch.push_layer(blocks);
        }
        scratch.plan_stale = true;
        Ok(Lamb {
            groups: self.groups.clone(),
            group_layers: self.group_layers.clone(),
            layers: self.layers.clone(),
            names: self.names.clone(),
            states,
            step: self.step,
            threads: self.threads,
            pool: build_pool(self.threads)?,
            backend: self.backend.clone(),
            max_grad_norm: self.max_grad_norm,
            schedule: self.schedule,
            custom_schedule: self.custom_schedule.clone(),
            poisoned: self.poisoned,
            no_decay_group: self.no_decay_group,
            scratch,
            #[cfg(test)]
            panic_in: self.panic_in,
            #[cfg(test)]
            fail_master_of: self.fail_master_of,
        })
    }
}

/// A deep copy; see [`Lamb::try_clone`].
///
/// # Panics
/// If memory for the copy or the clone's threads cannot be had (like `Vec::clone`, which
/// aborts); [`Lamb::try_clone`] returns the error instead.
impl Clone for Lamb {
    fn clone(&self) -> Lamb {
        match self.try_clone() {
            Ok(copy) => copy,
            Err(e) => panic!("Lamb::clone: {e}"),
        }
    }
}

/// The settings and sizes, not the buffers.
impl std::fmt::Debug for Lamb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lamb")
            .field("groups", &self.groups)
            .field("layers", &self.layers.len())
            .field("params", &self.layers.iter().map(|l| l.len).sum::<usize>())
            .field("step", &self.step)
            .field("threads", &self.threads)
            .field("backend", &self.backend)
            .field("max_grad_norm", &self.max_grad_norm)
            .field("schedule", &self.schedule)
            .field("custom_schedule", &self.custom_schedule.is_some())
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}
