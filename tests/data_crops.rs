//! The training and testing inputs of MVTec-style data, end to end at a small size: the demo
//! dataset loaded at 128 pixels, training batches of 4 images turned into 16 shared random
//! 32-pixel crops each (64 crops), and the full cut (stride 24) whose patches map back to their
//! place in the image.

use multi_teacher_ad::data::{
    FloatImage,
    crops::{FullCut, SeededRng, random_crops, random_offsets},
    demo::{DemoSpec, write_demo_dataset},
    folder::{FolderDataset, load_images},
};

const SIZE: usize = 128;
const CROP: usize = 32;

fn window(image: &FloatImage, y: usize, x: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for c in 0..3 {
        for dy in 0..CROP {
            for dx in 0..CROP {
                out.push(image.get(c, y + dy, x + dx));
            }
        }
    }
    out
}

fn demo_train_images() -> Vec<FloatImage> {
    let dir = tempfile::tempdir().unwrap();
    let spec = DemoSpec {
        seed: 11,
        image_size: 96, // resized up to 128 on loading
        train: 4,
        test_good: 0,
        test_defect: 1,
    };
    write_demo_dataset(dir.path(), &spec).unwrap();
    let weave = FolderDataset::open(dir.path())
        .unwrap()
        .category("weave")
        .unwrap();
    load_images(&weave.train, SIZE).unwrap()
}

#[test]
fn a_batch_of_four_becomes_sixteen_shared_crops_each() {
    let batch = demo_train_images();
    assert_eq!(batch.len(), 4);
    let crops = random_crops(&batch, CROP, 16, &mut SeededRng::new(42)).unwrap();
    assert_eq!(crops.len(), 64);
    let offsets = random_offsets(SIZE, SIZE, CROP, 16, &mut SeededRng::new(42)).unwrap();
    for (k, &(y, x)) in offsets.iter().enumerate() {
        assert!(y <= SIZE - CROP && x <= SIZE - CROP);
        for (i, image) in batch.iter().enumerate() {
            // Offset-major: crop 4k + i is image i at offset k.
            assert_eq!(
                crops[4 * k + i].data,
                window(image, y, x),
                "offset {k}, image {i}"
            );
        }
    }
    // 16 draws over 97 x 97 positions: not all the same.
    assert!(offsets.iter().any(|&o| o != offsets[0]));
}

#[test]
fn full_cut_patches_map_back_onto_the_image() {
    let batch = demo_train_images();
    let cut = FullCut::new(SIZE, CROP, 24).unwrap();
    assert_eq!(cut.axis_offsets(), vec![0, 24, 48, 72, 96]);
    let patches = cut.patches(&batch[0]).unwrap();
    assert_eq!(patches.len(), 25);
    for (patch, (y, x)) in patches.iter().zip(cut.offsets()) {
        assert_eq!(patch.data, window(&batch[0], y, x));
    }
    // Row-major: y outer, x inner.
    assert_eq!(
        &cut.offsets()[..6],
        &[(0, 0), (0, 24), (0, 48), (0, 72), (0, 96), (24, 0)]
    );

    let err = FullCut::new(SIZE, SIZE + 1, 24).unwrap_err().to_string();
    assert!(err.contains("do not fit"), "{err}");
    assert!(cut.patches(&FloatImage::zeros(3, 64, 64)).is_err());
}
