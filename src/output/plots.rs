//! Pictures for people, drawn with `plotters`: ROC curves and score histograms with axes,
//! labels and a legend. The text uses DejaVu Sans, embedded (no system fonts needed).

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

/// The legend of a chart's labelled series, framed, at `position`.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(drawing)
}

/// A drawn RGB buffer of `w` x `h` pixels as PNG bytes.
fn buffer_png(w: u32, h: u32, pixels: Vec<u8>, what: &str) -> Result<Vec<u8>> {
    let image = image::RgbImage::from_raw(w, h, pixels)
        .ok_or_else(|| Error::Training("drawing a plot: wrong buffer size".into()))?;
    png_bytes(&image, what)
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
        legend(&mut chart, SeriesLabelPosition::LowerRight)?;
        root.present().map_err(drawing)?;
    }
    buffer_png(w, h, pixels, "a ROC curve")
}

/// Size of the histogram picture in pixels.
pub const HISTOGRAM_SIZE: (u32, u32) = (560, 400);

/// The number of bins of [`histogram_png`].
const HISTOGRAM_BINS: usize = 30;

/// A PNG histogram of image scores: the normal ones (blue) and the defect ones (orange) counted
/// on the same 30 bins spanning every value and the threshold, overlaid half-transparent; the
/// threshold, if any, a red vertical line; axes "score" and "images", and a legend. Either set
/// may be empty (normal-only data); when every value is the same the bins span a little around
/// it. Errors on a value or threshold that is not finite.
pub fn histogram_png(
    title: &str,
    normal: &[f64],
    defect: &[f64],
    threshold: Option<f64>,
) -> Result<Vec<u8>> {
    let values = || normal.iter().chain(defect).copied().chain(threshold);
    if let Some(v) = values().find(|v| !v.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "histogram: a score or the threshold is {v} (not finite)"
        )));
    }
    let lo = values().fold(f64::INFINITY, f64::min);
    let hi = values().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo > hi {
        // Nothing to show: a unit range.
        (0.0, 1.0)
    } else if lo == hi {
        let pad = if lo == 0.0 { 1.0 } else { 0.1 * lo.abs() };
        (lo - pad, hi + pad)
    } else {
        (lo, hi)
    };
    let width = (hi - lo) / HISTOGRAM_BINS as f64;
    let counts = |set: &[f64]| {
        let mut counts = [0u32; HISTOGRAM_BINS];
        for &v in set {
            let bin = ((v - lo) / (hi - lo) * HISTOGRAM_BINS as f64).floor() as usize;
            counts[bin.min(HISTOGRAM_BINS - 1)] += 1;
        }
        counts
    };
    let (normal_counts, defect_counts) = (counts(normal), counts(defect));
    let highest = normal_counts.iter().chain(&defect_counts).copied().max();
    // Room above the highest bar for the legend.
    let top = ((highest.unwrap_or(0) as f64 * 1.3).ceil() as u32).max(1);

    fonts();
    let (w, h) = HISTOGRAM_SIZE;
    let mut pixels = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing)?;
        let margin = 0.02 * (hi - lo);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(54)
            .build_cartesian_2d((lo - margin)..(hi + margin), 0u32..top)
            .map_err(drawing)?;
        chart
            .configure_mesh()
            .x_labels(6)
            .y_labels(6)
            .x_desc("score")
            .y_desc("images")
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 15))
            .draw()
            .map_err(drawing)?;
        let sets = [
            ("normal", normal, &normal_counts, RGBColor(31, 119, 180)),
            ("defect", defect, &defect_counts, RGBColor(255, 127, 14)),
        ];
        for (name, set, counts, color) in sets {
            if set.is_empty() {
                continue;
            }
            let fill = color.mix(0.5).filled();
            let bars = counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, &c)| {
                    let x0 = lo + i as f64 * width;
                    Rectangle::new([(x0, 0), (x0 + width, c)], fill)
                });
            chart
                .draw_series(bars)
                .map_err(drawing)?
                .label(format!("{name} ({})", set.len()))
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 20, y + 6)], fill));
        }
        if let Some(t) = threshold {
            chart
                .draw_series(LineSeries::new([(t, 0), (t, top)], RED.stroke_width(2)))
                .map_err(drawing)?
                .label("threshold")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        root.present().map_err(drawing)?;
    }
    buffer_png(w, h, pixels, "a histogram")
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

    /// Counts of the picture's pixels that are light blue (the normal bars), light orange (the
    /// defect bars), and the longest run of red pixels down one column (the threshold line).
    fn histogram_colours(png: &[u8]) -> (usize, usize, usize) {
        let img = image::load_from_memory(png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), HISTOGRAM_SIZE);
        let (mut blue, mut orange, mut red_column) = (0, 0, 0);
        for x in 0..img.width() {
            let mut run = 0;
            for y in 0..img.height() {
                let [r, g, b] = img.get_pixel(x, y).0.map(i32::from);
                if b > r + 40 && b > 150 {
                    blue += 1;
                }
                if r > 200 && (150..230).contains(&g) && b < 160 {
                    orange += 1;
                }
                if r > 200 && g < 60 && b < 60 {
                    run += 1;
                    red_column = red_column.max(run);
                } else {
                    run = 0;
                }
            }
        }
        (blue, orange, red_column)
    }

    #[test]
    fn a_histogram_of_both_sets_with_a_threshold() {
        let normal: Vec<f64> = (0..200).map(|i| 0.2 + 0.001 * (i % 50) as f64).collect();
        let defect: Vec<f64> = (0..40).map(|i| 0.3 + 0.005 * (i % 20) as f64).collect();
        let png = histogram_png("class x", &normal, &defect, Some(0.27)).unwrap();
        let (blue, orange, red) = histogram_colours(&png);
        assert!(blue > 500, "normal bars: {blue} blue pixels");
        assert!(orange > 500, "defect bars: {orange} orange pixels");
        assert!(red > 150, "threshold line: {red} red pixels down a column");
    }

    #[test]
    fn a_histogram_of_normal_images_only() {
        let normal = [0.1, 0.2, 0.2, 0.3, 0.35, 0.5];
        let png = histogram_png("normal only", &normal, &[], Some(0.45)).unwrap();
        let (blue, orange, red) = histogram_colours(&png);
        assert!(blue > 500, "{blue}");
        assert_eq!(orange, 0);
        assert!(red > 150, "{red}");
        // No threshold, no line.
        let png = histogram_png("normal only", &normal, &[], None).unwrap();
        assert_eq!(histogram_colours(&png).2, 0);
    }

    #[test]
    fn a_histogram_of_one_repeated_value() {
        for threshold in [None, Some(0.7)] {
            let png = histogram_png("one value", &[0.7; 12], &[0.7; 3], threshold).unwrap();
            let (blue, orange, _) = histogram_colours(&png);
            assert!(blue > 100 && orange > 100, "{blue} {orange}");
        }
        let png = histogram_png("zero", &[0.0; 4], &[], None).unwrap();
        assert!(histogram_colours(&png).0 > 100);
        // Nothing at all still draws the axes.
        histogram_png("empty", &[], &[], None).unwrap();
        assert!(histogram_png("bad", &[f64::NAN], &[], None).is_err());
        assert!(histogram_png("bad", &[0.1], &[], Some(f64::INFINITY)).is_err());
    }
}
