//! [`Model`]: the layer table every rank registers, and its settings. Nothing is checked
//! while it is built, so that no rank can fail alone before the first collective call;
//! [`DistLamb::new`](crate::DistLamb::new) checks it on every rank, and the ranks agree.

use lamb_std::lamb_core::{LambConfig, Schedule};
use lamb_std::{GroupId, Lamb, LayerId, Precision};

/// The layers, groups and settings of a distributed optimizer, the same on every rank.
/// Built like a [`Lamb`]: [`Model::new`] / [`Model::with_decay_split`], then groups,
/// precisions, layers and settings.
///
/// ```
/// use lamb_mpi::Model;
/// use lamb_std::lamb_core::LambConfig;
///
/// let mut model = Model::with_decay_split(LambConfig::nvlamb());
/// model.add_param("fc.weight", &[64, 784]);
/// model.add_param("fc.bias", &[64]);
/// model.set_max_grad_norm(Some(1.0));
/// // The single-process optimizer of the same model (for a reference run, or to read
/// // the checkpoints of a distributed run).
/// let lamb = model.to_lamb()?;
/// assert_eq!(lamb.layer_count(), 2);
/// # Ok::<(), lamb_std::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    config: LambConfig,
    decay_split: bool,
    /// Groups after the first (or the first two, with the decay split).
    groups: Vec<(String, LambConfig, f64)>,
    precisions: Vec<(GroupId, Precision)>,
    /// Name, length, group.
    layers: Vec<(String, usize, usize)>,
    max_grad_norm: Option<f64>,
    schedule: Schedule,
}

impl Model {
    /// One group, `"default"`, of configuration `config` (as [`Lamb::new`]).
    pub fn new(config: LambConfig) -> Model {
        Model {
            config,
            decay_split: false,
            groups: Vec::new(),
            precisions: Vec::new(),
            layers: Vec::new(),
            max_grad_norm: None,
            schedule: Schedule::Constant,
        }
    }

    /// Groups `"decay"` and `"no_decay"`, as [`Lamb::with_decay_split`]; [`Model::add_param`]
    /// picks the group by the same rule.
    pub fn with_decay_split(config: LambConfig) -> Model {
        Model {
            decay_split: true,
            ..Model::new(config)
        }
    }

    /// Adds a group (see [`Lamb::add_group`]).
    pub fn add_group(
        &mut self,
        name: impl Into<String>,
        config: LambConfig,
        lr_scale: f64,
    ) -> GroupId {
        self.groups.push((name.into(), config, lr_scale));
        GroupId(self.groups.len() - 1 + 1 + usize::from(self.decay_split))
    }

    /// Sets a group's storage precision (see [`Lamb::set_precision`]).
    pub fn set_precision(&mut self, group: GroupId, precision: Precision) {
        self.precisions.push((group, precision));
    }

    /// Adds a layer of `len` elements to the first group.
    pub fn add_layer(&mut self, name: impl Into<String>, len: usize) -> LayerId {
        self.add_layer_to(GroupId(0), name, len)
    }

    /// Adds a layer of `len` elements to `group`.
    pub fn add_layer_to(&mut self, group: GroupId, name: impl Into<String>, len: usize) -> LayerId {
        self.layers.push((name.into(), len, group.0));
        LayerId(self.layers.len() - 1)
    }

    /// Adds a layer of shape `shape`, its group chosen as [`Lamb::add_param`] does. A
    /// shape whose element count overflows is recorded as `usize::MAX` elements, which
    /// [`DistLamb::new`](crate::DistLamb::new) refuses.
    pub fn add_param(&mut self, name: impl Into<String>, shape: &[usize]) -> LayerId {
        let name = name.into();
        let len = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let group = usize::from(self.decay_split && (shape.len() <= 1 || name.ends_with(".bias")));
        self.add_layer_to(GroupId(group), name, len.unwrap_or(usize::MAX))
    }

    /// The layers: name, length, group index.
    pub fn layers(&self) -> &[(String, usize, usize)] {
        &self.layers
    }

    /// Sets global gradient-norm clipping.
    pub fn set_max_grad_norm(&mut self, max_norm: Option<f64>) {
        self.max_grad_norm = max_norm;
    }

    /// Sets the learning-rate schedule.
    pub fn set_schedule(&mut self, schedule: Schedule) {
        self.schedule = schedule;
    }

    /// The single-process lamb-std optimizer of this model, every check of lamb-std
    /// applied (its state allocated in full).
    pub fn to_lamb(&self) -> Result<Lamb, lamb_std::Error> {
        let mut lamb = self.settings()?;
        for (name, len, group) in &self.layers {
            lamb.add_layer_to(GroupId(*group), name.clone(), *len)?;
        }
        Ok(lamb)
    }

    /// A lamb-std optimizer with this model's groups and settings and no layers: the
    /// checked settings a distributed optimizer keeps.
    pub(crate) fn settings(&self) -> Result<Lamb, lamb_std::Error> {
        let mut lamb = if self.decay_split {
            Lamb::with_decay_split(self.config)?
        } else {
            Lamb::new(self.config)?
        };
        for (name, config, lr_scale) in &self.groups {
            lamb.add_group(name.clone(), *config, *lr_scale)?;
        }
        for &(group, precision) in &self.precisions {
            lamb.set_precision(group, precision)?;
        }
        lamb.set_max_grad_norm(self.max_grad_norm)?;
        lamb.set_schedule(self.schedule)?;
        Ok(lamb)
    }

    /// The table as text, one line per group, layer and setting: what ranks compare.
    pub(crate) fn describe(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "base: {:?}, decay split {}",
            self.config, self.decay_split
        )];
        lines.extend(
            (self.groups.iter().enumerate()).map(|(i, g)| format!("added group {i}: {g:?}")),
        );
        lines.extend(
            (self.precisions.iter()).map(|(g, p)| format!("precision of group {}: {p:?}", g.0)),
        );
        lines.extend(
            (self.layers.iter().enumerate()).map(|(i, (name, len, group))| {
                format!("layer {i}: '{name}', {len} elements, group {group}")
            }),
        );
        lines.push(format!("clipping: {:?}", self.max_grad_norm));
        lines.push(format!("schedule: {:?}", self.schedule));
        lines.push(format!("{} layers", self.layers.len()));
        lines
    }
}
