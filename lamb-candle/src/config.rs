//! [`Config`]: the settings of a [`Lamb`](crate::Lamb), which is `candle_nn::Optimizer`'s
//! `Config`.

use lamb_std::Precision;
use lamb_std::lamb_core::{LambConfig, Schedule};

/// The lamb-std settings a candle user sets; [`Config::default`] is
/// [`LambConfig::default`] with timm's decay split, no clipping, a constant schedule and
/// one thread. Change fields with struct update syntax:
///
/// ```
/// use lamb_candle::{Config, lamb_std::lamb_core::{LambConfig, Schedule}};
/// let config = Config {
///     lamb: LambConfig { lr: 2e-3, ..LambConfig::nvlamb() },
///     max_grad_norm: Some(1.0),
///     schedule: Schedule::WarmupPoly { warmup: 100, total: 10_000, power: 1.0, end: 0.0 },
///     threads: 0, // one per core
///     ..Config::default()
/// };
/// assert!(config.decay_split);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    /// Hyperparameters: a preset ([`LambConfig::paper`], [`LambConfig::nvlamb`],
    /// [`LambConfig::timm`], ...), with `lr` the base learning rate
    /// ([`candle_nn::Optimizer::learning_rate`]).
    pub lamb: LambConfig,
    /// timm's `param_groups_weight_decay`: 1-D (and 0-D) Vars and Vars whose name ends in
    /// `.bias` get no weight decay and no trust ratio (group `"no_decay"`), the rest get
    /// `lamb` (group `"decay"`); see [`lamb_std::Lamb::with_decay_split`]. Where every Var
    /// falls on one side, the optimizer has that one group. `false`: one group, `lamb`.
    pub decay_split: bool,
    /// Global gradient-norm clipping (`None`: off); see
    /// [`lamb_std::Lamb::set_max_grad_norm`].
    pub max_grad_norm: Option<f64>,
    /// A factor on the learning rate by step; see [`lamb_std::Lamb::set_schedule`].
    pub schedule: Schedule,
    /// Worker threads: 1 runs on the caller's thread, 0 means one per core. Results are
    /// bit-identical for every count.
    pub threads: usize,
    /// How the optimizer state is stored (f32, bf16 or 8-bit moments) and how bf16/f16
    /// Vars are updated (through an f32 master copy, or bf16 in place with
    /// [`Rounding`](lamb_std::lamb_core::layer::Rounding)), for every group.
    pub precision: Precision,
    /// Loss scale of mixed-precision training: the gradients are divided by it inside the
    /// step (1: none). With a scale, use [`NonFinite::Skip`] so that an overflow skips the
    /// step, and read [`Lamb::last_report`](crate::Lamb::last_report) to lower it.
    ///
    /// [`NonFinite::Skip`]: lamb_std::lamb_core::NonFinite::Skip
    pub loss_scale: f32,
}

impl Default for Config {
    fn default() -> Config {
        Config::new(LambConfig::default())
    }
}

impl Config {
    /// The defaults with hyperparameters `lamb`.
    pub fn new(lamb: LambConfig) -> Config {
        Config {
            lamb,
            decay_split: true,
            max_grad_norm: None,
            schedule: Schedule::Constant,
            threads: 1,
            precision: Precision::default(),
            loss_scale: 1.0,
        }
    }
}
