//! One-class CIFAR-10 (METHOD.md): the python layout `cifar-10-batches-py` (Python 2
//! protocol-2 pickles, read by [`super::pickle`] without Python) or the binary layout
//! `cifar-10-batches-bin` (records of 1 label byte + 3072 pixel bytes). Images are planar RGB:
//! 1024 R, then 1024 G, then 1024 B, row-major.
//!
//! For a normal class k: train on the training images of class k, test on all test images,
//! label 1 (anomalous) when the class is not k.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;

use super::{FloatImage, pickle, transform};
use crate::{Error, Result};

/// Bytes of one 32x32 RGB image.
pub const IMAGE_BYTES: usize = 3 * 32 * 32;
/// The ten classes, in label order.
pub const CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];
const PY_DIR: &str = "cifar-10-batches-py";
const BIN_DIR: &str = "cifar-10-batches-bin";

/// Which of the two published layouts was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CifarLayout {
    /// `cifar-10-batches-py`: pickled batches.
    Python,
    /// `cifar-10-batches-bin`: fixed-size records.
    Binary,
}

/// Images and labels of one split.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CifarSplit {
    /// `len() * 3072` bytes, planar RGB per image.
    pub images: Vec<u8>,
    /// Class of each image, 0-9.
    pub labels: Vec<u8>,
}

impl CifarSplit {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The planar RGB bytes of image `i`.
    ///
    /// # Panics
    /// If `i >= self.len()`, like slice indexing.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]
    }

    /// How many images of each class (labels outside 0-9 are not counted).
    pub fn class_counts(&self) -> [usize; 10] {
        let mut counts = [0; 10];
        for &l in &self.labels {
            if let Some(count) = counts.get_mut(l as usize) {
                *count += 1;
            }
        }
        counts
    }
}

/// CIFAR-10 read from disk.
#[derive(Debug, Clone)]
pub struct Cifar10 {
    /// The folder that holds the batch files.
    pub root: PathBuf,
    pub layout: CifarLayout,
    /// The names in `batches.meta` (`batches.meta.txt`), in label order.
    pub class_names: Vec<String>,
    /// `data_batch_1` to `data_batch_5`, in that order (shared, not copied, by the inputs that
    /// read it).
    pub train: Arc<CifarSplit>,
    /// `test_batch`.
    pub test: Arc<CifarSplit>,
}

/// The one-class split of METHOD.md for a normal class.
#[derive(Debug, Clone, PartialEq)]
pub struct OneClassSplit {
    /// The normal class, 0-9.
    pub normal: usize,
    /// Indices into the training split: the images of the normal class (5000 in CIFAR-10).
    pub train: Vec<usize>,
    /// Indices into the test split: all of them, in order.
    pub test: Vec<usize>,
    /// For each entry of `test`: 1 (anomalous) when its class is not the normal one, else 0.
    pub test_labels: Vec<u8>,
}

impl Cifar10 {
    /// Opens the batch folder itself (`cifar-10-batches-py` or `cifar-10-batches-bin`, or any
    /// folder holding `data_batch_1` or `data_batch_1.bin`), or a parent holding
    /// `cifar-10-batches-py` (preferred) or `cifar-10-batches-bin`. The files are read in
    /// parallel.
    pub fn open(root: &Path) -> Result<Self> {
        let (dir, layout) = locate(root)?;
        let suffix = match layout {
            CifarLayout::Python => "",
            CifarLayout::Binary => ".bin",
        };
        let mut files: Vec<PathBuf> = (1..=5)
            .map(|i| dir.join(format!("data_batch_{i}{suffix}")))
            .collect();
        files.push(dir.join(format!("test_batch{suffix}")));
        let mut splits = files
            .par_iter()
            .map(|path| match layout {
                CifarLayout::Python => read_python_batch(path),
                CifarLayout::Binary => read_binary_batch(path),
            })
            .collect::<Result<Vec<_>>>()?;
        let class_names = match layout {
            CifarLayout::Python => read_python_meta(&dir.join("batches.meta"))?,
            CifarLayout::Binary => read_binary_meta(&dir.join("batches.meta.txt"))?,
        };
        let test = splits.pop().unwrap_or_default();
        let rest: usize = splits.iter().skip(1).map(|s| s.images.len()).sum();
        let mut splits = splits.into_iter();
        let mut train = splits.next().unwrap_or_default();
        train.images.reserve_exact(rest);
        for split in splits {
            train.images.extend_from_slice(&split.images);
            train.labels.extend_from_slice(&split.labels);
        }
        Ok(Self {
            root: dir,
            layout,
            class_names,
            train: Arc::new(train),
            test: Arc::new(test),
        })
    }

    /// The one-class split of METHOD.md for `normal` (0-9; see [`parse_class`]): the training
    /// images of that class, and every test image, labelled 1 when its class is another one.
    pub fn one_class(&self, normal: usize) -> Result<OneClassSplit> {
        let Some(name) = CLASSES.get(normal) else {
            return Err(Error::InvalidArgument(format!(
                "CIFAR-10 normal class {normal} is out of range 0-9"
            )));
        };
        let dataset_error = |message: String| Error::Dataset {
            root: self.root.clone(),
            message,
        };
        let train: Vec<usize> = (0..self.train.len())
            .filter(|&i| self.train.labels[i] as usize == normal)
            .collect();
        if train.is_empty() {
            return Err(dataset_error(format!(
                "no training images of class {normal} ({name})"
            )));
        }
        if self.test.is_empty() {
            return Err(dataset_error("no test images".into()));
        }
        let test_labels = self
            .test
            .labels
            .iter()
            .map(|&l| u8::from(l as usize != normal))
            .collect();
        Ok(OneClassSplit {
            normal,
            train,
            test: (0..self.test.len()).collect(),
            test_labels,
        })
    }
}

/// A CIFAR-10 class given by its index (`0`-`9`) or its name (`airplane` ... `truck`, any case).
pub fn parse_class(text: &str) -> Result<usize> {
    let token = text.trim();
    let found = match token.parse::<usize>() {
        Ok(i) => (i < CLASSES.len()).then_some(i),
        Err(_) => CLASSES.iter().position(|n| n.eq_ignore_ascii_case(token)),
    };
    found.ok_or_else(|| {
        Error::InvalidArgument(format!(
            "unknown CIFAR-10 class {text:?}: give 0-9 or one of {}",
            CLASSES.join(", ")
        ))
    })
}

/// A CIFAR image as the networks see it, with the reference's sizes (256, then 224) or smaller
/// ones for quick trials.
pub fn preprocess(planar_rgb: &[u8], resize: usize, crop: usize) -> Result<FloatImage> {
    transform::cifar_image(planar_rgb, 32, resize, crop)
}

fn locate(root: &Path) -> Result<(PathBuf, CifarLayout)> {
    let dataset_error = |message: String| Error::Dataset {
        root: root.to_path_buf(),
        message,
    };
    if !root.is_dir() {
        return Err(dataset_error(
            "the data root is not a folder (missing?)".into(),
        ));
    }
    let name = root.file_name().and_then(|n| n.to_str());
    if name == Some(PY_DIR) || root.join("data_batch_1").is_file() {
        return Ok((root.to_path_buf(), CifarLayout::Python));
    }
    if name == Some(BIN_DIR) || root.join("data_batch_1.bin").is_file() {
        return Ok((root.to_path_buf(), CifarLayout::Binary));
    }
    if root.join(PY_DIR).is_dir() {
        return Ok((root.join(PY_DIR), CifarLayout::Python));
    }
    if root.join(BIN_DIR).is_dir() {
        return Ok((root.join(BIN_DIR), CifarLayout::Binary));
    }
    Err(dataset_error(format!(
        "no CIFAR-10 here: expected {PY_DIR}/ or {BIN_DIR}/ (or their files data_batch_1..5, \
         test_batch)"
    )))
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn read_pickle(path: &Path) -> Result<pickle::Value> {
    let bytes = read_file(path)?;
    if bytes.first() != Some(&0x80) {
        return Err(Error::invalid_file(
            path,
            "not a pickle of protocol 2 or later (those start with byte 0x80), so not a \
             CIFAR-10 python batch",
        ));
    }
    pickle::read(&bytes).map_err(|e| Error::invalid_file(path, format!("bad pickle: {e}")))
}

/// A python-layout batch: `{"data": uint8 [N, 3072], "labels": [N ints], ...}`.
pub fn read_python_batch(path: &Path) -> Result<CifarSplit> {
    let invalid = |m: String| Error::invalid_file(path, m);
    let value = read_pickle(path)?;
    if !matches!(value, pickle::Value::Dict(_)) {
        return Err(invalid(format!(
            "holds a {}, not a CIFAR batch (a dict)",
            value.kind()
        )));
    }
    let data = value
        .get("data")
        .ok_or_else(|| invalid("no 'data' entry: not a CIFAR batch".into()))?;
    let array = pickle::numpy_array(data).map_err(|m| invalid(format!("'data': {m}")))?;
    if array.dtype.trim_start_matches(['|', '<', '>', '=']) != "u1" {
        return Err(invalid(format!(
            "'data' has dtype {}, expected uint8 (|u1)",
            array.dtype
        )));
    }
    if array.shape.len() != 2 || array.shape[1] != IMAGE_BYTES || array.fortran_order {
        return Err(invalid(format!(
            "'data' has shape {:?}{}, expected [N, 3072] in C order",
            array.shape,
            if array.fortran_order {
                " in Fortran order"
            } else {
                ""
            }
        )));
    }
    let labels = match value.get("labels").map(|v| &**v) {
        Some(pickle::Value::List(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match **v {
                pickle::Value::Int(l) if (0..10).contains(&l) => Ok(l as u8),
                pickle::Value::Int(l) => Err(invalid(format!("label {i} is {l}, expected 0-9"))),
                ref other => Err(invalid(format!(
                    "label {i} is a {}, expected an int 0-9",
                    other.kind()
                ))),
            })
            .collect::<Result<Vec<_>>>()?,
        Some(other) => {
            return Err(invalid(format!(
                "'labels' is a {}, expected a list",
                other.kind()
            )));
        }
        None => return Err(invalid("no 'labels' entry: not a CIFAR batch".into())),
    };
    if labels.len() != array.shape[0] {
        return Err(invalid(format!(
            "{} labels for {} images",
            labels.len(),
            array.shape[0]
        )));
    }
    Ok(CifarSplit {
        images: array.data.to_vec(),
        labels,
    })
}

fn read_python_meta(path: &Path) -> Result<Vec<String>> {
    let value = read_pickle(path)?;
    let names = match value.get("label_names").map(|v| &**v) {
        Some(pickle::Value::List(items)) => items
            .iter()
            .map(|v| v.as_text().map(str::to_string))
            .collect::<Option<Vec<_>>>(),
        _ => None,
    };
    match names {
        Some(names) if names.len() == CLASSES.len() => Ok(names),
        _ => Err(Error::invalid_file(
            path,
            "expected a dict with 'label_names', a list of 10 strings",
        )),
    }
}

/// A binary-layout batch: records of 1 label byte and 3072 pixel bytes.
pub fn read_binary_batch(path: &Path) -> Result<CifarSplit> {
    let bytes = read_file(path)?;
    let record = IMAGE_BYTES + 1;
    if bytes.is_empty() || bytes.len() % record != 0 {
        return Err(Error::invalid_file(
            path,
            format!(
                "{} bytes is not a whole number of {record}-byte records (truncated?)",
                bytes.len()
            ),
        ));
    }
    let n = bytes.len() / record;
    let mut split = CifarSplit {
        images: Vec::with_capacity(n * IMAGE_BYTES),
        labels: Vec::with_capacity(n),
    };
    for (i, chunk) in bytes.chunks_exact(record).enumerate() {
        if chunk[0] > 9 {
            return Err(Error::invalid_file(
                path,
                format!("record {i} has label {}, expected 0-9", chunk[0]),
            ));
        }
        split.labels.push(chunk[0]);
        split.images.extend_from_slice(&chunk[1..]);
    }
    Ok(split)
}

fn read_binary_meta(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if names.len() != CLASSES.len() {
        return Err(Error::invalid_file(
            path,
            format!("expected 10 class names, one a line, found {}", names.len()),
        ));
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_batches_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.bin");
        let mut bytes = vec![3u8];
        bytes.extend(std::iter::repeat_n(7u8, IMAGE_BYTES));
        bytes.push(9);
        bytes.extend(std::iter::repeat_n(8u8, IMAGE_BYTES));
        std::fs::write(&path, &bytes).unwrap();
        let split = read_binary_batch(&path).unwrap();
        assert_eq!(split.labels, vec![3, 9]);
        assert_eq!(split.image(1)[0], 8);

        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let err = read_binary_batch(&path).unwrap_err().to_string();
        assert!(err.contains("b.bin") && err.contains("truncated"), "{err}");
        bytes[0] = 10;
        std::fs::write(&path, &bytes).unwrap();
        assert!(
            read_binary_batch(&path)
                .unwrap_err()
                .to_string()
                .contains("label 10")
        );
    }

    #[test]
    fn one_class_split_labels_every_other_class_anomalous() {
        let data = Cifar10 {
            root: PathBuf::from("x"),
            layout: CifarLayout::Binary,
            class_names: CLASSES.iter().map(|s| s.to_string()).collect(),
            train: Arc::new(CifarSplit {
                images: vec![0; 4 * IMAGE_BYTES],
                labels: vec![1, 0, 1, 2],
            }),
            test: Arc::new(CifarSplit {
                images: vec![0; 3 * IMAGE_BYTES],
                labels: vec![1, 5, 1],
            }),
        };
        let split = data.one_class(1).unwrap();
        assert_eq!(split.train, vec![0, 2]);
        assert_eq!(split.test, vec![0, 1, 2]);
        assert_eq!(split.test_labels, vec![0, 1, 0]);
        assert!(data.one_class(10).unwrap_err().to_string().contains("0-9"));
        assert!(data.one_class(7).unwrap_err().to_string().contains("horse"));
    }

    #[test]
    fn classes_are_parsed_by_index_or_name() {
        assert_eq!(parse_class("0").unwrap(), 0);
        assert_eq!(parse_class(" 9 ").unwrap(), 9);
        assert_eq!(parse_class("Automobile").unwrap(), 1);
        assert_eq!(parse_class("truck").unwrap(), 9);
        for bad in ["10", "-1", "car", ""] {
            let err = parse_class(bad).unwrap_err().to_string();
            assert!(err.contains("airplane, automobile"), "{err}");
        }
    }

    #[test]
    fn class_counts_skip_labels_out_of_range() {
        let split = CifarSplit {
            images: vec![0; 4 * IMAGE_BYTES],
            labels: vec![3, 3, 9, 200],
        };
        let counts = split.class_counts();
        assert_eq!(
            (counts[3], counts[9], counts.iter().sum::<usize>()),
            (2, 1, 3)
        );
    }

    #[test]
    fn a_batch_folder_is_recognised_by_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let py = dir.path().join(PY_DIR);
        std::fs::create_dir(&py).unwrap();
        assert_eq!(locate(&py).unwrap(), (py.clone(), CifarLayout::Python));
        // Its missing files are then named, rather than "no CIFAR-10 here" (the files are read
        // in parallel, so whichever is reported first).
        let err = Cifar10::open(&py).unwrap_err().to_string();
        assert!(
            err.contains("data_batch_") || err.contains("test_batch"),
            "{err}"
        );
        let bin = dir.path().join("renamed");
        std::fs::create_dir(&bin).unwrap();
        std::fs::write(bin.join("data_batch_1.bin"), b"").unwrap();
        assert_eq!(locate(&bin).unwrap(), (bin.clone(), CifarLayout::Binary));
        assert_eq!(locate(dir.path()).unwrap(), (py, CifarLayout::Python));
    }
}
