//! Everything observable about a [`lamb_std::Lamb`]'s state, as exact bytes, for "nothing
//! changed" and "same bits" comparisons.

use super::bytes_of;
use lamb_std::{GroupId, Lamb, LayerId, StateView};

/// One layer: name, len, group, f32 m and v, compact state (tag byte + bytes), master
/// copy, last report (canonical bits).
#[derive(Debug, PartialEq, Clone)]
pub struct LayerState {
    pub name: String,
    pub len: usize,
    pub group: usize,
    pub m: Vec<u8>,
    pub v: Vec<u8>,
    pub state: Vec<u8>,
    pub master: Option<Vec<u8>>,
    pub last: Option<[u32; 5]>,
}

/// The optimizer: step counter, groups (Debug of each, which shows every field),
/// clipping, schedule, layers.
#[derive(Debug, PartialEq, Clone)]
pub struct State {
    pub steps: u64,
    pub groups: Vec<String>,
    pub layers: Vec<LayerState>,
}

/// The compact state's bytes after a tag byte (0: f32, 1: bf16, 2: 8-bit).
pub fn state_bytes(s: &StateView<'_>) -> Vec<u8> {
    let parts = match *s {
        StateView::F32 { m, v } => vec![vec![0], bytes_of(m), bytes_of(v)],
        StateView::Bf16 { m, v } => vec![vec![1], bytes_of(m), bytes_of(v)],
        StateView::Q8 {
            m,
            v,
            m_absmax,
            v_absmax,
        } => vec![
            vec![2],
            bytes_of(m),
            bytes_of(v),
            bytes_of(m_absmax),
            bytes_of(v_absmax),
        ],
    };
    parts.concat()
}

/// A snapshot of `opt`.
pub fn snapshot(opt: &Lamb) -> State {
    State {
        steps: opt.steps(),
        groups: (0..opt.group_count())
            .map(|i| format!("{:?}", opt.group(GroupId(i)).expect("listed group")))
            .collect(),
        layers: (0..opt.layer_count())
            .map(|i| {
                let l = opt.layer(LayerId(i)).unwrap();
                LayerState {
                    name: l.name.to_string(),
                    len: l.len,
                    group: l.group.0,
                    m: bytes_of(l.m),
                    v: bytes_of(l.v),
                    state: state_bytes(&l.state),
                    master: l.master.map(bytes_of),
                    last: l.last.map(|r| {
                        [
                            super::canon(r.param_norm),
                            super::canon(r.update_norm),
                            super::canon(r.trust_ratio),
                            super::canon(r.step_size),
                            r.skipped as u32,
                        ]
                    }),
                }
            })
            .collect(),
    }
}
