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
        self.folder.category(class_name(index)?)
    }

    /// Category `name` (one of [`CATEGORIES`], any case).
    pub fn category_by_name(&self, name: &str) -> Result<Category> {
        self.category(class_index(name)?)
    }
}

/// The name of class `index` (0..14).
pub fn class_name(index: usize) -> Result<&'static str> {
    CATEGORIES.get(index).copied().ok_or_else(|| {
        Error::InvalidArgument(format!("MVTec class index {index} is out of range 0-14"))
    })
}

/// The class index (0..14) of category `name`, in any case.
pub fn class_index(name: &str) -> Result<usize> {
    CATEGORIES
        .iter()
        .position(|c| c.eq_ignore_ascii_case(name))
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "'{name}' is not an MVTec AD category ({})",
                CATEGORIES.join(", ")
            ))
        })
}

/// Parses a class list such as `0-14`, `bottle,screw`, `3,5-7` or `all` against `names`
/// (indices into `names`, in the order given, without duplicates).
pub fn parse_class_list(spec: &str, names: &[&str]) -> Result<Vec<usize>> {
    if names.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "--classes {spec:?}: there are no classes to choose from"
        )));
    }
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
        for (i, name) in CATEGORIES.iter().enumerate() {
            assert_eq!(class_index(name).unwrap(), i);
            assert_eq!(class_name(i).unwrap(), *name);
        }
        assert_eq!(class_index("Metal_Nut").unwrap(), 9);
        assert!(
            class_index("nut")
                .unwrap_err()
                .to_string()
                .contains("metal_nut")
        );
        assert!(class_name(15).is_err());
    }

    #[test]
    fn other_name_lists_work_too() {
        let names = ["weave", "grain"];
        assert_eq!(parse_class_list("grain,0", &names).unwrap(), vec![1, 0]);
        assert_eq!(parse_class_list("0-1", &names).unwrap(), vec![0, 1]);
        assert!(parse_class_list("2", &names).is_err());
        assert!(parse_class_list("0", &[]).is_err());
    }
}
