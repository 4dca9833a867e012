//! The loss-curve PNG written next to `--metrics-file`.
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

fn font() -> Result<()> {
    // Embedded DejaVu Sans: the chart has labels on machines without system fonts.
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *ONCE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .is_ok()
    });
    ok.then_some(())
        .ok_or_else(|| anyhow!("cannot load the embedded font"))
}

/// Training loss (and validation loss, when any) against iteration.
pub fn loss_curve(
    path: &Path,
    title: &str,
    train: &[(u64, f64)],
    valid: &[(u64, f64)],
) -> Result<()> {
    font()?;
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    let all = || train.iter().chain(valid).filter(|(_, l)| l.is_finite());
    let (x_max, mut y_min, mut y_max) = all()
        .fold((1u64, f64::MAX, f64::MIN), |(x, lo, hi), (i, l)| {
            (x.max(*i), lo.min(*l), hi.max(*l))
        });
    if y_min > y_max {
        (y_min, y_max) = (0.0, 1.0);
    }
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0u64..x_max, (y_min - pad)..(y_max + pad))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("iteration")
        .y_desc("lm loss")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(train.iter().copied(), &BLUE))
        .map_err(|e| err(&e))?
        .label("train")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    if !valid.is_empty() {
        chart
            .draw_series(LineSeries::new(valid.iter().copied(), &RED))
            .map_err(|e| err(&e))?
            .label("validation")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        // Validation runs every --eval-interval: mark each point (a lone one has no line).
        chart
            .draw_series(
                valid
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y), 3, RED.filled())),
            )
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
