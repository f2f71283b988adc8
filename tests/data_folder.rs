//! Your own data in the MVTec layout (any category and defect names, several image formats,
//! optional masks), and every kind of bad input giving an error that names the file or folder.

use std::path::Path;

use multi_teacher_ad::data::folder::{FolderDataset, load_image, load_images, load_mask};

fn save(path: &Path, image: image::DynamicImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image.save(path).unwrap();
}

fn rgb(size: u32, shade: u8) -> image::DynamicImage {
    image::RgbImage::from_fn(size, size, |x, y| {
        image::Rgb([shade, (x * 8) as u8, (y * 8) as u8])
    })
    .into()
}

/// A category "pcb" with PNG, JPEG, BMP and TIFF files (extensions in mixed case), two defect
/// folders, one mask missing, and files that must be ignored.
fn own_data(root: &Path) {
    let pcb = root.join("pcb");
    save(&pcb.join("train/good/b.JPG"), rgb(20, 10));
    save(&pcb.join("train/good/a.png"), rgb(20, 20));
    save(&pcb.join("train/good/c.bmp"), rgb(20, 30));
    save(&pcb.join("train/good/d.TIFF"), rgb(20, 40));
    std::fs::write(pcb.join("train/good/.DS_Store"), b"junk").unwrap();
    std::fs::write(pcb.join("train/good/._a.png"), b"AppleDouble junk").unwrap();
    std::fs::write(pcb.join("train/good/notes.txt"), b"not an image").unwrap();
    save(&pcb.join("test/good/0.png"), rgb(20, 50));
    save(&pcb.join("test/solder_bridge/0.png"), rgb(20, 60));
    save(&pcb.join("test/solder_bridge/1.png"), rgb(20, 70));
    save(&pcb.join("test/missing_part/0.png"), rgb(20, 80));
    save(
        &pcb.join("ground_truth/solder_bridge/0_mask.png"),
        image::GrayImage::from_fn(20, 20, |x, _| image::Luma([if x < 5 { 255 } else { 0 }])).into(),
    );
    save(
        &pcb.join("ground_truth/missing_part/0_mask.png"),
        image::GrayImage::from_pixel(20, 20, image::Luma([255])).into(),
    );
    // Not a category: no train/ or test/ inside.
    std::fs::create_dir_all(root.join("docs")).unwrap();
    std::fs::create_dir_all(root.join(".cache/train")).unwrap();
}

#[test]
fn any_category_and_defect_names_with_several_formats() {
    let dir = tempfile::tempdir().unwrap();
    own_data(dir.path());
    let dataset = FolderDataset::open(dir.path()).unwrap();
    assert_eq!(dataset.categories, vec!["pcb"]);
    let pcb = dataset.category("pcb").unwrap();
    let train: Vec<_> = pcb
        .train
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(train, ["a.png", "b.JPG", "c.bmp", "d.TIFF"]);
    let test: Vec<_> = pcb
        .test
        .iter()
        .map(|t| (t.defect.as_str(), t.label, t.mask.is_some()))
        .collect();
    assert_eq!(
        test,
        [
            ("good", 0, false),
            ("missing_part", 1, true),
            ("solder_bridge", 1, true),
            ("solder_bridge", 1, false),
        ]
    );
    assert_eq!(
        pcb.missing_masks,
        vec![pcb.dir.join("test/solder_bridge/1.png")]
    );

    // Every format decodes to RGB at the asked size, in parallel, in the given order.
    let images = load_images(&pcb.train, 24).unwrap();
    assert_eq!(images.len(), 4);
    for (image, shade) in images.iter().zip([20u8, 10, 30, 40]) {
        assert_eq!(image.shape(), [3, 24, 24]);
        // The red channel is flat: its value tells which file this is (JPEG is lossy).
        let expected = (shade as f32 / 255.0 - 0.5) / 0.5;
        assert!((image.get(0, 12, 12) - expected).abs() < 0.05, "{shade}");
    }
    let mask = load_mask(pcb.test[2].mask.as_ref().unwrap(), 40).unwrap();
    assert!(
        mask.chunks(40)
            .all(|row| row[..10] == [1; 10] && row[10..] == [0; 30])
    );
}

#[test]
fn a_missing_root_or_category_or_train_set_names_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let err = FolderDataset::open(&dir.path().join("no-such-root"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no-such-root") && err.contains("not a folder"),
        "{err}"
    );

    own_data(dir.path());
    let dataset = FolderDataset::open(dir.path()).unwrap();
    let err = dataset.category("bottle").unwrap_err().to_string();
    assert!(
        err.contains("no category 'bottle'") && err.contains("pcb"),
        "{err}"
    );

    // The root given one level too deep: the error says what to do.
    let err = FolderDataset::open(&dir.path().join("pcb"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("give its parent folder"), "{err}");

    std::fs::create_dir_all(dir.path().join("empty/train/good")).unwrap();
    std::fs::write(dir.path().join("empty/train/good/readme.md"), b"x").unwrap();
    let dataset = FolderDataset::open(dir.path()).unwrap();
    let err = dataset.category("empty").unwrap_err().to_string();
    assert!(
        err.contains("empty/train/good") && err.contains("holds no images"),
        "{err}"
    );

    std::fs::create_dir_all(dir.path().join("testonly/test/good")).unwrap();
    let dataset = FolderDataset::open(dir.path()).unwrap();
    let err = dataset.category("testonly").unwrap_err().to_string();
    assert!(err.contains("testonly/train/good is missing"), "{err}");
}

#[test]
fn unreadable_and_truncated_images_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.png");
    save(&good, rgb(16, 0));
    let bytes = std::fs::read(&good).unwrap();

    let truncated = dir.path().join("truncated.png");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let header_only = dir.path().join("header_only.png");
    std::fs::write(&header_only, &bytes[..20]).unwrap();
    let garbage = dir.path().join("garbage.jpg");
    std::fs::write(&garbage, b"this is not a JPEG at all").unwrap();
    let empty = dir.path().join("empty.bmp");
    std::fs::write(&empty, b"").unwrap();
    let absent = dir.path().join("absent.png");

    for path in [&truncated, &header_only, &garbage, &empty, &absent] {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let err = load_image(path, 32).unwrap_err().to_string();
        assert!(err.contains(&name), "{err}");
        let err = load_mask(path, 32).unwrap_err().to_string();
        assert!(err.contains(&name), "{err}");
    }
    // In a batch, the failing file is named too.
    let err = load_images(&[good.clone(), truncated.clone(), good], 32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated.png"), "{err}");
}
