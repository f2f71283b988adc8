//! torchvision `resnet18` (He et al., "Deep Residual Learning for Image Recognition", 2015), as
//! `torchvision.models.resnet18(pretrained=False)` builds it: the same layers under the same
//! names and the same initialisation (convolutions kaiming-normal, fan-out, ReLU gain; batch
//! norms weight 1, bias 0; `fc` as a default `nn.Linear`).

use burn::nn::conv::Conv2d;
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;

use mtad_kernels::conv3x3::conv2d;
use mtad_kernels::fused::add_relu;
use mtad_kernels::pool::max_pool2d;

use super::Activation::{Identity, Relu};
use super::{batch_norm_act, norm};

/// Configuration of [`ResNet18`].
#[derive(Config, Debug)]
pub struct ResNet18Config {
    /// Width of the classifier output.
    #[config(default = 1000)]
    pub num_classes: usize,
}

/// torchvision `resnet18`: `[N, 3, H, W]` -> `[N, num_classes]`.
#[derive(Module, Debug)]
pub struct ResNet18 {
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub maxpool: MaxPool2d,
    pub layer1: Vec<BasicBlock>,
    pub layer2: Vec<BasicBlock>,
    pub layer3: Vec<BasicBlock>,
    pub layer4: Vec<BasicBlock>,
    pub avgpool: AdaptiveAvgPool2d,
    pub fc: Linear,
}

/// torchvision `BasicBlock`: two 3x3 convolutions and a shortcut.
#[derive(Module, Debug)]
pub struct BasicBlock {
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub conv2: Conv2d,
    pub bn2: BatchNorm,
    /// torchvision's `downsample` (`Sequential(conv1x1, BatchNorm2d)`), where the block changes
    /// the stride or the width.
    pub downsample: Option<Downsample>,
}

/// The projection shortcut: torchvision's `downsample.0` (1x1 conv) and `downsample.1` (norm).
#[derive(Module, Debug)]
pub struct Downsample {
    pub conv: Conv2d,
    pub bn: BatchNorm,
}

/// A bias-free convolution with torchvision resnet's initialisation:
/// `kaiming_normal_(mode="fan_out", nonlinearity="relu")`, i.e. std `sqrt(2 / (out * k * k))`.
fn conv(
    channels: [usize; 2],
    kernel: usize,
    stride: usize,
    padding: usize,
    device: &Device,
) -> Conv2d {
    super::kaiming_conv(channels, kernel, stride, padding, true, device)
}

impl BasicBlock {
    fn new(in_channels: usize, out_channels: usize, stride: usize, device: &Device) -> Self {
        let downsample = (stride != 1 || in_channels != out_channels).then(|| Downsample {
            conv: conv([in_channels, out_channels], 1, stride, 0, device),
            bn: norm(out_channels, device),
        });
        Self {
            conv1: conv([in_channels, out_channels], 3, stride, 1, device),
            bn1: norm(out_channels, device),
            conv2: conv([out_channels, out_channels], 3, 1, 1, device),
            bn2: norm(out_channels, device),
            downsample,
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let identity = match &self.downsample {
            Some(down) => batch_norm_act(&down.bn, conv2d(&down.conv, x.clone()), Identity),
            None => x.clone(),
        };
        let out = batch_norm_act(&self.bn1, conv2d(&self.conv1, x), Relu);
        let out = batch_norm_act(&self.bn2, conv2d(&self.conv2, out), Identity);
        add_relu(out, identity)
    }
}

/// One stage of two basic blocks; the first one carries the stride.
fn stage(
    in_channels: usize,
    out_channels: usize,
    stride: usize,
    device: &Device,
) -> Vec<BasicBlock> {
    vec![
        BasicBlock::new(in_channels, out_channels, stride, device),
        BasicBlock::new(out_channels, out_channels, 1, device),
    ]
}

impl ResNet18Config {
    /// A freshly initialised network, as torchvision initialises it.
    pub fn init(&self, device: &Device) -> ResNet18 {
        ResNet18 {
            conv1: conv([3, 64], 7, 2, 3, device),
            bn1: norm(64, device),
            maxpool: MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(),
            layer1: stage(64, 64, 1, device),
            layer2: stage(64, 128, 2, device),
            layer3: stage(128, 256, 2, device),
            layer4: stage(256, 512, 2, device),
            avgpool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            // nn.Linear's default init, which is Burn's default too.
            fc: LinearConfig::new(512, self.num_classes).init(device),
        }
    }
}

impl ResNet18 {
    /// # Shapes
    /// - `images`: `[N, 3, H, W]`
    /// - output: `[N, num_classes]`
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = batch_norm_act(&self.bn1, conv2d(&self.conv1, images), Relu); // [N, 64, H/2, W/2]
        let mut x = max_pool2d(&self.maxpool, x); // [N, 64, H/4, W/4]
        for block in self
            .layer1
            .iter()
            .chain(&self.layer2)
            .chain(&self.layer3)
            .chain(&self.layer4)
        {
            x = block.forward(x);
        }
        let x = self.avgpool.forward(x); // [N, 512, 1, 1]
        self.fc.forward(x.flatten::<2>(1, 3)) // [N, num_classes]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_have_torchvision_shapes_and_count() {
        let net = ResNet18Config::new().init(&Device::flex());
        assert_eq!(crate::students::num_learnable_params(&net), 11_689_512);
        assert_eq!(net.conv1.weight.shape().dims::<4>(), [64, 3, 7, 7]);
        assert!(net.conv1.bias.is_none());
        // torch fc.weight [1000, 512] is [512, 1000] in Burn's [in, out] layout.
        assert_eq!(net.fc.weight.shape().dims::<2>(), [512, 1000]);
        assert_eq!(net.fc.bias.as_ref().unwrap().shape().dims::<1>(), [1000]);
        assert!(net.layer1[0].downsample.is_none());
        let down = net.layer2[0]
            .downsample
            .as_ref()
            .expect("layer2.0.downsample");
        assert_eq!(down.conv.weight.shape().dims::<4>(), [128, 64, 1, 1]);
        assert_eq!(down.conv.stride, [2, 2]);
        assert_eq!(
            net.layer4[1].conv2.weight.shape().dims::<4>(),
            [512, 512, 3, 3]
        );
        assert_eq!(
            net.layer4.len() + net.layer3.len() + net.layer2.len() + net.layer1.len(),
            8
        );
    }

    #[test]
    fn initialisation_is_torchvisions() {
        let net = ResNet18Config::new().init(&Device::flex());
        // kaiming_normal_, fan_out, relu: std = sqrt(2 / (512 * 9)) for layer4's 3x3 convs
        let w = net.layer4[1].conv2.weight.val();
        let std = w.clone().square().mean().sqrt().into_scalar::<f32>();
        let expected = (2.0f32 / (512.0 * 9.0)).sqrt();
        assert!(
            (std / expected - 1.0).abs() < 0.02,
            "std {std} vs {expected}"
        );
        let mean = w.mean().into_scalar::<f32>();
        assert!(mean.abs() < 0.02 * expected, "mean {mean}");
        assert_eq!(net.bn1.gamma.val().min().into_scalar::<f32>(), 1.0);
        assert_eq!(net.bn1.beta.val().abs().max().into_scalar::<f32>(), 0.0);
        // nn.Linear default: U(-1/sqrt(512), 1/sqrt(512)) for weight and bias
        let bound = 1.0 / 512f32.sqrt();
        let fc_max = net.fc.weight.val().abs().max().into_scalar::<f32>();
        assert!(
            fc_max <= bound && fc_max > 0.99 * bound,
            "{fc_max} vs {bound}"
        );
        let bias_max = net
            .fc
            .bias
            .as_ref()
            .unwrap()
            .val()
            .abs()
            .max()
            .into_scalar::<f32>();
        assert!(
            bias_max <= bound && bias_max > 0.9 * bound,
            "{bias_max} vs {bound}"
        );
    }

    #[test]
    fn maps_small_images_to_logits() {
        let device = Device::flex();
        let net = ResNet18Config::new().with_num_classes(10).init(&device);
        let x = Tensor::<4>::random([2, 3, 32, 32], burn::tensor::Distribution::Default, &device);
        let y = net.forward(x);
        assert_eq!(y.dims(), [2, 10]);
        let values = y.into_data().try_into_vec::<f32>().unwrap();
        assert!(values.iter().all(|v| v.is_finite()));
    }
}
