//! train_digits' figure: the loss curves at the tuned lrs, one panel per batch size, and
//! the final loss against the base lr.

use super::*;

/// LAMB's and AdamW's colors.
const COLORS: [plotters::style::RGBColor; 2] = [
    plotters::style::RGBColor(200, 30, 30),
    plotters::style::RGBColor(30, 90, 200),
];

impl Grid {
    /// One y range for all panels: what they show (the curves at the tuned lrs, the final
    /// losses of the grid), capped at 10 (far above the initial ln 10 = 2.3).
    fn y_range(&self, chosen: [f64; 2]) -> std::ops::Range<f64> {
        let shown = self.batches.iter().flat_map(|&b| {
            (0..2).flat_map(move |k| self.get(OPTS[k], chosen[k], b).1.curve.iter().copied())
        });
        let finals = self.results.iter().map(|r| r.train_loss);
        let (lo, hi) = shown
            .chain(finals)
            .filter(|x| x.is_finite() && *x > 0.0)
            .fold((f64::INFINITY, 0.0f64), |(lo, hi), x| {
                (lo.min(x), hi.max(x))
            });
        lo * 0.7..(hi * 1.5).min(10.0)
    }

    /// The training loss curves of both optimizers at their tuned lr, at one batch size.
    fn plot_curves(
        &self,
        panel: &common::Panel,
        batch: usize,
        chosen: [f64; 2],
        epochs: usize,
        y_range: std::ops::Range<f64>,
    ) -> Result<(), Box<dyn std::error::Error>> {
        use plotters::prelude::*;
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("batch {}", self.batch_label(batch)),
                ("sans-serif", 22),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..epochs as f64, y_range.log_scale())?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc("training loss")
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 16))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0e}"))
            .draw()?;
        for (k, opt) in OPTS.into_iter().enumerate() {
            let (j, r) = self.get(opt, chosen[k], batch);
            let color = COLORS[k];
            let points = r
                .curve
                .iter()
                .enumerate()
                .filter(|(_, y)| y.is_finite())
                .map(|(x, &y)| (x as f64, y));
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(format!("{} (lr {:.1e})", opt.name(), j.lr()))
                .legend(common::line_key(color.stroke_width(2)));
        }
        common::draw_legend(&mut chart, SeriesLabelPosition::UpperRight, 15)?;
        Ok(())
    }

    /// The last panel: robustness to the base lr, at the smallest and the full batch.
    fn plot_sweep(
        &self,
        panel: &common::Panel,
        y_range: std::ops::Range<f64>,
    ) -> Result<(), Box<dyn std::error::Error>> {
        use plotters::prelude::*;
        let mut chart = ChartBuilder::on(panel)
            .caption("final training loss vs base lr", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(
                (SWEEP[0] * 0.7..SWEEP[SWEEP.len() - 1] * 1.4).log_scale(),
                y_range.log_scale(),
            )?;
        chart
            .configure_mesh()
            .x_desc(format!("base lr (at batch {BASE_BATCH})"))
            .y_desc("final training loss")
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 16))
            .x_label_formatter(&|x| format!("{x:.0e}"))
            .y_label_formatter(&|y| format!("{y:.0e}"))
            .draw()?;
        for (k, opt) in OPTS.into_iter().enumerate() {
            for (batch, dashed) in [(BASE_BATCH, false), (self.full, true)] {
                let pts: Vec<(f64, f64)> = SWEEP
                    .iter()
                    .map(|&lr| (lr, self.get(opt, lr, batch).1.train_loss))
                    .filter(|(_, y)| y.is_finite())
                    .collect();
                let color = COLORS[k];
                let style = color.stroke_width(if dashed { 1 } else { 2 });
                let label = if dashed {
                    format!("{} batch {}, dashed", opt.name(), self.batch_label(batch))
                } else {
                    format!("{} batch {}", opt.name(), self.batch_label(batch))
                };
                if dashed {
                    chart
                        .draw_series(DashedLineSeries::new(pts.clone(), 6, 4, style))?
                        .label(label)
                        .legend(common::line_key(style));
                    chart
                        .draw_series(pts.iter().map(|&p| {
                            Circle::new(p, 4, ShapeStyle::from(color).stroke_width(1))
                        }))?;
                } else {
                    chart
                        .draw_series(LineSeries::new(pts.clone(), style))?
                        .label(label)
                        .legend(common::line_key(style));
                    chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
                }
            }
        }
        common::draw_legend(&mut chart, SeriesLabelPosition::LowerLeft, 14)?;
        Ok(())
    }

    pub(crate) fn plot(
        &self,
        path: &Path,
        chosen: [f64; 2],
        epochs: usize,
    ) -> Result<(), Box<dyn std::error::Error>> {
        use plotters::prelude::*;
        common::register_font();
        const W: u32 = 1500;
        const H: u32 = 900;
        let mut buf = vec![0u8; (W * H * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut buf, (W, H)).into_drawing_area();
            root.fill(&WHITE)?;
            let root = root.titled(
                &format!(
                    "LAMB vs AdamW, UCI digits, {epochs} epochs per run: training loss \
                     (base lr tuned at batch {BASE_BATCH}, lr = base lr * sqrt(batch / {BASE_BATCH}))"
                ),
                ("sans-serif", 24),
            )?;
            let panels = root.split_evenly((2, 3));
            let y_range = self.y_range(chosen);
            for (panel, &batch) in panels.iter().zip(&self.batches) {
                self.plot_curves(panel, batch, chosen, epochs, y_range.clone())?;
            }
            self.plot_sweep(&panels[5], y_range)?;
            root.present()?;
        }
        common::write_png(path, &buf, W, H)
    }
}
