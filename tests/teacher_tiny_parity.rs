//! The tiny teachers imported by build.rs give onnxruntime's outputs (stored in onnx/tiny).

mod common;

use burn::prelude::*;
use multi_teacher_ad::teachers::{Teacher, TeacherFamily, TeacherId, TeacherSize, WeightsLocation};

fn family(name: &str) -> TeacherFamily {
    match name {
        "tiny_resnet" => TeacherFamily::Resnet,
        "tiny_vgg" => TeacherFamily::Vgg,
        "tiny_densenet" => TeacherFamily::Densenet,
        other => panic!("unknown tiny teacher {other}"),
    }
}

#[test]
fn tiny_teachers_match_onnxruntime() {
    let device = Device::flex();
    let cases = common::reference_cases(&common::repo().join("onnx/tiny"));
    let mut seen = std::collections::BTreeSet::new();
    for (case, input, expected) in cases {
        let id = TeacherId::new(family(&case.teacher), TeacherSize::Tiny);
        let teacher = Teacher::load(id, &WeightsLocation::Build, &device).unwrap();
        let output = teacher.forward(common::tensor4(&input, &case.input_shape, &device));
        assert_eq!(output.dims().to_vec(), case.output_shape);
        let got = output.into_data().try_into_vec::<f32>().unwrap();
        let error = common::relative_l2(&got, &expected);
        println!(
            "{} {:?}: relative L2 {error:.2e}",
            case.teacher, case.input_shape
        );
        assert!(
            error <= 1e-5,
            "{} {:?}: relative L2 {error}",
            case.teacher,
            case.input_shape
        );
        assert_eq!(
            common::argmax_rows(&got, 1000),
            common::argmax_rows(&expected, 1000)
        );
        seen.insert((case.teacher.clone(), case.input_shape.clone()));
    }
    // Every family, each at more than one input size.
    for name in ["tiny_resnet", "tiny_vgg", "tiny_densenet"] {
        assert!(
            seen.iter().filter(|(t, _)| t == name).count() >= 2,
            "{name}: {seen:?}"
        );
    }
}
