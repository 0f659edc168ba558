//! The caller's floating-point mode changes no bit of a step, whatever the thread count:
//! with flush-to-zero, denormals-are-zero and round-toward-zero set on the calling thread
//! (as `torch.set_flush_denormal(True)` does for a host process), steps on subnormal
//! gradients with ε = 1e-45, clipping and a schedule give the bits of the default mode on
//! 1 and 2 threads, whether the pool's threads were started before the mode was set (they
//! do not share it) or after (they inherit it). The caller's mode is back after each step.

// The fp-mode helpers of lamb-core's test of the same (neither crate's package ships its tests).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[path = "../../lamb-core/tests/common/fp_mode.rs"]
mod fp_mode;

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod on_this_target {
    use super::fp_mode::{Mode, mode, values};
    use lamb_std::lamb_core::fpenv::DefaultFpMode;
    use lamb_std::lamb_core::half::bf16;
    use lamb_std::lamb_core::layer::Grads;
    use lamb_std::lamb_core::{LambConfig, Schedule};
    use lamb_std::{Lamb, LayerId, ParamsIn, StateView};
    use std::hint::black_box;

    /// Sets the hostile mode on this thread until dropped.
    struct Hostile {
        _mode: Mode,
    }
    impl Hostile {
        fn set() -> Hostile {
            let m = Mode::set(mode::HOSTILE);
            assert_eq!(
                black_box(f32::MIN_POSITIVE) / black_box(4.0f32),
                0.0,
                "the mode did not take"
            );
            Hostile { _mode: m }
        }
    }

    const LENS: [usize; 3] = [3000, 100, 5000];

    struct Inputs {
        w: [Vec<f32>; 2],
        h: Vec<bf16>,
        /// Per step: the two f32 gradients and the bf16 one.
        grads: Vec<([Vec<f32>; 2], Vec<bf16>)>,
    }

    fn inputs() -> Inputs {
        let bf = |v: Vec<f32>| v.into_iter().map(bf16::from_f32).collect::<Vec<_>>();
        Inputs {
            w: [values(LENS[0], 1, 0.5), values(LENS[1], 2, 0.5)],
            h: bf(values(LENS[2], 3, 0.5)),
            grads: (0..3)
                .map(|t| {
                    (
                        [values(LENS[0], 10 + t, 1e-3), values(LENS[1], 20 + t, 1e-3)],
                        bf(values(LENS[2], 30 + t, 1e-3)),
                    )
                })
                .collect(),
        }
    }

    /// When the pool's threads start relative to the mode change.
    #[derive(Clone, Copy, Debug)]
    enum Pool {
        /// Before: the workers are in the default mode, the caller is not.
        Before,
        /// After: the workers start in the caller's mode.
        After,
    }

    /// Three steps; every bit of the weights, the state and the reports.
    fn run(inputs: &Inputs, threads: usize, hostile: Option<Pool>) -> Vec<u64> {
        let mut opt = Lamb::new(LambConfig {
            eps: 1e-45,
            lr: 0.01,
            ..LambConfig::paper()
        })
        .unwrap();
        opt.set_max_grad_norm(Some(0.01)).unwrap();
        opt.set_schedule(Schedule::WarmupCosine {
            warmup: 2,
            total: 10,
            end: 0.1,
        })
        .unwrap();
        for (i, &n) in LENS.iter().enumerate() {
            opt.add_layer(format!("l{i}"), n).unwrap();
        }
        if matches!(hostile, None | Some(Pool::Before)) {
            opt.set_threads(threads).unwrap();
        }
        let _mode = hostile.map(|_| Hostile::set());
        if matches!(hostile, Some(Pool::After)) {
            opt.set_threads(threads).unwrap();
        }
        let [mut w0, mut w1] = inputs.w.clone();
        let mut h = inputs.h.clone();
        let mut out: Vec<u64> = vec![];
        for (g, gh) in &inputs.grads {
            let before = mode::get() & mode::CONTROL;
            let r = opt
                .step_mixed(
                    &mut [
                        ParamsIn::F32(&mut w0),
                        ParamsIn::F32(&mut w1),
                        ParamsIn::Bf16(&mut h),
                    ],
                    &[Grads::F32(&g[0]), Grads::F32(&g[1]), Grads::Bf16(gh)],
                )
                .unwrap();
            assert_eq!(
                mode::get() & mode::CONTROL,
                before,
                "the caller's mode was not restored"
            );
            assert!(r.applied);
            out.extend([
                r.grad_norm.unwrap().to_bits(),
                r.grad_scale.to_bits() as u64,
                r.lr_factor.to_bits(),
            ]);
        }
        drop(_mode);
        out.extend(w0.iter().chain(&w1).map(|x| x.to_bits() as u64));
        out.extend(h.iter().map(|x| x.to_bits() as u64));
        for i in 0..LENS.len() {
            let l = opt.layer(LayerId(i)).unwrap();
            let StateView::F32 { m, v } = l.state else {
                unreachable!("f32 moments")
            };
            let master = l.master.unwrap_or(&[]);
            out.extend(m.iter().chain(v).chain(master).map(|x| x.to_bits() as u64));
            let r = l.last.unwrap();
            out.extend(
                [r.param_norm, r.update_norm, r.trust_ratio, r.step_size]
                    .map(|x| x.to_bits() as u64),
            );
        }
        out
    }

    #[test]
    fn steps_give_the_default_bits_in_any_mode_and_thread_count() {
        assert!(DefaultFpMode::is_current());
        let inputs = inputs();
        let want = run(&inputs, 1, None);
        assert!(run(&inputs, 2, None) == want, "2 threads differ from 1");
        for threads in [1, 2] {
            for pool in [Pool::Before, Pool::After] {
                assert!(
                    run(&inputs, threads, Some(pool)) == want,
                    "{threads} threads, pool started {pool:?} the mode was set: the bits differ"
                );
            }
        }
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
#[test]
fn fp_mode_tests() {
    println!("SKIPPED fp_mode: no mode-setting code for this target in the tests");
}
