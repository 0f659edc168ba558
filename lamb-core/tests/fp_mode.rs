//! The caller's floating-point mode changes no bit: with flush-to-zero, denormals-are-zero
//! and round-toward-zero set on the calling thread, steps on subnormal inputs with ε = 1e-45
//! give exactly what they give in the default mode, on every backend, and the caller's mode
//! is back afterwards. With exceptions unmasked, a step over NaNs does not trap.
//!
//! The mode is set with the platform's own means (`_mm_setcsr` on x86-64, `msr fpcr` on
//! aarch64); on other targets these tests print SKIPPED.

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[path = "common/fp_mode.rs"]
mod fp_mode;

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod on_this_target {
    use super::fp_mode::{Mode, mode, values};
    use half::{bf16, f16};
    use lamb_core::fpenv::DefaultFpMode;
    use lamb_core::layer::{CompactLayer, F32Layer, Grads, HalfMut, Moments, Params, Rounding};
    use lamb_core::{Backend, EpsMode, LambConfig, LayerNorms, LayerReport, Schedule, StepScalars};
    use std::hint::black_box;

    /// Runs `f` with the hostile mode set; checks the mode took (subnormals flush) and is
    /// still set after `f`, i.e. that lamb-core restored it.
    fn hostile<T>(f: impl FnOnce() -> T) -> T {
        let m = Mode::set(mode::HOSTILE);
        assert_eq!(
            black_box(f32::MIN_POSITIVE) / black_box(4.0f32),
            0.0,
            "the mode did not take"
        );
        assert!(!DefaultFpMode::is_current());
        let out = f();
        assert_eq!(
            mode::get() & mode::CONTROL,
            m.now,
            "the caller's mode was not restored"
        );
        out
    }

    fn configs() -> [LambConfig; 3] {
        let tiny = LambConfig {
            eps: 1e-45,
            ..LambConfig::paper()
        };
        [
            tiny,
            LambConfig {
                eps_mode: EpsMode::InsideSqrt,
                ..tiny
            },
            LambConfig {
                lr: 0.3,
                ..LambConfig::optax()
            },
        ]
    }

    /// The inputs of [`run`], made in the default mode (the test's own arithmetic would
    /// flush them otherwise).
    struct Inputs {
        p: Vec<f32>,
        m: Vec<f32>,
        v: Vec<f32>,
        pb: Vec<bf16>,
        master: Vec<f32>,
        ph: Vec<f16>,
        g: Vec<Vec<f32>>,
        gh: Vec<Vec<f16>>,
    }

    fn inputs() -> Inputs {
        let n = 1000;
        let master = values(n, 5, 1.0);
        Inputs {
            p: values(n, 1, 1.0),
            m: values(n, 2, 1e-3),
            v: values(n, 3, 1e-6).into_iter().map(f32::abs).collect(),
            pb: values(n, 4, 1.0).into_iter().map(bf16::from_f32).collect(),
            ph: master.iter().map(|&x| f16::from_f32(x)).collect(),
            master,
            g: (1..=3).map(|t| values(n, 10 + t, 1e-3)).collect(),
            gh: (1..=3)
                .map(|t| {
                    values(n, 20 + t, 1e-4)
                        .into_iter()
                        .map(f16::from_f32)
                        .collect()
                })
                .collect(),
        }
    }

    /// Three steps of a 1000-element layer in f32 and in compact formats on `b`, every
    /// bit of the results and reports.
    fn run(b: Backend, cfg: &LambConfig, inputs: &Inputs) -> Vec<u32> {
        let n = inputs.p.len();
        let mut out = vec![];
        let (mut p, mut m, mut v) = (inputs.p.clone(), inputs.m.clone(), inputs.v.clone());
        let mut pb = inputs.pb.clone();
        let mut master = inputs.master.clone();
        let mut ph = inputs.ph.clone();
        let (mut m2, mut v2) = (vec![bf16::ZERO; n], vec![bf16::ZERO; n]);
        let (mut m3, mut v3) = (vec![0.0f32; n], vec![0.0f32; n]);
        for step in 1..=3u64 {
            let (g, gh) = (&inputs.g[step as usize - 1], &inputs.gh[step as usize - 1]);
            let reports = [
                b.step_layer(
                    cfg,
                    step,
                    0.5,
                    &mut F32Layer {
                        param: &mut p,
                        grad: g,
                        m: &mut m,
                        v: &mut v,
                    },
                ),
                b.step_layer_compact(
                    cfg,
                    step,
                    1.0,
                    &mut CompactLayer {
                        params: Params::Bf16 {
                            data: &mut pb,
                            rounding: Rounding::Stochastic { seed: step },
                        },
                        grads: Grads::F32(g),
                        moments: Moments::Bf16 {
                            m: &mut m2,
                            v: &mut v2,
                            rounding: Rounding::Nearest,
                        },
                    },
                ),
                b.step_layer_compact(
                    cfg,
                    step,
                    1.0,
                    &mut CompactLayer {
                        params: Params::Master {
                            master: &mut master,
                            model: HalfMut::F16(&mut ph),
                        },
                        grads: Grads::F16(gh),
                        moments: Moments::F32 {
                            m: &mut m3,
                            v: &mut v3,
                        },
                    },
                ),
            ];
            for r in reports {
                let r = r.unwrap();
                assert!(!r.skipped, "{b} {cfg:?} step {step}");
                out.extend(
                    [r.param_norm, r.update_norm, r.trust_ratio, r.step_size].map(f32::to_bits),
                );
            }
            out.push(b.sum_squares(g).unwrap().to_bits() as u32);
            out.push(b.sum_squares_grads(&Grads::F16(gh)).unwrap().to_bits() as u32);
        }
        let f = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for buf in [&p, &m, &v, &master, &m3, &v3] {
            out.extend(f(buf));
        }
        out.extend(pb.iter().chain(&m2).chain(&v2).map(|x| x.to_bits() as u32));
        out.extend(ph.iter().map(|x| x.to_bits() as u32));
        out
    }

    #[test]
    fn steps_give_the_default_bits_in_any_mode() {
        assert!(DefaultFpMode::is_current());
        let inputs = inputs();
        for cfg in configs() {
            let want = run(Backend::Scalar, &cfg, &inputs);
            for b in Backend::available() {
                assert!(
                    run(b, &cfg, &inputs) == want,
                    "{b}: default mode differs from scalar"
                );
                let got = hostile(|| run(b, &cfg, &inputs));
                assert!(
                    got == want,
                    "{b} {cfg:?}: the caller's mode changed the bits"
                );
            }
        }
    }

    /// The scalar entry points: the step's scalars (ε = 1e-45 must not flush to 0), the
    /// plan, the schedule and validation.
    #[test]
    fn scalars_plan_schedule_and_validation_ignore_the_mode() {
        let cfg = configs()[0];
        let norms = LayerNorms {
            param_sq: 1e-40,
            update_sq: 3e-45,
            ..LayerNorms::default()
        };
        let schedule = Schedule::WarmupCosine {
            warmup: 3,
            total: 1000,
            end: 1e-3,
        };
        let bits = |s: StepScalars, r: LayerReport, f: f64| {
            let mut v = vec![
                s.eps.to_bits(),
                s.inv_bias1.to_bits(),
                s.inv_bias2.to_bits(),
            ];
            v.extend([r.param_norm, r.update_norm, r.trust_ratio, r.step_size].map(f32::to_bits));
            v.push(f.to_bits() as u32);
            v.push((f.to_bits() >> 32) as u32);
            v
        };
        let compute = || {
            bits(
                StepScalars::new(&cfg, 7, 1.0).unwrap(),
                LayerReport::plan(&cfg, norms),
                schedule.factor(500),
            )
        };
        let want = compute();
        assert_eq!(f32::from_bits(want[0]), 1e-45);
        assert_eq!(hostile(compute), want);
        hostile(|| {
            assert_eq!(cfg.validate(), Ok(()));
            assert_eq!(
                Schedule::WarmupPoly {
                    warmup: 0,
                    total: 10,
                    power: 1e-310,
                    end: 0.0
                }
                .validate(),
                Ok(())
            );
        });
    }

    /// Unmasked exceptions would turn the NaN checks of phase 1 (`d − d`, NaN arithmetic)
    /// into a trap (SIGFPE): the kernels mask them, and the step is refused as usual.
    #[test]
    fn unmasked_exceptions_do_not_trap() {
        let n = 40;
        for b in Backend::available() {
            for bad in [f32::NAN, f32::INFINITY, 1e20] {
                let mut p = vec![1.0f32; n];
                let mut g = vec![0.1f32; n];
                g[n - 3] = bad;
                let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
                let r = {
                    let trapping = Mode::set(mode::TRAPPING);
                    let r = b.step_layer(
                        &LambConfig::paper(),
                        1,
                        1.0,
                        &mut F32Layer {
                            param: &mut p,
                            grad: &g,
                            m: &mut m,
                            v: &mut v,
                        },
                    );
                    assert_eq!(mode::get() & mode::CONTROL, trapping.now);
                    r
                };
                assert!(r.unwrap().skipped, "{b} {bad}");
                assert!(p.iter().all(|&x| x == 1.0));
            }
        }
    }

    #[test]
    fn the_guard_restores_the_mode() {
        let m = Mode::set(mode::HOSTILE);
        {
            let _g = DefaultFpMode::enter();
            assert!(DefaultFpMode::is_current());
            assert!(black_box(f32::MIN_POSITIVE) / black_box(4.0f32) > 0.0);
            {
                let _nested = DefaultFpMode::enter();
                assert!(DefaultFpMode::is_current());
            }
            assert!(DefaultFpMode::is_current());
        }
        assert_eq!(mode::get() & mode::CONTROL, m.now);
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
#[test]
fn fp_mode_tests() {
    println!("SKIPPED fp_mode: no mode-setting code for this target in the tests");
}
