//! Reading a PyTorch optimizer state (timm `Lamb`'s) saved as safetensors: tensors
//! `state.{i}.{key}`, the `param_groups` list as JSON in the metadata. The mapping is
//! described in the parent module's docs, section "PyTorch and timm".

use std::collections::HashMap;

use lamb_core::{Adaptation, BiasCorrection, LambConfig};
use safetensors::Dtype;
use serde_json::{Map, Value};

use super::container::{Parsed, Refusal, Tensor, f32s, parse};
use super::decode::{check_group, check_max_grad_norm, check_moment};
use super::meta::KEY_FORMAT;
use crate::domain::NextStep;
use crate::optimizer::{GroupId, Lamb, LayerId, Snapshot, StateBytes, StateFormat};

/// The metadata key holding the JSON of `state_dict()["param_groups"]`.
const KEY_PARAM_GROUPS: &str = "param_groups";
/// The largest step counter, [`crate::MAX_STEP`] (2^53, exact in an f64).
const MAX_EXACT_STEP: f64 = crate::MAX_STEP as f64;

struct Decoded<'a> {
    step: u64,
    groups: Vec<(LambConfig, f64)>,
    max_grad_norm: Option<f64>,
    /// Per lamb layer: m and v, or `None` for a parameter without state (zeros).
    moments: Vec<LayerMoments<'a>>,
}

pub(super) fn load(lamb: &mut Lamb, bytes: &[u8]) -> Result<(), Refusal> {
    let d = decode(lamb, bytes)?;
    // Everything is checked: from here nothing can fail. A torch state has no master
    // copy: the next step makes one from the model. `decode` refused layers whose moments
    // are not f32.
    let none: &[u8] = &[];
    let layers = d.moments.into_iter().map(|mv| {
        let moments = mv.map(|(m, v)| StateBytes {
            m,
            v,
            m_absmax: none,
            v_absmax: none,
        });
        (moments, None)
    });
    lamb.restore(Snapshot {
        step: d.step,
        groups: d.groups,
        max_grad_norm: d.max_grad_norm,
        schedule: None,
        layers: layers.collect(),
    });
    Ok(())
}

/// One entry of `param_groups`.
struct TorchGroup<'a> {
    ids: Vec<usize>,
    names: Option<Vec<&'a str>>,
    raw: &'a Map<String, Value>,
}

/// A layer's m and v, or `None` for a parameter without state (zeros).
type LayerMoments<'a> = Option<(&'a [u8], &'a [u8])>;
/// Per lamb group, its configuration and `lr_scale`.
type GroupConfigs = Vec<(LambConfig, f64)>;
/// Per lamb layer, m and v as found among the tensors (`None`: not there).
type FoundMoments<'a> = Vec<[Option<&'a [u8]>; 2]>;
/// Each step counter found, with where it was found (for messages).
type Steps = Vec<(f64, String)>;

fn decode<'a>(lamb: &Lamb, bytes: &'a [u8]) -> Result<Decoded<'a>, Refusal> {
    let f = parse(bytes)?;
    if f.metadata.contains_key(KEY_FORMAT) {
        return Err(
            "this is a lamb checkpoint, not a PyTorch state: load it with Lamb::load".into(),
        );
    }
    let pg_json = f.metadata.get(KEY_PARAM_GROUPS).ok_or_else(|| {
        format!(
            "not a PyTorch optimizer state: no '{KEY_PARAM_GROUPS}' in the safetensors metadata"
        )
    })?;
    let pg: Vec<Map<String, Value>> = serde_json::from_str(pg_json)
        .map_err(|e| format!("bad '{KEY_PARAM_GROUPS}' (a JSON list of objects): {e}"))?;
    let groups = torch_groups(&pg)?;
    check_layers_take_torch_state(lamb, &groups)?;
    let (layer_of, lamb_group_of) = map_params(lamb, &groups)?;
    let (found, mut steps) = state_tensors(lamb, &f, &layer_of)?;
    let moments = paired_moments(lamb, &found)?;
    steps.extend(group_steps(&groups)?);
    let step = step_counter(&steps, moments.iter().any(Option::is_some))?;
    let (configs, max_grad_norm) = hyperparameters(lamb, &groups, &lamb_group_of)?;
    check_next_step(lamb, step, &configs, &moments)?;
    Ok(Decoded {
        step,
        groups: configs,
        max_grad_norm,
        moments,
    })
}

/// Refuses an optimizer with a layer whose moments are not f32, or whose layer count is not
/// the state's parameter count.
fn check_layers_take_torch_state(lamb: &Lamb, groups: &[TorchGroup<'_>]) -> Result<(), Refusal> {
    let nl = lamb.layer_count();
    for i in 0..nl {
        let l = lamb.layer_at(LayerId(i));
        if l.state.format() != StateFormat::F32 {
            return Err(format!(
                "layer '{}' stores its moments compactly (its group's precision); a PyTorch \
                 state loads into f32 moments only",
                l.name
            ));
        }
    }
    let total: usize = groups.iter().map(|g| g.ids.len()).sum();
    if total != nl {
        return Err(format!(
            "the PyTorch state has {total} parameters, the optimizer has {nl} layers"
        ));
    }
    Ok(())
}

/// The tensors `state.{id}.{exp_avg, exp_avg_sq, step}`, in name order: each layer's
/// moments, and the step counters they hold. Refuses any other tensor.
fn state_tensors<'a>(
    lamb: &Lamb,
    f: &Parsed<'a>,
    layer_of: &HashMap<usize, usize>,
) -> Result<(FoundMoments<'a>, Steps), Refusal> {
    let mut moments: FoundMoments<'a> = vec![[None, None]; lamb.layer_count()];
    let mut steps: Steps = Vec::new();
    let mut names: Vec<&String> = f.tensors.keys().collect();
    names.sort();
    for name in names {
        let t = &f.tensors[name];
        let parsed = name
            .strip_prefix("state.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(id, key)| {
                // Canonical indices only ("01" would alias "1").
                let n = id.parse::<usize>().ok()?;
                (n.to_string() == id).then_some((n, key))
            });
        let Some((id, key)) = parsed else {
            return Err(format!(
                "unexpected tensor '{name}' (a PyTorch state has only state.{{index}}.{{key}})"
            ));
        };
        let Some(&layer) = layer_of.get(&id) else {
            return Err(format!(
                "tensor '{name}': parameter index {id} is in no param_groups entry"
            ));
        };
        let lname = lamb.layer_at(LayerId(layer)).name;
        match key {
            "exp_avg" | "exp_avg_sq" => {
                let data = moment(t, name, lname, lamb.layer_at(LayerId(layer)).len)?;
                moments[layer][usize::from(key == "exp_avg_sq")] = Some(data);
            }
            "step" => steps.push((step_value(t, name)?, format!("tensor '{name}'"))),
            other => {
                return Err(format!(
                    "tensor '{name}': state '{other}' of parameter {id} ('{lname}') is not one \
                     lamb keeps (exp_avg, exp_avg_sq, step)"
                ));
            }
        }
    }
    Ok((moments, steps))
}

/// Each layer's m and v, checked, or `None` for a layer with neither; refuses a layer with
/// only one of them.
fn paired_moments<'a>(
    lamb: &Lamb,
    found: &FoundMoments<'a>,
) -> Result<Vec<LayerMoments<'a>>, Refusal> {
    let mut out = Vec::with_capacity(found.len());
    for (layer, mv) in found.iter().enumerate() {
        let lname = lamb.layer_at(LayerId(layer)).name;
        out.push(match *mv {
            [Some(m), Some(v)] => {
                check_moment(lname, "exp_avg", m)?;
                check_moment(lname, "exp_avg_sq", v)?;
                Some((m, v))
            }
            [None, None] => None,
            [m, _] => {
                let (has, lacks) = if m.is_some() {
                    ("exp_avg", "exp_avg_sq")
                } else {
                    ("exp_avg_sq", "exp_avg")
                };
                return Err(format!(
                    "layer '{lname}': the PyTorch state has {has} but no {lacks}"
                ));
            }
        });
    }
    Ok(out)
}

/// The step counters of the groups (timm keeps one per group), with where they are.
fn group_steps(groups: &[TorchGroup<'_>]) -> Result<Steps, Refusal> {
    let mut steps = Steps::new();
    for (g, grp) in groups.iter().enumerate() {
        match grp.raw.get("step") {
            None | Some(Value::Null) => {}
            Some(v) => {
                let x = v.as_f64().ok_or_else(|| {
                    format!("param_groups[{g}]: 'step' is {v}, expected a number")
                })?;
                steps.push((x, format!("param_groups[{g}].step")));
            }
        }
    }
    Ok(steps)
}

/// The one step counter lamb keeps: the counters found (per parameter as in Adam, or per
/// group as in timm) must agree and be a whole number in [0, 2^53]; none at all is step 0,
/// unless there are moments.
fn step_counter(steps: &[(f64, String)], has_moments: bool) -> Result<u64, Refusal> {
    match steps.split_first() {
        None if has_moments => {
            Err("no step counter: neither param_groups[*].step nor state.*.step tensors".into())
        }
        None => Ok(0),
        Some(((x, src), rest)) => {
            if let Some((y, other)) = rest.iter().find(|(y, _)| y != x) {
                return Err(format!(
                    "{src} is {x} but {other} is {y}: lamb keeps one step counter for all layers"
                ));
            }
            if !(x.is_finite() && *x >= 0.0 && x.fract() == 0.0 && *x <= MAX_EXACT_STEP) {
                return Err(format!(
                    "{src} is {x}: a step counter must be a whole number in [0, 2^53]"
                ));
            }
            Ok(*x as u64)
        }
    }
}

/// Each lamb group's configuration (timm's hyperparameters over the group's own) and
/// `lr_scale`, and the clipping threshold, all checked.
fn hyperparameters(
    lamb: &Lamb,
    groups: &[TorchGroup<'_>],
    lamb_group_of: &[Option<usize>],
) -> Result<(GroupConfigs, Option<f64>), Refusal> {
    let mut configs: GroupConfigs = (0..lamb.group_count())
        .map(|g| lamb.group(GroupId(g)).map(|grp| (grp.config, grp.lr_scale)))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let mut max_grad_norm = lamb.max_grad_norm();
    let mut mgn_seen: Option<(Option<f64>, usize)> = None;
    for (g, grp) in groups.iter().enumerate() {
        if let Some(lg) = lamb_group_of[g] {
            let name = &lamb.group(GroupId(lg)).map_err(|e| e.to_string())?.name;
            let config = timm_config(g, grp.raw, configs[lg].0)?;
            check_group(name, &config, configs[lg].1)
                .map_err(|e| format!("param_groups[{g}] → {e}"))?;
            configs[lg].0 = config;
        }
        if let Some(v) = grp.raw.get("max_grad_norm") {
            let x = match v {
                Value::Null => None,
                v => Some(v.as_f64().ok_or_else(|| {
                    format!("param_groups[{g}]: 'max_grad_norm' is {v}, expected a number or null")
                })?),
            };
            match mgn_seen {
                Some((y, h)) if y != x => {
                    return Err(format!(
                        "param_groups[{h}] and [{g}] disagree on max_grad_norm ({y:?}, {x:?}); \
                         lamb clips the whole model with one"
                    ));
                }
                _ => mgn_seen = Some((x, g)),
            }
            max_grad_norm = x;
        }
    }
    check_max_grad_norm(max_grad_norm)?;
    Ok((configs, max_grad_norm))
}

/// The moments must be able to take the next step under the loaded configuration.
fn check_next_step(
    lamb: &Lamb,
    step: u64,
    configs: &[(LambConfig, f64)],
    moments: &[LayerMoments<'_>],
) -> Result<(), Refusal> {
    if let Ok(t) = crate::domain::next_step(step) {
        for (layer, mv) in moments.iter().enumerate() {
            let l = lamb.layer_at(LayerId(layer));
            if let (Some((m, v)), Some(rule)) = (mv, NextStep::new(&configs[l.group.0].0, t)) {
                rule.check_m(f32s(m))
                    .and_then(|()| rule.check_v(f32s(v)))
                    .map_err(|e| format!("layer '{}': {e}", l.name))?;
            }
        }
    }
    Ok(())
}

fn torch_groups(pg: &[Map<String, Value>]) -> Result<Vec<TorchGroup<'_>>, Refusal> {
    let mut out = Vec::with_capacity(pg.len());
    for (g, raw) in pg.iter().enumerate() {
        let bad = |what: &str| format!("param_groups[{g}]: {what}");
        let ids = raw
            .get("params")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no 'params' list"))?
            .iter()
            .map(|v| v.as_u64().and_then(|x| usize::try_from(x).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad("'params' must be a list of parameter indices"))?;
        let names = match raw.get("param_names") {
            None => None,
            Some(v) => Some(
                v.as_array()
                    .and_then(|a| a.iter().map(Value::as_str).collect::<Option<Vec<&str>>>())
                    .filter(|n| n.len() == ids.len())
                    .ok_or_else(|| {
                        bad("'param_names' must be a list of names, one per 'params'")
                    })?,
            ),
        };
        out.push(TorchGroup { ids, names, raw });
    }
    if out.iter().any(|g| g.names.is_some()) && out.iter().any(|g| g.names.is_none()) {
        return Err("some param_groups have 'param_names' and others not".into());
    }
    Ok(out)
}

/// PyTorch parameter index → lamb layer, and torch group → lamb group (`None` for an empty
/// torch group matched by name).
type Mapping = (HashMap<usize, usize>, Vec<Option<usize>>);

fn map_params(lamb: &Lamb, groups: &[TorchGroup<'_>]) -> Result<Mapping, Refusal> {
    let by_name = groups.first().is_some_and(|g| g.names.is_some());
    let mut layer_of = HashMap::new();
    let mut torch_of_layer: Vec<Option<usize>> = vec![None; lamb.layer_count()];
    let mut lamb_group_of = Vec::with_capacity(groups.len());
    let lamb_groups: Vec<Vec<usize>> = (0..lamb.group_count())
        .map(|g| {
            (0..lamb.layer_count())
                .filter(|&i| lamb.layer_at(LayerId(i)).group.0 == g)
                .collect()
        })
        .collect();
    if !by_name && groups.len() != lamb.group_count() {
        return Err(format!(
            "the PyTorch state has {} param_groups, the optimizer has {} groups (without \
             param_names, groups are matched by position)",
            groups.len(),
            lamb.group_count()
        ));
    }
    for (g, grp) in groups.iter().enumerate() {
        let layers = match &grp.names {
            Some(names) => layers_by_name(lamb, names, &grp.ids)?,
            None => layers_by_position(lamb, g, grp, &lamb_groups[g])?,
        };
        for (&id, &layer) in grp.ids.iter().zip(&layers) {
            if layer_of.insert(id, layer).is_some() {
                return Err(format!(
                    "parameter index {id} appears twice in param_groups"
                ));
            }
            if let Some(other) = torch_of_layer[layer].replace(id) {
                return Err(format!(
                    "PyTorch parameters {other} and {id} both map to layer '{}'",
                    lamb.layer_at(LayerId(layer)).name
                ));
            }
        }
        let lg = lamb_group_of_layers(lamb, g, &layers, by_name)?;
        if let Some(lg) = lg
            && let Some(h) = lamb_group_of.iter().position(|&x| x == Some(lg))
        {
            return Err(format!(
                "param_groups[{h}] and [{g}] both map to lamb group '{}'",
                group_name(lamb, lg)
            ));
        }
        lamb_group_of.push(lg);
    }
    Ok((layer_of, lamb_group_of))
}

/// The layers of a torch group that names its parameters: each name must be a layer.
fn layers_by_name(lamb: &Lamb, names: &[&str], ids: &[usize]) -> Result<Vec<usize>, Refusal> {
    names
        .iter()
        .zip(ids)
        .map(|(name, id)| {
            lamb.layer_id(name).map(|l| l.0).ok_or_else(|| {
                format!("PyTorch parameter '{name}' (index {id}) is not a layer of this optimizer")
            })
        })
        .collect()
}

/// The layers of torch group `g` without names: lamb group `g`'s layers (`ours`), which
/// must be as many.
fn layers_by_position(
    lamb: &Lamb,
    g: usize,
    grp: &TorchGroup<'_>,
    ours: &[usize],
) -> Result<Vec<usize>, Refusal> {
    if ours.len() != grp.ids.len() {
        return Err(format!(
            "param_groups[{g}] has {} parameters, lamb group '{}' has {} layers",
            grp.ids.len(),
            group_name(lamb, g),
            ours.len()
        ));
    }
    Ok(ours.to_vec())
}

/// The one lamb group that the layers of torch group `g` belong to (`None`: no layers,
/// matched by name; by position it is group `g`). Refuses layers of two lamb groups.
fn lamb_group_of_layers(
    lamb: &Lamb,
    g: usize,
    layers: &[usize],
    by_name: bool,
) -> Result<Option<usize>, Refusal> {
    let mut lgs = layers.iter().map(|&l| lamb.layer_at(LayerId(l)).group.0);
    match lgs.next() {
        None if by_name => Ok(None),
        None => Ok(Some(g)),
        Some(first) => match lgs.find(|&x| x != first) {
            Some(other) => Err(format!(
                "param_groups[{g}] holds layers of lamb groups '{}' and '{}'",
                group_name(lamb, first),
                group_name(lamb, other)
            )),
            None => Ok(Some(first)),
        },
    }
}

/// Lamb group `g`'s name, for messages (empty if there is no such group).
fn group_name(lamb: &Lamb, g: usize) -> String {
    lamb.group(GroupId(g))
        .map(|g| g.name.clone())
        .unwrap_or_default()
}

/// An f32 moment tensor of any shape with `len` elements.
fn moment<'a>(t: &Tensor<'a>, name: &str, layer: &str, len: usize) -> Result<&'a [u8], Refusal> {
    if t.dtype != Dtype::F32 {
        return Err(format!(
            "tensor '{name}' (layer '{layer}'): dtype {:?}; lamb reads f32 moments",
            t.dtype
        ));
    }
    let numel = t.shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
    if numel != Some(len) {
        return Err(format!(
            "layer '{layer}': checkpoint has {} elements, model has {len} (tensor '{name}', \
             shape {:?})",
            numel.map_or_else(|| "too many".to_string(), |n| n.to_string()),
            t.shape
        ));
    }
    Ok(t.data)
}

/// A 0-d or 1-element step tensor's value.
fn step_value(t: &Tensor<'_>, name: &str) -> Result<f64, Refusal> {
    if !(t.shape.is_empty() || t.shape == [1]) {
        return Err(format!(
            "tensor '{name}': shape {:?}, a step is 0-d or [1]",
            t.shape
        ));
    }
    let d = t.data;
    let x = match t.dtype {
        Dtype::F32 => d.first_chunk::<4>().map(|b| f32::from_le_bytes(*b) as f64),
        Dtype::F64 => d.first_chunk::<8>().map(|b| f64::from_le_bytes(*b)),
        Dtype::I64 => d.first_chunk::<8>().map(|b| i64::from_le_bytes(*b) as f64),
        Dtype::I32 => d.first_chunk::<4>().map(|b| i32::from_le_bytes(*b) as f64),
        other => {
            return Err(format!(
                "tensor '{name}': dtype {other:?}, a step is F32, F64, I64 or I32"
            ));
        }
    };
    x.ok_or_else(|| format!("tensor '{name}': no data"))
}

/// timm `Lamb` hyperparameters of one `param_groups` entry over `base`.
fn timm_config(
    g: usize,
    raw: &Map<String, Value>,
    base: LambConfig,
) -> Result<LambConfig, Refusal> {
    let bad = |key: &str, v: &Value, want: &str| {
        format!("param_groups[{g}]: '{key}' is {v}, expected {want}")
    };
    let num = |key: &str| -> Result<Option<f64>, Refusal> {
        match raw.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| bad(key, v, "a number")),
        }
    };
    let flag = |key: &str| -> Result<Option<bool>, Refusal> {
        match raw.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| bad(key, v, "true or false")),
        }
    };
    for key in ["caution", "amsgrad", "maximize"] {
        if flag(key)? == Some(true) {
            return Err(format!(
                "param_groups[{g}]: '{key}' is on; lamb cannot continue such a state"
            ));
        }
    }
    let mut c = base;
    if let Some(lr) = num("initial_lr")?.or(num("lr")?) {
        c.lr = lr;
    }
    if let Some(v) = raw.get("betas") {
        let b = v
            .as_array()
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_f64()?, a[1].as_f64()?)))
            .ok_or_else(|| bad("betas", v, "[beta1, beta2]"))?;
        (c.beta1, c.beta2) = b;
    }
    if let Some(x) = num("eps")? {
        c.eps = x;
    }
    if let Some(x) = num("weight_decay")? {
        c.weight_decay = x;
    }
    if flag("decoupled_decay")? == Some(true) && c.weight_decay != 0.0 {
        return Err(format!(
            "param_groups[{g}]: 'decoupled_decay' with weight decay {}: lamb adds the decay to \
             the update (timm's default), it cannot continue this state",
            c.weight_decay
        ));
    }
    if let Some(b) = flag("bias_correction")? {
        c.bias_correction = if b {
            BiasCorrection::F64
        } else {
            BiasCorrection::Off
        };
    }
    if let Some(b) = flag("grad_averaging")? {
        c.grad_averaging = b;
    }
    if let Some(b) = flag("trust_clip")? {
        c.ratio_max = if b { 1.0 } else { f64::INFINITY };
    }
    if let Some(b) = flag("always_adapt")? {
        c.adaptation = if b {
            Adaptation::Always
        } else {
            Adaptation::WhenDecayed
        };
    }
    Ok(c)
}
