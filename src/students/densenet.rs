//! torchvision `densenet121` (Huang et al., "Densely Connected Convolutional Networks", 2017),
//! as `torchvision.models.densenet121(pretrained=False)` builds it: growth rate 32, blocks of
//! 6, 12, 24 and 16 layers, 64 initial features, bottleneck width 4 x 32, no dropout;
//! convolutions kaiming-normal (fan-in, ReLU gain), batch norms weight 1 and bias 0, the
//! classifier a default `nn.Linear` with bias 0.

use burn::nn::conv::Conv2d;
use burn::nn::pool::{AvgPool2d, AvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, Initializer, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;

use mtad_kernels::cat::cat_channels;
use mtad_kernels::conv3x3::conv2d;
use mtad_kernels::pool::{avg_pool2d, max_pool2d};

use super::Activation::Relu;
use super::{batch_norm_act, norm};

/// Channels each dense layer adds.
const GROWTH_RATE: usize = 32;
/// Layers in each of the four dense blocks.
const BLOCK_CONFIG: [usize; 4] = [6, 12, 24, 16];
/// Channels of the stem convolution.
const NUM_INIT_FEATURES: usize = 64;
/// Bottleneck width, in multiples of the growth rate.
const BN_SIZE: usize = 4;

/// Configuration of [`DenseNet121`].
#[derive(Config, Debug)]
pub struct DenseNet121Config {
    /// Width of the classifier output.
    #[config(default = 1000)]
    pub num_classes: usize,
}

/// torchvision `densenet121`: `[N, 3, H, W]` -> `[N, num_classes]`. The fields are torchvision's
/// `features.*` children (in its order) and `classifier`.
#[derive(Module, Debug)]
pub struct DenseNet121 {
    pub conv0: Conv2d,
    pub norm0: BatchNorm,
    pub pool0: MaxPool2d,
    pub denseblock1: DenseBlock,
    pub transition1: Transition,
    pub denseblock2: DenseBlock,
    pub transition2: Transition,
    pub denseblock3: DenseBlock,
    pub transition3: Transition,
    pub denseblock4: DenseBlock,
    pub norm5: BatchNorm,
    pub classifier: Linear,
}

/// torchvision `_DenseBlock`: `layers[i]` is its `denselayer{i+1}`.
#[derive(Module, Debug)]
pub struct DenseBlock {
    pub layers: Vec<DenseLayer>,
}

/// torchvision `_DenseLayer`: BN-ReLU-conv1x1 bottleneck, then BN-ReLU-conv3x3 to `GROWTH_RATE`
/// new channels.
#[derive(Module, Debug)]
pub struct DenseLayer {
    pub norm1: BatchNorm,
    pub conv1: Conv2d,
    pub norm2: BatchNorm,
    pub conv2: Conv2d,
}

/// torchvision `_Transition`: BN-ReLU-conv1x1 halving the channels, then 2x2 average pooling.
#[derive(Module, Debug)]
pub struct Transition {
    pub norm: BatchNorm,
    pub conv: Conv2d,
    pub pool: AvgPool2d,
}

/// A bias-free convolution with torchvision densenet's initialisation: `kaiming_normal_` with
/// its defaults (fan-in, gain sqrt 2), i.e. std `sqrt(2 / (in * k * k))`.
fn conv(
    channels: [usize; 2],
    kernel: usize,
    stride: usize,
    padding: usize,
    device: &Device,
) -> Conv2d {
    super::kaiming_conv(channels, kernel, stride, padding, false, device)
}

impl DenseLayer {
    fn new(in_channels: usize, device: &Device) -> Self {
        let bottleneck = BN_SIZE * GROWTH_RATE;
        Self {
            norm1: norm(in_channels, device),
            conv1: conv([in_channels, bottleneck], 1, 1, 0, device),
            norm2: norm(bottleneck, device),
            conv2: conv([bottleneck, GROWTH_RATE], 3, 1, 1, device),
        }
    }

    /// `[N, C, H, W]` (all previous features, concatenated) -> `[N, GROWTH_RATE, H, W]`.
    pub fn forward(&self, features: Tensor<4>) -> Tensor<4> {
        let x = conv2d(&self.conv1, batch_norm_act(&self.norm1, features, Relu));
        conv2d(&self.conv2, batch_norm_act(&self.norm2, x, Relu))
    }
}

impl DenseBlock {
    fn new(num_layers: usize, in_channels: usize, device: &Device) -> Self {
        let layers = (0..num_layers)
            .map(|i| DenseLayer::new(in_channels + i * GROWTH_RATE, device))
            .collect();
        Self { layers }
    }

    /// `[N, C, H, W]` -> `[N, C + layers * GROWTH_RATE, H, W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut features = x;
        for layer in &self.layers {
            let new = layer.forward(features.clone());
            features = cat_channels(features, new);
        }
        features
    }
}

impl Transition {
    fn new(in_channels: usize, out_channels: usize, device: &Device) -> Self {
        Self {
            norm: norm(in_channels, device),
            conv: conv([in_channels, out_channels], 1, 1, 0, device),
            pool: AvgPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        avg_pool2d(
            &self.pool,
            conv2d(&self.conv, batch_norm_act(&self.norm, x, Relu)),
        )
    }
}

impl DenseNet121Config {
    /// A freshly initialised network, as torchvision initialises it.
    pub fn init(&self, device: &Device) -> DenseNet121 {
        let mut channels = NUM_INIT_FEATURES;
        let mut blocks = Vec::new();
        let mut transitions = Vec::new();
        for (i, layers) in BLOCK_CONFIG.into_iter().enumerate() {
            blocks.push(DenseBlock::new(layers, channels, device));
            channels += layers * GROWTH_RATE;
            if i + 1 < BLOCK_CONFIG.len() {
                transitions.push(Transition::new(channels, channels / 2, device));
                channels /= 2;
            }
        }
        let mut classifier = LinearConfig::new(channels, self.num_classes).init(device);
        classifier.bias = Some(Initializer::Zeros.init([self.num_classes], device));

        let [denseblock1, denseblock2, denseblock3, denseblock4]: [DenseBlock; 4] =
            blocks.try_into().expect("four dense blocks");
        let [transition1, transition2, transition3]: [Transition; 3] =
            transitions.try_into().expect("three transitions");
        DenseNet121 {
            conv0: conv([3, NUM_INIT_FEATURES], 7, 2, 3, device),
            norm0: norm(NUM_INIT_FEATURES, device),
            pool0: MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(),
            denseblock1,
            transition1,
            denseblock2,
            transition2,
            denseblock3,
            transition3,
            denseblock4,
            norm5: norm(channels, device),
            classifier,
        }
    }
}

impl DenseNet121 {
    /// # Shapes
    /// - `images`: `[N, 3, H, W]`
    /// - output: `[N, num_classes]`
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = batch_norm_act(&self.norm0, conv2d(&self.conv0, images), Relu);
        let x = max_pool2d(&self.pool0, x); // [N, 64, H/4, W/4]
        let x = self.transition1.forward(self.denseblock1.forward(x)); // [N, 128, H/8, W/8]
        let x = self.transition2.forward(self.denseblock2.forward(x)); // [N, 256, H/16, W/16]
        let x = self.transition3.forward(self.denseblock3.forward(x)); // [N, 512, H/32, W/32]
        // norm5, F.relu, then F.adaptive_avg_pool2d(., (1, 1)), i.e. the spatial mean.
        let x = batch_norm_act(&self.norm5, self.denseblock4.forward(x), Relu); // [N, 1024, H/32, W/32]
        let x = x.mean_dim(3).mean_dim(2); // [N, 1024, 1, 1]
        self.classifier.forward(x.flatten::<2>(1, 3)) // [N, num_classes]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_have_torchvision_shapes_and_count() {
        let net = DenseNet121Config::new().init(&Device::flex());
        assert_eq!(crate::students::num_learnable_params(&net), 7_978_856);
        assert_eq!(net.conv0.weight.shape().dims::<4>(), [64, 3, 7, 7]);
        let sizes: Vec<usize> = [
            &net.denseblock1,
            &net.denseblock2,
            &net.denseblock3,
            &net.denseblock4,
        ]
        .iter()
        .map(|b| b.layers.len())
        .collect();
        assert_eq!(sizes, BLOCK_CONFIG);
        // features.denseblock3.denselayer24.conv1: 256 + 23 * 32 = 992 -> 128
        let last = net.denseblock3.layers.last().unwrap();
        assert_eq!(last.conv1.weight.shape().dims::<4>(), [128, 992, 1, 1]);
        assert_eq!(last.conv2.weight.shape().dims::<4>(), [32, 128, 3, 3]);
        assert_eq!(
            net.transition2.conv.weight.shape().dims::<4>(),
            [256, 512, 1, 1]
        );
        assert_eq!(net.norm5.gamma.shape().dims::<1>(), [1024]);
        // torch classifier.weight [1000, 1024] is [1024, 1000] in Burn's [in, out] layout.
        assert_eq!(net.classifier.weight.shape().dims::<2>(), [1024, 1000]);
    }

    #[test]
    fn initialisation_is_torchvisions() {
        let net = DenseNet121Config::new().init(&Device::flex());
        let w = net.denseblock4.layers[0].conv1.weight.val(); // fan-in 512
        let std = w.square().mean().sqrt().into_scalar::<f32>();
        let expected = (2.0f32 / 512.0).sqrt();
        assert!(
            (std / expected - 1.0).abs() < 0.02,
            "std {std} vs {expected}"
        );
        let bias = net.classifier.bias.as_ref().unwrap().val().abs().max();
        assert_eq!(bias.into_scalar::<f32>(), 0.0);
        let bound = 1.0 / 1024f32.sqrt();
        let w_max = net.classifier.weight.val().abs().max().into_scalar::<f32>();
        assert!(w_max <= bound && w_max > 0.99 * bound, "{w_max} vs {bound}");
    }

    #[test]
    fn maps_small_images_to_logits() {
        let device = Device::flex();
        let net = DenseNet121Config::new().with_num_classes(10).init(&device);
        let x = Tensor::<4>::random([1, 3, 32, 32], burn::tensor::Distribution::Default, &device);
        assert_eq!(net.forward(x).dims(), [1, 10]);
    }
}
