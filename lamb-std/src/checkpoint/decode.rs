//! Reading a lamb checkpoint: every check of the [module docs](super#what-loading-checks),
//! in the order integrity, format, model, scalars, tensors, before anything changes; then
//! [`Lamb::restore`] replaces the state whole.

use std::collections::HashSet;

use lamb_core::codec::{QBLOCK, q8_m_encode, q8_v_encode};
use lamb_core::half::bf16;
use lamb_core::{LambConfig, Schedule};
use safetensors::Dtype;

use super::container::{Parsed, Refusal, bf16s, f32s, parse};
use super::meta::{
    CHECKSUM_PREFIX, DTYPE_BF16, DTYPE_F32, DTYPE_Q8_M, DTYPE_Q8_V, FORMAT, KEY_CHECKSUM,
    KEY_FORMAT, KEY_META, KEY_VERSION, LayerMeta, Meta, VERSION, dtypes, verify_checksum,
};
use crate::buffer::AlignedBuf;
use crate::domain::{NextStep, Unsteppable};
use crate::error::Error;
use crate::optimizer::{GroupId, Lamb, LayerId, Snapshot, StateBytes, StateFormat};

/// A layer's checked state: its moments in the layer's format and the master copy, if the
/// file has one (little-endian bytes).
struct LayerIn<'a> {
    moments: StateBytes<'a>,
    master: Option<&'a [u8]>,
}

/// A checked checkpoint, ready to copy in.
struct Decoded<'a> {
    step: u64,
    groups: Vec<(LambConfig, f64)>,
    max_grad_norm: Option<f64>,
    schedule: Schedule,
    layers: Vec<LayerIn<'a>>,
    /// Per layer, when asked for: the parameters.
    params: Vec<&'a [u8]>,
}

/// Loads a lamb checkpoint into `lamb` (and the parameters into `params`, if given):
/// everything is checked and allocated first, then nothing can fail.
pub(super) fn load(
    lamb: &mut Lamb,
    bytes: &[u8],
    params: Option<&mut [&mut [f32]]>,
) -> Result<(), Refusal> {
    let d = decode(lamb, bytes, params.is_some())?;
    // The master copies are the only state a load allocates: allocate them all before
    // changing anything, so that running out of memory is a refusal, not an abort.
    let mut layers = Vec::with_capacity(d.layers.len());
    for (i, layer) in d.layers.into_iter().enumerate() {
        let master = match layer.master {
            None => None,
            Some(src) => {
                let mut b = AlignedBuf::try_zeroed(src.len() / 4).map_err(|e| {
                    Error::OutOfMemory {
                        name: lamb.layer_at(LayerId(i)).name.to_string(),
                        what: "master copy",
                        bytes: e.bytes().unwrap_or(usize::MAX),
                    }
                    .to_string()
                })?;
                b.copy_from_le_bytes(src);
                Some(b)
            }
        };
        layers.push((Some(layer.moments), master));
    }
    // Everything is checked and allocated: from here nothing can fail.
    if let Some(params) = params {
        for (dst, src) in params.iter_mut().zip(&d.params) {
            for (x, b) in dst.iter_mut().zip(f32s(src)) {
                *x = b;
            }
        }
    }
    lamb.restore(Snapshot {
        step: d.step,
        groups: d.groups,
        max_grad_norm: d.max_grad_norm,
        schedule: Some(d.schedule),
        layers,
    });
    Ok(())
}

fn decode<'a>(lamb: &Lamb, bytes: &'a [u8], want_params: bool) -> Result<Decoded<'a>, Refusal> {
    let (f, meta) = read_meta(bytes)?;
    check_groups(lamb, &meta)?;
    check_layers(lamb, &meta)?;
    if want_params && !meta.params {
        return Err(
            "the checkpoint holds no parameters (it was written by save, not save_with_params)"
                .into(),
        );
    }
    let (groups, max_grad_norm, schedule) = check_scalars(&meta)?;
    // The moments must be able to take the next step under the loaded configuration.
    let rules: Vec<Option<NextStep>> = groups
        .iter()
        .map(|(c, _)| {
            let t = crate::domain::next_step(meta.step).ok()?;
            NextStep::new(c, t)
        })
        .collect();
    let mut seen = HashSet::with_capacity(f.tensors.len());
    let mut layers = Vec::with_capacity(meta.layers.len());
    let mut params = Vec::new();
    for (i, lm) in meta.layers.iter().enumerate() {
        let ours = lamb.layer_at(LayerId(i));
        let rule = rules[ours.group.0].as_ref();
        let tensors = Tensors {
            f: &f,
            seen: &mut seen,
            i,
            lm,
            len: ours.len,
        };
        let (layer, p) = tensors.layer(ours.state.format(), rule, meta.step, meta.params)?;
        if want_params && let Some(p) = p {
            params.push(p);
        }
        layers.push(layer);
    }
    if let Some(extra) = f.tensors.keys().filter(|k| !seen.contains(*k)).min() {
        return Err(format!(
            "unexpected tensor '{extra}' (the metadata announces no such tensor)"
        ));
    }
    Ok(Decoded {
        step: meta.step,
        groups,
        max_grad_norm,
        schedule,
        layers,
        params,
    })
}

/// Integrity first (a corrupted file is refused before its header is parsed), then the
/// format, version, checksum entry and metadata keys; the parsed file and its `lamb.meta`.
fn read_meta(bytes: &[u8]) -> Result<(Parsed<'_>, Meta), Refusal> {
    let checksum = verify_checksum(bytes)?;
    let f = parse(bytes)?;
    let md = &f.metadata;
    match md.get(KEY_FORMAT) {
        Some(v) if v == FORMAT => {}
        Some(v) => {
            return Err(format!(
                "not a lamb checkpoint: '{KEY_FORMAT}' is {v:?}, expected {FORMAT:?}"
            ));
        }
        None if md.contains_key("param_groups") => {
            return Err(format!(
                "not a lamb checkpoint but a PyTorch optimizer state (it has 'param_groups' \
                 and no '{KEY_FORMAT}'): load it with Lamb::load_torch_state"
            ));
        }
        None => {
            return Err(format!(
                "not a lamb checkpoint: no '{KEY_FORMAT}' in the safetensors metadata"
            ));
        }
    }
    match md.get(KEY_VERSION) {
        Some(v) if *v == VERSION.to_string() => {}
        Some(v) => {
            return Err(format!(
                "format version {v:?}; this lamb reads version {VERSION}"
            ));
        }
        None => return Err(format!("no '{KEY_VERSION}' in the metadata")),
    }
    let stored = md.get(KEY_CHECKSUM);
    match (stored, checksum) {
        (None, _) => return Err(format!("no '{KEY_CHECKSUM}' in the metadata")),
        (Some(v), Some(c)) if *v == format!("{CHECKSUM_PREFIX}{c}") => {}
        (Some(v), _) => {
            return Err(format!(
                "the '{KEY_CHECKSUM}' value {v:?} is not written as lamb writes it"
            ));
        }
    }
    if let Some(k) = md
        .keys()
        .filter(|k| ![KEY_FORMAT, KEY_VERSION, KEY_META, KEY_CHECKSUM].contains(&k.as_str()))
        .min()
    {
        return Err(format!("unexpected metadata key '{k}'"));
    }
    let meta_json = md
        .get(KEY_META)
        .ok_or_else(|| format!("no '{KEY_META}' in the metadata"))?;
    let meta: Meta =
        serde_json::from_str(meta_json).map_err(|e| format!("bad '{KEY_META}': {e}"))?;

    Ok((f, meta))
}

/// The groups of the file against the optimizer's: count, names, precision.
fn check_groups(lamb: &Lamb, meta: &Meta) -> Result<(), Refusal> {
    if meta.layers.len() != lamb.layer_count() {
        return Err(format!(
            "checkpoint has {} layers, the optimizer has {}",
            meta.layers.len(),
            lamb.layer_count()
        ));
    }
    if meta.groups.len() != lamb.group_count() {
        return Err(format!(
            "checkpoint has {} parameter groups, the optimizer has {}",
            meta.groups.len(),
            lamb.group_count()
        ));
    }
    for (g, gm) in meta.groups.iter().enumerate() {
        let ours = lamb.group(GroupId(g)).map_err(|e| e.to_string())?;
        if gm.name != ours.name {
            return Err(format!(
                "parameter group #{g}: checkpoint has '{}', the optimizer has '{}'",
                gm.name, ours.name
            ));
        }
        if gm.precision.to_precision() != Some(ours.precision) {
            return Err(format!(
                "group '{}': checkpoint has precision {:?}, the optimizer {:?}",
                gm.name, gm.precision, ours.precision
            ));
        }
    }
    Ok(())
}

/// The layers of the file against the optimizer's: count, names, lengths, groups, moment
/// dtypes, master copies, and each group's `params`.
fn check_layers(lamb: &Lamb, meta: &Meta) -> Result<(), Refusal> {
    let group_name = |g: usize| {
        lamb.group(GroupId(g))
            .map(|g| g.name.clone())
            .unwrap_or_default()
    };
    let mut members: Vec<Vec<u64>> = vec![Vec::new(); lamb.group_count()];
    for (i, lm) in meta.layers.iter().enumerate() {
        let l = lamb.layer_at(LayerId(i));
        if lm.name != l.name {
            return Err(format!(
                "layer #{i}: checkpoint has '{}', the optimizer has '{}'",
                lm.name, l.name
            ));
        }
        if lm.len != l.len as u64 {
            return Err(format!(
                "layer '{}': checkpoint has {} elements, model has {}",
                l.name, lm.len, l.len
            ));
        }
        if lm.group != l.group.0 as u64 {
            let theirs = usize::try_from(lm.group)
                .ok()
                .and_then(|g| meta.groups.get(g))
                .map_or_else(|| format!("#{}", lm.group), |g| format!("'{}'", g.name));
            return Err(format!(
                "layer '{}': checkpoint puts it in group {theirs}, the optimizer in group '{}'",
                l.name,
                group_name(l.group.0)
            ));
        }
        members[l.group.0].push(i as u64);
        let (om, ov, oblock) = dtypes(l.state.format());
        for (which, m, ours) in [
            ("exp_avg", &lm.exp_avg, om),
            ("exp_avg_sq", &lm.exp_avg_sq, ov),
        ] {
            if ![DTYPE_F32, DTYPE_BF16, DTYPE_Q8_M, DTYPE_Q8_V].contains(&m.dtype.as_str()) {
                return Err(format!(
                    "layer '{}': {which} is stored as {:?}, which this version of lamb cannot \
                     read",
                    l.name, m.dtype
                ));
            }
            if m.dtype != ours || m.block != oblock {
                return Err(format!(
                    "layer '{}': checkpoint stores {which} as {:?}{}, the optimizer as {ours:?}{}",
                    l.name,
                    m.dtype,
                    m.block
                        .map_or(String::new(), |b| format!(" in blocks of {b}")),
                    oblock.map_or(String::new(), |b| format!(" in blocks of {b}")),
                ));
            }
        }
        let keeps_master = lamb.group(l.group).is_ok_and(|g| g.precision.master);
        if lm.master && !keeps_master {
            return Err(format!(
                "layer '{}': the checkpoint has a master copy, but its group keeps none",
                l.name
            ));
        }
    }
    for (gm, want) in meta.groups.iter().zip(&members) {
        if gm.params != *want {
            return Err(format!(
                "parameter group '{}': its 'params' {:?} are not the layers that name it {:?}",
                gm.name, gm.params, want
            ));
        }
    }
    Ok(())
}

/// The step, the groups' configurations, clipping and schedule, checked by the setters'
/// rules.
fn check_scalars(meta: &Meta) -> Result<Scalars, Refusal> {
    crate::domain::check_step(meta.step)?;
    let mut groups = Vec::with_capacity(meta.groups.len());
    for gm in &meta.groups {
        let config = LambConfig::from(&gm.config);
        check_group(&gm.name, &config, gm.lr_scale.0)?;
        groups.push((config, gm.lr_scale.0));
    }
    let max_grad_norm = meta.max_grad_norm.map(|x| x.0);
    check_max_grad_norm(max_grad_norm)?;
    let schedule = Schedule::from(&meta.schedule);
    schedule.validate().map_err(|e| format!("schedule: {e}"))?;
    Ok((groups, max_grad_norm, schedule))
}

/// Per group configuration and lr multiplier, clipping, schedule.
type Scalars = (Vec<(LambConfig, f64)>, Option<f64>, Schedule);

/// One layer's tensors in a parsed file.
struct Tensors<'f, 'a> {
    f: &'f Parsed<'a>,
    seen: &'f mut HashSet<String>,
    /// The layer's index, metadata and length.
    i: usize,
    lm: &'f LayerMeta,
    len: usize,
}

impl<'a> Tensors<'_, 'a> {
    /// The tensor `state.{i}.{key}`, which must have `dtype` and `shape`.
    fn get(&mut self, key: &str, dtype: Dtype, shape: &[usize]) -> Result<&'a [u8], Refusal> {
        let name = format!("state.{}.{key}", self.i);
        tensor_of(self.f, self.seen, &name, &self.lm.name, dtype, shape)
    }

    /// The layer's checked state (moments in `format`, step, master copy) and, if the file
    /// has them, its parameters.
    fn layer(
        mut self,
        format: StateFormat,
        rule: Option<&NextStep>,
        step: u64,
        has_params: bool,
    ) -> Result<(LayerIn<'a>, Option<&'a [u8]>), Refusal> {
        let moments = self.moments(format, rule)?;
        let (i, len, lname) = (self.i, self.len, self.lm.name.clone());
        let s = self.get("step", Dtype::F32, &[])?;
        if let Some(x) = f32s(s).next()
            && x.to_bits() != (step as f32).to_bits()
        {
            return Err(format!(
                "tensor 'state.{i}.step' is {x:?}, but the checkpoint's step is {step}"
            ));
        }
        let master = if self.lm.master {
            let bytes = self.get("master", Dtype::F32, &[len])?;
            // Like the moments, the master copy is state the next step reads: a NaN in it
            // would skip every step until reset().
            if let Some(k) = f32s(bytes).position(|x| !x.is_finite()) {
                return Err(format!(
                    "layer '{lname}': the master copy has a non-finite value at element {k}"
                ));
            }
            Some(bytes)
        } else {
            None
        };
        let params = if has_params {
            let name = format!("param.{lname}");
            Some(tensor_of(
                self.f,
                self.seen,
                &name,
                &lname,
                Dtype::F32,
                &[len],
            )?)
        } else {
            None
        };
        Ok((LayerIn { moments, master }, params))
    }

    /// The layer's moments in `format`: finite (v >= 0), codes in range, able to step.
    fn moments(
        &mut self,
        format: StateFormat,
        rule: Option<&NextStep>,
    ) -> Result<StateBytes<'a>, Refusal> {
        let (len, lname) = (self.len, self.lm.name.clone());
        let lname = lname.as_str();
        let steppable = |r: Result<(), Unsteppable>| r.map_err(|e| format!("layer '{lname}': {e}"));
        let none: &[u8] = &[];
        Ok(match format {
            StateFormat::F32 => {
                let m = self.get("exp_avg", Dtype::F32, &[len])?;
                let v = self.get("exp_avg_sq", Dtype::F32, &[len])?;
                check_values(lname, "exp_avg", f32s(m))?;
                check_values(lname, "exp_avg_sq", f32s(v))?;
                if let Some(r) = rule {
                    steppable(r.check_m(f32s(m)).and_then(|()| r.check_v(f32s(v))))?;
                }
                StateBytes {
                    m,
                    v,
                    m_absmax: none,
                    v_absmax: none,
                }
            }
            StateFormat::Bf16 => {
                let m = self.get("exp_avg", Dtype::BF16, &[len])?;
                let v = self.get("exp_avg_sq", Dtype::BF16, &[len])?;
                let (mf, vf) = (|| bf16s(m).map(bf16::to_f32), || bf16s(v).map(bf16::to_f32));
                check_values(lname, "exp_avg", mf())?;
                check_values(lname, "exp_avg_sq", vf())?;
                if let Some(r) = rule {
                    steppable(r.check_m(mf()).and_then(|()| r.check_v(vf())))?;
                }
                StateBytes {
                    m,
                    v,
                    m_absmax: none,
                    v_absmax: none,
                }
            }
            StateFormat::Q8 => {
                let blocks = [len.div_ceil(QBLOCK)];
                let m = self.get("exp_avg", Dtype::U8, &[len])?;
                let m_absmax = self.get("exp_avg.absmax", Dtype::F32, &blocks)?;
                let v = self.get("exp_avg_sq", Dtype::U8, &[len])?;
                let v_absmax = self.get("exp_avg_sq.absmax", Dtype::F32, &blocks)?;
                check_q8(lname, "exp_avg", m, m_absmax, true)?;
                check_q8(lname, "exp_avg_sq", v, v_absmax, false)?;
                if let Some(r) = rule {
                    let (ma, va): (Vec<f32>, Vec<f32>) =
                        (f32s(m_absmax).collect(), f32s(v_absmax).collect());
                    steppable(r.check_q8(m, v, &ma, &va))?;
                }
                StateBytes {
                    m,
                    v,
                    m_absmax,
                    v_absmax,
                }
            }
        })
    }
}

/// The tensor `name`, which must have `dtype` and `shape`; notes it in `seen`.
fn tensor_of<'a>(
    f: &Parsed<'a>,
    seen: &mut HashSet<String>,
    name: &str,
    layer: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<&'a [u8], Refusal> {
    let t = f
        .tensors
        .get(name)
        .ok_or_else(|| format!("missing tensor '{name}' (layer '{layer}')"))?;
    if t.dtype != dtype {
        return Err(format!(
            "tensor '{name}' (layer '{layer}'): dtype {:?}, expected {dtype:?}",
            t.dtype
        ));
    }
    if t.shape != shape {
        return Err(format!(
            "tensor '{name}' (layer '{layer}'): shape {:?}, expected {shape:?}",
            t.shape
        ));
    }
    seen.insert(name.to_string());
    Ok(t.data)
}

/// Checks 8-bit moments: scales finite and >= 0, codes no larger than the code of 1 (the
/// largest the encoder makes, `|x| <= absmax`).
fn check_q8(
    layer: &str,
    which: &str,
    codes: &[u8],
    absmax: &[u8],
    signed: bool,
) -> Result<(), Refusal> {
    check_values(
        layer,
        &format!("{which}.absmax"),
        f32s(absmax).map(|x| if x < 0.0 { f32::NAN } else { x }),
    )
    .map_err(|e| e.replace("must be finite", "must be finite and >= 0"))?;
    let (max, mask) = if signed {
        (q8_m_encode(1.0, 1.0), 0x7f)
    } else {
        (q8_v_encode(1.0, 1.0), 0xff)
    };
    if let Some(k) = codes.iter().position(|&c| c & mask > max) {
        return Err(format!(
            "layer '{layer}': {which}[{k}] has the 8-bit code {:#04x}, beyond the largest \
             the encoder makes ({max:#04x})",
            codes[k]
        ));
    }
    Ok(())
}

/// Checks that moment values are finite (and, for v, >= 0), naming the first bad element.
pub(crate) fn check_values(
    layer: &str,
    which: &str,
    values: impl Iterator<Item = f32>,
) -> Result<(), Refusal> {
    let sq = which.starts_with("exp_avg_sq");
    for (k, x) in values.enumerate() {
        if !x.is_finite() || (sq && x < 0.0) {
            return Err(format!(
                "layer '{layer}': {which}[{k}] = {x:?}: must be finite{}",
                if sq { " and >= 0" } else { "" }
            ));
        }
    }
    Ok(())
}

/// Checks f32 moment bytes.
pub(crate) fn check_moment(layer: &str, which: &str, data: &[u8]) -> Result<(), Refusal> {
    check_values(layer, which, f32s(data))
}

/// Validates a group's configuration and lr multiplier as the optimizer's setters do.
pub(crate) fn check_group(name: &str, config: &LambConfig, lr_scale: f64) -> Result<(), Refusal> {
    crate::domain::validate_group(name, config, lr_scale).map_err(|e| e.to_string())
}

/// Validates a clipping threshold as [`Lamb::set_max_grad_norm`] does.
pub(crate) fn check_max_grad_norm(x: Option<f64>) -> Result<(), Refusal> {
    crate::domain::validate_max_grad_norm(x).map_err(|e| e.to_string())
}
