//! Full-size teachers against onnxruntime. Needs the exports, so it is ignored by default:
//!     python onnx/refresh_teachers.py --random-weights
//!     cargo test --release -- --ignored teacher_parity

mod common;

use burn::prelude::*;
use multi_teacher_ad::teachers::{Teacher, TeacherFamily, TeacherId, TeacherSize, WeightsLocation};

#[test]
#[ignore = "needs onnx/{resnet152,vgg19,densenet201}.onnx: python onnx/refresh_teachers.py --random-weights, then rebuild"]
fn teacher_parity() {
    let device = Device::flex();
    let cases = common::reference_cases(&common::repo().join("onnx"));
    let mut checked = Vec::new();
    for (case, input, expected) in cases {
        let family = TeacherFamily::ALL
            .into_iter()
            .find(|&f| TeacherId::new(f, TeacherSize::Full).name() == case.teacher)
            .unwrap_or_else(|| panic!("unknown teacher {}", case.teacher));
        let teacher = Teacher::load(
            TeacherId::new(family, TeacherSize::Full),
            &WeightsLocation::Build,
            &device,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let started = std::time::Instant::now();
        let output = teacher.forward(common::tensor4(&input, &case.input_shape, &device));
        let got = output.into_data().try_into_vec::<f32>().unwrap();
        let seconds = started.elapsed().as_secs_f64();
        let error = common::relative_l2(&got, &expected);
        let same_argmax = common::argmax_rows(&got, 1000) == common::argmax_rows(&expected, 1000);
        println!(
            "{} {:?}: relative L2 {error:.2e}, argmax identical: {same_argmax}, forward {seconds:.2}s",
            case.teacher, case.input_shape
        );
        assert!(error <= 1e-3, "{}: relative L2 {error}", case.teacher);
        assert!(same_argmax, "{}: argmax differs", case.teacher);
        checked.push(case.teacher);
    }
    for name in ["resnet152", "vgg19", "densenet201"] {
        assert!(checked.iter().any(|t| t == name), "no reference for {name}");
    }
}
