//! `mtad inspect`: what a dataset holds and everything wrong with it, before a long run.
//! Every image is decoded (in parallel), so truncated or unreadable files are found here rather
//! than hours into training.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use rayon::prelude::*;

use super::{
    cifar::{CLASSES, Cifar10, CifarLayout},
    folder::{FolderDataset, GOOD},
    mvtec,
};

/// How bad a problem is: errors make the dataset unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    pub message: String,
}

/// What one category (or CIFAR class) holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
}

/// The result of inspecting a dataset.
#[derive(Debug, Clone)]
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

/// Inspects a folder dataset; with `mvtec`, also checks for the 15 MVTec categories.
pub fn inspect_folder(root: &Path, mvtec: bool) -> InspectReport {
    let mut report = InspectReport::new(if mvtec { "MVTec AD" } else { "folder" }, root);
    let dataset = match FolderDataset::open(root) {
        Ok(d) => d,
        Err(e) => {
            report.problem(Severity::Error, e.to_string());
            return report;
        }
    };
    if mvtec {
        let missing: Vec<_> = mvtec::CATEGORIES
            .iter()
            .filter(|c| !dataset.categories.iter().any(|f| f == *c))
            .collect();
        if !missing.is_empty() {
            report.problem(
                Severity::Warning,
                format!(
                    "MVTec categories missing: {} (the others can still be trained)",
                    missing
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
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
        let category = match dataset.category(name) {
            Ok(c) => c,
            Err(e) => {
                report.problem(Severity::Error, e.to_string());
                continue;
            }
        };
        let mut summary = CategoryReport {
            name: name.clone(),
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
        if category.test.is_empty() {
            report.problem(
                Severity::Warning,
                format!("{name}: no test images: nothing to evaluate"),
            );
        } else if summary.test_good == 0 || summary.test_defect == 0 {
            report.problem(
                Severity::Warning,
                format!("{name}: the test set needs both good and defect images for a ROC AUC"),
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
        // Decode every image once, in parallel.
        let images: Vec<&Path> = category
            .train
            .iter()
            .map(PathBuf::as_path)
            .chain(category.test.iter().map(|t| t.path.as_path()))
            .collect();
        let decoded: Vec<_> = images.par_iter().map(|p| (p, decode_info(p))).collect();
        for (path, info) in decoded {
            match info {
                Ok((w, h, c)) => {
                    *summary.sizes.entry(format!("{w}x{h}")).or_default() += 1;
                    *summary.channels.entry(c).or_default() += 1;
                }
                Err(message) => report.problem(
                    Severity::Error,
                    format!("{}: cannot decode: {message}", path.display()),
                ),
            }
        }
        let masks: Vec<&PathBuf> = category
            .test
            .iter()
            .filter_map(|t| t.mask.as_ref())
            .collect();
        for (path, info) in masks
            .par_iter()
            .map(|p| (p, decode_info(p)))
            .collect::<Vec<_>>()
        {
            if let Err(message) = info {
                report.problem(
                    Severity::Error,
                    format!("{}: cannot decode mask: {message}", path.display()),
                );
            }
        }
        report.categories.push(summary);
    }
    report
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

fn decode_info(path: &Path) -> Result<(u32, u32, u8), String> {
    let image = image::ImageReader::open(path)
        .map_err(|e| e.to_string())?
        .with_guessed_format()
        .map_err(|e| e.to_string())?
        .decode()
        .map_err(|e| e.to_string())?;
    Ok((image.width(), image.height(), image.color().channel_count()))
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

        // As MVTec: the 15 categories are missing and these four are not MVTec's.
        let report = inspect_folder(dir.path(), true);
        assert!(report.problems.iter().any(|p| p.message.contains("carpet")));
    }

    #[test]
    fn broken_images_and_missing_roots_make_it_unusable() {
        let dir = small_demo();
        let victim = dir.path().join("disc/train/good/001.png");
        let bytes = std::fs::read(&victim).unwrap();
        std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
        std::fs::remove_file(dir.path().join("grain/ground_truth/hole/000_mask.png")).unwrap();
        let report = inspect_folder(dir.path(), false);
        assert!(!report.is_usable());
        let text = report.to_string();
        assert!(text.contains("001.png: cannot decode"), "{text}");
        assert!(text.contains("have no mask"), "{text}");

        let report = inspect_folder(&dir.path().join("absent"), true);
        assert!(!report.is_usable());
        assert!(report.to_string().contains("absent"));
    }
}
