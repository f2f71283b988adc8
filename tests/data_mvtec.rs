//! MVTec AD in its real layout, generated here into a temporary folder: an RGB category
//! (bottle) and a grayscale one (grid, as in the real dataset), with masks; loading by class
//! index, labels, masks, conversion to RGB, the 1024 resize and the full cut.

use std::path::Path;

use multi_teacher_ad::data::{
    crops::FullCut,
    folder::{load_image, load_mask},
    mvtec::{CATEGORIES, Mvtec, parse_class_list},
};

fn gray(path: &Path, size: u32, f: impl Fn(u32, u32) -> u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::GrayImage::from_fn(size, size, |x, y| image::Luma([f(x, y)]))
        .save(path)
        .unwrap();
}

fn rgb(path: &Path, size: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_fn(size, size, |x, y| image::Rgb([x as u8, y as u8, 200]))
        .save(path)
        .unwrap();
}

fn tree(root: &Path) {
    for i in 0..3 {
        rgb(&root.join(format!("bottle/train/good/{i:03}.png")), 40);
        gray(
            &root.join(format!("grid/train/good/{i:03}.png")),
            36,
            |x, y| ((x + y) * 3) as u8,
        );
    }
    rgb(&root.join("bottle/test/good/000.png"), 40);
    rgb(&root.join("bottle/test/broken_large/000.png"), 40);
    gray(
        &root.join("bottle/ground_truth/broken_large/000_mask.png"),
        40,
        |x, _| if x < 10 { 255 } else { 0 },
    );
    gray(&root.join("grid/test/good/000.png"), 36, |_, _| 128);
    gray(&root.join("grid/test/bent/000.png"), 36, |_, _| 10);
    gray(&root.join("grid/test/bent/001.png"), 36, |_, _| 20);
    gray(
        &root.join("grid/ground_truth/bent/000_mask.png"),
        36,
        |_, y| if y < 18 { 255 } else { 0 },
    );
    gray(
        &root.join("grid/ground_truth/bent/001_mask.png"),
        36,
        |_, _| 255,
    );
}

#[test]
fn categories_by_index_with_labels_masks_and_rgb() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path());
    let mvtec = Mvtec::open(dir.path()).unwrap();
    assert_eq!(mvtec.missing_categories().len(), 13);

    let grid_index = parse_class_list("grid", &CATEGORIES).unwrap()[0];
    assert_eq!(grid_index, 1);
    let grid = mvtec.category(grid_index).unwrap();
    assert_eq!(grid.train.len(), 3);
    assert_eq!(grid.test_labels(), vec![1, 1, 0]); // "bent" sorts before "good"
    assert!(
        grid.test
            .iter()
            .filter(|t| t.label == 1)
            .all(|t| t.mask.is_some())
    );

    // Grayscale becomes 3 equal channels at 64x64 (1024 in the real pipeline).
    let image = load_image(&grid.train[1], 64).unwrap();
    assert_eq!((image.channels, image.height, image.width), (3, 64, 64));
    for (y, x) in [(0, 0), (20, 33), (63, 63)] {
        assert_eq!(image.get(0, y, x), image.get(1, y, x));
        assert_eq!(image.get(1, y, x), image.get(2, y, x));
    }
    let mask = load_mask(grid.test[0].mask.as_ref().unwrap(), 64).unwrap();
    assert_eq!(mask.iter().filter(|&&m| m == 1).count(), 32 * 64); // the top half

    let bottle = mvtec.category(5).unwrap();
    assert_eq!(bottle.name, "bottle");
    assert_eq!(bottle.test_labels(), vec![1, 0]);
    let image = load_image(&bottle.test[1].path, 40).unwrap();
    assert_eq!(image.get(2, 5, 5), (200.0 / 255.0 - 0.5) / 0.5);

    // The full cut of a resized image maps patches back to their offsets.
    let cut = FullCut::new(64, 24, 20).unwrap();
    let patches = cut.patches(&image_at(&bottle.train[0], 64)).unwrap();
    assert_eq!(patches.len(), 9);

    let err = mvtec.category(0).unwrap_err().to_string();
    assert!(err.contains("carpet"), "{err}");
    assert!(mvtec.category(15).is_err());
}

fn image_at(path: &Path, size: usize) -> multi_teacher_ad::data::FloatImage {
    load_image(path, size).unwrap()
}

#[test]
fn all_fifteen_categories_by_class_list_and_inspect() {
    use multi_teacher_ad::data::inspect::{Severity, inspect_folder};
    let dir = tempfile::tempdir().unwrap();
    for (i, name) in CATEGORIES.iter().enumerate() {
        // Alternate grey and RGB sources, as the real dataset mixes them; two training images,
        // the fewest that train accepts.
        let shade = |_, _| (i * 10) as u8;
        for image in ["000", "001"] {
            let path = dir.path().join(format!("{name}/train/good/{image}.png"));
            if i % 2 == 0 {
                gray(&path, 8, shade);
            } else {
                rgb(&path, 8);
            }
        }
        gray(
            &dir.path().join(format!("{name}/test/good/000.png")),
            8,
            shade,
        );
        gray(
            &dir.path().join(format!("{name}/test/crack/000.png")),
            8,
            shade,
        );
        if *name != "screw" {
            gray(
                &dir.path()
                    .join(format!("{name}/ground_truth/crack/000_mask.png")),
                8,
                |_, _| 255,
            );
        }
    }
    let mvtec = Mvtec::open(dir.path()).unwrap();
    assert!(mvtec.missing_categories().is_empty());
    let chosen = parse_class_list("3,5-7,screw", &CATEGORIES).unwrap();
    let names: Vec<String> = chosen
        .iter()
        .map(|&i| mvtec.category(i).unwrap().name)
        .collect();
    assert_eq!(names, ["tile", "bottle", "cable", "capsule", "screw"]);
    assert_eq!(mvtec.category_by_name("Screw").unwrap().name, "screw");

    // The defect image without a mask is kept, with `mask: None`, and inspect reports it.
    let screw = mvtec.category(11).unwrap();
    assert_eq!(screw.test_labels(), vec![1, 0]);
    assert_eq!(screw.test[0].mask, None);
    assert_eq!(screw.missing_masks, vec![screw.test[0].path.clone()]);
    let report = inspect_folder(dir.path(), true);
    assert!(report.is_usable(), "{report}");
    assert_eq!(report.categories.len(), 15);
    let warnings: Vec<&str> = report
        .problems
        .iter()
        .map(|p| {
            assert_eq!(p.severity, Severity::Warning);
            p.message.as_str()
        })
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].starts_with("screw: 1 defect images have no mask"));
    let channels: usize = report
        .categories
        .iter()
        .filter_map(|c| c.channels.get(&1))
        .sum();
    assert_eq!(channels, 8 * 2 + 15 * 2); // grey train images of the 8 even categories, grey tests

    // Extra folders and missing categories are flagged against the 15 names.
    std::fs::rename(dir.path().join("zipper"), dir.path().join("zip")).unwrap();
    let text = inspect_folder(dir.path(), true).to_string();
    assert!(text.contains("MVTec categories missing: zipper"), "{text}");
    assert!(text.contains("'zip' is not an MVTec category"), "{text}");
}
