//! torchvision `vgg11` without batch norm (configuration "A" of Simonyan & Zisserman, "Very Deep
//! Convolutional Networks for Large-Scale Image Recognition", 2014), as
//! `torchvision.models.vgg11(pretrained=False)` builds it: convolutions kaiming-normal (fan-out,
//! ReLU gain) with bias 0, linear layers normal(0, 0.01) with bias 0, dropout 0.5.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{Dropout, DropoutConfig, Initializer, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;

use mtad_kernels::fused::{conv2d_relu, relu};
use mtad_kernels::pool::max_pool2d;

/// Output widths of the eight convolutions; a 2x2 max-pool follows those marked `true`.
const FEATURES: [(usize, bool); 8] = [
    (64, true),
    (128, true),
    (256, false),
    (256, true),
    (512, false),
    (512, true),
    (512, false),
    (512, true),
];

/// Spatial size the features are pooled to before the classifier.
const POOLED: usize = 7;

/// Configuration of [`Vgg11`].
#[derive(Config, Debug)]
pub struct Vgg11Config {
    /// Width of the classifier output.
    #[config(default = 1000)]
    pub num_classes: usize,
    /// Dropout probability in the classifier.
    #[config(default = 0.5)]
    pub dropout: f64,
}

/// torchvision `vgg11`: `[N, 3, H, W]` -> `[N, num_classes]`.
#[derive(Module, Debug)]
pub struct Vgg11 {
    /// The eight 3x3 convolutions of torchvision's `features` (its indices 0, 3, 6, 8, 11, 13,
    /// 16, 18; the others are ReLUs and max-pools).
    pub features: Vec<Conv2d>,
    pub maxpool: MaxPool2d,
    /// `AdaptiveAvgPool2d((7, 7))`: for inputs smaller than 224 (feature maps under 7x7) it
    /// repeats values like torch's adaptive pooling does.
    pub avgpool: AdaptiveAvgPool2d,
    /// torchvision's `classifier.0`, `.3`, `.6`: 25088 -> 4096 -> 4096 -> num_classes.
    pub classifier: Vec<Linear>,
    pub dropout: Dropout,
}

impl Vgg11Config {
    /// A freshly initialised network, as torchvision initialises it.
    pub fn init(&self, device: &Device) -> Vgg11 {
        let mut features = Vec::with_capacity(FEATURES.len());
        let mut in_channels = 3;
        for (out_channels, _) in FEATURES {
            let mut conv = Conv2dConfig::new([in_channels, out_channels], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_initializer(Initializer::KaimingNormal {
                    gain: std::f64::consts::SQRT_2,
                    fan_out_only: true,
                })
                .init(device);
            // Burn draws the bias with the weight's initializer; torchvision zeroes it.
            conv.bias = Some(Initializer::Zeros.init([out_channels], device));
            features.push(conv);
            in_channels = out_channels;
        }
        let widths = [in_channels * POOLED * POOLED, 4096, 4096, self.num_classes];
        let classifier = widths
            .windows(2)
            .map(|w| {
                let mut linear = LinearConfig::new(w[0], w[1])
                    .with_initializer(Initializer::Normal {
                        mean: 0.0,
                        std: 0.01,
                    })
                    .init(device);
                linear.bias = Some(Initializer::Zeros.init([w[1]], device));
                linear
            })
            .collect();
        Vgg11 {
            features,
            maxpool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            avgpool: AdaptiveAvgPool2dConfig::new([POOLED, POOLED]).init(),
            classifier,
            dropout: DropoutConfig::new(self.dropout).init(),
        }
    }
}

impl Vgg11 {
    /// # Shapes
    /// - `images`: `[N, 3, H, W]`
    /// - output: `[N, num_classes]`
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let mut x = images;
        for (conv, (_, pool)) in self.features.iter().zip(FEATURES) {
            x = conv2d_relu(conv, x);
            if pool {
                x = max_pool2d(&self.maxpool, x);
            }
        }
        let x = self.avgpool.forward(x); // [N, 512, 7, 7]
        let x = x.flatten::<2>(1, 3); // [N, 25088]
        let last = self.classifier.len() - 1;
        let mut x = x;
        for (i, linear) in self.classifier.iter().enumerate() {
            x = linear.forward(x);
            if i < last {
                x = self.dropout.forward(relu(x));
            }
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_have_torchvision_shapes_and_count() {
        let net = Vgg11Config::new().init(&Device::flex());
        assert_eq!(crate::students::num_learnable_params(&net), 132_863_336);
        assert_eq!(net.features.len(), 8);
        assert_eq!(net.features[0].weight.shape().dims::<4>(), [64, 3, 3, 3]);
        assert_eq!(net.features[7].weight.shape().dims::<4>(), [512, 512, 3, 3]);
        // torch classifier.0.weight [4096, 25088] is [25088, 4096] in Burn's [in, out] layout.
        assert_eq!(net.classifier[0].weight.shape().dims::<2>(), [25088, 4096]);
        assert_eq!(net.classifier[2].weight.shape().dims::<2>(), [4096, 1000]);
        assert_eq!(net.dropout.prob, 0.5);
    }

    #[test]
    fn initialisation_is_torchvisions() {
        let net = Vgg11Config::new()
            .with_num_classes(10)
            .init(&Device::flex());
        let conv = &net.features[4];
        let std = conv
            .weight
            .val()
            .square()
            .mean()
            .sqrt()
            .into_scalar::<f32>();
        let expected = (2.0f32 / (512.0 * 9.0)).sqrt();
        assert!(
            (std / expected - 1.0).abs() < 0.02,
            "std {std} vs {expected}"
        );
        let bias = conv
            .bias
            .as_ref()
            .unwrap()
            .val()
            .abs()
            .max()
            .into_scalar::<f32>();
        assert_eq!(bias, 0.0);
        let w = net.classifier[1].weight.val();
        let std = w.square().mean().sqrt().into_scalar::<f32>();
        assert!((std / 0.01 - 1.0).abs() < 0.01, "linear std {std}");
        let bias = net.classifier[1].bias.as_ref().unwrap().val().abs().max();
        assert_eq!(bias.into_scalar::<f32>(), 0.0);
    }

    #[test]
    fn adaptive_pool_repeats_small_maps_like_torch() {
        // torch: AdaptiveAvgPool2d((7, 7)) on a 2x2 map uses windows [floor(i*2/7), ceil((i+1)*2/7))
        // -> rows 0,0,0,(0+1)/2,1,1,1 per axis.
        let device = Device::flex();
        let pool = AdaptiveAvgPool2dConfig::new([POOLED, POOLED]).init();
        let x = Tensor::<4>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [1, 1, 2, 2]),
            &device,
        );
        let y = pool.forward(x).into_data().try_into_vec::<f32>().unwrap();
        let axis = |v: [f32; 2]| [v[0], v[0], v[0], (v[0] + v[1]) / 2.0, v[1], v[1], v[1]];
        let rows = axis([0.0, 1.0]);
        let cols = axis([0.0, 1.0]);
        for (i, r) in rows.iter().enumerate() {
            for (j, c) in cols.iter().enumerate() {
                // the input is 1 + c + 2 r at (r, c), linear, so a window's mean is its centre's
                let want = 1.0 + c + 2.0 * r;
                assert_eq!(y[i * 7 + j], want, "at ({i}, {j}): {y:?}");
            }
        }
        let one = Tensor::<4>::from_data(TensorData::new(vec![5.0f32], [1, 1, 1, 1]), &device);
        let y = pool.forward(one).into_data().try_into_vec::<f32>().unwrap();
        assert_eq!(y, vec![5.0; 49]);
    }

    #[test]
    fn maps_small_images_to_logits() {
        let device = Device::flex();
        let net = Vgg11Config::new().with_num_classes(10).init(&device);
        let x = Tensor::<4>::random([1, 3, 32, 32], burn::tensor::Distribution::Default, &device);
        assert_eq!(net.forward(x).dims(), [1, 10]);
    }
}
