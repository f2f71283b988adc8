//! Teacher statistics over a dataset: one streaming pass through the ensemble, saved and reloaded
//! bit for bit, applied as z-scores.

use burn::prelude::*;
use burn::tensor::Distribution;
use multi_teacher_ad::teachers::{
    TeacherEnsemble, TeacherFamily, TeacherSize, TeacherStatistics, WeightsLocation,
};

#[test]
fn streaming_statistics_over_batches_equal_whole_set_statistics() {
    let device = Device::flex();
    let ensemble = TeacherEnsemble::load(
        TeacherSize::Tiny,
        &TeacherFamily::ALL,
        &WeightsLocation::Build,
        &device,
    )
    .unwrap();
    device.seed(3);
    // A small "dataset" of 11 images in uneven batches.
    let images = Tensor::<4>::random([11, 3, 32, 32], Distribution::Uniform(-1.0, 1.0), &device);
    let batches = [0..4, 4..5, 5..11].map(|r| Ok(images.clone().slice([r, 0..3, 0..32, 0..32])));
    let stats = ensemble.statistics(batches).unwrap();
    assert_eq!(stats.count, 11);
    assert_eq!(
        stats.teachers,
        vec!["tiny_resnet", "tiny_vgg", "tiny_densenet"]
    );

    // Whole-set reference with the tensor API (unbiased variance).
    let outputs = ensemble.forward(images.clone());
    for (t, out) in outputs.iter().enumerate() {
        let mean = out
            .clone()
            .mean_dim(0)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let var = out
            .clone()
            .var(0)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        for j in 0..1000 {
            let std = var[j].sqrt();
            assert!((stats.mean[t][j] - mean[j]).abs() <= 1e-4 * mean[j].abs().max(1.0));
            let std = if std == 0.0 { 1e-3 } else { std };
            assert!(
                (stats.std[t][j] - std).abs() <= 1e-3 * std.max(1e-3),
                "{t} {j}"
            );
        }
    }

    // Saved and reloaded bit for bit.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meanstd.data");
    stats.save(&path).unwrap();
    let loaded = TeacherStatistics::load(&path).unwrap();
    assert_eq!(loaded, stats);

    // z-scores of the same set have mean ~0 and unbiased std ~1 in every dimension.
    let z = loaded.z_scores(&outputs).unwrap();
    for zt in z {
        let mean = zt.clone().mean_dim(0).abs().max().into_scalar::<f32>();
        let std_dev = zt
            .var(0)
            .sqrt()
            .sub_scalar(1.0)
            .abs()
            .max()
            .into_scalar::<f32>();
        assert!(mean < 1e-3, "mean {mean}");
        assert!(std_dev < 1e-2, "std off by {std_dev}");
    }
}
