//! Teacher weights read at run time from a folder: a good copy loads, a missing, truncated or
//! different file is an error naming the file, never a panic.

use burn::prelude::*;
use multi_teacher_ad::teachers::{
    Teacher, TeacherFamily, TeacherId, TeacherSize, WeightsLocation, generated,
};

fn tiny_resnet() -> TeacherId {
    TeacherId::new(TeacherFamily::Resnet, TeacherSize::Tiny)
}

#[test]
fn weights_from_a_folder_load_and_give_the_same_outputs() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tiny_resnet.bpk"),
        generated::TINY_RESNET_BPK,
    )
    .unwrap();
    let from_dir = Teacher::load(
        tiny_resnet(),
        &WeightsLocation::Dir(dir.path().into()),
        &device,
    )
    .unwrap();
    let built = Teacher::load(tiny_resnet(), &WeightsLocation::Build, &device).unwrap();
    let x = Tensor::<4>::ones([1, 3, 32, 32], &device);
    let a = from_dir
        .forward(x.clone())
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    let b = built.forward(x).into_data().try_into_vec::<f32>().unwrap();
    assert_eq!(a, b);
    // A freshly initialised network would not give these outputs: the weights were applied.
    let c = Teacher::load(tiny_resnet(), &WeightsLocation::Build, &device).unwrap();
    assert_eq!(c.sha256(), built.sha256());
}

#[test]
fn missing_truncated_and_foreign_weights_are_errors() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let location = WeightsLocation::Dir(dir.path().into());
    let path = dir.path().join("tiny_resnet.bpk");

    let err = Teacher::load(tiny_resnet(), &location, &device)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tiny_resnet.bpk") && err.contains("not found"),
        "{err}"
    );
    assert!(err.contains("refresh_teachers.py"), "{err}");

    let good = generated::TINY_RESNET_BPK;
    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    let err = Teacher::load(tiny_resnet(), &location, &device)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tiny_resnet.bpk") && err.contains("truncated"),
        "{err}"
    );

    // The right size, but another teacher's weights.
    std::fs::write(&path, generated::TINY_VGG_BPK).unwrap();
    let err = Teacher::load(tiny_resnet(), &location, &device)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("tiny_resnet"), "{err}");

    let mut altered = good.to_vec();
    let middle = altered.len() / 2;
    altered[middle] ^= 0xff;
    std::fs::write(&path, &altered).unwrap();
    let err = Teacher::load(tiny_resnet(), &location, &device)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("sha256"), "{err}");
}

#[test]
fn real_teachers_missing_from_the_build_give_the_commands_to_get_them() {
    let id = TeacherId::new(TeacherFamily::Vgg, TeacherSize::Full);
    if id.built().is_some() {
        return; // this build has the real vgg19: nothing to check here
    }
    let err = Teacher::load(id, &WeightsLocation::Build, &Device::flex())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("vgg19") && err.contains("not compiled into this binary"),
        "{err}"
    );
    assert!(
        err.contains("python onnx/refresh_teachers.py") && err.contains("cargo build --release")
    );
}
