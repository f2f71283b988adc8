//! The students against torchvision, and the losses and scores against torch
//! (fixtures: `tests/fixtures/networks/make_fixtures.py`).
//!
//! Each student gets the same formula weights as the torchvision model in the script, filled in
//! torchvision's parameter order; the names and shapes must match torchvision's one by one, and
//! the outputs must match: resnet18 and densenet121 on two 64x64 images with batch statistics
//! (training) and with the running statistics that one training pass left (inference); vgg11
//! on two 32x32 images in inference (its dropout is random in training).

mod common;
#[path = "fixtures/networks/formula.rs"]
mod formula;

use burn::prelude::*;
use formula::{InputSpec, ParamSpec, TensorFile, assert_close, entry, relative_l2, values};
use multi_teacher_ad::students::{
    DenseNet121Config, ResNet18Config, Student, StudentConfig, StudentKind, Vgg11Config,
    cosine_score, distillation_loss, embedding_score, num_learnable_params, reconstruction_loss,
    reconstruction_score,
};

/// Outputs of deep random networks: f32 with different summation orders.
const OUTPUT_TOLERANCE: f64 = 1e-4;

struct Case {
    params: Vec<ParamSpec>,
    input: InputSpec,
    train: Option<TensorFile>,
    eval: TensorFile,
}

fn case(name: &str) -> Case {
    let index = formula::index();
    let net = &index["students"][name];
    Case {
        params: entry(&net["params"]),
        input: entry(&net["input"]),
        train: net["outputs"].get("train").map(entry),
        eval: entry(&net["outputs"]["eval"]),
    }
}

fn assert_output(got: Tensor<2>, want: &TensorFile, what: &str) {
    assert_eq!(got.dims().to_vec(), want.shape, "{what}");
    let error = relative_l2(&values(got), &want.values());
    assert!(
        error < OUTPUT_TOLERANCE,
        "{what}: relative L2 error {error:e}"
    );
}

/// Runs the checks shared by the students with batch norm: training pass, then inference.
fn check_with_batch_norm(student: Student, case: &Case, device: &Device) {
    let train = case.train.as_ref().expect("a training output");
    assert_output(
        student.forward(case.input.tensor(device)),
        train,
        "training",
    );
    let student = student.valid();
    let plain = Device::flex();
    assert_output(
        student.forward(case.input.tensor(&plain)),
        &case.eval,
        "inference",
    );
}

#[test]
fn resnet18_matches_torchvision() {
    let case = case("resnet18");
    let device = Device::flex().autodiff();
    let (net, paths) =
        formula::fill_in_order(ResNet18Config::new().init(&device), &case.params, &device);
    formula::assert_names(&paths, &case.params, |p| {
        p.replace(".gamma", ".weight")
            .replace(".beta", ".bias")
            .replace("downsample.conv", "downsample.0")
            .replace("downsample.bn", "downsample.1")
    });
    check_with_batch_norm(Student::Resnet(net), &case, &device);
}

#[test]
fn densenet121_matches_torchvision() {
    let case = case("densenet121");
    let device = Device::flex().autodiff();
    let (net, paths) = formula::fill_in_order(
        DenseNet121Config::new().init(&device),
        &case.params,
        &device,
    );
    formula::assert_names(&paths, &case.params, |p| {
        let p = p.replace(".gamma", ".weight").replace(".beta", ".bias");
        if p.starts_with("classifier") {
            return p;
        }
        // denseblockK.layers.I.rest -> features.denseblockK.denselayer{I+1}.rest
        let parts: Vec<&str> = p.split('.').collect();
        let p = if parts.len() > 3 && parts[1] == "layers" {
            let layer: usize = parts[2].parse().unwrap();
            format!(
                "{}.denselayer{}.{}",
                parts[0],
                layer + 1,
                parts[3..].join(".")
            )
        } else {
            p
        };
        format!("features.{p}")
    });
    check_with_batch_norm(Student::Densenet(net), &case, &device);
}

#[test]
fn vgg11_matches_torchvision_with_small_inputs_pooled_up_to_7x7() {
    let case = case("vgg11");
    // Inference only: its dropout is random in training. At 32x32 the features are 1x1, which
    // AdaptiveAvgPool2d((7, 7)) repeats 49 times before the classifier.
    let device = Device::flex();
    let (net, paths) =
        formula::fill_in_order(Vgg11Config::new().init(&device), &case.params, &device);
    formula::assert_names(&paths, &case.params, |p| {
        let parts: Vec<&str> = p.split('.').collect();
        let i: usize = parts[1].parse().unwrap();
        let torch_index = match parts[0] {
            "features" => [0, 3, 6, 8, 11, 13, 16, 18][i],
            "classifier" => [0, 3, 6][i],
            other => panic!("unexpected {other}"),
        };
        format!("{}.{torch_index}.{}", parts[0], parts[2])
    });
    let student = Student::Vgg(net);
    assert_output(
        student.forward(case.input.tensor(&device)),
        &case.eval,
        "inference",
    );
}

#[test]
fn every_student_has_torchvisions_size_and_trains_on_small_images() {
    let device = Device::flex().autodiff();
    for kind in StudentKind::ALL {
        let student = StudentConfig::new(kind).init(&device);
        assert_eq!(
            num_learnable_params(&student),
            kind.torchvision_num_params(),
            "{kind}"
        );
        let images =
            Tensor::<4>::random([2, 3, 32, 32], burn::tensor::Distribution::Default, &device);
        let z_s = student.forward(images);
        assert_eq!(z_s.dims(), [2, 1000], "{kind}");
        let z_t = Tensor::<2>::random([2, 1000], burn::tensor::Distribution::Default, &device);
        let grads = distillation_loss(z_s, z_t).backward();
        let first = match &student {
            Student::Resnet(net) => net.conv1.weight.grad(&grads),
            Student::Vgg(net) => net.features[0].weight.grad(&grads),
            Student::Densenet(net) => net.conv0.weight.grad(&grads),
        };
        let first = first.unwrap_or_else(|| panic!("{kind}: no gradient reaches the first conv"));
        assert!(
            first.abs().sum().into_scalar::<f32>() > 0.0,
            "{kind}: zero gradient"
        );
    }
}

#[test]
fn losses_and_scores_match_torch() {
    let index = formula::index();
    let losses = &index["losses"];
    let device = Device::flex().autodiff();
    let z_s: Tensor<2> = entry::<TensorFile>(&losses["z_s"]).tensor(&device);
    let z_t: Tensor<2> = entry::<TensorFile>(&losses["z_t"]).tensor(&device);
    let want = |key: &str| -> Vec<f32> { entry(&losses[key]) };

    // Rows 2 and 3 have norms below eps (clamped separately, as torch does) and zero.
    let as_z = values(embedding_score(z_s.clone(), z_t.clone()));
    assert_close(&as_z, &want("as_z"), 1e-5, "AS_z");
    let as_cossim = values(cosine_score(z_s.clone(), z_t.clone()));
    assert_close(&as_cossim, &want("as_cossim"), 1e-6, "AS_cossim");

    // The distillation loss and its gradient on the two ordinary rows.
    let z_s2 = z_s.slice([0..2]).detach().require_grad();
    let z_t2 = z_t.slice([0..2]).detach();
    let loss = distillation_loss(z_s2.clone(), z_t2);
    let grads = loss.backward();
    let loss = loss.into_scalar::<f32>();
    let loss_want: f32 = entry(&losses["loss_kd_rows01"]);
    assert!((loss - loss_want).abs() < 1e-5, "{loss} vs {loss_want}");
    let grad = values(z_s2.grad(&grads).expect("gradient of z_S"));
    let grad_want = entry::<TensorFile>(&losses["grad_z_s_rows01"]).values();
    assert!(
        relative_l2(&grad, &grad_want) < 1e-5,
        "{:e}",
        relative_l2(&grad, &grad_want)
    );

    let plain = Device::flex();
    let x: Tensor<4> = entry::<InputSpec>(&losses["x"]).tensor(&plain);
    let x_s: Tensor<4> = entry::<InputSpec>(&losses["x_s"]).tensor(&plain);
    let as_rec = values(reconstruction_score(x_s.clone(), x.clone()));
    assert_close(&as_rec, &want("as_rec"), 1e-6, "AS_rec");
    let rec = reconstruction_loss(x, x_s).into_scalar::<f32>();
    let rec_want: f32 = entry(&losses["loss_rec"]);
    assert!((rec - rec_want).abs() < 1e-6, "{rec} vs {rec_want}");
}
