//! CIFAR-10 from the committed real-format fixtures (tests/fixtures/cifar, written by
//! make_fixtures.py): both layouts, the one-class split, the preprocessing, and bad files.

use std::path::Path;

use multi_teacher_ad::data::cifar::{
    CLASSES, Cifar10, CifarLayout, IMAGE_BYTES, preprocess, read_binary_batch, read_python_batch,
};

fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cifar")
}

/// The generator's image formula (make_fixtures.py).
fn expected_pixel(index: usize, c: usize, y: usize, x: usize) -> u8 {
    ((index * 37 + c * 85 + y * 7 + x * 3 + (x * y) % 11) % 256) as u8
}

#[test]
fn both_layouts_read_the_same_images_and_labels() {
    let py = Cifar10::open(&fixtures().join("cifar-10-batches-py")).unwrap();
    let bin = Cifar10::open(&fixtures().join("cifar-10-batches-bin")).unwrap();
    assert_eq!(py.layout, CifarLayout::Python);
    assert_eq!(bin.layout, CifarLayout::Binary);
    assert_eq!(py.train, bin.train);
    assert_eq!(py.test, bin.test);
    assert_eq!(py.class_names, CLASSES);
    assert_eq!(bin.class_names, CLASSES);
    assert_eq!(py.train.len(), 15);
    assert_eq!(py.test.len(), 3);
    // Image 4 of the training set (batch 2, second image), planar RGB, row-major.
    let image = py.train.image(4);
    assert_eq!(image.len(), IMAGE_BYTES);
    for (c, y, x) in [(0, 0, 0), (1, 5, 31), (2, 31, 17)] {
        assert_eq!(image[c * 1024 + y * 32 + x], expected_pixel(4, c, y, x));
    }
    assert_eq!(
        py.train.labels,
        (0..15).map(|i| (i % 10) as u8).collect::<Vec<_>>()
    );
    assert_eq!(py.test.labels, vec![5, 6, 7]);
}

#[test]
fn a_parent_folder_prefers_the_python_layout() {
    let data = Cifar10::open(&fixtures()).unwrap();
    assert_eq!(data.layout, CifarLayout::Python);
}

#[test]
fn the_one_class_split_and_preprocessing() {
    let data = Cifar10::open(&fixtures()).unwrap();
    let split = data.one_class(6).unwrap();
    assert_eq!(split.train, vec![6]);
    assert_eq!(split.test_labels, vec![1, 0, 1]);
    let image = preprocess(data.train.image(6), 64, 56).unwrap();
    assert_eq!((image.channels, image.height, image.width), (3, 56, 56));
    assert!(image.data.iter().all(|v| (-1.0..=1.0).contains(v)));
}

fn copy_fixture(dir: &Path) -> std::path::PathBuf {
    let target = dir.join("cifar-10-batches-py");
    std::fs::create_dir_all(&target).unwrap();
    for entry in std::fs::read_dir(fixtures().join("cifar-10-batches-py")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), target.join(entry.file_name())).unwrap();
    }
    target
}

#[test]
fn bad_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = copy_fixture(dir.path());
    let batch = root.join("data_batch_3");
    let good = std::fs::read(&batch).unwrap();

    // Truncated.
    std::fs::write(&batch, &good[..good.len() - 100]).unwrap();
    let err = Cifar10::open(&root).unwrap_err().to_string();
    assert!(
        err.contains("data_batch_3") && err.contains("truncated"),
        "{err}"
    );

    // Not a pickle.
    std::fs::write(&batch, b"hello world").unwrap();
    let err = read_python_batch(&batch).unwrap_err().to_string();
    assert!(err.contains("not a pickle"), "{err}");

    // A pickle of something else: the list [1].
    std::fs::write(&batch, b"\x80\x02]q\x01K\x01a.").unwrap();
    let err = read_python_batch(&batch).unwrap_err().to_string();
    assert!(err.contains("not a CIFAR batch"), "{err}");

    // Wrong dtype: '<f4' instead of 'u1' (same byte count would not fit: check the message).
    let wrong_dtype = replace(&good, b"U\x02u1", b"U\x02f4");
    std::fs::write(&batch, &wrong_dtype).unwrap();
    let err = read_python_batch(&batch).unwrap_err().to_string();
    assert!(err.contains("dtype") || err.contains("needs"), "{err}");

    // Wrong shape: 3 x 3072 declared as 3 x 1024 (BININT2 0x0c00 -> 0x0400).
    let wrong_shape = replace(&good, b"K\x03M\x00\x0c\x86", b"K\x09M\x00\x04\x86");
    std::fs::write(&batch, &wrong_shape).unwrap();
    let err = read_python_batch(&batch).unwrap_err().to_string();
    assert!(
        err.contains("shape") || err.contains("expected [N, 3072]"),
        "{err}"
    );

    // Missing file.
    std::fs::remove_file(&batch).unwrap();
    let err = Cifar10::open(&root).unwrap_err().to_string();
    assert!(err.contains("data_batch_3"), "{err}");

    // Binary layout: truncated record.
    let bin = dir.path().join("t.bin");
    let good = std::fs::read(fixtures().join("cifar-10-batches-bin/test_batch.bin")).unwrap();
    std::fs::write(&bin, &good[..good.len() - 1]).unwrap();
    assert!(
        read_binary_batch(&bin)
            .unwrap_err()
            .to_string()
            .contains("t.bin")
    );

    // No CIFAR at all.
    let err = Cifar10::open(dir.path().join("empty").as_path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("empty"), "{err}");
}

fn replace(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = haystack
        .windows(from.len())
        .position(|w| w == from)
        .unwrap_or_else(|| panic!("pattern {from:?} not in the fixture"));
    let mut out = haystack[..at].to_vec();
    out.extend_from_slice(to);
    out.extend_from_slice(&haystack[at + from.len()..]);
    out
}

#[test]
fn inspect_reports_classes_and_counts() {
    use multi_teacher_ad::data::inspect::inspect_cifar;
    let report = inspect_cifar(&fixtures());
    assert!(report.is_usable(), "{report}");
    assert_eq!(report.categories.len(), 10);
    assert_eq!(report.categories[0].train, 2); // images 0 and 10
    assert_eq!(report.categories[5].test_good, 1);
    assert!(report.to_string().contains("python layout"));
    let report = inspect_cifar(&fixtures().join("nothing-here"));
    assert!(!report.is_usable());
}
