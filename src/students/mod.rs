//! The students of the method: torchvision `resnet18`, `vgg11` (no batch norm) and
//! `densenet121`, trained from scratch, each mapping an image `[N, 3, H, W]` to its 1000-d
//! classifier output `z_S` `[N, 1000]` (METHOD.md, "Students").
//!
//! Every student has torchvision's exact layer shapes and default initialisation, so its
//! parameter count matches torchvision's. This module also holds what the method computes from
//! the embeddings: the two training losses and the three per-input anomaly scores, written as
//! the reference (`finTS.py`) writes them with `torch.nn.MSELoss` and `torch.nn.CosineSimilarity`.

pub mod densenet;
pub mod resnet;
pub mod vgg;

use std::fmt;

use burn::module::{ModuleVisitor, Param};
use burn::nn::BatchNorm;
use burn::prelude::*;
use burn::tensor::activation::{leaky_relu, relu};

pub use densenet::{DenseNet121, DenseNet121Config};
pub use resnet::{ResNet18, ResNet18Config};
pub use vgg::{Vgg11, Vgg11Config};

/// Width of a student's output, the 1000 ImageNet classes of torchvision's classifiers.
pub const EMBEDDING_DIM: usize = 1000;

/// `eps` of `torch.nn.CosineSimilarity`, the reference's default.
pub const COSINE_EPS: f64 = 1e-8;

/// The three student architectures; the names are the reference's `--student` choices.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum StudentKind {
    /// torchvision resnet18.
    Resnet,
    /// torchvision vgg11 (without batch norm).
    Vgg,
    /// torchvision densenet121.
    Densenet,
}

impl StudentKind {
    /// All three, in the reference's order (the multi-student ensemble sums them in this order).
    pub const ALL: [StudentKind; 3] = [Self::Resnet, Self::Vgg, Self::Densenet];

    /// The reference's name for the choice (`--student`), also used in its file names.
    pub fn name(self) -> &'static str {
        match self {
            Self::Resnet => "resnet",
            Self::Vgg => "vgg",
            Self::Densenet => "densenet",
        }
    }

    /// The torchvision architecture behind the choice.
    pub fn architecture(self) -> &'static str {
        match self {
            Self::Resnet => "resnet18",
            Self::Vgg => "vgg11",
            Self::Densenet => "densenet121",
        }
    }

    /// torchvision's parameter count for the architecture (1000 classes).
    pub fn torchvision_num_params(self) -> usize {
        match self {
            Self::Resnet => 11_689_512,
            Self::Vgg => 132_863_336,
            Self::Densenet => 7_978_856,
        }
    }
}

impl fmt::Display for StudentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Configuration of a [`Student`].
#[derive(Config, Debug)]
pub struct StudentConfig {
    /// Which architecture.
    pub kind: StudentKind,
    /// Width of the classifier output; the method uses torchvision's 1000.
    #[config(default = 1000)]
    pub num_classes: usize,
}

impl StudentConfig {
    /// A freshly initialised student, as `torchvision.models.<arch>(pretrained=False)`.
    pub fn init(&self, device: &Device) -> Student {
        match self.kind {
            StudentKind::Resnet => Student::Resnet(
                ResNet18Config::new()
                    .with_num_classes(self.num_classes)
                    .init(device),
            ),
            StudentKind::Vgg => Student::Vgg(
                Vgg11Config::new()
                    .with_num_classes(self.num_classes)
                    .init(device),
            ),
            StudentKind::Densenet => Student::Densenet(
                DenseNet121Config::new()
                    .with_num_classes(self.num_classes)
                    .init(device),
            ),
        }
    }
}

/// One student network.
#[derive(Module, Debug)]
pub enum Student {
    Resnet(ResNet18),
    Vgg(Vgg11),
    Densenet(DenseNet121),
}

impl Student {
    /// Which architecture this is.
    pub fn kind(&self) -> StudentKind {
        match self {
            Self::Resnet(_) => StudentKind::Resnet,
            Self::Vgg(_) => StudentKind::Vgg,
            Self::Densenet(_) => StudentKind::Densenet,
        }
    }

    /// The embedding `z_S`.
    ///
    /// # Shapes
    /// - `images`: `[N, 3, H, W]`, H and W at least 32 (five stride-2 stages)
    /// - output: `[N, num_classes]`
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        match self {
            Self::Resnet(net) => net.forward(images),
            Self::Vgg(net) => net.forward(images),
            Self::Densenet(net) => net.forward(images),
        }
    }
}

/// `torch.nn.BatchNorm2d` semantics on a Burn [`BatchNorm`].
///
/// Burn's layer normalises with the batch statistics in training exactly as torch does, but
/// feeds the *biased* batch variance into `running_var`, where torch uses the unbiased one
/// (`n / (n - 1)` times it, `n` = values per channel). With small feature maps (32x32 images
/// leave 1x1 maps in the last stages, so `n` is the batch size) that factor is far from 1, and
/// the running statistics are what every score is computed with, so the students and the
/// decoder use this function instead of `BatchNorm::forward`. Outside training (a plain device or a `valid()` module) it is Burn's
/// inference path. With one value per channel torch refuses to train; here the batch variance
/// (0) is used as is.
pub fn batch_norm<const D: usize>(norm: &BatchNorm, input: Tensor<D>) -> Tensor<D> {
    if !training(norm, &input) {
        return norm.forward(input);
    }
    let per_channel = input.shape().num_elements() / input.dims()[1];
    let result = burn::tensor::module::batch_norm_train(
        input,
        norm.gamma.val(),
        norm.beta.val(),
        norm.epsilon,
    );
    update_running_statistics(norm, result.mean, result.variance, per_channel);
    result.output
}

fn training<const D: usize>(norm: &BatchNorm, input: &Tensor<D>) -> bool {
    input.device().is_autodiff() && norm.training.is_enabled()
}

/// Torch's running-statistics update from a training batch's mean and biased variance over
/// `per_channel` values (the variance made unbiased).
fn update_running_statistics(
    norm: &BatchNorm,
    mean: Tensor<1>,
    variance: Tensor<1>,
    per_channel: usize,
) {
    let unbiased = per_channel as f64 / per_channel.saturating_sub(1).max(1) as f64;
    let device = mean.device();
    let momentum = norm.momentum;
    let running_mean = norm
        .running_mean
        .value_sync()
        .to_device(&device)
        .mul_scalar(1.0 - momentum)
        .add(mean.detach().mul_scalar(momentum));
    let running_var = norm
        .running_var
        .value_sync()
        .to_device(&device)
        .mul_scalar(1.0 - momentum)
        .add(variance.detach().mul_scalar(momentum * unbiased));
    norm.running_mean.update(running_mean.detach());
    norm.running_var.update(running_var.detach());
}

/// The activation after a batch norm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Identity,
    Relu,
    /// Leaky ReLU with this negative slope.
    LeakyRelu(f64),
}

impl Activation {
    /// `v` for `v > 0`, `slope * v` elsewhere.
    fn slope(self) -> f64 {
        match self {
            Self::Identity => 1.0,
            Self::Relu => 0.0,
            Self::LeakyRelu(slope) => slope,
        }
    }

    fn apply(self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Self::Identity => x,
            Self::Relu => relu(x),
            Self::LeakyRelu(slope) => leaky_relu(x, slope),
        }
    }
}

/// `activation(batch_norm(norm, input))`, in training on the CPU backend through one fused
/// kernel (`mtad_kernels::batch_norm`) with the same results and running-statistics update, and
/// outside autodiff through `mtad_kernels::fused` (one pass with the running statistics).
pub fn batch_norm_act(norm: &BatchNorm, input: Tensor<4>, activation: Activation) -> Tensor<4> {
    if training(norm, &input) {
        let fused = mtad_kernels::batch_norm::batch_norm_act(
            &input,
            norm.gamma.val(),
            norm.beta.val(),
            norm.epsilon,
            activation.slope(),
        );
        if let Some((output, mean, variance)) = fused {
            let per_channel = input.shape().num_elements() / input.dims()[1];
            update_running_statistics(norm, mean, variance, per_channel);
            return output;
        }
    }
    if !input.is_autodiff() {
        return mtad_kernels::fused::batch_norm_act(norm, vec![input], activation.slope());
    }
    activation.apply(batch_norm(norm, input))
}

/// A bias-free convolution with `kaiming_normal_` (gain sqrt 2) over fan-in or fan-out, as
/// torchvision initialises its resnets (fan-out) and densenets (fan-in).
fn kaiming_conv(
    channels: [usize; 2],
    kernel: usize,
    stride: usize,
    padding: usize,
    fan_out: bool,
    device: &Device,
) -> burn::nn::conv::Conv2d {
    burn::nn::conv::Conv2dConfig::new(channels, [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(burn::nn::PaddingConfig2d::Explicit(
            padding, padding, padding, padding,
        ))
        .with_bias(false)
        .with_initializer(burn::nn::Initializer::KaimingNormal {
            gain: std::f64::consts::SQRT_2,
            fan_out_only: fan_out,
        })
        .init(device)
}

/// A batch norm with torch's defaults: eps 1e-5, momentum 0.1, weight 1, bias 0.
fn norm(channels: usize, device: &Device) -> BatchNorm {
    burn::nn::BatchNormConfig::new(channels).init(device)
}

/// Number of learnable parameters, what torch counts with `sum(p.numel() for p in
/// m.parameters())`. Burn's `Module::num_params` also counts the batch norms' running mean and
/// variance, which torch keeps as buffers.
pub fn num_learnable_params<M: Module>(module: &M) -> usize {
    #[derive(Default)]
    struct Counter {
        path: Vec<String>,
        total: usize,
    }
    impl ModuleVisitor for Counter {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let running = matches!(
                self.path.last().map(String::as_str),
                Some("running_mean" | "running_var")
            );
            if !running {
                self.total += param.lazy_shape().num_elements();
            }
        }
    }
    let mut counter = Counter::default();
    module.visit(&mut counter);
    counter.total
}

// ---------------------------------------------------------------------------------------------
// Losses and anomaly scores
// ---------------------------------------------------------------------------------------------

/// `torch.nn.CosineSimilarity(dim=1, eps=1e-8)` between the rows of `a` and `b`: `[N, D]` ->
/// `[N]`.
///
/// torch documents `a·b / max(|a|·|b|, eps)` but computes (and this follows)
/// `(a / max(|a|, eps)) · (b / max(|b|, eps))`; the two differ only for rows of norm below 1e-4.
pub fn cosine_similarity(a: Tensor<2>, b: Tensor<2>) -> Tensor<1> {
    let a_norm = a.clone().square().sum_dim(1).sqrt().clamp_min(COSINE_EPS); // [N, 1]
    let b_norm = b.clone().square().sum_dim(1).sqrt().clamp_min(COSINE_EPS); // [N, 1]
    (a / a_norm).mul(b / b_norm).sum_dim(1).squeeze_dim::<1>(1)
}

/// The student's training loss: `MSE(z_S, z_T) + mean(1 - cos(z_S, z_T))`, a `[1]` tensor.
///
/// Pass `z_t` detached: only the student learns from this loss (METHOD.md, step 3).
pub fn distillation_loss(z_s: Tensor<2>, z_t: Tensor<2>) -> Tensor<1> {
    let mse = (z_s.clone() - z_t.clone()).square().mean();
    let cosine = cosine_similarity(z_s, z_t).neg().add_scalar(1.0).mean();
    mse + cosine
}

/// The decoder's training loss: `MSE(x, x_T)`, the mean over every element, a `[1]` tensor.
///
/// Taken as the mean of each input's mean (the same value, every input having as many
/// elements): Burn's CPU backend adds a whole tensor of 4 million elements or more (64 crops
/// of 224 pixels are 9.6 million) on several threads in an order that varies from run to run,
/// while a per-row sum is one thread's, so the loss has the same bits in every run.
pub fn reconstruction_loss(images: Tensor<4>, reconstructions: Tensor<4>) -> Tensor<1> {
    (images - reconstructions)
        .square()
        .flatten::<2>(1, 3)
        .mean_dim(1)
        .mean()
}

/// `AS_z`: mean over the embedding of `(z_S - z_T)^2`, one score per input: `[N, D]` -> `[N]`.
pub fn embedding_score(z_s: Tensor<2>, z_t: Tensor<2>) -> Tensor<1> {
    (z_s - z_t).square().mean_dim(1).squeeze_dim::<1>(1)
}

/// `AS_cossim`: `1 - cos(z_S, z_T)`, one score per input: `[N, D]` -> `[N]`.
pub fn cosine_score(z_s: Tensor<2>, z_t: Tensor<2>) -> Tensor<1> {
    cosine_similarity(z_s, z_t).neg().add_scalar(1.0)
}

/// `AS_rec`: mean over C, H, W of `(x_S - x)^2`, where `x_S` is the decoder's reconstruction
/// from the *student's* embedding: `[N, C, H, W]` -> `[N]`.
pub fn reconstruction_score(reconstructions: Tensor<4>, images: Tensor<4>) -> Tensor<1> {
    let [n, c, h, w] = images.dims();
    (reconstructions - images)
        .square()
        .reshape([n, c * h * w])
        .mean_dim(1)
        .squeeze_dim::<1>(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::BatchNormConfig;
    use burn::tensor::Distribution;

    fn values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
        tensor.into_data().try_into_vec::<f32>().unwrap()
    }

    fn tensor2(rows: &[[f32; 3]]) -> Tensor<2> {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_data(TensorData::new(flat, [rows.len(), 3]), &Device::flex())
    }

    #[test]
    fn kind_names_are_the_reference_choices() {
        let names: Vec<_> = StudentKind::ALL.iter().map(|k| k.to_string()).collect();
        assert_eq!(names, ["resnet", "vgg", "densenet"]);
        for kind in StudentKind::ALL {
            let parsed = <StudentKind as clap::ValueEnum>::from_str(kind.name(), false).unwrap();
            assert_eq!(parsed, kind);
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.name()));
        }
    }

    #[test]
    fn learnable_params_leave_out_running_statistics() {
        let norm = BatchNormConfig::new(5).init(&Device::flex());
        assert_eq!(norm.num_params(), 20); // Burn: gamma, beta, running mean and variance
        assert_eq!(num_learnable_params(&norm), 10);
        for kind in StudentKind::ALL {
            let student = StudentConfig::new(kind).init(&Device::flex());
            assert_eq!(student.kind(), kind);
            assert_eq!(
                num_learnable_params(&student),
                kind.torchvision_num_params(),
                "{kind}"
            );
        }
    }

    #[test]
    fn cosine_follows_torch_including_the_eps_clamp() {
        let a = tensor2(&[
            [1.0, 2.0, 2.0],
            [1e-5, 0.0, 0.0],
            [1e-9, 0.0, 0.0],
            [0.0, 0.0, 0.0],
        ]);
        let b = tensor2(&[
            [2.0, 0.0, 0.0],
            [1e-5, 0.0, 0.0],
            [1.0, 0.0, 0.0],
            [1.0, 1.0, 1.0],
        ]);
        let cos = values(cosine_similarity(a, b));
        // torch: [1/3, 1.0 (each norm clamped separately), 0.1, 0.0]
        let expected = [1.0 / 3.0, 1.0, 0.1, 0.0];
        for (got, want) in cos.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{cos:?} != {expected:?}");
        }
    }

    #[test]
    fn losses_and_scores_on_a_hand_worked_case() {
        // z_s rows: (1,0,0), (0,2,0); z_t rows: (0,1,0), (0,1,0)
        let z_s = tensor2(&[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]);
        let z_t = tensor2(&[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]);
        // squared errors: row 0 = 1 + 1 = 2, row 1 = 1 -> AS_z = [2/3, 1/3]
        let as_z = values(embedding_score(z_s.clone(), z_t.clone()));
        assert!((as_z[0] - 2.0 / 3.0).abs() < 1e-6 && (as_z[1] - 1.0 / 3.0).abs() < 1e-6);
        // cos = [0, 1] -> AS_cossim = [1, 0]
        let as_cos = values(cosine_score(z_s.clone(), z_t.clone()));
        assert!((as_cos[0] - 1.0).abs() < 1e-6 && as_cos[1].abs() < 1e-6);
        // MSE = 3/6 = 0.5, mean(1 - cos) = 0.5
        let loss = distillation_loss(z_s, z_t).into_scalar::<f32>();
        assert!((loss - 1.0).abs() < 1e-6, "{loss}");

        let device = Device::flex();
        let x = Tensor::<4>::zeros([2, 1, 1, 2], &device);
        let x_s = Tensor::<4>::from_data(
            TensorData::new(vec![1.0f32, 1.0, 0.0, 2.0], [2, 1, 1, 2]),
            &device,
        );
        let as_rec = values(reconstruction_score(x_s.clone(), x.clone()));
        assert_eq!(as_rec, [1.0, 2.0]);
        let rec = reconstruction_loss(x, x_s).into_scalar::<f32>();
        assert!((rec - 1.5).abs() < 1e-6, "{rec}");
    }

    #[test]
    fn batch_norm_updates_running_variance_unbiased_like_torch() {
        let device = Device::flex().autodiff();
        let norm = BatchNormConfig::new(1).init(&device);
        // one channel, values 0 and 2: mean 1, biased var 1, unbiased var 2
        let x = Tensor::<4>::from_data(TensorData::new(vec![0.0f32, 2.0], [2, 1, 1, 1]), &device);
        let y = values(batch_norm(&norm, x));
        let expected = 1.0 / (1.0f32 + 1e-5).sqrt();
        assert!(
            (y[0] + expected).abs() < 1e-5 && (y[1] - expected).abs() < 1e-5,
            "{y:?}"
        );
        let mean = values(norm.running_mean.value_sync());
        let var = values(norm.running_var.value_sync());
        assert!((mean[0] - 0.1).abs() < 1e-6, "{mean:?}");
        // 0.9 * 1 + 0.1 * 2
        assert!((var[0] - 1.1).abs() < 1e-6, "{var:?}");
    }

    #[test]
    fn fused_batch_norm_act_equals_batch_norm_then_activation() {
        let device = Device::flex().autodiff();
        device.seed(9);
        let x: Tensor<4> = Tensor::random([3, 4, 5, 6], Distribution::Normal(1.0, 2.0), &device);
        for activation in [
            Activation::Identity,
            Activation::Relu,
            Activation::LeakyRelu(0.2),
        ] {
            let (fused, plain) = (
                BatchNormConfig::new(4).init(&device),
                BatchNormConfig::new(4).init(&device),
            );
            let got = values(batch_norm_act(&fused, x.clone(), activation));
            let want = values(activation.apply(batch_norm(&plain, x.clone())));
            let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-5);
            assert!(close(&got, &want), "{activation:?}");
            for (a, b) in [
                (&fused.running_mean, &plain.running_mean),
                (&fused.running_var, &plain.running_var),
            ] {
                let (a, b) = (values(a.value_sync()), values(b.value_sync()));
                assert!(
                    close(&a, &b) && a != [0.0; 4] && a != [1.0; 4],
                    "{a:?} {b:?}"
                );
            }
        }
    }

    #[test]
    fn batch_norm_outside_training_uses_running_statistics() {
        let device = Device::flex().autodiff();
        let norm = BatchNormConfig::new(1).init(&device).valid();
        let x = Tensor::<4>::from_data(
            TensorData::new(vec![0.0f32, 2.0], [2, 1, 1, 1]),
            &Device::flex(),
        );
        let y = values(batch_norm(&norm, x));
        let scale = 1.0 / (1.0f32 + 1e-5).sqrt();
        assert!(
            y[0].abs() < 1e-6 && (y[1] - 2.0 * scale).abs() < 1e-5,
            "{y:?}"
        );
        assert_eq!(values(norm.running_var.value()), [1.0]);
    }
}
