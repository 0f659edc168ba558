//! Regression tests from fuzzing (`fuzz/`): each reproduces a finding with its
//! minimal input. See fuzz/README.md for the targets and how to turn a crash artifact into
//! a test here.

use lamb_std::lamb_core::LambConfig;
use lamb_std::lamb_core::half::bf16;
use lamb_std::lamb_core::layer::Grads;
use lamb_std::{Lamb, LayerId, ParamsIn};

fn bf(xs: &[f32]) -> Vec<bf16> {
    xs.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// `make_masters` creates a layer's f32 master copy from the model's bf16 parameters at
/// the start of `step_mixed`, before the step can still be refused. A refused step thus
/// leaves state behind: here the first step is skipped because a parameter is NaN, the
/// user repairs the parameter, and every later step is still skipped, because the optimizer
/// now steps its NaN master copy instead of the model (until `reset()`).
#[test]
fn a_skipped_first_step_does_not_pin_a_nan_master_copy() {
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    opt.add_layer("w", 4).unwrap();
    let mut w = bf(&[f32::NAN, 0.5, 0.5, 0.5]);
    let g = bf(&[0.01; 4]);
    let r = opt
        .step_mixed(&mut [ParamsIn::Bf16(&mut w)], &[Grads::Bf16(&g)])
        .unwrap();
    assert!(!r.applied);
    w[0] = bf16::from_f32(0.5); // the user repairs the parameter
    let r = opt
        .step_mixed(&mut [ParamsIn::Bf16(&mut w)], &[Grads::Bf16(&g)])
        .unwrap();
    assert!(
        r.applied,
        "still skipped after the parameter was repaired: {r:?}; master = {:?}",
        opt.layer(LayerId(0)).unwrap().master
    );
}

/// Same root cause, silent: the first step is skipped (a gradient overflow, as happens at
/// the start of loss-scaled training), the model's weights are then replaced (say, loaded),
/// and the next step writes back values derived from the *old* weights held in the master
/// copy made by the refused step: the new weights are lost.
#[test]
fn a_skipped_first_step_does_not_revert_later_weights() {
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    opt.add_layer("w", 2).unwrap();
    let mut w = bf(&[0.5, 0.5]);
    let overflow = bf(&[f32::INFINITY, 0.0]);
    let r = opt
        .step_mixed(&mut [ParamsIn::Bf16(&mut w)], &[Grads::Bf16(&overflow)])
        .unwrap();
    assert!(!r.applied);
    let mut w = bf(&[-3.0, -3.0]); // new weights
    let g = bf(&[0.01, 0.01]);
    let r = opt
        .step_mixed(&mut [ParamsIn::Bf16(&mut w)], &[Grads::Bf16(&g)])
        .unwrap();
    assert!(r.applied);
    for x in &w {
        assert!(
            (x.to_f32() + 3.0).abs() < 0.1,
            "the step reverted the weights to the ones seen by a refused step: {w:?}"
        );
    }
}

/// `add_param` multiplies the shape with `Iterator::product`, which panics on overflow in
/// debug builds ("attempt to multiply with overflow") and wraps in release builds, where
/// `[2^33, 2^33]` registers a layer of 0 elements. It must be an `Err`.
#[test]
fn add_param_with_an_overflowing_shape_is_an_error() {
    let r = std::panic::catch_unwind(|| {
        let mut opt = Lamb::new(LambConfig::paper()).unwrap();
        opt.add_param("x", &[1 << 33, 1 << 33])
            .map(|id| opt.layer(id).unwrap().len)
    });
    match r {
        Ok(Err(_)) => {}
        Ok(Ok(len)) => panic!("registered a layer of {len} elements for shape [2^33, 2^33]"),
        Err(_) => panic!("add_param panicked on shape [2^33, 2^33]"),
    }
}

/// Found by `checkpoint_decode` (in its first minute): a checkpoint whose moments are
/// non-finite is refused, but one whose f32 master copy holds a NaN (or an infinity) loads,
/// and then every step of the model is skipped (the step reads the master copy) until
/// `reset()`. The master copy is optimizer state like the moments; the load must refuse it.
/// Minimal input: a one-layer bf16 model after one step, `state.0.master[0]` set to NaN,
/// checksum recomputed.
#[test]
fn a_checkpoint_with_a_non_finite_master_copy_is_refused() {
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    opt.add_layer("w", 2).unwrap();
    let mut w = bf(&[0.5, 0.5]);
    let g = bf(&[0.01, 0.01]);
    let _ = opt
        .step_mixed(&mut [ParamsIn::Bf16(&mut w)], &[Grads::Bf16(&g)])
        .unwrap();
    assert!(opt.layer(LayerId(0)).unwrap().master.is_some());
    let mut bytes = opt.to_checkpoint_bytes().unwrap();
    set_f32(&mut bytes, "state.0.master", 0, f32::NAN);
    fix_checksum(&mut bytes);

    let mut fresh = Lamb::new(LambConfig::paper()).unwrap();
    fresh.add_layer("w", 2).unwrap();
    let r = fresh.load_checkpoint_bytes(&bytes);
    assert!(
        r.is_err(),
        "loaded a NaN master copy: {:?}",
        fresh.layer(LayerId(0)).unwrap().master
    );
    assert!(fresh.layer(LayerId(0)).unwrap().master.is_none() && fresh.steps() == 0);
}

/// The safetensors header of a checkpoint, as text, and where the tensor data starts.
fn header(bytes: &[u8]) -> (String, usize) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (String::from_utf8(bytes[8..8 + n].to_vec()).unwrap(), 8 + n)
}

/// Sets element `k` of the f32 tensor `name` (found by a text search of the header).
fn set_f32(bytes: &mut [u8], name: &str, k: usize, x: f32) {
    let (h, data) = header(bytes);
    let entry = &h[h
        .find(&format!("\"{name}\""))
        .expect("tensor in the header")..];
    let key = "\"data_offsets\":[";
    let at = entry.find(key).expect("data_offsets") + key.len();
    let start: usize = entry[at..]
        .split(',')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let p = data + start + 4 * k;
    bytes[p..p + 4].copy_from_slice(&x.to_le_bytes());
}

/// Rewrites the `lamb.checksum` digits as the format defines them: XXH64 (seed 0) of the
/// whole file with the 16 digits as ASCII '0'.
fn fix_checksum(bytes: &mut [u8]) {
    let (h, _) = header(bytes);
    let key = "\"lamb.checksum\":\"xxh64:";
    let at = 8 + h.find(key).expect("checksum entry") + key.len();
    bytes[at..at + 16].copy_from_slice(b"0000000000000000");
    let hex = format!("{:016x}", xxh64(bytes));
    bytes[at..at + 16].copy_from_slice(hex.as_bytes());
}

/// XXH64 with seed 0 (the reference algorithm; checked against the xxhash-rust crate).
fn xxh64(data: &[u8]) -> u64 {
    const P1: u64 = 0x9E37_79B1_85EB_CA87;
    const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    const P3: u64 = 0x1656_67B1_9E37_79F9;
    const P4: u64 = 0x85EB_CA77_C2B2_AE63;
    const P5: u64 = 0x27D4_EB2F_1656_67C5;
    let round = |acc: u64, x: u64| {
        acc.wrapping_add(x.wrapping_mul(P2))
            .rotate_left(31)
            .wrapping_mul(P1)
    };
    let merge = |h: u64, v: u64| (h ^ round(0, v)).wrapping_mul(P1).wrapping_add(P4);
    let u64_at = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().unwrap());
    let (len, mut i) = (data.len(), 0);
    let mut h = if len >= 32 {
        let mut v = [P1.wrapping_add(P2), P2, 0, 0u64.wrapping_sub(P1)];
        while i + 32 <= len {
            for (k, acc) in v.iter_mut().enumerate() {
                *acc = round(*acc, u64_at(i + 8 * k));
            }
            i += 32;
        }
        let h = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        v.iter().fold(h, |h, &x| merge(h, x))
    } else {
        P5
    };
    h = h.wrapping_add(len as u64);
    while i + 8 <= len {
        h = (h ^ round(0, u64_at(i)))
            .rotate_left(27)
            .wrapping_mul(P1)
            .wrapping_add(P4);
        i += 8;
    }
    if i + 4 <= len {
        let x = u32::from_le_bytes(data[i..i + 4].try_into().unwrap()) as u64;
        h = (h ^ x.wrapping_mul(P1))
            .rotate_left(23)
            .wrapping_mul(P2)
            .wrapping_add(P3);
        i += 4;
    }
    for &b in &data[i..] {
        h = (h ^ (b as u64).wrapping_mul(P5))
            .rotate_left(11)
            .wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

/// `add_layer` with a length whose f32 buffers cannot exist is an error, not an allocator
/// panic (fuzz/README.md, Findings 4).
#[test]
fn add_layer_with_an_impossible_length_is_an_error() {
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    for len in [usize::MAX, usize::MAX / 4, (isize::MAX as usize) / 2] {
        assert!(opt.add_layer(format!("x{len}"), len).is_err(), "{len}");
    }
    assert_eq!(opt.layer_count(), 0);
}
