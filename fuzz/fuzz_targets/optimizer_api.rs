//! Arbitrary sequences of calls on `lamb_std::Lamb`: registering layers and groups (bad
//! names, unknown groups, invalid configurations and lr scales), precision settings (f32,
//! bf16 and 8-bit moments, master copies, stochastic rounding), clipping, schedules,
//! threads (including counts over `Lamb::max_threads`, which must be refused), backends,
//! `reset`, impossible and unallocatable lengths and shapes (which must be refused, not
//! abort in the allocator), the model converting a layer's parameters to another storage,
//! and steps (`step`, `step_scaled`, `step_mixed`, `step_mixed_scaled`, with f32/bf16/f16
//! parameters and gradients) with the wrong number of tensors, wrong lengths, aliased
//! gradients, non-finite values and bad loss scales.
//!
//! Checked after every call:
//! - nothing panics, and no step reports a worker panic or a poisoned optimizer;
//! - after every `Err`, and every step with `applied == false`: every parameter buffer
//!   passed, every layer's moments (f32 `m`/`v` and the compact `state`), every layer's
//!   last report, the group table and `steps()` are exactly as before (bits compared, NaN
//!   payloads included), master copies included: a refused step keeps none of the copies it
//!   made (fuzz/README.md, Findings 3);
//! - an applied step advances `steps()` by exactly one and reports that step;
//! - the parameter storage rule (`lamb_std::ParamStorage`): the harness records each
//!   layer's storage at every applied step and frees it at `reset`; a step passing a layer
//!   in another storage than recorded must be an `Err`, an applied step must never have
//!   one, `Error::StorageChanged` must name exactly a recorded mismatch, and each layer's
//!   `storage` must equal the record after every call;
//! - a shadow optimizer fed the same calls, but on `Backend::Scalar` and one thread, returns
//!   the same result and holds the same bits (params, moments, masters, reports) after
//!   every call, while the optimizer under test runs on the backend and thread count
//!   (1..=3) the input chose: a whole-model differential test of backends and of the
//!   thread partitioning.
#![no_main]

use arbitrary::Arbitrary;
use lamb_core::Backend;
use lamb_core::half::{bf16, f16};
use lamb_core::layer::{Grads as GradsIn, Rounding};
use lamb_fuzz::state::{self, state_bytes};
use lamb_fuzz::{ConfigSpec, F32, F64, Few, Fill, Rng, ScheduleSpec, bytes_of};
use lamb_std::{
    Error, GroupId, Lamb, LayerId, ParamStorage, ParamsIn, Precision, StateFormat, StepReport,
};
use libfuzzer_sys::fuzz_target;

#[path = "optimizer_api/ops.rs"]
mod ops;
#[path = "optimizer_api/step.rs"]
mod step;
use ops::apply_op;
use step::do_step;

const MAX_OPS: usize = 40;
const MAX_LAYERS: usize = 12;

#[derive(Arbitrary, Debug, Clone)]
enum Name {
    /// `l0`..`l7`: collisions (DuplicateName) are likely.
    Short(u8),
    /// `b0.bias`..`b3.bias`: picked for the no-decay group by `add_param`.
    Bias(u8),
    /// Any 4 bytes, as lossy UTF-8 (empty, control characters, U+FFFD...).
    Any([u8; 4]),
}

impl Name {
    fn get(&self) -> String {
        match self {
            Name::Short(i) => format!("l{}", i % 8),
            Name::Bias(i) => format!("b{}.bias", i % 4),
            Name::Any(b) => String::from_utf8_lossy(b).into_owned(),
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Len {
    Zero,
    /// 1..=32.
    Small(u8),
    /// Around the reduction block: 1024 + (k mod 9) − 4, or twice that.
    NearBlock {
        k: u8,
        twice: bool,
    },
    /// 0..=2200.
    Medium(u16),
    /// A length whose f32 buffers cannot exist (more than `isize::MAX` bytes): must be an
    /// `Err`. `usize::MAX - k`, or `2^62 + k`.
    Impossible {
        k: u8,
        top: bool,
    },
    /// `2^58 + k`: buffers within `isize::MAX` bytes but beyond any 64-bit address space
    /// (2^58 to 2^60 bytes, whatever the moments' format): the allocator is asked and
    /// fails, which must be `Error::OutOfMemory`, not an abort. (Under AddressSanitizer
    /// this needs `allocator_may_return_null=1`, which `run.sh` sets.)
    Unallocatable {
        k: u8,
    },
}

/// The first length of `Len::Unallocatable`.
const UNALLOCATABLE: usize = 1 << 58;

/// The most elements a layer of this target may have: anything larger that is accepted
/// is a failure (the harness would have to allocate it).
const MAX_LEN: usize = 4096;

impl Len {
    fn get(self) -> usize {
        match self {
            Len::Zero => 0,
            Len::Small(n) => 1 + n as usize % 32,
            Len::NearBlock { k, twice } => (1024 + (k % 9) as usize - 4) * (1 + twice as usize),
            Len::Medium(n) => n as usize % 2201,
            Len::Impossible { k, top } => {
                if top {
                    usize::MAX - k as usize
                } else {
                    (1usize << 62) + k as usize
                }
            }
            Len::Unallocatable { k } => UNALLOCATABLE + k as usize,
        }
    }
}

/// How the user's model holds a layer's parameters (0, 1: f32; 2: bf16; 3: f16).
#[derive(Arbitrary, Debug, Clone, Copy)]
struct Format(u8);

/// A thread count for `set_threads`.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Threads {
    /// 1..=3.
    Few(u8),
    /// 0: one per core.
    Auto,
    /// `Lamb::max_threads() + 1 + k`: refused.
    Over(u16),
    /// `usize::MAX`: refused.
    Huge,
}

#[derive(Arbitrary, Debug, Clone)]
enum Fault {
    None,
    /// One parameter tensor too few / too many; one gradient too few / too many.
    DropParam,
    ExtraParam,
    DropGrad,
    ExtraGrad,
    /// Layer `layer`'s parameter (or gradient) is `delta` elements longer (or shorter).
    WrongLen {
        layer: u8,
        grad: bool,
        delta: i8,
    },
    /// Layer `b`'s gradient starts `shift` elements into layer `a`'s (shared memory).
    AliasGrads {
        a: u8,
        b: u8,
        shift: u16,
    },
}

#[derive(Arbitrary, Debug, Clone)]
struct Patch {
    layer: u8,
    index: u16,
    /// Patch the parameter (persistently, as a user's model would hold it) or the gradient.
    param: bool,
    value: F32,
}

/// The inverse loss scale of the `*_scaled` steps.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum LossScale {
    /// `2^-k`, k in [0, 24]: what a loss scaler uses.
    Pow2(u8),
    /// Anything (invalid when not finite and > 0).
    Any(F32),
}

impl LossScale {
    fn get(self) -> f32 {
        match self {
            LossScale::Pow2(k) => 2f32.powi(-((k % 25) as i32)),
            LossScale::Any(x) => x.get(),
        }
    }
}

/// The gradients of a step.
#[derive(Arbitrary, Debug, Clone)]
enum GradFill {
    /// Finite, uniform in ±2^scale (scale folded into [-30, 30]).
    Finite { seed: u64, scale: i8 },
    /// Any fill (non-finite values likely).
    Any(Fill),
}

#[derive(Arbitrary, Debug, Clone)]
struct StepSpec {
    /// `step_mixed*` even if every parameter is f32 (it must be when one is not).
    mixed: bool,
    /// `None`: unscaled; `Some`: the `*_scaled` variant with this inverse loss scale.
    inv_loss_scale: Option<LossScale>,
    /// Gradient storage in a mixed step: 0, 1: f32; 2: bf16; 3: f16.
    grad_format: u8,
    grads: GradFill,
    patches: Few<Patch, 4>,
    fault: Option<Fault>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum MinLen {
    Zero,
    /// `k·QBLOCK`, k in [0, 8].
    Blocks(u8),
    Default,
    Any(u16),
}

#[derive(Arbitrary, Debug, Clone)]
enum Op {
    AddLayer {
        name: Name,
        len: Len,
        format: Format,
    },
    AddLayerTo {
        group: u8,
        name: Name,
        len: Len,
        format: Format,
    },
    AddParam {
        name: Name,
        shape: Few<u8, 3>,
        /// Dimensions 2^31, 2^31, then 2^(31 + d mod 33) instead of d mod 13: a product of
        /// at least 2^62 elements (more bytes than `isize::MAX`) or one that overflows
        /// usize, which must be an `Err`.
        huge: bool,
        format: Format,
    },
    AddGroup {
        name: Name,
        config: ConfigSpec,
        lr_scale: F64,
    },
    SetGroup {
        group: u8,
        config: ConfigSpec,
        lr_scale: F64,
    },
    SetPrecision {
        group: u8,
        moments: u8,
        min_len: MinLen,
        master: bool,
        stochastic: Option<u64>,
    },
    SetMaxGradNorm(Option<F64>),
    SetSchedule(ScheduleSpec),
    SetThreads(Threads),
    SetBackend(u8),
    Step(StepSpec),
    Reset,
    /// The model converts layer `layer`'s parameters to `format` (values through f32).
    Convert {
        layer: u8,
        format: Format,
    },
    // ---------------------------------------------------------------------------------
    // CHECKPOINT (the checkpoint issue): add here an operation that saves the optimizer
    // (to bytes and/or a file under a temp dir), optionally corrupts/truncates the bytes,
    // and loads them back, into the same optimizer and into a fresh one. Checks to add in
    // `apply_op` (optimizer_api/ops.rs): a refused load leaves the state exactly as before (snapshot
    // compare, like a failed step); an accepted load of an unmodified save reproduces
    // `snapshot()` bit for bit and the next step gives the same bits as without the
    // round trip. Apply it to the shadow optimizer too.
    // ---------------------------------------------------------------------------------
}

/// The configuration the optimizer is created with (`Lamb::new` refuses an invalid one,
/// naming the group; the run then ends).
#[derive(Arbitrary, Debug)]
enum InitialConfig {
    /// A preset (see [`ConfigSpec::Preset`]) with no overrides.
    Preset(u8),
    /// Anything.
    Spec(ConfigSpec),
}

#[derive(Debug)]
struct Input {
    /// `Lamb::with_decay_split` (groups "decay" and "no_decay") instead of `Lamb::new`.
    decay_split: bool,
    config: InitialConfig,
    /// Layers registered before `ops`, one per group in turn (so that a step does not
    /// always stop at `EmptyGroup`); `ops` can still add empty groups.
    initial: Few<(Len, Format), 4>,
    /// Operations, parsed until the input runs out (up to `MAX_OPS`). `Vec<Op>`'s own
    /// `arbitrary_take_rest` spends a "continue?" bit per element, which makes random
    /// inputs stop after one or two operations.
    ops: Vec<Op>,
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let decay_split = u.arbitrary()?;
        let config = u.arbitrary()?;
        let initial = u.arbitrary()?;
        let mut ops = Vec::new();
        while !u.is_empty() && ops.len() < MAX_OPS {
            ops.push(u.arbitrary()?);
        }
        Ok(Input {
            decay_split,
            config,
            initial,
            ops,
        })
    }
}

/// Everything observable about an optimizer's state: lamb_fuzz's snapshot and each layer's
/// parameter storage.
#[derive(Debug, PartialEq)]
struct State {
    base: state::State,
    storage: Vec<Option<ParamStorage>>,
}

fn snapshot(opt: &Lamb) -> State {
    State {
        base: state::snapshot(opt),
        storage: (0..opt.layer_count())
            .map(|i| opt.layer(LayerId(i)).unwrap().storage)
            .collect(),
    }
}

/// A parameter tensor as the user's model holds it.
#[derive(Clone, Debug)]
enum Tensor {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Tensor {
    fn new(len: usize, format: Format, seed: u64) -> Tensor {
        let mut r = Rng::new(seed);
        let v: Vec<f32> = (0..len).map(|_| r.unit()).collect();
        match format.0 % 4 {
            2 => Tensor::Bf16(v.into_iter().map(bf16::from_f32).collect()),
            3 => Tensor::F16(v.into_iter().map(f16::from_f32).collect()),
            _ => Tensor::F32(v),
        }
    }
    fn len(&self) -> usize {
        match self {
            Tensor::F32(x) => x.len(),
            Tensor::Bf16(x) => x.len(),
            Tensor::F16(x) => x.len(),
        }
    }
    fn is_f32(&self) -> bool {
        matches!(self, Tensor::F32(_))
    }
    fn storage(&self) -> ParamStorage {
        match self {
            Tensor::F32(_) => ParamStorage::F32,
            Tensor::Bf16(_) => ParamStorage::Bf16,
            Tensor::F16(_) => ParamStorage::F16,
        }
    }
    /// The same values (through f32) in `format`'s storage.
    fn convert(&self, format: Format) -> Tensor {
        let v: Vec<f32> = match self {
            Tensor::F32(t) => t.clone(),
            Tensor::Bf16(t) => t.iter().map(|x| x.to_f32()).collect(),
            Tensor::F16(t) => t.iter().map(|x| x.to_f32()).collect(),
        };
        match format.0 % 4 {
            2 => Tensor::Bf16(v.into_iter().map(bf16::from_f32).collect()),
            3 => Tensor::F16(v.into_iter().map(f16::from_f32).collect()),
            _ => Tensor::F32(v),
        }
    }
    fn set(&mut self, i: usize, x: f32) {
        match self {
            Tensor::F32(t) => t[i] = x,
            Tensor::Bf16(t) => t[i] = bf16::from_f32(x),
            Tensor::F16(t) => t[i] = f16::from_f32(x),
        }
    }
    fn resize(&mut self, len: usize) {
        match self {
            Tensor::F32(t) => t.resize(len, 0.25),
            Tensor::Bf16(t) => t.resize(len, bf16::from_f32(0.25)),
            Tensor::F16(t) => t.resize(len, f16::from_f32(0.25)),
        }
    }
    fn bits(&self) -> Vec<u8> {
        match self {
            Tensor::F32(t) => bytes_of(t),
            Tensor::Bf16(t) => bytes_of(t),
            Tensor::F16(t) => bytes_of(t),
        }
    }
    fn params_in(&mut self) -> ParamsIn<'_> {
        match self {
            Tensor::F32(t) => ParamsIn::F32(t),
            Tensor::Bf16(t) => ParamsIn::Bf16(t),
            Tensor::F16(t) => ParamsIn::F16(t),
        }
    }
}

/// The user's side of the model: parameter tensors, one per registered layer, and the
/// harness's record of each layer's fixed storage (`ParamStorage`'s rule: set by an
/// applied step, freed by `reset`).
struct Model {
    params: Vec<Tensor>,
    fixed: Vec<Option<ParamStorage>>,
}

impl Model {
    fn add(&mut self, len: usize, format: Format) {
        let seed = 0x9e37_79b9 + self.params.len() as u64;
        self.params.push(Tensor::new(len, format, seed));
        self.fixed.push(None);
    }
}

/// `LAMB_FUZZ_STATS=1`: print a line per input and per step (run the binary on corpus
/// files to see what a corpus exercises).
fn stats() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("LAMB_FUZZ_STATS").is_some())
}

fn check_no_panic<T: std::fmt::Debug>(r: &Result<T, Error>) {
    if let Err(e @ (Error::WorkerPanicked { .. } | Error::Poisoned)) = r {
        panic!("a kernel panicked inside a step: {e}");
    }
}

fn show<T: std::fmt::Debug>(r: &Result<T, Error>) -> String {
    format!("{r:?}")
}

fuzz_target!(|input: Input| {
    let config = match &input.config {
        InitialConfig::Preset(p) => ConfigSpec::Preset {
            preset: *p,
            overrides: Few(vec![]),
        }
        .build(),
        InitialConfig::Spec(spec) => spec.build(),
    };
    if stats() {
        eprintln!(
            "STATS input initial={} ops={}",
            input.initial.len(),
            input.ops.len()
        );
    }
    let make = || {
        if input.decay_split {
            Lamb::with_decay_split(config)
        } else {
            Lamb::new(config)
        }
    };
    let (mut opt, mut shadow) = match (make(), make()) {
        (Ok(opt), Ok(shadow)) => (opt, shadow),
        (Err(e), _) | (_, Err(e)) => {
            assert!(
                matches!(
                    e,
                    Error::Config { group: Some(_), .. } | Error::LrScaleOverflow { .. }
                ),
                "Lamb::new refused a configuration with {e:?}"
            );
            return;
        }
    };
    shadow
        .set_backend(Backend::Scalar)
        .expect("scalar is always available");
    let mut model = Model {
        params: Vec::new(),
        fixed: Vec::new(),
    };
    for (i, (len, format)) in input.initial.iter().enumerate() {
        let op = Op::AddLayerTo {
            group: (i % opt.group_count()) as u8,
            name: Name::Short(i as u8),
            len: *len,
            format: *format,
        };
        apply_op(&mut opt, &mut shadow, &mut model, &op);
    }
    for op in &input.ops {
        apply_op(&mut opt, &mut shadow, &mut model, op);
    }
});
