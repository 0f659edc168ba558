//! State the allocator cannot provide is an `Err` naming the layer and the bytes, never an
//! abort of the process, and the optimizer is left as it was.
#![cfg(target_pointer_width = "64")]

use lamb_std::lamb_core::LambConfig;
use lamb_std::{Error, GroupId, Lamb, LayerId, Precision, StateFormat};

/// Whether the kernel refuses an allocation far beyond its memory. Linux's default
/// heuristic overcommit (`vm.overcommit_memory = 0`) and strict accounting (2) do; with
/// `1` ("always") a 4 TiB mapping succeeds and zeroing it would exhaust the machine.
fn overcommit_refuses_huge_allocations() -> bool {
    match std::fs::read_to_string("/proc/sys/vm/overcommit_memory") {
        Ok(mode) => mode.trim() != "1",
        Err(_) => false,
    }
}

/// Registers a layer that cannot be allocated and checks the refusal, then that the
/// optimizer still registers and steps.
fn refused_then_usable(mut opt: Lamb, group: GroupId, len: usize, min_bytes: usize) {
    opt.add_layer_to(group, "before", 3).unwrap();
    let e = opt.add_layer_to(group, "x", len).unwrap_err();
    match &e {
        Error::OutOfMemory { name, what, bytes } => {
            assert_eq!(name, "x");
            assert_eq!(*what, "moments");
            assert!(*bytes >= min_bytes, "{bytes} < {min_bytes}");
        }
        other => panic!("not OutOfMemory: {other:?}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("layer 'x'") && msg.contains("bytes"), "{msg}");
    assert_eq!(opt.layer_count(), 1);
    assert_eq!(opt.layer_id("x"), None);
    // The name is free, and later layers register and step.
    let id = opt.add_layer_to(group, "x", 5).unwrap();
    assert_eq!(id, LayerId(1));
    let (mut a, mut b) = (vec![0.5f32; 3], vec![0.5f32; 5]);
    let r = opt.step(&mut [&mut a, &mut b], &[&[0.01; 3], &[0.01; 5]]);
    assert!(r.unwrap().applied);
    assert!(b.iter().all(|&x| x < 0.5));
}

/// The report's case: 2^40 elements, 4 TiB of f32 moments each, on a machine with far
/// less memory. Before, the process aborted ("memory allocation of 4398046511104 bytes
/// failed").
#[test]
fn a_layer_too_large_for_the_machine_is_an_error() {
    if !overcommit_refuses_huge_allocations() {
        println!("SKIPPED: vm.overcommit_memory = 1 would let a 4 TiB mapping succeed");
        return;
    }
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    opt.add_layer("before", 3).unwrap();
    let e = opt.add_param("x", &[1 << 40]).unwrap_err();
    assert_eq!(
        e,
        Error::OutOfMemory {
            name: "x".into(),
            what: "moments",
            bytes: 4 << 40,
        }
    );
    assert!(e.to_string().contains("4398046511104 bytes"), "{e}");
    assert_eq!(opt.layer_count(), 1);
    let mut a = vec![0.5f32; 3];
    assert!(opt.step(&mut [&mut a], &[&[0.01; 3]]).unwrap().applied);
    refused_then_usable(
        Lamb::new(LambConfig::paper()).unwrap(),
        GroupId(0),
        1 << 40,
        4 << 40,
    );
}

/// 2^58 elements (2^60 bytes of f32): within `isize`, so the allocator is asked, but
/// beyond the address space of every 64-bit CPU (at most 2^57 bytes), so it fails whatever
/// the overcommit policy. In every storage format.
#[test]
fn a_layer_beyond_the_address_space_is_an_error_in_every_format() {
    let len = 1usize << 58;
    for (moments, min_bytes) in [
        (StateFormat::F32, len * 4),
        (StateFormat::Bf16, len * 2),
        (StateFormat::Q8, len),
    ] {
        let mut opt = Lamb::new(LambConfig::paper()).unwrap();
        let precision = Precision {
            moments,
            compact_min_len: 0,
            ..Precision::default()
        };
        opt.set_precision(GroupId(0), precision).unwrap();
        refused_then_usable(opt, GroupId(0), len, min_bytes);
    }
}
