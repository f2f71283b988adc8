//! A small procedural dataset in the MVTec AD layout, made from a seed, for the CPU demo and
//! the end-to-end tests: two textures and two simple objects, normal images with natural
//! variation (shifts, slight rotation and scale, brightness, noise) and test images with local defects (scratches,
//! holes, stains, foreign patches) and their masks. The same seed writes the same bytes.

use std::path::Path;

use image::{GrayImage, RgbImage};

use super::crops::SeededRng;
use crate::output::write_atomic;
use crate::{Error, Result};

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoSpec {
    pub seed: u64,
    /// Side of the square images.
    pub image_size: usize,
    /// Normal training images per category.
    pub train: usize,
    /// Normal test images per category.
    pub test_good: usize,
    /// Test images per defect type and category.
    pub test_defect: usize,
}

impl Default for DemoSpec {
    fn default() -> Self {
        Self {
            seed: 0,
            image_size: 128,
            train: 16,
            test_good: 6,
            test_defect: 3,
        }
    }
}

/// The demo's categories and their defect types.
pub const DEMO_CATEGORIES: [(&str, [Defect; 2]); 4] = [
    ("weave", [Defect::Scratch, Defect::Stain]),
    ("grain", [Defect::Hole, Defect::Patch]),
    ("disc", [Defect::Scratch, Defect::Hole]),
    ("washer", [Defect::Stain, Defect::Patch]),
];

/// Kinds of local defect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defect {
    Scratch,
    Hole,
    Stain,
    Patch,
}

impl Defect {
    pub fn name(self) -> &'static str {
        match self {
            Defect::Scratch => "scratch",
            Defect::Hole => "hole",
            Defect::Stain => "stain",
            Defect::Patch => "patch",
        }
    }
}

/// Writes the dataset under `root` (created if needed) and returns the number of images.
pub fn write_demo_dataset(root: &Path, spec: &DemoSpec) -> Result<usize> {
    if !(32..=4096).contains(&spec.image_size) || spec.train == 0 {
        return Err(Error::InvalidArgument(format!(
            "demo dataset: images of 32 to 4096 pixels and at least one training image \
             (got {} and {})",
            spec.image_size, spec.train
        )));
    }
    let mut written = 0;
    for (index, (category, defects)) in DEMO_CATEGORIES.iter().enumerate() {
        let mut rng = SeededRng::new(spec.seed ^ (0x5eed_0000 + index as u64));
        let dir = root.join(category);
        for i in 0..spec.train {
            let image = normal_image(category, spec.image_size, &mut rng);
            save_rgb(&dir.join("train/good").join(format!("{i:03}.png")), &image)?;
            written += 1;
        }
        for i in 0..spec.test_good {
            let image = normal_image(category, spec.image_size, &mut rng);
            save_rgb(&dir.join("test/good").join(format!("{i:03}.png")), &image)?;
            written += 1;
        }
        for defect in defects {
            for i in 0..spec.test_defect {
                let mut image = normal_image(category, spec.image_size, &mut rng);
                let mask = add_defect(&mut image, *defect, object_radii(category), &mut rng);
                let name = format!("{i:03}");
                save_rgb(
                    &dir.join("test")
                        .join(defect.name())
                        .join(format!("{name}.png")),
                    &image,
                )?;
                save_gray(
                    &dir.join("ground_truth")
                        .join(defect.name())
                        .join(format!("{name}_mask.png")),
                    spec.image_size,
                    mask,
                )?;
                written += 1;
            }
        }
    }
    Ok(written)
}

fn save_rgb(path: &Path, image: &Canvas) -> Result<()> {
    let size = image.size as u32;
    let pixels = image
        .data
        .iter()
        .map(|v| v.clamp(0.0, 255.0).round() as u8)
        .collect();
    save(path, RgbImage::from_raw(size, size, pixels).map(Into::into))
}

fn save_gray(path: &Path, size: usize, mask: Vec<u8>) -> Result<()> {
    let size = size as u32;
    save(path, GrayImage::from_raw(size, size, mask).map(Into::into))
}

/// Writes `image` as a PNG through the atomic writer: a full disk or a kill leaves no
/// half-written image behind.
fn save(path: &Path, image: Option<image::DynamicImage>) -> Result<()> {
    let image = image.ok_or_else(|| Error::invalid_file(path, "image buffer of the wrong size"))?;
    let mut png = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| Error::invalid_file(path, format!("encoding the PNG: {e}")))?;
    write_atomic(path, png.get_ref())
}

/// An RGB image in 0..255 floats, `[y][x][c]`.
struct Canvas {
    size: usize,
    data: Vec<f32>,
}

impl Canvas {
    fn set(&mut self, x: usize, y: usize, rgb: [f32; 3], alpha: f32) {
        let i = (y * self.size + x) * 3;
        for (d, v) in self.data[i..i + 3].iter_mut().zip(rgb) {
            *d = *d * (1.0 - alpha) + v * alpha;
        }
    }
}

fn normal_image(category: &str, size: usize, rng: &mut SeededRng) -> Canvas {
    let s = size as f32;
    let brightness = 1.0 + (rng.unit() as f32 - 0.5) * 0.1;
    let phase_x = rng.unit() as f32 * std::f32::consts::TAU;
    let phase_y = rng.unit() as f32 * std::f32::consts::TAU;
    let scale = 1.0 + (rng.unit() as f32 - 0.5) * 0.06;
    let (cx, cy) = (
        s / 2.0 + (rng.unit() as f32 - 0.5) * s * 0.06,
        s / 2.0 + (rng.unit() as f32 - 0.5) * s * 0.06,
    );
    // Up to 4 degrees either way (the objects are round, so only the textures show it).
    let (sin, cos) = ((rng.unit() as f32 - 0.5) * 8f32.to_radians()).sin_cos();
    let mut canvas = Canvas {
        size,
        data: vec![0.0; size * size * 3],
    };
    for y in 0..size {
        for x in 0..size {
            let (dx, dy) = (x as f32 - s / 2.0, y as f32 - s / 2.0);
            let (u, v) = (
                (s / 2.0 + dx * cos - dy * sin) / s,
                (s / 2.0 + dx * sin + dy * cos) / s,
            );
            let rgb = match category {
                "weave" => {
                    let a = (u * 24.0 * scale * std::f32::consts::PI + phase_x).sin();
                    let b = (v * 24.0 * scale * std::f32::consts::PI + phase_y).sin();
                    let t = 0.5 + 0.25 * (a + b);
                    [90.0 + 100.0 * t, 110.0 + 80.0 * t, 150.0 + 60.0 * t]
                }
                "grain" => {
                    let ring = ((v * 14.0 * scale + 0.6 * (u * 5.0 + phase_x).sin())
                        * std::f32::consts::PI)
                        .sin();
                    let t = 0.5 + 0.5 * ring;
                    [150.0 + 60.0 * t, 100.0 + 45.0 * t, 55.0 + 25.0 * t]
                }
                _ => {
                    let r =
                        ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt() / (s * scale);
                    let inside = if category == "disc" {
                        r < 0.32
                    } else {
                        (0.16..0.34).contains(&r)
                    };
                    if inside {
                        let shade = 1.0 - 0.5 * r;
                        [200.0 * shade, 200.0 * shade, 205.0 * shade]
                    } else {
                        [40.0, 45.0, 50.0]
                    }
                }
            };
            let noise = (rng.unit() as f32 - 0.5) * 12.0;
            canvas.set(x, y, rgb.map(|c| c * brightness + noise), 1.0);
        }
    }
    canvas
}

/// Where a defect may be centred on an object: radii (fractions of the image side) inside it.
fn object_radii(category: &str) -> Option<(f32, f32)> {
    match category {
        "disc" => Some((0.0, 0.22)),
        "washer" => Some((0.2, 0.3)),
        _ => None,
    }
}

/// Adds one defect and returns its mask (0 or 255 per pixel).
fn add_defect(
    image: &mut Canvas,
    defect: Defect,
    object: Option<(f32, f32)>,
    rng: &mut SeededRng,
) -> Vec<u8> {
    let size = image.size;
    let s = size as f32;
    let mut mask = vec![0u8; size * size];
    // Centre of the defect: on the object for objects, anywhere away from the border otherwise.
    // How far a scratch may run from its centre: on an object, not past its rim.
    let mut reach = s;
    let (cx, cy) = if let Some((r_min, r_max)) = object {
        let angle = rng.unit() as f32 * std::f32::consts::TAU;
        let r = s * (r_min + (r_max - r_min) * rng.unit() as f32);
        reach = (s * (r_max + 0.06) - r).max(2.0);
        (s / 2.0 + r * angle.cos(), s / 2.0 + r * angle.sin())
    } else {
        (
            s * (0.25 + 0.5 * rng.unit() as f32),
            s * (0.25 + 0.5 * rng.unit() as f32),
        )
    };
    let mut paint = |x: usize, y: usize, rgb: [f32; 3], alpha: f32, mask: &mut Vec<u8>| {
        image.set(x, y, rgb, alpha);
        if alpha > 0.3 {
            mask[y * size + x] = 255;
        }
    };
    match defect {
        Defect::Scratch => {
            let angle = rng.unit() as f32 * std::f32::consts::PI;
            let half = (s * (0.1 + 0.08 * rng.unit() as f32)).min(reach);
            let width = (s / 64.0).max(1.0);
            let (dx, dy) = (angle.cos(), angle.sin());
            for y in 0..size {
                for x in 0..size {
                    let (px, py) = (x as f32 - cx, y as f32 - cy);
                    let along = px * dx + py * dy;
                    let across = (px * -dy + py * dx).abs();
                    if along.abs() <= half && across <= width {
                        paint(x, y, [235.0, 235.0, 230.0], 1.0, &mut mask);
                    }
                }
            }
        }
        Defect::Hole => {
            let radius = s * (0.04 + 0.03 * rng.unit() as f32);
            for y in 0..size {
                for x in 0..size {
                    let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
                    if d <= radius {
                        paint(x, y, [12.0, 10.0, 10.0], 1.0, &mut mask);
                    }
                }
            }
        }
        Defect::Stain => {
            let (rx, ry) = (
                s * (0.06 + 0.04 * rng.unit() as f32),
                s * (0.04 + 0.03 * rng.unit() as f32),
            );
            for y in 0..size {
                for x in 0..size {
                    let d = ((x as f32 - cx) / rx).powi(2) + ((y as f32 - cy) / ry).powi(2);
                    if d < 1.5 {
                        let alpha = 0.75 * (1.0 - d / 1.5).clamp(0.0, 1.0).sqrt();
                        paint(x, y, [120.0, 70.0, 20.0], alpha, &mut mask);
                    }
                }
            }
        }
        Defect::Patch => {
            let half = (s * (0.05 + 0.03 * rng.unit() as f32)) as isize;
            let cell = (s / 48.0).max(1.0) as isize;
            for dy in -half..=half {
                for dx in -half..=half {
                    let (x, y) = (cx as isize + dx, cy as isize + dy);
                    if x < 0 || y < 0 || x >= size as isize || y >= size as isize {
                        continue;
                    }
                    let checker = ((dx + half) / cell + (dy + half) / cell) % 2 == 0;
                    let rgb = if checker {
                        [30.0, 160.0, 60.0]
                    } else {
                        [220.0, 220.0, 60.0]
                    };
                    paint(x as usize, y as usize, rgb, 1.0, &mut mask);
                }
            }
        }
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::folder::FolderDataset;

    fn spec() -> DemoSpec {
        DemoSpec {
            seed: 3,
            image_size: 48,
            train: 3,
            test_good: 2,
            test_defect: 2,
        }
    }

    fn all_bytes(root: &Path) -> Vec<(String, Vec<u8>)> {
        let mut files = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let name = path.strip_prefix(root).unwrap().display().to_string();
                    files.push((name, std::fs::read(&path).unwrap()));
                }
            }
        }
        files.sort();
        files
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_images() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        assert_eq!(
            write_demo_dataset(a.path(), &spec()).unwrap(),
            4 * (3 + 2 + 4)
        );
        write_demo_dataset(b.path(), &spec()).unwrap();
        write_demo_dataset(c.path(), &DemoSpec { seed: 4, ..spec() }).unwrap();
        assert_eq!(all_bytes(a.path()), all_bytes(b.path()));
        assert_ne!(all_bytes(a.path()), all_bytes(c.path()));
    }

    #[test]
    fn it_is_a_usable_mvtec_layout_with_masks_on_the_defects() {
        let dir = tempfile::tempdir().unwrap();
        write_demo_dataset(dir.path(), &spec()).unwrap();
        let dataset = FolderDataset::open(dir.path()).unwrap();
        assert_eq!(dataset.categories, vec!["disc", "grain", "washer", "weave"]);
        for name in &dataset.categories {
            let category = dataset.category(name).unwrap();
            assert_eq!(category.train.len(), 3);
            assert_eq!(category.test.iter().filter(|t| t.label == 1).count(), 4);
            assert!(category.missing_masks.is_empty());
            for t in category.test.iter().filter(|t| t.label == 1) {
                let mask = image::open(t.mask.as_ref().unwrap()).unwrap().to_luma8();
                let marked = mask.pixels().filter(|p| p.0[0] == 255).count();
                // Local: visible but well under a quarter of the image.
                assert!(
                    (4..48 * 48 / 4).contains(&marked),
                    "{}: {marked}",
                    t.path.display()
                );
            }
        }
    }

    #[test]
    fn defects_change_the_pixels_under_their_mask() {
        let mut rng = SeededRng::new(9);
        let clean = normal_image("grain", 64, &mut rng.clone());
        let mut damaged = normal_image("grain", 64, &mut rng);
        let mask = add_defect(&mut damaged, Defect::Hole, None, &mut SeededRng::new(1));
        for (i, &m) in mask.iter().enumerate() {
            let changed = (0..3).any(|c| clean.data[i * 3 + c] != damaged.data[i * 3 + c]);
            assert_eq!(m == 255, changed, "pixel {i}");
        }
    }

    #[test]
    fn too_small_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            write_demo_dataset(
                dir.path(),
                &DemoSpec {
                    image_size: 16,
                    ..spec()
                }
            )
            .is_err()
        );
    }
}
