//! What the checkpoint tests share: a full snapshot of an optimizer's state, a load that
//! must be refused with nothing changed, a step to give an optimizer state, and re-signing
//! edited bytes. Included by `checkpoint.rs` and `checkpoint_layout.rs` (each with
//! `#[path]`), not by every test that uses `common`.

use lamb_std::lamb_core::half::bf16;
use lamb_std::{Error, GroupId, Lamb, LayerId, StateView};

/// Every bit of optimizer state: step, settings, every group, every layer's stored moments
/// (whatever their format) and master copy.
pub fn snapshot(opt: &Lamb) -> Vec<String> {
    let mut out = vec![
        format!("step {}", opt.steps()),
        format!("clip {:?}", opt.max_grad_norm().map(f64::to_bits)),
        format!("schedule {:?}", opt.schedule()),
    ];
    for g in 0..opt.group_count() {
        out.push(format!("group {:?}", opt.group(GroupId(g)).unwrap()));
    }
    for i in 0..opt.layer_count() {
        let l = opt.layer(LayerId(i)).unwrap();
        let f = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let b = |x: &[bf16]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        out.push(format!("layer {} {} {:?}", l.name, l.len, l.group));
        out.push(match l.state {
            StateView::F32 { m, v } => format!("f32 {:?} {:?}", f(m), f(v)),
            StateView::Bf16 { m, v } => format!("bf16 {:?} {:?}", b(m), b(v)),
            StateView::Q8 {
                m,
                v,
                m_absmax,
                v_absmax,
            } => format!("q8 {m:?} {v:?} {:?} {:?}", f(m_absmax), f(v_absmax)),
        });
        out.push(format!("master {:?}", l.master.map(f)));
    }
    out
}

/// Loads `bytes` into `opt`, expects an error containing `want`, and checks that nothing
/// changed.
pub fn refused(opt: &mut Lamb, bytes: &[u8], want: &str) {
    let before = snapshot(opt);
    let e = opt.load_checkpoint_bytes(bytes).unwrap_err();
    assert!(matches!(e, Error::Checkpoint { .. }), "{e:?}");
    assert!(e.to_string().contains(want), "expected {want:?} in: {e}");
    assert!(
        snapshot(opt) == before,
        "a refused load changed the optimizer"
    );
}

pub fn stepped(opt: &mut Lamb) {
    let mut p: Vec<Vec<f32>> = (0..opt.layer_count())
        .map(|i| vec![0.5; opt.layer(LayerId(i)).unwrap().len])
        .collect();
    let g: Vec<Vec<f32>> = p.iter().map(|x| vec![0.01; x.len()]).collect();
    let mut pp: Vec<&mut [f32]> = p.iter_mut().map(|x| x.as_mut_slice()).collect();
    let gg: Vec<&[f32]> = g.iter().map(|x| x.as_slice()).collect();
    let _ = opt.step(&mut pp, &gg).unwrap();
}

/// Rewrites the `lamb.meta` JSON of a checkpoint and re-signs it (a well-formed file from a
/// "different writer"), to reach the checks behind the checksum.
pub fn resign(bytes: &[u8], edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let (_, md) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
    let mut metadata = md.metadata().clone().unwrap();
    let mut meta: serde_json::Value = serde_json::from_str(&metadata["lamb.meta"]).unwrap();
    edit(&mut meta);
    metadata.insert("lamb.meta".into(), meta.to_string());
    metadata.insert("lamb.checksum".into(), "xxh64:0000000000000000".into());
    let tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
    crate::common::sign(safetensors::serialize(tensors, Some(metadata)).unwrap())
}
