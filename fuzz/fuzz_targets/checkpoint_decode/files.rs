//! Safetensors files as a JSON header and data: splitting, joining and editing them, and
//! writing a PyTorch optimizer state.

use super::*;

/// The header (parsed) and the tensor data of a safetensors file.
fn split(bytes: &[u8]) -> Option<(Value, &[u8])> {
    let n = u64::from_le_bytes(*bytes.first_chunk::<8>()?) as usize;
    let header = bytes.get(8..8usize.checked_add(n)?)?;
    Some((serde_json::from_slice(header).ok()?, &bytes[8 + n..]))
}

/// A safetensors file from a header and data (header padded with spaces to 8 bytes).
fn join(header: &Value, data: &[u8]) -> Vec<u8> {
    let mut h = serde_json::to_string(header).expect("JSON values serialise");
    while !h.len().is_multiple_of(8) {
        h.push(' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out
}

/// JSON pointers to every node of `v`, depth first.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    let esc = |k: &str| k.replace('~', "~0").replace('/', "~1");
    match v {
        Value::Object(m) => m
            .iter()
            .for_each(|(k, x)| pointers(x, format!("{at}/{}", esc(k)), out)),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, x)| pointers(x, format!("{at}/{i}"), out)),
        _ => {}
    }
}

fn edit_json(v: &mut Value, e: &JsonEdit) {
    let mut ptrs = Vec::new();
    pointers(v, String::new(), &mut ptrs);
    let ptr = &ptrs[e.pick as usize % ptrs.len()];
    match &e.op {
        JsonOp::Replace(x) => {
            if let Some(node) = v.pointer_mut(ptr) {
                *node = x.get();
            }
        }
        JsonOp::Remove => {
            if let Some((parent, key)) = ptr.rsplit_once('/') {
                let key = key.replace("~1", "/").replace("~0", "~");
                match v.pointer_mut(parent) {
                    Some(Value::Object(m)) => {
                        m.remove(&key);
                    }
                    Some(Value::Array(a)) => {
                        if let Ok(i) = key.parse::<usize>()
                            && i < a.len()
                        {
                            a.remove(i);
                        }
                    }
                    _ => {}
                }
            }
        }
        JsonOp::AddKey(k, x) => {
            let key = STRINGS.get(*k as usize).copied().unwrap_or("x").to_string();
            let target = match v.pointer_mut(ptr) {
                Some(Value::Object(_)) => ptr.clone(),
                _ => ptr
                    .rsplit_once('/')
                    .map_or(String::new(), |(p, _)| p.to_string()),
            };
            if let Some(Value::Object(m)) = v.pointer_mut(&target) {
                m.insert(key, x.get());
            }
        }
    }
}

/// Applies JSON edits to the header (or to the JSON document in metadata key `inner_key`)
/// and rebuilds the file; returns `bytes` unchanged when it is not a parsable file.
pub(crate) fn apply_json_edits(bytes: Vec<u8>, edits: &[JsonEdit], inner_key: &str) -> Vec<u8> {
    if edits.is_empty() {
        return bytes;
    }
    let Some((mut header, data)) = split(&bytes) else {
        return bytes;
    };
    for e in edits {
        if e.inner {
            let doc = header
                .pointer(&format!("/__metadata__/{inner_key}"))
                .and_then(Value::as_str)
                .and_then(|s| serde_json::from_str::<Value>(s).ok());
            if let Some(mut doc) = doc {
                edit_json(&mut doc, e);
                if let Some(slot) = header.pointer_mut(&format!("/__metadata__/{inner_key}")) {
                    *slot = Value::String(doc.to_string());
                }
            }
        } else {
            edit_json(&mut header, e);
        }
    }
    join(&header, data)
}

pub(crate) fn apply_byte_edits(bytes: &mut Vec<u8>, edits: &[ByteEdit]) {
    let header_end = bytes.first_chunk::<8>().map_or(0, |h| {
        (u64::from_le_bytes(*h) as usize)
            .saturating_add(8)
            .min(bytes.len())
    });
    for e in edits {
        let pick = |pos: u32, header: bool, len: usize| -> Option<usize> {
            let end = header_end.min(len);
            let (lo, hi) = if header { (0, end) } else { (end, len) };
            (hi > lo).then(|| lo + pos as usize % (hi - lo))
        };
        match *e {
            ByteEdit::Flip { pos, bit, header } => {
                if let Some(i) = pick(pos, header, bytes.len()) {
                    bytes[i] ^= 1 << (bit % 8);
                }
            }
            ByteEdit::Set { pos, value, header } => {
                if let Some(i) = pick(pos, header, bytes.len()) {
                    bytes[i] = value;
                }
            }
            ByteEdit::Truncate(n) => {
                let len = bytes.len();
                bytes.truncate(len.saturating_sub(1 + n as usize % len.max(1)));
            }
            ByteEdit::Append(n) => bytes.extend(std::iter::repeat_n(0xab, 1 + n as usize % 16)),
        }
    }
}

/// Recomputes the `lamb.checksum` digits as the format defines them (XXH64, seed 0, of the
/// whole file with the 16 digits as ASCII '0'), where the header has a well-formed entry.
pub(crate) fn fix_checksum(bytes: &mut [u8]) {
    let Some(n) = bytes
        .first_chunk::<8>()
        .map(|h| u64::from_le_bytes(*h) as usize)
    else {
        return;
    };
    let Some(header) = bytes.get(8..8usize.saturating_add(n)) else {
        return;
    };
    let Ok(text) = std::str::from_utf8(header) else {
        return;
    };
    let key = "\"lamb.checksum\"";
    let mut hits = text.match_indices(key);
    let (Some((at, _)), None) = (hits.next(), hits.next()) else {
        return;
    };
    let ws = |mut i: usize| {
        while header.get(i).is_some_and(|b| b" \t\r\n".contains(b)) {
            i += 1;
        }
        i
    };
    let mut i = ws(at + key.len());
    if header.get(i) != Some(&b':') {
        return;
    }
    i = ws(i + 1);
    if header.get(i..i + 7) != Some(b"\"xxh64:".as_slice()) || header.get(i + 7 + 16) != Some(&b'"')
    {
        return;
    }
    let at = 8 + i + 7;
    bytes[at..at + 16].copy_from_slice(b"0000000000000000");
    let hex = format!("{:016x}", xxhash_rust::xxh64::xxh64(bytes, 0));
    bytes[at..at + 16].copy_from_slice(hex.as_bytes());
}

/// A tensor of a safetensors file: name, dtype, shape, little-endian bytes.
type Tensor = (String, &'static str, Vec<usize>, Vec<u8>);

/// The `state.{id}.step` tensor, in the dtype and shape `tensor_step % 5` picks (0: none).
fn torch_step_tensor(tensor_step: u8, id: usize, step: u64) -> Option<Tensor> {
    let (dtype, shape, bytes) = match tensor_step % 5 {
        1 => ("F32", vec![], (step as f32).to_le_bytes().to_vec()),
        2 => ("F64", vec![], (step as f64).to_le_bytes().to_vec()),
        3 => ("I64", vec![], (step as i64).to_le_bytes().to_vec()),
        4 => ("I32", vec![1], (step as i32).to_le_bytes().to_vec()),
        _ => return None,
    };
    Some((format!("state.{id}.step"), dtype, shape, bytes))
}

/// The tensors of layer `l` as PyTorch parameter `id`: its moments (zeros unless f32) and
/// maybe its step.
fn torch_layer_tensors(l: &LayerView<'_>, id: usize, step: u64, t: &TorchSpec) -> Vec<Tensor> {
    let shape = if t.two_d && l.len.is_multiple_of(2) && l.len > 0 {
        vec![l.len / 2, 2]
    } else {
        vec![l.len]
    };
    let (m, v) = match l.state {
        StateView::F32 { m, v } => (bytes_of(m), bytes_of(v)),
        _ => (vec![0; 4 * l.len], vec![0; 4 * l.len]),
    };
    let mut tensors = vec![
        (format!("state.{id}.exp_avg"), "F32", shape.clone(), m),
        (format!("state.{id}.exp_avg_sq"), "F32", shape, v),
    ];
    tensors.extend(torch_step_tensor(t.tensor_step, id, step));
    tensors
}

/// A PyTorch param group: its parameters' ids (and names), and the group's settings.
fn torch_group(
    group: &Group,
    ids: &[usize],
    names: &[String],
    model: &Model,
    t: &TorchSpec,
) -> Value {
    let c = group.config;
    let mut m = Map::new();
    m.insert("params".into(), json!(ids));
    if t.names {
        m.insert("param_names".into(), json!(names));
    }
    m.insert("lr".into(), json!(c.lr * group.lr_scale));
    m.insert("betas".into(), json!([c.beta1, c.beta2]));
    m.insert("eps".into(), json!(c.eps));
    m.insert("weight_decay".into(), json!(c.weight_decay));
    m.insert(
        "bias_correction".into(),
        json!(c.bias_correction != BiasCorrection::Off),
    );
    m.insert("grad_averaging".into(), json!(c.grad_averaging));
    m.insert("trust_clip".into(), json!(c.ratio_max == 1.0));
    m.insert(
        "always_adapt".into(),
        json!(c.adaptation == Adaptation::Always),
    );
    m.insert(
        "max_grad_norm".into(),
        json!(model.max_grad_norm.filter(|x| x.is_finite())),
    );
    if let Some(s) = t.group_step {
        m.insert("step".into(), JsonVal::Float(s).get());
    }
    Value::Object(m)
}

/// A PyTorch (timm `Lamb`) optimizer state of `opt` as safetensors.
pub(crate) fn torch_state(opt: &Lamb, model: &Model, t: &TorchSpec) -> Vec<u8> {
    let mut tensors: Vec<Tensor> = Vec::new();
    let mut groups = Vec::new();
    let mut id = 0usize;
    for g in 0..opt.group_count() {
        let group = opt.group(GroupId(g)).expect("group");
        let (mut ids, mut names) = (Vec::new(), Vec::new());
        for i in 0..opt.layer_count() {
            let l = opt.layer(LayerId(i)).unwrap();
            if l.group.0 != g {
                continue;
            }
            ids.push(id);
            names.push(l.name.to_string());
            tensors.extend(torch_layer_tensors(&l, id, opt.steps(), t));
            id += 1;
        }
        groups.push(torch_group(&group, &ids, &names, model, t));
    }
    let mut header = Map::new();
    header.insert(
        "__metadata__".into(),
        json!({ "param_groups": Value::Array(groups).to_string() }),
    );
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let start = data.len();
        data.extend_from_slice(&bytes);
        header.insert(
            name,
            json!({ "dtype": dtype, "shape": shape, "data_offsets": [start, data.len()] }),
        );
    }
    join(&Value::Object(header), &data)
}
