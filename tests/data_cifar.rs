//! CIFAR-10 from the committed real-format fixtures (tests/fixtures/cifar, written by
//! make_fixtures.py): both layouts, Python 3 re-pickles, the one-class split, the preprocessing,
//! and bad files, each an error that names the file and what is wrong.

use std::path::{Path, PathBuf};

use multi_teacher_ad::data::{
    cifar::{
        CLASSES, Cifar10, CifarLayout, IMAGE_BYTES, parse_class, preprocess, read_binary_batch,
        read_python_batch,
    },
    pickle,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cifar")
}

/// The generator's image formula (make_fixtures.py), for image `index` across all files.
fn expected_pixel(index: usize, c: usize, y: usize, x: usize) -> u8 {
    ((index * 37 + c * 85 + y * 7 + x * 3 + (x * y) % 11) % 256) as u8
}

fn assert_image(image: &[u8], index: usize) {
    assert_eq!(image.len(), IMAGE_BYTES);
    for (c, y, x) in [(0, 0, 0), (0, 1, 0), (1, 5, 31), (2, 31, 17), (2, 31, 31)] {
        assert_eq!(
            image[c * 1024 + y * 32 + x],
            expected_pixel(index, c, y, x),
            "image {index}, channel {c}, row {y}, column {x}"
        );
    }
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
    // 5 training batches of 3 images, then a test batch of 10; image n has label n % 10.
    assert_eq!((py.train.len(), py.test.len()), (15, 10));
    assert_eq!(py.train.images.len(), 15 * IMAGE_BYTES);
    for i in 0..15 {
        assert_image(py.train.image(i), i);
    }
    for i in 0..10 {
        assert_image(py.test.image(i), 15 + i);
    }
    let labels = |range: std::ops::Range<usize>| range.map(|n| (n % 10) as u8).collect::<Vec<_>>();
    assert_eq!(py.train.labels, labels(0..15));
    assert_eq!(py.test.labels, labels(15..25));
}

#[test]
fn a_parent_folder_prefers_the_python_layout() {
    let data = Cifar10::open(&fixtures()).unwrap();
    assert_eq!(data.layout, CifarLayout::Python);
    assert!(data.root.ends_with("cifar-10-batches-py"));
    // With only the binary folder, the parent gives the binary layout.
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&bin).unwrap();
    for entry in std::fs::read_dir(fixtures().join("cifar-10-batches-bin")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), bin.join(entry.file_name())).unwrap();
    }
    let data = Cifar10::open(dir.path()).unwrap();
    assert_eq!((data.layout, data.train.len()), (CifarLayout::Binary, 15));
}

#[test]
fn the_one_class_split_and_preprocessing() {
    let data = Cifar10::open(&fixtures()).unwrap();
    let normal = parse_class("frog").unwrap();
    assert_eq!(normal, 6);
    let split = data.one_class(normal).unwrap();
    assert_eq!(split.normal, 6);
    assert_eq!(split.train, vec![6]);
    assert_eq!(split.test, (0..10).collect::<Vec<_>>());
    // Test labels are 5, 6, 7, 8, 9, 0, 1, 2, 3, 4: only the second is a frog.
    assert_eq!(split.test_labels, vec![1, 0, 1, 1, 1, 1, 1, 1, 1, 1]);
    let split = data.one_class(parse_class("0").unwrap()).unwrap();
    assert_eq!(split.train, vec![0, 10]);
    assert_eq!(split.test_labels.iter().filter(|&&l| l == 0).count(), 1);

    let image = preprocess(data.train.image(6), 64, 56).unwrap();
    assert_eq!((image.channels, image.height, image.width), (3, 56, 56));
    assert!(image.data.iter().all(|v| (-1.0..=1.0).contains(v)));
}

#[test]
fn python3_repickles_read_the_same() {
    // Written by Python 3's pickle and numpy 2 (make_fixtures.py): protocol 2 stores bytes as
    // _codecs.encode(text, "latin1"), 3 as BINBYTES, 4 adds FRAME, MEMOIZE and STACK_GLOBAL,
    // 5 uses numpy's _frombuffer with a BYTEARRAY8.
    for protocol in 2..=5 {
        let path = fixtures().join(format!("python3/protocol_{protocol}.pkl"));
        let split = read_python_batch(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(split.labels, vec![protocol as u8], "protocol {protocol}");
        assert_image(split.image(0), 20 + protocol);
    }
}

#[test]
fn memo_references_see_the_built_object() {
    // Python 2's pickle of two '<u2' arrays: the second names _reconstruct, ndarray and the
    // dtype through BINGET, the dtype's byte order set by a BUILD before that.
    let bytes = std::fs::read(fixtures().join("shared_memo.pkl")).unwrap();
    assert!(bytes.windows(4).any(|w| w == b"h\x02h\x03"), "no BINGET");
    let pickle::Value::List(arrays) = pickle::read(&bytes).unwrap() else {
        panic!("not a list")
    };
    let a = pickle::numpy_array(&arrays[0]).unwrap();
    let b = pickle::numpy_array(&arrays[1]).unwrap();
    assert_eq!((a.shape.as_slice(), a.dtype.as_str()), (&[2, 3][..], "<u2"));
    assert_eq!((b.shape.as_slice(), b.dtype.as_str()), (&[1, 3][..], "<u2"));
    let words = |d: &[u8]| -> Vec<u16> {
        d.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    };
    assert_eq!(words(a.data), [1, 258, 65535, 0, 4660, 513]);
    assert_eq!(words(b.data), [7, 256, 43981]);
}

fn copy_python_fixture(dir: &Path) -> PathBuf {
    let target = dir.join("cifar-10-batches-py");
    std::fs::create_dir_all(&target).unwrap();
    for entry in std::fs::read_dir(fixtures().join("cifar-10-batches-py")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), target.join(entry.file_name())).unwrap();
    }
    target
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

/// Writes `bytes` as the batch, reads it, and returns the error, checking it names the file.
fn batch_error(batch: &Path, bytes: &[u8]) -> String {
    std::fs::write(batch, bytes).unwrap();
    let err = read_python_batch(batch)
        .expect_err("a bad batch was accepted")
        .to_string();
    assert!(err.contains("data_batch_3"), "{err}");
    err
}

#[test]
fn bad_python_batches_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = copy_python_fixture(dir.path());
    let batch = root.join("data_batch_3");
    let good = std::fs::read(&batch).unwrap();
    assert!(read_python_batch(&batch).is_ok());

    // Truncated anywhere: in the header, in the pixels, before STOP. Also through open().
    for keep in [1, 2, 50, 200, 5000, good.len() - 1] {
        let err = batch_error(&batch, &good[..keep]);
        assert!(err.contains("truncated"), "{keep} bytes: {err}");
    }
    let err = Cifar10::open(&root).unwrap_err().to_string();
    assert!(
        err.contains("data_batch_3") && err.contains("truncated"),
        "{err}"
    );

    // Not a pickle; empty; a pickle of something else.
    for bytes in [&b"hello world"[..], b""] {
        let err = batch_error(&batch, bytes);
        assert!(err.contains("not a pickle"), "{err}");
    }
    let err = batch_error(&batch, b"\x80\x02]q\x01K\x01a.");
    assert!(err.contains("holds a list, not a CIFAR batch"), "{err}");
    let err = batch_error(&batch, b"\x80\x02}.");
    assert!(err.contains("no 'data' entry"), "{err}");
    let err = batch_error(&batch, b"\x80\x02}U\x04dataK\x01s.");
    assert!(
        err.contains("'data': expected a numpy array, found a int"),
        "{err}"
    );

    // Wrong dtype: int8 (same size), float32 (size no longer matches the data).
    let err = batch_error(&batch, &replace(&good, b"U\x02u1", b"U\x02i1"));
    assert!(err.contains("dtype |i1, expected uint8"), "{err}");
    let err = batch_error(&batch, &replace(&good, b"U\x02u1", b"U\x02f4"));
    assert!(err.contains("needs 36864 bytes, holds 9216"), "{err}");

    // Wrong shape with the right byte count: [9, 1024], [9216]; Fortran order.
    let shape = b"K\x03M\x00\x0c\x86";
    let err = batch_error(&batch, &replace(&good, shape, b"K\x09M\x00\x04\x86"));
    assert!(err.contains("shape [9, 1024], expected [N, 3072]"), "{err}");
    let err = batch_error(&batch, &replace(&good, shape, b"M\x00\x24\x85"));
    assert!(err.contains("shape [9216]"), "{err}");
    let err = batch_error(&batch, &replace(&good, b"tb\x89T", b"tb\x88T"));
    assert!(err.contains("Fortran order"), "{err}");
    // A shape whose size is not the data's.
    let err = batch_error(&batch, &replace(&good, shape, b"K\x04M\x00\x0c\x86"));
    assert!(err.contains("needs 12288 bytes, holds 9216"), "{err}");

    // Labels: too few, out of range, not ints.
    let labels = b"(K\x06K\x07K\x08e";
    let err = batch_error(&batch, &replace(&good, labels, b"(K\x06K\x07e"));
    assert!(err.contains("2 labels for 3 images"), "{err}");
    let err = batch_error(&batch, &replace(&good, labels, b"(K\x06K\x07K\x0ce"));
    assert!(err.contains("label 2 is 12, expected 0-9"), "{err}");
    let err = batch_error(&batch, &replace(&good, labels, b"(K\x06NK\x08e"));
    assert!(err.contains("label 1 is a None"), "{err}");

    // Missing file.
    std::fs::remove_file(&batch).unwrap();
    let err = Cifar10::open(&root).unwrap_err().to_string();
    assert!(err.contains("data_batch_3"), "{err}");
}

#[test]
fn bad_meta_and_binary_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = copy_python_fixture(dir.path());
    let meta = root.join("batches.meta");
    std::fs::write(&meta, b"\x80\x02}U\x0blabel_names](U\x03catU\x03doges.").unwrap();
    let err = Cifar10::open(&root).unwrap_err().to_string();
    assert!(
        err.contains("batches.meta") && err.contains("10 strings"),
        "{err}"
    );
    std::fs::remove_file(&meta).unwrap();
    let err = Cifar10::open(&root).unwrap_err().to_string();
    assert!(err.contains("batches.meta"), "{err}");

    let bin = dir.path().join("t.bin");
    let good = std::fs::read(fixtures().join("cifar-10-batches-bin/test_batch.bin")).unwrap();
    std::fs::write(&bin, &good[..good.len() - 1]).unwrap();
    let err = read_binary_batch(&bin).unwrap_err().to_string();
    assert!(err.contains("t.bin") && err.contains("truncated"), "{err}");
    let mut bad_label = good.clone();
    bad_label[IMAGE_BYTES + 1] = 10;
    std::fs::write(&bin, &bad_label).unwrap();
    let err = read_binary_batch(&bin).unwrap_err().to_string();
    assert!(
        err.contains("t.bin") && err.contains("record 1 has label 10"),
        "{err}"
    );
    let err = read_binary_batch(&dir.path().join("absent.bin"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent.bin"), "{err}");
}

#[test]
fn a_missing_or_empty_folder_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let err = Cifar10::open(&dir.path().join("absent"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("absent") && err.contains("not a folder"),
        "{err}"
    );
    let err = Cifar10::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("no CIFAR-10 here"), "{err}");
}

#[test]
fn inspect_reports_classes_and_counts() {
    use multi_teacher_ad::data::inspect::inspect_cifar;
    let report = inspect_cifar(&fixtures());
    assert!(report.is_usable(), "{report}");
    assert_eq!(report.categories.len(), 10);
    assert_eq!(report.categories[0].train, 2); // images 0 and 10
    assert_eq!(report.categories[5].test_good, 1);
    assert_eq!(report.categories[5].test_defect, 9);
    assert!(report.to_string().contains("python layout"));
    let report = inspect_cifar(&fixtures().join("nothing-here"));
    assert!(!report.is_usable());
}
