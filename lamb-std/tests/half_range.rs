//! A step whose new weights would not fit the half-precision format they are stored in
//! (f16's 65504, bf16's 3.39e38) is refused like any other non-finite step: skipped or an
//! error naming the layer, with the model copy, master copy, moments and step counter as
//! they were. A big layer of small weights, whose L2 norm alone is past f16's range, still
//! steps.

use lamb_std::lamb_core::half::{bf16, f16};
use lamb_std::lamb_core::layer::{Grads, Rounding};
use lamb_std::lamb_core::{LambConfig, LambError, NonFinite};
use lamb_std::{Error, GroupId, Lamb, LayerId, ParamsIn, Precision, StateView, StepReport};

/// Every stored bit of layer `i`'s state: master copy and moments.
fn state_bits(opt: &Lamb, i: usize) -> Vec<u32> {
    let l = opt.layer(LayerId(i)).unwrap();
    let mut bits: Vec<u32> = l
        .master
        .unwrap_or(&[])
        .iter()
        .map(|x| x.to_bits())
        .collect();
    match l.state {
        StateView::F32 { m, v } => bits.extend(m.iter().chain(v).map(|x| x.to_bits())),
        StateView::Bf16 { m, v } => bits.extend(m.iter().chain(v).map(|x| x.to_bits() as u32)),
        StateView::Q8 { .. } => unreachable!("these tests keep f32 or bf16 moments"),
    }
    bits
}

/// Half-precision weights of one format, so one test body serves f16 and bf16.
trait Half: Copy + std::fmt::Debug {
    fn from_f32(x: f32) -> Self;
    fn bits(self) -> u16;
    fn is_finite(self) -> bool;
    fn params(w: &mut [Self]) -> ParamsIn<'_>;
    fn grads(g: &[Self]) -> Grads<'_>;
}

impl Half for f16 {
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn bits(self) -> u16 {
        self.to_bits()
    }
    fn is_finite(self) -> bool {
        f16::is_finite(self)
    }
    fn params(w: &mut [Self]) -> ParamsIn<'_> {
        ParamsIn::F16(w)
    }
    fn grads(g: &[Self]) -> Grads<'_> {
        Grads::F16(g)
    }
}

impl Half for bf16 {
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn bits(self) -> u16 {
        self.to_bits()
    }
    fn is_finite(self) -> bool {
        bf16::is_finite(self)
    }
    fn params(w: &mut [Self]) -> ParamsIn<'_> {
        ParamsIn::Bf16(w)
    }
    fn grads(g: &[Self]) -> Grads<'_> {
        Grads::Bf16(g)
    }
}

/// Two layers, `"ok"` (small weights) and `"hot"` (`hot`), in one group of `config` and
/// `precision`. A first step at lr 0 (which moves nothing but fills the moments and makes
/// the master copy) succeeds; then the step at the configured lr must be refused with
/// everything left as the first step left it.
fn refused<H: Half>(config: LambConfig, precision: Precision, hot: &[f32], hot_grad: &[f32]) {
    refused_ok_grad::<H>(config, precision, hot, hot_grad, 1e-3);
}

/// [`refused`], with `"ok"`'s gradients `ok_grad·i` (0: an update of 0 without weight decay).
fn refused_ok_grad<H: Half>(
    config: LambConfig,
    precision: Precision,
    hot: &[f32],
    hot_grad: &[f32],
    ok_grad: f32,
) {
    for policy in [NonFinite::Skip, NonFinite::Error] {
        let config = LambConfig {
            non_finite: policy,
            ..config
        };
        let mut opt = Lamb::new(config).unwrap();
        opt.set_precision(GroupId(0), precision).unwrap();
        opt.add_layer("ok", 40).unwrap();
        opt.add_layer("hot", hot.len()).unwrap();
        let mut ok: Vec<H> = (0..40).map(|i| H::from_f32(0.01 * i as f32)).collect();
        let mut w: Vec<H> = hot.iter().map(|&x| H::from_f32(x)).collect();
        let g_ok: Vec<H> = (0..40).map(|i| H::from_f32(ok_grad * i as f32)).collect();
        let g: Vec<H> = hot_grad.iter().map(|&x| H::from_f32(x)).collect();

        opt.set_group(GroupId(0), config, 0.0).unwrap();
        let first = opt
            .step_mixed(
                &mut [H::params(&mut ok), H::params(&mut w)],
                &[H::grads(&g_ok), H::grads(&g)],
            )
            .unwrap();
        assert!(first.applied, "lr 0 moves nothing and must step");
        opt.set_group(GroupId(0), config, 1.0).unwrap();

        let model: Vec<u16> = ok.iter().chain(&w).map(|x| x.bits()).collect();
        let state = [state_bits(&opt, 0), state_bits(&opt, 1)];
        let result = opt.step_mixed(
            &mut [H::params(&mut ok), H::params(&mut w)],
            &[H::grads(&g_ok), H::grads(&g)],
        );
        match policy {
            NonFinite::Skip => {
                let r = result.unwrap();
                assert!(
                    !r.applied,
                    "{config:?}: a step that overflows the weights applied"
                );
                assert_eq!(
                    r.skipped.map(|s| (s.index, s.name)),
                    Some((1, "hot".to_string()))
                );
            }
            NonFinite::Error => assert_eq!(
                result.unwrap_err(),
                Error::Layer {
                    index: 1,
                    name: "hot".into(),
                    source: LambError::NonFinite {},
                }
            ),
        }
        let after: Vec<u16> = ok.iter().chain(&w).map(|x| x.bits()).collect();
        assert_eq!(after, model, "the model copy changed");
        assert!(w.iter().all(|x| x.is_finite()));
        assert_eq!([state_bits(&opt, 0), state_bits(&opt, 1)], state);
        assert_eq!(opt.steps(), 1, "the step counter moved");
    }
}

/// AdamW: u ≈ −1 + 0.01·65000 = 649 and a step of 1000·649 takes f16 65000 far past −65504.
#[test]
fn f16_adamw_step_past_the_range_is_refused() {
    let cfg = LambConfig {
        lr: 1000.0,
        ..LambConfig::paper().adamw()
    };
    refused::<f16>(cfg, Precision::default(), &[65000.0; 64], &[-1.0; 64]);
}

/// LAMB without weight decay: the trust ratio ‖p‖/‖u‖ = 60000, the step 0.1·60000 = 6000
/// on every weight, 60000 → 66000: past f16's range, though ‖p‖ + s·‖u‖ is far inside f32's.
#[test]
fn f16_lamb_step_past_the_range_is_refused() {
    let cfg = LambConfig {
        lr: 0.1,
        ..LambConfig::optax()
    };
    refused::<f16>(cfg, Precision::default(), &[60000.0; 64], &[-1.0; 64]);
}

/// bf16 updated in place (no master copy): one weight of 1 moved up by 3.4025e38. The f32
/// result is finite, but rounds to infinity in bf16, to nearest or, with probability 98%,
/// stochastically. (The weights start small: a weight near bf16::MAX would overflow the
/// f32 lane sums of ‖p‖², refusing even the first step. The `"ok"` layer has no gradient:
/// any other would move by 3.4e38 too.)
#[test]
fn bf16_in_place_step_past_the_range_is_refused() {
    let cfg = LambConfig {
        lr: 3.4025e38,
        weight_decay: 0.0,
        ..LambConfig::paper().adamw()
    };
    let hot = vec![1.0f32; 8];
    // Only the big weight has a gradient, so ‖u‖ is 1 and the f32 bound holds.
    let mut grad = vec![0.0f32; 8];
    grad[3] = -1.0;
    for rounding in [
        Rounding::Nearest,
        Rounding::Stochastic { seed: 1 },
        Rounding::Stochastic { seed: 2 },
    ] {
        let precision = Precision {
            master: false,
            rounding,
            ..Precision::default()
        };
        refused_ok_grad::<bf16>(cfg, precision, &hot, &grad, 0.0);
        // The same through a master copy: its model copy would be rounded to infinity.
        refused_ok_grad::<bf16>(cfg, Precision::default(), &hot, &grad, 0.0);
    }
}

fn step_f16(opt: &mut Lamb, w: &mut [f16], g: &[f16]) -> StepReport {
    opt.step_mixed(&mut [ParamsIn::F16(w)], &[Grads::F16(g)])
        .unwrap()
}

/// The guard bounds the largest element, not the L2 norm: 2^20 weights of 100 have
/// ‖p‖ = 102400, beyond f16's 65504, and step as always; so do weights right at the top of
/// f16's range moved down, or moved up by less than rounding can take to infinity.
#[test]
fn big_f16_layers_of_small_weights_still_step() {
    let n = 1 << 20;
    let mut opt = Lamb::new(LambConfig {
        lr: 0.01,
        ..LambConfig::paper()
    })
    .unwrap();
    opt.add_layer("big", n).unwrap();
    let mut w = vec![f16::from_f32(100.0); n];
    let g = vec![f16::from_f32(0.5); n];
    for _ in 0..3 {
        assert!(step_f16(&mut opt, &mut w, &g).applied);
    }
    // Each step moves every weight by lr·‖p‖ / √n = 1.
    assert!(w.iter().all(|x| x.to_f32() == 97.0), "{:?}", w[0]);

    // f16::MAX moved down.
    let mut opt = Lamb::new(LambConfig {
        lr: 1.0,
        ..LambConfig::paper().adamw()
    })
    .unwrap();
    opt.add_layer("top", 16).unwrap();
    let mut w = vec![f16::MAX; 16];
    assert!(step_f16(&mut opt, &mut w, &[f16::from_f32(1.0); 16]).applied);
    assert!(w.iter().all(|x| x.to_f32() < 65504.0));

    // 65000 + 510 = 65510 rounds to 65504 (values below 65520 stay finite): AdamW with no
    // decay moves each weight by lr·(−m̂/(√v̂ + ε)) = lr·(1 − 1e-6·…) ≈ 510.
    let mut opt = Lamb::new(LambConfig {
        lr: 510.0,
        weight_decay: 0.0,
        ..LambConfig::paper().adamw()
    })
    .unwrap();
    opt.add_layer("near", 16).unwrap();
    let mut w = vec![f16::from_f32(65000.0); 16];
    assert!(step_f16(&mut opt, &mut w, &[f16::from_f32(-1.0); 16]).applied);
    assert!(w.iter().all(|x| *x == f16::MAX), "{:?}", w[0]);
}
