//! MVTec AD: the folder layout of [`super::folder`] with its 15 categories in the reference's
//! order (class index 0..14), addressable by index or by name.

use std::path::Path;

use super::folder::{Category, FolderDataset};
use crate::{Error, Result};

/// The 15 categories, in the reference's order.
pub const CATEGORIES: [&str; 15] = [
    "carpet",
    "grid",
    "leather",
    "tile",
    "wood",
    "bottle",
    "cable",
    "capsule",
    "hazelnut",
    "metal_nut",
    "pill",
    "screw",
    "toothbrush",
    "transistor",
    "zipper",
];

/// MVTec AD at `root`.
#[derive(Debug, Clone)]
pub struct Mvtec {
    pub folder: FolderDataset,
}

impl Mvtec {
    pub fn open(root: &Path) -> Result<Self> {
        Ok(Self {
            folder: FolderDataset::open(root)?,
        })
    }

    /// The categories of the 15 that are missing under the root.
    pub fn missing_categories(&self) -> Vec<&'static str> {
        CATEGORIES
            .iter()
            .copied()
            .filter(|c| !self.folder.categories.iter().any(|f| f == c))
            .collect()
    }

    /// Category `index` (0..14, reference order).
    pub fn category(&self, index: usize) -> Result<Category> {
        let name = CATEGORIES.get(index).ok_or_else(|| {
            Error::InvalidArgument(format!("MVTec class index {index} is out of range 0-14"))
        })?;
        self.folder.category(name)
    }
}

/// Parses a class list such as `0-14`, `bottle,screw`, `3,5-7` or `all` against `names`
/// (indices into `names`, in the order given, without duplicates).
pub fn parse_class_list(spec: &str, names: &[&str]) -> Result<Vec<usize>> {
    let bad = |message: String| {
        Error::InvalidArgument(format!(
            "--classes {spec:?}: {message} (classes: 0-{} or {})",
            names.len() - 1,
            names.join(", ")
        ))
    };
    let index = |token: &str| -> Result<usize> {
        if let Ok(i) = token.parse::<usize>() {
            return if i < names.len() {
                Ok(i)
            } else {
                Err(bad(format!("index {i} is out of range")))
            };
        }
        names
            .iter()
            .position(|n| n.eq_ignore_ascii_case(token))
            .ok_or_else(|| bad(format!("unknown class '{token}'")))
    };
    if spec.trim().eq_ignore_ascii_case("all") {
        return Ok((0..names.len()).collect());
    }
    let mut out = Vec::new();
    for token in spec.split(',').map(str::trim) {
        if token.is_empty() {
            return Err(bad("empty entry".to_string()));
        }
        let range = match token.split_once('-') {
            Some((a, b)) if a.trim().parse::<usize>().is_ok() => {
                let (a, b) = (index(a.trim())?, index(b.trim())?);
                if a > b {
                    return Err(bad(format!("range {token} runs backwards")));
                }
                a..=b
            }
            _ => {
                let i = index(token)?;
                i..=i
            }
        };
        for i in range {
            if !out.contains(&i) {
                out.push(i);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_lists_by_index_range_and_name() {
        assert_eq!(
            parse_class_list("0-14", &CATEGORIES).unwrap(),
            (0..15).collect::<Vec<_>>()
        );
        assert_eq!(parse_class_list("all", &CATEGORIES).unwrap().len(), 15);
        assert_eq!(
            parse_class_list("bottle,screw", &CATEGORIES).unwrap(),
            vec![5, 11]
        );
        assert_eq!(
            parse_class_list("3, 5-7,metal_nut", &CATEGORIES).unwrap(),
            vec![3, 5, 6, 7, 9]
        );
        assert_eq!(
            parse_class_list("2,2,1-2", &CATEGORIES).unwrap(),
            vec![2, 1]
        );
    }

    #[test]
    fn bad_class_lists_are_clear_errors() {
        let err = parse_class_list("15", &CATEGORIES).unwrap_err().to_string();
        assert!(err.contains("out of range"), "{err}");
        let err = parse_class_list("bottel", &CATEGORIES)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown class 'bottel'") && err.contains("bottle"),
            "{err}"
        );
        assert!(parse_class_list("5-3", &CATEGORIES).is_err());
        assert!(parse_class_list("1,,2", &CATEGORIES).is_err());
    }

    #[test]
    fn the_reference_order() {
        assert_eq!(CATEGORIES[0], "carpet");
        assert_eq!(CATEGORIES[5], "bottle");
        assert_eq!(CATEGORIES[14], "zipper");
    }
}
