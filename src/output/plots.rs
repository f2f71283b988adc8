//! Pictures for people, drawn with `plotters`: ROC curves with axes, labels and a legend. The
//! text uses DejaVu Sans, embedded (no system fonts needed).

use std::sync::Once;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use super::png_bytes;
use crate::{Error, Result};

/// One curve of a plot.
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub rgb: [u8; 3],
}

/// Size of the ROC picture in pixels.
pub const ROC_SIZE: (u32, u32) = (560, 500);

fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is valid: it is DejaVu's own file, embedded by the `dejavu` crate.
        let _ = register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

fn drawing<E: std::fmt::Debug>(e: E) -> Error {
    Error::Training(format!("drawing a plot: {e:?}"))
}

/// A PNG of ROC curves in the unit square: false positive rate against true positive rate, a
/// 20% grid, the chance diagonal, and a legend naming each curve.
pub fn roc_png(title: &str, curves: &[Curve]) -> Result<Vec<u8>> {
    fonts();
    let (w, h) = ROC_SIZE;
    let mut pixels = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(54)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(drawing)?;
        chart
            .configure_mesh()
            .x_labels(6)
            .y_labels(6)
            .x_desc("false positive rate")
            .y_desc("true positive rate")
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 15))
            .draw()
            .map_err(drawing)?;
        let grey = RGBColor(160, 160, 160);
        chart
            .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], grey))
            .map_err(drawing)?
            .label("chance")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], grey));
        for curve in curves {
            let color = RGBColor(curve.rgb[0], curve.rgb[1], curve.rgb[2]);
            chart
                .draw_series(LineSeries::new(
                    curve.points.iter().copied(),
                    color.stroke_width(3),
                ))
                .map_err(drawing)?
                .label(curve.label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(drawing)?;
        root.present().map_err(drawing)?;
    }
    let image = image::RgbImage::from_raw(w, h, pixels)
        .ok_or_else(|| Error::Training("drawing a plot: wrong buffer size".into()))?;
    png_bytes(&image, "a ROC curve")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_perfect_curve_runs_up_the_left_axis_with_labels_and_a_legend() {
        let curve = Curve {
            label: "perfect".into(),
            points: vec![(0.0, 0.0), (0.0, 1.0), (1.0, 1.0)],
            rgb: [0, 0, 255],
        };
        let png = roc_png("class x", &[curve]).unwrap();
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), ROC_SIZE);
        let blue = |x: u32, y: u32| {
            let [r, g, b] = img.get_pixel(x, y).0;
            b > 200 && r < 80 && g < 80
        };
        // The curve's vertical part: a blue column somewhere in the left fifth of the picture.
        let column = (0..ROC_SIZE.0 / 5).find(|&x| (100..300).all(|y| blue(x, y)));
        assert!(column.is_some(), "no vertical blue line on the left");
        // Text was drawn: dark pixels below the plot (the x axis labels and description).
        let dark = (ROC_SIZE.1 - 40..ROC_SIZE.1)
            .flat_map(|y| (0..ROC_SIZE.0).map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 100))
            .count();
        assert!(dark > 50, "no axis text: {dark} dark pixels");
        // The legend: blue pixels in the lower right quarter, left of the plot's right edge,
        // beside its label, apart from the curve (which runs along the top there).
        let legend = (ROC_SIZE.1 / 2..ROC_SIZE.1 - 50)
            .flat_map(|y| (ROC_SIZE.0 / 2..ROC_SIZE.0 - 20).map(move |x| (x, y)))
            .any(|(x, y)| blue(x, y));
        assert!(legend, "no legend entry");
    }
}
