//! `mtad inspect`: what a dataset holds and everything wrong with it, before a long run.
//!
//! By default only image headers are read (size and channels), and each PNG and JPEG file's end
//! is checked for its end marker, which finds truncated downloads: a full MVTec AD is inspected
//! in seconds. [`InspectDepth::Decode`] decodes every image (in parallel) to also find files
//! damaged in the middle.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use rayon::prelude::*;

mod headers;
use headers::{ImageInfo, image_info};

use super::{
    cifar::{CLASSES, Cifar10, CifarLayout},
    folder::{self, FolderDataset, GOOD},
    mvtec,
};

/// How bad a problem is: errors make the dataset unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub severity: Severity,
    pub message: String,
}

/// What one category (or CIFAR class) holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CategoryReport {
    pub name: String,
    pub train: usize,
    pub test_good: usize,
    pub test_defect: usize,
    /// Defect folder -> image count.
    pub defects: BTreeMap<String, usize>,
    pub masks_found: usize,
    pub masks_missing: usize,
    /// "WxH" -> count.
    pub sizes: BTreeMap<String, usize>,
    /// Channel count -> count.
    pub channels: BTreeMap<u8, usize>,
    /// What its test set can measure (`folder::supported_metrics`).
    pub metrics: Vec<String>,
}

/// The result of inspecting a dataset.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InspectReport {
    pub kind: String,
    pub root: PathBuf,
    pub categories: Vec<CategoryReport>,
    pub problems: Vec<Problem>,
}

impl InspectReport {
    fn new(kind: &str, root: &Path) -> Self {
        Self {
            kind: kind.to_string(),
            root: root.to_path_buf(),
            categories: Vec::new(),
            problems: Vec::new(),
        }
    }

    fn problem(&mut self, severity: Severity, message: impl Into<String>) {
        self.problems.push(Problem {
            severity,
            message: message.into(),
        });
    }

    /// True when nothing found stops training.
    pub fn is_usable(&self) -> bool {
        !self.categories.is_empty() && self.problems.iter().all(|p| p.severity != Severity::Error)
    }
}

/// How much of each image [`inspect_folder_with`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InspectDepth {
    /// Headers, and the end marker of PNG and JPEG files (fast).
    #[default]
    Headers,
    /// Every image decoded in full.
    Decode,
}

/// Inspects a folder dataset reading headers only; with `mvtec`, also checks for the 15 MVTec
/// categories.
pub fn inspect_folder(root: &Path, mvtec: bool) -> InspectReport {
    inspect_folder_with(root, mvtec, InspectDepth::Headers)
}

/// [`inspect_folder`] at a chosen depth.
pub fn inspect_folder_with(root: &Path, mvtec: bool, depth: InspectDepth) -> InspectReport {
    let kind = match (mvtec, depth) {
        (true, InspectDepth::Headers) => "MVTec AD (headers read)",
        (true, InspectDepth::Decode) => "MVTec AD (every image decoded)",
        (false, InspectDepth::Headers) => "folder dataset (headers read)",
        (false, InspectDepth::Decode) => "folder dataset (every image decoded)",
    };
    let mut report = InspectReport::new(kind, root);
    let dataset = match FolderDataset::open(root) {
        Ok(d) => d,
        Err(e) => {
            report.problem(Severity::Error, e.to_string());
            return report;
        }
    };
    if mvtec {
        let missing: Vec<&str> = mvtec::CATEGORIES
            .iter()
            .copied()
            .filter(|c| !dataset.categories.iter().any(|f| f == c))
            .collect();
        if !missing.is_empty() {
            report.problem(
                Severity::Warning,
                format!(
                    "MVTec categories missing: {} (the others can still be trained)",
                    missing.join(", ")
                ),
            );
        }
        for extra in dataset
            .categories
            .iter()
            .filter(|c| !mvtec::CATEGORIES.contains(&c.as_str()))
        {
            report.problem(
                Severity::Warning,
                format!("'{extra}' is not an MVTec category: use --dataset folder to train on it"),
            );
        }
    }
    for name in &dataset.categories {
        inspect_category(&dataset, name, depth, &mut report);
    }
    report
}

fn inspect_category(
    dataset: &FolderDataset,
    name: &str,
    depth: InspectDepth,
    report: &mut InspectReport,
) {
    let category = match dataset.category(name) {
        Ok(c) => c,
        Err(e) => {
            report.problem(Severity::Error, e.to_string());
            return;
        }
    };
    let mut summary = CategoryReport {
        name: name.to_string(),
        train: category.train.len(),
        ..CategoryReport::default()
    };
    for t in &category.test {
        if t.defect == GOOD {
            summary.test_good += 1;
        } else {
            summary.test_defect += 1;
            *summary.defects.entry(t.defect.clone()).or_default() += 1;
            if t.mask.is_some() {
                summary.masks_found += 1;
            } else {
                summary.masks_missing += 1;
            }
        }
    }
    // The rule `train` applies (`Category::check_trainable`): "usable" means train accepts it.
    if let Err(message) = category.check_trainable() {
        report.problem(Severity::Error, format!("{name}: {message}"));
    }
    let (metrics, note) = category.supported_metrics();
    summary.metrics = metrics.iter().map(|m| m.to_string()).collect();
    if let Some(note) = note {
        report.problem(
            Severity::Warning,
            format!("{name}: {note} (training and the threshold need only normal images)"),
        );
    }
    if summary.masks_missing > 0 {
        report.problem(
            Severity::Warning,
            format!(
                "{name}: {} defect images have no mask (pixel-level results will skip them), \
                 e.g. {}",
                summary.masks_missing,
                category.missing_masks[0].display()
            ),
        );
    }
    skipped_and_ignored(&category.dir, report);

    // Every image and mask once, in parallel.
    let masks: Vec<(&Path, &Path)> = category
        .test
        .iter()
        .filter_map(|t| t.mask.as_deref().map(|m| (t.path.as_path(), m)))
        .collect();
    let images: Vec<&Path> = category
        .train
        .iter()
        .map(PathBuf::as_path)
        .chain(category.test.iter().map(|t| t.path.as_path()))
        .chain(masks.iter().map(|(_, m)| *m))
        .collect();
    let infos: BTreeMap<&Path, Result<ImageInfo, String>> = images
        .par_iter()
        .map(|&p| (p, image_info(p, depth)))
        .collect();
    let image_count = category.train.len() + category.test.len();
    let mut not_square = Vec::new();
    for (i, path) in images.iter().enumerate() {
        let is_mask = i >= image_count;
        match &infos[path] {
            Ok(info) if !is_mask => {
                *summary
                    .sizes
                    .entry(format!("{}x{}", info.width, info.height))
                    .or_default() += 1;
                *summary.channels.entry(info.channels).or_default() += 1;
                if info.width != info.height {
                    not_square.push(*path);
                }
                if let Some(warning) = &info.warning {
                    report.problem(Severity::Warning, format!("{}: {warning}", path.display()));
                }
            }
            Ok(info) => {
                if let Some(warning) = &info.warning {
                    report.problem(Severity::Warning, format!("{}: {warning}", path.display()));
                }
            }
            Err(message) => report.problem(
                Severity::Error,
                format!(
                    "{}: cannot read {}: {message}",
                    path.display(),
                    if is_mask { "mask" } else { "image" }
                ),
            ),
        }
    }
    if let Some(first) = not_square.first() {
        report.problem(
            Severity::Warning,
            format!(
                "{name}: {} images are not square (e.g. {}): they are stretched to a square, \
                 as the reference's Resize((1024, 1024)) does",
                not_square.len(),
                first.display()
            ),
        );
    }
    let mismatched: Vec<&Path> = masks
        .iter()
        .filter(|(image, mask)| match (&infos[image], &infos[mask]) {
            (Ok(i), Ok(m)) => (i.width, i.height) != (m.width, m.height),
            _ => false,
        })
        .map(|(_, m)| *m)
        .collect();
    if let Some(first) = mismatched.first() {
        report.problem(
            Severity::Warning,
            format!(
                "{name}: {} masks differ in size from their image (e.g. {}); they are resized \
                 to the image size all the same",
                mismatched.len(),
                first.display()
            ),
        );
    }
    report.categories.push(summary);
}

/// Warns about files that are not read: other extensions in the image folders, and folders
/// beside `train/good` (torchvision's `ImageFolder` would train on those too; we do not).
fn skipped_and_ignored(dir: &Path, report: &mut InspectReport) {
    let mut folders = vec![dir.join("train").join(GOOD)];
    let test = dir.join("test");
    if let Ok(names) = folder::sorted_subfolders(&test) {
        folders.extend(names.iter().map(|n| test.join(n)));
    }
    for folder_path in folders {
        if let Ok(skipped) = folder::skipped_files(&folder_path)
            && let Some(first) = skipped.first()
        {
            report.problem(
                Severity::Warning,
                format!(
                    "{}: {} files are skipped, not being {} images (e.g. {})",
                    folder_path.display(),
                    skipped.len(),
                    folder::IMAGE_EXTENSIONS.join("/"),
                    first.display()
                ),
            );
        }
    }
    if let Ok(names) = folder::sorted_subfolders(&dir.join("train")) {
        let others: Vec<&String> = names.iter().filter(|n| *n != GOOD).collect();
        if !others.is_empty() {
            report.problem(
                Severity::Warning,
                format!(
                    "{}: only train/good is trained on; ignored: {}",
                    dir.display(),
                    others
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
    }
}

/// Inspects one-class CIFAR-10.
pub fn inspect_cifar(root: &Path) -> InspectReport {
    let mut report = InspectReport::new("CIFAR-10", root);
    let data = match Cifar10::open(root) {
        Ok(d) => d,
        Err(e) => {
            report.problem(Severity::Error, e.to_string());
            return report;
        }
    };
    report.kind = format!(
        "CIFAR-10 ({} layout, {})",
        match data.layout {
            CifarLayout::Python => "python",
            CifarLayout::Binary => "binary",
        },
        data.root.display()
    );
    if data.class_names != CLASSES {
        report.problem(
            Severity::Warning,
            format!("unexpected class names {:?}", data.class_names),
        );
    }
    let (train, test) = (data.train.class_counts(), data.test.class_counts());
    for (k, name) in CLASSES.iter().enumerate() {
        if train[k] == 0 {
            report.problem(
                Severity::Error,
                format!("class {k} ({name}) has no training images"),
            );
        }
        report.categories.push(CategoryReport {
            name: format!("{k} {name}"),
            train: train[k],
            test_good: test[k],
            test_defect: data.test.len() - test[k],
            sizes: BTreeMap::from([("32x32".to_string(), train[k] + test[k])]),
            channels: BTreeMap::from([(3, train[k] + test[k])]),
            metrics: folder::supported_metrics(test[k], data.test.len() - test[k], 0)
                .0
                .iter()
                .map(|m| m.to_string())
                .collect(),
            ..CategoryReport::default()
        });
    }
    if data.train.len() != 50_000 || data.test.len() != 10_000 {
        report.problem(
            Severity::Warning,
            format!(
                "{} training and {} test images; the full CIFAR-10 has 50000 and 10000",
                data.train.len(),
                data.test.len()
            ),
        );
    }
    report
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} at {}", self.kind, self.root.display())?;
        if !self.categories.is_empty() {
            writeln!(
                f,
                "{:<16} {:>6} {:>10} {:>12} {:>6} {:>8}  {:<24} defects",
                "category",
                "train",
                "test good",
                "test defect",
                "masks",
                "missing",
                "sizes (channels)"
            )?;
        }
        for c in &self.categories {
            let sizes = c.sizes.keys().cloned().collect::<Vec<_>>().join(",");
            let channels = c
                .channels
                .keys()
                .map(u8::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let defects = c
                .defects
                .iter()
                .map(|(d, n)| format!("{d}:{n}"))
                .collect::<Vec<_>>()
                .join(" ");
            writeln!(
                f,
                "{:<16} {:>6} {:>10} {:>12} {:>6} {:>8}  {:<24} {}",
                c.name,
                c.train,
                c.test_good,
                c.test_defect,
                c.masks_found,
                c.masks_missing,
                format!("{sizes} ({channels})"),
                defects
            )?;
        }
        for c in self.categories.iter().filter(|c| !c.metrics.is_empty()) {
            writeln!(f, "{} can measure: {}", c.name, c.metrics.join(", "))?;
        }
        for p in &self.problems {
            let tag = match p.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            writeln!(f, "{tag}: {}", p.message)?;
        }
        write!(
            f,
            "{}",
            if self.is_usable() {
                "usable"
            } else {
                "NOT usable: fix the errors above"
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::demo::{DemoSpec, write_demo_dataset};

    fn small_demo() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let spec = DemoSpec {
            image_size: 32,
            train: 2,
            test_good: 1,
            test_defect: 1,
            ..DemoSpec::default()
        };
        write_demo_dataset(dir.path(), &spec).unwrap();
        dir
    }

    #[test]
    fn a_good_dataset_is_usable_and_counted() {
        let dir = small_demo();
        let report = inspect_folder(dir.path(), false);
        assert!(report.is_usable(), "{report}");
        assert_eq!(report.categories.len(), 4);
        let weave = report
            .categories
            .iter()
            .find(|c| c.name == "weave")
            .unwrap();
        assert_eq!((weave.train, weave.test_good, weave.test_defect), (2, 1, 2));
        assert_eq!(weave.masks_found, 2);
        assert_eq!(weave.sizes.get("32x32"), Some(&5));
        let text = report.to_string();
        assert!(
            text.contains("weave") && text.contains("scratch:1"),
            "{text}"
        );

        // As MVTec: the 15 categories are missing and these four are not MVTec's, which are
        // warnings: what is there can be trained.
        let report = inspect_folder(dir.path(), true);
        assert!(report.is_usable(), "{report}");
        assert!(report.problems.iter().any(|p| p.message.contains("carpet")));
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.message.contains("'weave' is not an MVTec category"))
        );
    }

    #[test]
    fn broken_images_and_missing_roots_make_it_unusable() {
        let dir = small_demo();
        let victim = dir.path().join("disc/train/good/001.png");
        let bytes = std::fs::read(&victim).unwrap();
        std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
        std::fs::remove_file(dir.path().join("grain/ground_truth/hole/000_mask.png")).unwrap();
        for depth in [InspectDepth::Headers, InspectDepth::Decode] {
            let report = inspect_folder_with(dir.path(), false, depth);
            assert!(!report.is_usable());
            let text = report.to_string();
            assert!(text.contains("001.png: cannot read image"), "{text}");
            assert!(text.contains("have no mask"), "{text}");
        }

        let report = inspect_folder(&dir.path().join("absent"), true);
        assert!(!report.is_usable());
        assert!(report.to_string().contains("absent"));
    }

    #[test]
    fn damage_inside_a_png_takes_full_decoding_to_find() {
        let dir = small_demo();
        let victim = dir.path().join("weave/test/good/000.png");
        let mut bytes = std::fs::read(&victim).unwrap();
        // Inside the first IDAT chunk's compressed data: the header and the end are intact.
        let idat = bytes.windows(4).position(|w| w == b"IDAT").unwrap();
        for b in &mut bytes[idat + 20..idat + 60] {
            *b ^= 0x5a;
        }
        std::fs::write(&victim, &bytes).unwrap();
        assert!(inspect_folder(dir.path(), false).is_usable());
        let report = inspect_folder_with(dir.path(), false, InspectDepth::Decode);
        assert!(!report.is_usable());
        assert!(report.to_string().contains("000.png: cannot read image"));
    }

    #[test]
    fn odd_shapes_skipped_files_and_ignored_folders_are_warnings() {
        let dir = small_demo();
        let disc = dir.path().join("disc");
        image::RgbImage::new(40, 30)
            .save(disc.join("train/good/900.png"))
            .unwrap();
        image::GrayImage::new(16, 16)
            .save(disc.join("ground_truth/hole/000_mask.png"))
            .unwrap();
        std::fs::write(disc.join("test/good/readme.txt"), b"notes").unwrap();
        std::fs::create_dir_all(disc.join("train/bad")).unwrap();
        let report = inspect_folder(dir.path(), false);
        assert!(report.is_usable(), "{report}");
        let warnings: Vec<&str> = report
            .problems
            .iter()
            .filter(|p| p.severity == Severity::Warning)
            .map(|p| p.message.as_str())
            .collect();
        let has = |needle: &str| warnings.iter().any(|w| w.contains(needle));
        assert!(has("1 images are not square"), "{warnings:?}");
        assert!(has("1 masks differ in size"), "{warnings:?}");
        assert!(has("readme.txt"), "{warnings:?}");
        assert!(has("ignored: bad"), "{warnings:?}");
        let disc = &report.categories[0];
        assert_eq!(disc.sizes.get("40x30"), Some(&1));
    }
}
