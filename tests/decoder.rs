//! The decoder and the teacher weighting against the reference's `Student_de_class`,
//! `upsample` and `Weight_Class`, re-written in `tests/fixtures/networks/make_fixtures.py`.
//!
//! Both get the same formula weights as in the script, filled in torch's parameter order. The
//! 32x32 case runs the reference's reconstruction step: `z_T` from three teachers, `x_T` with
//! batch statistics, the loss, its gradients, the running statistics it left and inference
//! with them.

mod common;
#[path = "fixtures/networks/formula.rs"]
mod formula;

use burn::module::Param;
use burn::prelude::*;
use formula::{InputSpec, ParamSpec, TensorFile, entry, relative_l2, values};
use multi_teacher_ad::decoder::{Decoder, DecoderConfig};
use multi_teacher_ad::students::reconstruction_loss;
use multi_teacher_ad::weighting::TeacherWeightingConfig;

/// Outputs after eleven 3x3 convolutions and as many batch norms, in f32.
const OUTPUT_TOLERANCE: f64 = 1e-4;

fn decoder(case: &serde_json::Value, device: &Device) -> Decoder {
    let params: Vec<ParamSpec> = entry(&case["params"]);
    let output_size: usize = entry(&case["output_size"]);
    let decoder = DecoderConfig::new()
        .with_output_size(output_size)
        .init(device);
    let (decoder, paths) = formula::fill_in_order(decoder, &params, device);
    formula::assert_names(&paths, &params, |p| {
        p.replace("up_conv", "up.1")
            .replace("up_bn", "up.2")
            .replace(".gamma", ".weight")
            .replace(".beta", ".bias")
    });
    decoder
}

fn assert_matches(got: Vec<f32>, want: &TensorFile, tolerance: f64, what: &str) {
    let error = relative_l2(&got, &want.values());
    assert!(error < tolerance, "{what}: relative L2 error {error:e}");
}

#[test]
fn reconstruction_step_matches_the_reference() {
    let index = formula::index();
    let case = &index["decoder"]["decoder32"];
    let device = Device::flex().autodiff();
    let decoder = decoder(case, &device);
    let mut weighting = TeacherWeightingConfig::new().init(&device);
    let w: Vec<f32> = entry(&case["w"]);
    weighting.w = Param::from_data(TensorData::new(w, [3, 1]), &device);

    let teachers: Vec<InputSpec> = entry(&case["teachers"]);
    let z: Vec<Tensor<2>> = teachers.iter().map(|t| t.tensor(&device)).collect();
    let z_t = weighting.forward_list(z);
    assert_matches(values(z_t.clone()), &entry(&case["z_t"]), 1e-6, "z_T");

    let x_t = decoder.forward(z_t.clone());
    assert_eq!(x_t.dims(), [2, 3, 32, 32]);
    assert_matches(
        values(x_t.clone()),
        &entry(&case["train"]),
        OUTPUT_TOLERANCE,
        "x_T (training)",
    );

    let images: Tensor<4> = entry::<InputSpec>(&case["images"]).tensor(&device);
    let loss = reconstruction_loss(images, x_t);
    let grads = loss.backward();
    let loss = loss.into_scalar::<f32>();
    let loss_want: f32 = entry(&case["loss_rec"]);
    assert!(
        (loss - loss_want).abs() < 1e-5 * loss_want,
        "loss {loss} vs {loss_want}"
    );
    let grad_w = values(weighting.w.grad(&grads).expect("gradient of w"));
    assert_matches(grad_w, &entry(&case["grad_w"]), 1e-4, "grad w");
    let grad_bias = decoder
        .linear1
        .bias
        .as_ref()
        .unwrap()
        .grad(&grads)
        .expect("gradient");
    assert_matches(
        values(grad_bias),
        &entry(&case["grad_linear1_bias"]),
        1e-4,
        "grad linear1.bias",
    );

    // torch's running variance is updated with the unbiased batch variance.
    let running_var = values(decoder.up1.bn1.running_var.value_sync());
    assert_matches(
        running_var,
        &entry(&case["running_var_up1_bn1"]),
        1e-5,
        "up1.bn1.running_var",
    );

    let decoder = decoder.valid();
    let x_eval = decoder.forward(z_t.inner());
    assert_matches(
        values(x_eval),
        &entry(&case["eval"]),
        OUTPUT_TOLERANCE,
        "x_T (inference)",
    );
}

#[test]
fn larger_start_grid_matches_the_reference() {
    let index = formula::index();
    let case = &index["decoder"]["decoder64"];
    let device = Device::flex().autodiff();
    let decoder = decoder(case, &device);
    assert_eq!(decoder.grid, 2);
    let z: Tensor<2> = entry::<InputSpec>(&case["z"]).tensor(&device);
    let x = decoder.forward(z);
    assert_eq!(x.dims(), [1, 3, 64, 64]);
    assert_matches(
        values(x),
        &entry(&case["train"]),
        OUTPUT_TOLERANCE,
        "x (training)",
    );
}

#[test]
fn reference_decoder_reconstructs_224_images() {
    let device = Device::flex();
    let decoder = DecoderConfig::new().init(&device);
    assert_eq!(decoder.grid, 7);
    let z = Tensor::<2>::random([1, 1000], burn::tensor::Distribution::Default, &device);
    assert_eq!(decoder.forward(z).dims(), [1, 3, 224, 224]);
}

#[test]
fn weighting_starts_uniform_and_learns_from_the_reconstruction() {
    let device = Device::flex().autodiff();
    let weighting = TeacherWeightingConfig::new().init(&device);
    assert!(
        weighting
            .weights_vec()
            .iter()
            .all(|a| (a - 1.0 / 3.0).abs() < 1e-7)
    );
    // With equal weights, z_T is the teachers' mean.
    let z: Vec<Tensor<2>> = (0..3)
        .map(|i| Tensor::<2>::full([1, 4], i as f32, &device))
        .collect();
    let z_t = weighting.forward_list(z);
    assert!(values(z_t.clone()).iter().all(|v| (v - 1.0).abs() < 1e-6));
    // Pulling z_T towards teacher 2 must raise its weight's gradient step, i.e. lower grad w_2.
    let loss = (z_t - 2.0).square().mean();
    let grads = loss.backward();
    let grad = values(weighting.w.grad(&grads).expect("gradient of w"));
    assert!(grad[2] < 0.0 && grad[0] > 0.0, "{grad:?}");
}
