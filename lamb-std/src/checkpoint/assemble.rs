//! [`Lamb::set_state`]: installs a state assembled elsewhere (for instance gathered from
//! the shards of a distributed optimizer), so that [`Lamb::save`] writes it as the one
//! checkpoint file a single process would have written.

use crate::error::Error;
use crate::optimizer::{GroupId, Lamb, LayerId, Snapshot, StateBytes, StateView};

impl Lamb {
    /// Replaces the step counter and every layer's moments and master copy with
    /// `layers[i]` = (moments, master copy) of layer `i`, as a checkpoint load would; the
    /// groups, clipping and schedule stay. For state assembled outside this optimizer,
    /// such as lamb-mpi's shards gathered on one rank, so that [`Lamb::save`] writes the
    /// file a single process writes.
    ///
    /// Checked first, and then either everything is replaced or nothing: the layer count;
    /// each layer's moment format (that of its group's [`Precision`](crate::Precision) for
    /// its length) and lengths (8-bit scales: one per 256 elements); master copies of the
    /// layer's length; every moment finite, v and the 8-bit scales ≥ 0; `step` at most
    /// [`MAX_STEP`](crate::MAX_STEP). What a checkpoint load checks beyond this (the
    /// moments' step domain, 8-bit code ranges) is checked when the saved file is loaded.
    ///
    /// ```
    /// use lamb_std::{Lamb, StateView, lamb_core::LambConfig};
    /// let mut opt = Lamb::new(LambConfig::paper())?;
    /// opt.add_layer("w", 3)?;
    /// let (m, v) = ([0.1f32, 0.2, 0.3], [0.01f32, 0.04, 0.09]);
    /// opt.set_state(7, &[(StateView::F32 { m: &m, v: &v }, None)])?;
    /// assert_eq!(opt.steps(), 7);
    /// let bad = [f32::NAN, 0.0, 0.0];
    /// assert!(opt.set_state(8, &[(StateView::F32 { m: &bad, v: &v }, None)]).is_err());
    /// assert_eq!(opt.steps(), 7);
    /// # Ok::<(), lamb_std::Error>(())
    /// ```
    pub fn set_state(
        &mut self,
        step: u64,
        layers: &[(StateView<'_>, Option<&[f32]>)],
    ) -> Result<(), Error> {
        let refuse = |what: String| Error::Checkpoint { path: None, what };
        if layers.len() != self.layer_count() {
            return Err(refuse(format!(
                "set_state: {} layer states for {} layers",
                layers.len(),
                self.layer_count()
            )));
        }
        if step > crate::MAX_STEP {
            return Err(refuse(format!(
                "set_state: step {step} is beyond {}",
                crate::MAX_STEP
            )));
        }
        let mut bytes = Vec::with_capacity(layers.len());
        for (i, (state, master)) in layers.iter().enumerate() {
            let layer = self.layer_at(LayerId(i));
            let fail =
                |what: String| refuse(format!("set_state: layer {i} '{}': {what}", layer.name));
            check_state(layer.len, layer.state, state).map_err(fail)?;
            if let Some(master) = master {
                if master.len() != layer.len {
                    return Err(fail(format!(
                        "master copy has {} elements, the layer {}",
                        master.len(),
                        layer.len
                    )));
                }
                if let Some(x) = master.iter().position(|x| !x.is_finite()) {
                    return Err(fail(format!("master copy element {x} is not finite")));
                }
            }
            bytes.push((le_bytes(state), master));
        }
        // Everything checked: allocate, then replace (which cannot fail).
        let mut states = Vec::with_capacity(layers.len());
        for (i, (b, master)) in bytes.iter().enumerate() {
            let master = match master {
                None => None,
                Some(x) => {
                    let mut buf = crate::buffer::AlignedBuf::try_zeroed(x.len()).map_err(|e| {
                        Error::OutOfMemory {
                            name: self.layer_at(LayerId(i)).name.to_string(),
                            what: "master copy",
                            bytes: e.bytes().unwrap_or(usize::MAX),
                        }
                    })?;
                    buf.copy_from_slice(x);
                    Some(buf)
                }
            };
            let moments = StateBytes {
                m: &b[0],
                v: &b[1],
                m_absmax: &b[2],
                v_absmax: &b[3],
            };
            states.push((Some(moments), master));
        }
        let groups = (0..self.group_count())
            .filter_map(|g| self.group(GroupId(g)).ok())
            .map(|g| (g.config, g.lr_scale))
            .collect();
        self.restore(Snapshot {
            step,
            groups,
            max_grad_norm: self.max_grad_norm(),
            schedule: None,
            layers: states,
        });
        Ok(())
    }
}

/// Checks `given` against the layer's own state `held` (format, lengths) and its values.
fn check_state(len: usize, held: StateView<'_>, given: &StateView<'_>) -> Result<(), String> {
    if held.format() != given.format() {
        return Err(format!(
            "moments are {:?}, the layer keeps {:?}",
            given.format(),
            held.format()
        ));
    }
    let scales = len.div_ceil(lamb_core::codec::QBLOCK);
    let (m, v, sm, sv) = match *given {
        StateView::F32 { m, v } => (m.len(), v.len(), scales, scales),
        StateView::Bf16 { m, v } => (m.len(), v.len(), scales, scales),
        StateView::Q8 {
            m,
            v,
            m_absmax,
            v_absmax,
        } => (m.len(), v.len(), m_absmax.len(), v_absmax.len()),
    };
    if (m, v, sm, sv) != (len, len, scales, scales) {
        return Err(format!(
            "moments of {m} and {v} elements ({sm} and {sv} scales), the layer has {len} ({scales})"
        ));
    }
    let bad = |name: &str, k: usize| Err(format!("{name} element {k} is not finite (or < 0)"));
    let finite = |x: f32| x.is_finite();
    let nonneg = |x: f32| x.is_finite() && x >= 0.0;
    match *given {
        StateView::F32 { m, v } => {
            if let Some(k) = m.iter().position(|&x| !finite(x)) {
                return bad("m", k);
            }
            if let Some(k) = v.iter().position(|&x| !nonneg(x)) {
                return bad("v", k);
            }
        }
        StateView::Bf16 { m, v } => {
            if let Some(k) = m.iter().position(|x| !finite(x.to_f32())) {
                return bad("m", k);
            }
            if let Some(k) = v.iter().position(|x| !nonneg(x.to_f32())) {
                return bad("v", k);
            }
        }
        StateView::Q8 {
            m_absmax, v_absmax, ..
        } => {
            if let Some(k) = m_absmax.iter().position(|&x| !nonneg(x)) {
                return bad("m's scale", k);
            }
            if let Some(k) = v_absmax.iter().position(|&x| !nonneg(x)) {
                return bad("v's scale", k);
            }
        }
    }
    Ok(())
}

/// The moments as little-endian bytes: m, v and (8-bit moments only) their scales.
fn le_bytes(state: &StateView<'_>) -> [Vec<u8>; 4] {
    fn f32s(x: &[f32]) -> Vec<u8> {
        x.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
    match *state {
        StateView::F32 { m, v } => [f32s(m), f32s(v), Vec::new(), Vec::new()],
        StateView::Bf16 { m, v } => {
            let b = |x: &[lamb_core::half::bf16]| x.iter().flat_map(|x| x.to_le_bytes()).collect();
            [b(m), b(v), Vec::new(), Vec::new()]
        }
        StateView::Q8 {
            m,
            v,
            m_absmax,
            v_absmax,
        } => [m.to_vec(), v.to_vec(), f32s(m_absmax), f32s(v_absmax)],
    }
}

#[cfg(test)]
mod tests {
    use lamb_core::LambConfig;

    use crate::{Error, GroupId, Lamb, LayerId, Precision, StateFormat, StateView};

    /// Two layers, 8-bit moments for the long one, after two steps.
    fn stepped() -> Lamb {
        let mut opt = Lamb::new(LambConfig::paper()).unwrap();
        let q8 = Precision {
            moments: StateFormat::Q8,
            ..Precision::default()
        };
        opt.set_precision(GroupId(0), q8).unwrap();
        opt.add_layer("a", 5000).unwrap();
        opt.add_layer("b", 10).unwrap();
        let mut p = [vec![0.5f32; 5000], vec![0.1f32; 10]];
        for _ in 0..2 {
            let mut ps: Vec<&mut [f32]> = p.iter_mut().map(|x| x.as_mut_slice()).collect();
            let _ = opt.step(&mut ps, &[&[0.01; 5000], &[-0.02; 10]]).unwrap();
        }
        opt
    }

    /// The state of one optimizer installed in a fresh one saves as the same file.
    #[test]
    fn installed_state_saves_as_the_original() {
        let original = stepped();
        let mut copy = stepped();
        copy.reset();
        let views: Vec<(StateView<'_>, Option<&[f32]>)> = (0..2)
            .map(|i| {
                let l = original.layer(LayerId(i)).unwrap();
                (l.state, l.master)
            })
            .collect();
        copy.set_state(original.steps(), &views).unwrap();
        let (a, b) = (
            original.to_checkpoint_bytes().unwrap(),
            copy.to_checkpoint_bytes().unwrap(),
        );
        let mut reloaded = stepped();
        reloaded.load_checkpoint_bytes(&b).unwrap();
        assert_eq!(reloaded.steps(), 2);
        for i in 0..2 {
            let (x, y) = (
                original.layer(LayerId(i)).unwrap(),
                reloaded.layer(LayerId(i)).unwrap(),
            );
            assert_eq!(
                format!("{:?}", x.state),
                format!("{:?}", y.state),
                "layer {i}"
            );
        }
        assert_eq!(a.len(), b.len());
    }

    /// A state of the wrong format or length, or non-finite, is refused and nothing changes.
    #[test]
    fn bad_states_are_refused_whole() {
        let mut opt = stepped();
        let reference = stepped();
        let (m, v) = (vec![0.0f32; 5000], vec![0.0f32; 5000]);
        let (m10, v10) = (vec![0.0f32; 10], vec![f32::NAN; 10]);
        let q = {
            let l = opt.layer(LayerId(0)).unwrap();
            l.state
        };
        let q = match q {
            StateView::Q8 {
                m,
                v,
                m_absmax,
                v_absmax,
            } => (m.to_vec(), v.to_vec(), m_absmax.to_vec(), v_absmax.to_vec()),
            _ => panic!("8-bit moments"),
        };
        let q8 = StateView::Q8 {
            m: &q.0,
            v: &q.1,
            m_absmax: &q.2,
            v_absmax: &q.3,
        };
        let f32_a = StateView::F32 { m: &m, v: &v };
        let nan_b = StateView::F32 { m: &m10, v: &v10 };
        for (layers, what) in [
            (vec![(f32_a, None), (nan_b, None)], "moments are F32"),
            (vec![(q8, None), (nan_b, None)], "v element 0 is not finite"),
            (vec![(q8, None)], "1 layer states for 2 layers"),
            (
                vec![(q8, Some(&m10[..])), (nan_b, None)],
                "master copy has 10 elements",
            ),
        ] {
            let e = opt.set_state(9, &layers).unwrap_err();
            assert!(
                matches!(&e, Error::Checkpoint { what: w, .. } if w.contains(what)),
                "{e}"
            );
            assert_eq!(opt.steps(), 2);
        }
        for i in 0..2 {
            let (x, y) = (
                reference.layer(LayerId(i)).unwrap(),
                opt.layer(LayerId(i)).unwrap(),
            );
            assert_eq!(
                format!("{:?}", x.state),
                format!("{:?}", y.state),
                "layer {i}"
            );
        }
    }
}
