//! A dataset in the MVTec AD layout, with any category and defect names:
//!
//! ```text
//! <root>/<category>/train/good/*.png
//! <root>/<category>/test/good/*.png
//! <root>/<category>/test/<defect>/*.png
//! <root>/<category>/ground_truth/<defect>/<stem>_mask.png   (optional)
//! ```
//!
//! Listing follows torchvision's `ImageFolder`, which the reference uses: class folders in
//! sorted order, files sorted by name; test label 1 for every folder except `good`. Images are
//! decoded as the reference's PIL `convert("RGB")` does (grey expanded, alpha dropped).

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::{FloatImage, transform};
use crate::{Error, Result};

/// File extensions read as images (case-insensitive): the formats this build decodes.
pub const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

/// The folder of normal images in `train/` and `test/`.
pub const GOOD: &str = "good";

/// One test image with its label and mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestImage {
    pub path: PathBuf,
    /// 0 for `good`, 1 for every defect folder.
    pub label: u8,
    /// The folder it came from: `good` or the defect type.
    pub defect: String,
    /// The ground-truth mask, if there is one; `None` for good images (their mask is empty) and
    /// for defect images whose mask is missing (see [`Category::missing_masks`]).
    pub mask: Option<PathBuf>,
}

/// One category's images.
#[derive(Debug, Clone)]
pub struct Category {
    pub name: String,
    pub dir: PathBuf,
    /// `train/good`, sorted.
    pub train: Vec<PathBuf>,
    /// `test/<folder>` for the folders in sorted order, each sorted.
    pub test: Vec<TestImage>,
    /// Defect images without a mask file.
    pub missing_masks: Vec<PathBuf>,
}

impl TestImage {
    /// The ground-truth mask at `size` x `size` (see [`load_mask`]): all zeros for a good image,
    /// `None` for a defect image without a mask file.
    pub fn load_mask(&self, size: usize) -> Result<Option<Vec<u8>>> {
        match (&self.mask, self.label) {
            (Some(path), _) => load_mask(path, size).map(Some),
            (None, 0) => Ok(Some(vec![0; size * size])),
            (None, _) => Ok(None),
        }
    }
}

impl Category {
    /// What `train` requires of a category, beside readable images: the one rule for `train`
    /// and `inspect`. The error says what is missing.
    pub fn check_trainable(&self) -> std::result::Result<(), String> {
        if self.train.len() < 2 {
            return Err(format!(
                "{} training images; at least 2 are needed",
                self.train.len()
            ));
        }
        // A test set of good images only, or none, is fine: the model is trained and
        // calibrated on normal images; what needs defects is left empty (`supported_metrics`).
        Ok(())
    }

    /// What this category's test set can measure (see [`supported_metrics`]).
    pub fn supported_metrics(&self) -> (Vec<&'static str>, Option<String>) {
        let good = self.test.iter().filter(|t| t.label == 0).count();
        let masks = self.test.iter().filter(|t| t.mask.is_some()).count();
        supported_metrics(good, self.test.len() - good, masks)
    }

    /// Test labels in test order.
    pub fn test_labels(&self) -> Vec<u8> {
        self.test.iter().map(|t| t.label).collect()
    }
}

/// What a test set of `good` normal and `defect` anomalous images (`masks` of them with a mask)
/// can measure, and a note on what it cannot: the metrics written as empty for it.
pub fn supported_metrics(
    good: usize,
    defect: usize,
    masks: usize,
) -> (Vec<&'static str>, Option<String>) {
    let mut metrics = vec!["threshold at --fpr on held-out normals"];
    if good > 0 {
        metrics.push("test false-positive rate");
    }
    if defect > 0 {
        metrics.push("test true-positive rate");
    }
    if good > 0 && defect > 0 {
        metrics.extend(["image AUROC", "AUPR", "F1-max", "AUROC per defect type"]);
        if masks > 0 {
            metrics.extend(["pixel AUROC", "AUPRO"]);
        }
    }
    let missing = match (good, defect) {
        (0, 0) => Some("no test images"),
        (_, 0) => Some("no defect test images"),
        (0, _) => Some("no good test images"),
        _ => None,
    };
    let note = missing.map(|m| {
        format!(
            "{m}: the AUROC, AUPR, F1-max and pixel metrics need both good and defect test \
             images; they are left empty"
        )
    });
    (metrics, note)
}

/// A root folder of categories in the MVTec layout.
#[derive(Debug, Clone)]
pub struct FolderDataset {
    pub root: PathBuf,
    /// Category folder names, sorted.
    pub categories: Vec<String>,
}

impl FolderDataset {
    /// Opens `root`: every visible subfolder with a `train` or `test` folder is a category.
    pub fn open(root: &Path) -> Result<Self> {
        let dataset_error = |message: String| Error::Dataset {
            root: root.to_path_buf(),
            message,
        };
        if !root.is_dir() {
            return Err(dataset_error(
                "the data root is not a folder (missing?)".into(),
            ));
        }
        let categories: Vec<String> = sorted_subfolders(root)?
            .into_iter()
            .filter(|name| {
                root.join(name).join("train").is_dir() || root.join(name).join("test").is_dir()
            })
            .collect();
        if categories.is_empty() {
            let hint = if root.join("train").is_dir() || root.join("test").is_dir() {
                " (this looks like one category: give its parent folder as the data root)"
            } else {
                ""
            };
            return Err(dataset_error(format!(
                "no category folders: expected <root>/<category>/train/good and \
                 <root>/<category>/test/<good|defect>{hint}"
            )));
        }
        Ok(Self {
            root: root.to_path_buf(),
            categories,
        })
    }

    /// Lists one category, checking that it can be trained on.
    pub fn category(&self, name: &str) -> Result<Category> {
        let dataset_error = |message: String| Error::Dataset {
            root: self.root.clone(),
            message,
        };
        let dir = self.root.join(name);
        if !dir.is_dir() {
            return Err(dataset_error(format!(
                "no category '{name}' (found: {})",
                self.categories.join(", ")
            )));
        }
        let train_dir = dir.join("train").join(GOOD);
        if !train_dir.is_dir() {
            return Err(dataset_error(format!("{} is missing", train_dir.display())));
        }
        let train = list_images(&train_dir)?;
        if train.is_empty() {
            return Err(dataset_error(format!(
                "{} holds no images ({})",
                train_dir.display(),
                IMAGE_EXTENSIONS.join(", ")
            )));
        }
        let mut test = Vec::new();
        let mut missing_masks = Vec::new();
        let test_dir = dir.join("test");
        if test_dir.is_dir() {
            for folder in sorted_subfolders(&test_dir)? {
                let label = u8::from(folder != GOOD);
                let masks = if label == 1 {
                    mask_files(&dir.join("ground_truth").join(&folder))?
                } else {
                    Vec::new()
                };
                for path in list_images(&test_dir.join(&folder))? {
                    let mask = if label == 1 {
                        let stem = path.file_stem().unwrap_or_default().to_string_lossy();
                        let found = find_mask(&masks, &format!("{stem}_mask"));
                        if found.is_none() {
                            missing_masks.push(path.clone());
                        }
                        found
                    } else {
                        None
                    };
                    test.push(TestImage {
                        path,
                        label,
                        defect: folder.clone(),
                        mask,
                    });
                }
            }
        }
        Ok(Category {
            name: name.to_string(),
            dir,
            train,
            test,
            missing_masks,
        })
    }
}

/// The image files of a `ground_truth/<defect>` folder; none when there is no such folder.
fn mask_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.is_dir() {
        list_images(dir)
    } else {
        Ok(Vec::new())
    }
}

/// The mask named `<stem>.png` (MVTec's), or else `<stem>` with another image extension.
fn find_mask(masks: &[PathBuf], stem: &str) -> Option<PathBuf> {
    let named = |p: &&PathBuf| p.file_stem().is_some_and(|s| s.to_string_lossy() == stem);
    masks
        .iter()
        .filter(named)
        .find(|p| p.extension().is_some_and(|e| e == "png"))
        .or_else(|| masks.iter().find(named))
        .cloned()
}

/// Visible subfolder names of `dir`, sorted.
pub fn sorted_subfolders(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && entry.path().is_dir() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Image files directly in `dir`, sorted by name; hidden files are ignored.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(visible_files(dir)?
        .into_iter()
        .filter(|p| is_image(p))
        .collect())
}

/// Visible files directly in `dir` that [`list_images`] leaves out (other extensions), sorted.
pub fn skipped_files(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(visible_files(dir)?
        .into_iter()
        .filter(|p| !is_image(p))
        .collect())
}

/// Whether `path` has one of the [`IMAGE_EXTENSIONS`], in any case.
pub fn is_image(path: &Path) -> bool {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}

/// Files (not folders) in `dir` whose names do not start with a dot, sorted by name.
fn visible_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if !hidden && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// Decodes an image as 8-bit RGB the way PIL's `convert("RGB")` does for 8-bit files: grey
/// copied to the three channels, alpha dropped (not blended), palettes expanded.
///
/// PNG, BMP and TIFF pixels are exactly PIL's (MVTec AD is PNG). JPEG decoders differ in their
/// IDCT and chroma upsampling: against PIL's libjpeg-turbo a 4:2:0 JPEG differs by up to 4 of 255
/// levels (0.4 on average). 16-bit files are scaled to 8 bits, where PIL would clip them.
pub fn decode_rgb8(path: &Path) -> Result<image::RgbImage> {
    Ok(decode(path)?.into_rgb8())
}

fn decode(path: &Path) -> Result<image::DynamicImage> {
    open_image(path)?.decode().map_err(|e| Error::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The largest side of an image or mask that is read: a file whose header claims more is
/// refused before anything is allocated (MVTec AD's largest images are 1024 pixels).
pub const MAX_IMAGE_SIDE: u32 = 16_384;

/// The most memory one decoded image may take.
pub const MAX_IMAGE_BYTES: u64 = 1 << 30;

/// A reader of an image file, its format guessed from its content, with the size limits
/// ([`MAX_IMAGE_SIDE`], [`MAX_IMAGE_BYTES`]) that every decoder of ours applies.
pub fn open_image(path: &Path) -> Result<image::ImageReader<std::io::BufReader<std::fs::File>>> {
    let mut reader = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    reader.limits(limits());
    Ok(reader)
}

fn limits() -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_BYTES);
    limits
}

/// Decodes the image at `path` in full (with the limits of [`open_image`]) and returns the
/// sha256 of its bytes: what `train` checks of every file before the first class starts.
pub fn check_image(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    reader.limits(limits());
    reader.decode().map_err(|e| Error::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(crate::output::sha256_hex(&bytes))
}

/// An image as the networks see it: RGB, in [-1, 1], resized to `size` x `size`
/// (`ToTensor`, `Normalize(0.5, 0.5)`, `Resize((size, size))`: the reference uses 1024 and
/// stretches images that are not square).
pub fn load_image(path: &Path, size: usize) -> Result<FloatImage> {
    let rgb = decode_rgb8(path)?;
    let (width, height) = rgb.dimensions();
    let image = transform::normalize_rgb8(rgb.as_raw(), width as usize, height as usize)?;
    transform::resize_bilinear_owned(image, size, size).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// [`load_image`] for many files, decoded and resized in parallel (rayon), in the given order;
/// the first file that fails is the error.
pub fn load_images(paths: &[PathBuf], size: usize) -> Result<Vec<FloatImage>> {
    paths.par_iter().map(|p| load_image(p, size)).collect()
}

/// A ground-truth mask at `size` x `size`, row-major, 1 for defect and 0 elsewhere.
///
/// The mask is binarised (> 127), resized with the same filter as the images
/// ([`transform::resize_bilinear`]) and thresholded at one half (>= 0.5), so that it lines up
/// with the resized image; nearest-neighbour would shift edges by up to half a source pixel.
pub fn load_mask(path: &Path, size: usize) -> Result<Vec<u8>> {
    let decoded = decode(path)?.into_luma8();
    let (width, height) = decoded.dimensions();
    let image = FloatImage {
        channels: 1,
        height: height as usize,
        width: width as usize,
        data: decoded
            .as_raw()
            .iter()
            .map(|&v| f32::from(u8::from(v > 127)))
            .collect(),
    };
    let resized =
        transform::resize_bilinear_owned(image, size, size).map_err(|e| Error::Image {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    Ok(resized.data.iter().map(|&v| u8::from(v >= 0.5)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, width: u32, height: u32, value: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::GrayImage::from_pixel(width, height, image::Luma([value]))
            .save(path)
            .unwrap();
    }

    #[test]
    fn lists_in_image_folder_order_with_labels_and_masks() {
        let dir = tempfile::tempdir().unwrap();
        let cat = dir.path().join("widget");
        write_png(&cat.join("train/good/001.png"), 4, 4, 10);
        write_png(&cat.join("train/good/000.png"), 4, 4, 10);
        write_png(&cat.join("test/good/000.png"), 4, 4, 10);
        write_png(&cat.join("test/scratch/000.png"), 4, 4, 10);
        write_png(&cat.join("test/scratch/001.PNG"), 4, 4, 10);
        write_png(&cat.join("test/crack/000.png"), 4, 4, 10);
        write_png(&cat.join("test/crack/001.png"), 4, 4, 10);
        write_png(&cat.join("ground_truth/crack/001_mask.bmp"), 4, 4, 255);
        write_png(&cat.join("ground_truth/scratch/000_mask.png"), 4, 4, 255);
        write_png(&cat.join("ground_truth/crack/000_mask.png"), 4, 4, 255);
        std::fs::write(cat.join("train/good/.hidden.png"), b"x").unwrap();
        std::fs::write(cat.join("train/good/notes.txt"), b"x").unwrap();

        let dataset = FolderDataset::open(dir.path()).unwrap();
        assert_eq!(dataset.categories, vec!["widget"]);
        let category = dataset.category("widget").unwrap();
        let names: Vec<_> = category
            .train
            .iter()
            .map(|p| p.file_name().unwrap())
            .collect();
        assert_eq!(names, ["000.png", "001.png"]);
        let test: Vec<_> = category
            .test
            .iter()
            .map(|t| (t.defect.as_str(), t.label, t.mask.is_some()))
            .collect();
        assert_eq!(
            test,
            [
                ("crack", 1, true),
                ("crack", 1, true),
                ("good", 0, false),
                ("scratch", 1, true),
                ("scratch", 1, false)
            ]
        );
        assert!(
            category.test[1]
                .mask
                .as_ref()
                .unwrap()
                .ends_with("001_mask.bmp")
        );
        assert_eq!(
            category.missing_masks,
            vec![cat.join("test/scratch/001.PNG")]
        );
        assert_eq!(category.test_labels(), vec![1, 1, 0, 1, 1]);
        // Masks at a size: zeros for good, the file for defects, None when missing.
        let good = category.test[2].load_mask(6).unwrap().unwrap();
        assert_eq!(good, vec![0; 36]);
        let crack = category.test[0].load_mask(6).unwrap().unwrap();
        assert_eq!(crack, vec![1; 36]);
        assert_eq!(category.test[4].load_mask(6).unwrap(), None);
        assert_eq!(
            skipped_files(&cat.join("train/good")).unwrap(),
            vec![cat.join("train/good/notes.txt")]
        );
    }

    #[test]
    fn bad_layouts_are_errors_naming_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let err = FolderDataset::open(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
        let err = FolderDataset::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no category folders"), "{err}");

        std::fs::create_dir_all(dir.path().join("empty/train/good")).unwrap();
        let dataset = FolderDataset::open(dir.path()).unwrap();
        let err = dataset.category("empty").unwrap_err().to_string();
        assert!(
            err.contains("holds no images") && err.contains("train/good"),
            "{err}"
        );
        let err = dataset.category("missing").unwrap_err().to_string();
        assert!(err.contains("no category 'missing'"), "{err}");
    }

    #[test]
    fn unreadable_images_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.png");
        write_png(&path, 8, 8, 100);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = load_image(&path, 16).unwrap_err().to_string();
        assert!(
            err.contains("broken.png") && err.contains("cannot decode"),
            "{err}"
        );
        let err = load_image(&dir.path().join("absent.png"), 16)
            .unwrap_err()
            .to_string();
        assert!(err.contains("absent.png"), "{err}");
    }

    #[test]
    fn grey_and_rgba_become_rgb_and_masks_threshold() {
        let dir = tempfile::tempdir().unwrap();
        let grey = dir.path().join("g.png");
        write_png(&grey, 4, 4, 255);
        let image = load_image(&grey, 8).unwrap();
        assert_eq!((image.channels, image.height, image.width), (3, 8, 8));
        assert!(image.data.iter().all(|&v| v == 1.0));

        let rgba = dir.path().join("a.png");
        image::RgbaImage::from_pixel(2, 2, image::Rgba([0, 255, 0, 0]))
            .save(&rgba)
            .unwrap();
        let image = load_image(&rgba, 2).unwrap();
        assert_eq!(image.get(0, 0, 0), -1.0);
        assert_eq!(image.get(1, 1, 1), 1.0);

        let mask = dir.path().join("m.png");
        let mut m = image::GrayImage::new(4, 4);
        m.put_pixel(0, 0, image::Luma([255]));
        m.put_pixel(1, 0, image::Luma([255]));
        m.save(&mask).unwrap();
        let resized = load_mask(&mask, 8).unwrap();
        assert_eq!(resized.iter().filter(|&&v| v == 1).count(), 8); // a 4x2 block of the 8x8
        assert_eq!(resized[0], 1);
        assert_eq!(resized[8 * 8 - 1], 0);
    }
}
