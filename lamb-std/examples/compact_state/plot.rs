//! compact_state's figure: per setting, the loss curves and each run's loss relative to
//! f32's.

use super::*;

/// Left panel of setting `k`: the training loss curves (log scale), every seed, thick for
/// the first.
fn plot_losses(
    area: &common::Panel,
    k: usize,
    s: &Setting,
    title: &str,
    runs: &Runs,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let curves = SEEDS
        .iter()
        .flat_map(|&seed| VARIANTS.map(|v| &runs.get(k, v, seed).result.curve))
        .flat_map(|c| c.iter().copied());
    let (lo, hi) = curves
        .filter(|x| x.is_finite() && *x > 0.0)
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        });
    let mut chart = ChartBuilder::on(area)
        .caption(format!("training loss: {title}"), ("sans-serif", 18))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..s.epochs as f64, (lo * 0.7..hi * 1.5).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("training loss")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0e}"))
        .draw()?;
    for seed in SEEDS {
        for v in [Variant::F32, Variant::Bf16, Variant::Q8] {
            let run = runs.get(k, v, seed);
            let c = v.color();
            let width = if seed == SEEDS[0] { 2 } else { 1 };
            let series = chart.draw_series(LineSeries::new(
                run.result
                    .curve
                    .iter()
                    .enumerate()
                    .map(|(x, &y)| (x as f64, y)),
                c.stroke_width(width),
            ))?;
            if seed == SEEDS[0] {
                let label = format!("{} moments ({:.2} B/param)", v.name(), run.bytes_per_param);
                series
                    .label(label)
                    .legend(common::line_key(c.stroke_width(2)));
            }
        }
    }
    common::draw_legend(&mut chart, SeriesLabelPosition::UpperRight, 14)?;
    Ok(())
}

/// Run (`k`, `v`, `seed`)'s loss curve relative to the f32 run of the same seed, in %.
fn relative_curve(runs: &Runs, k: usize, v: Variant, seed: u64) -> Vec<(f64, f64)> {
    let base = &runs.get(k, Variant::F32, seed).result.curve;
    runs.get(k, v, seed)
        .result
        .curve
        .iter()
        .zip(base)
        .enumerate()
        .map(|(x, (a, b))| (x as f64, 100.0 * (a / b - 1.0)))
        .collect()
}

/// Right panel of setting `k`: each run's loss relative to the f32 run of the same seed,
/// over the acceptance band.
fn plot_relative(
    area: &common::Panel,
    k: usize,
    s: &Setting,
    runs: &Runs,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let rel = |v: Variant, seed: u64| relative_curve(runs, k, v, seed);
    let others = [Variant::F32Ulp, Variant::Bf16, Variant::Q8];
    let m = SEEDS
        .iter()
        .flat_map(|&seed| others.map(|v| rel(v, seed)))
        .flatten()
        .map(|(_, y)| y.abs())
        .filter(|y| y.is_finite())
        .fold(2.0 * 100.0 * TOLERANCE, f64::max)
        .min(200.0)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "loss relative to the f32 run of the same seed",
            ("sans-serif", 18),
        )
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..s.epochs as f64, -m..m)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("difference (%)")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;
    let band = 100.0 * TOLERANCE;
    let green = RGBColor(120, 200, 120);
    chart
        .draw_series(std::iter::once(Rectangle::new(
            [(0.0, -band), (s.epochs as f64, band)],
            green.mix(0.3).filled(),
        )))?
        .label(format!("+-{band:.0}% (the acceptance, on the final loss)"))
        .legend(move |(x, y)| {
            Rectangle::new([(x, y - 5), (x + 20, y + 5)], green.mix(0.6).filled())
        });
    for seed in SEEDS {
        for v in others {
            let c = v.color();
            let width = if seed == SEEDS[0] { 2 } else { 1 };
            let series = chart.draw_series(LineSeries::new(
                rel(v, seed).into_iter().filter(|(_, y)| y.is_finite()),
                c.stroke_width(width),
            ))?;
            if seed == SEEDS[0] {
                series
                    .label(format!("{} vs f32", v.name()))
                    .legend(common::line_key(c.stroke_width(2)));
            }
        }
    }
    common::draw_legend(&mut chart, SeriesLabelPosition::UpperLeft, 14)?;
    Ok(())
}

pub(crate) fn plot(
    path: &Path,
    settings: &[Setting],
    full: usize,
    runs: &Runs,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    common::register_font();
    const W: u32 = 1400;
    const ROW: u32 = 480;
    let h = 50 + ROW * settings.len() as u32;
    let mut buf = vec![0u8; (W * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (W, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(
            "LAMB with f32 / bf16 / 8-bit moments on UCI digits (three seeds each; thick: first seed)",
            ("sans-serif", 22),
        )?;
        let rows = root.split_evenly((settings.len(), 2));
        for (k, s) in settings.iter().enumerate() {
            plot_losses(&rows[2 * k], k, s, &setting_title(s, full), runs)?;
            plot_relative(&rows[2 * k + 1], k, s, runs)?;
        }
        root.present()?;
    }
    common::write_png(path, &buf, W, h)
}
