//! The decoder of the method, the reference's `Student_de_class` (`finTS.py`), shared by the
//! teachers' and the student's embeddings: `Linear(1000 -> 6272)`, reshape to `[128, 7, 7]`,
//! then five up-blocks 128 -> 64 -> 32 -> 16 -> 8 -> 3, giving `[N, 3, 224, 224]` with no final
//! activation (METHOD.md, "Decoder").
//!
//! Each up-block is the reference's `upsample`: bilinear x2 (`align_corners=True`) ->
//! conv3x3 -> BN -> LeakyReLU(0.2), then `conv1` applied **twice with the same weights** ->
//! BN -> LeakyReLU(0.2) -> conv3x3 to the next width -> BN -> LeakyReLU(0.2). Linear and
//! convolutions have PyTorch's default initialisation (Burn's defaults are the same), batch
//! norms torch's (weight 1, bias 0, momentum 0.1, eps 1e-5).
//!
//! The output size is configurable for small images: the decoder starts from an
//! `output_size / 32` grid (7 for 224) and its linear layer is `embedding_dim -> 128 * grid^2`.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::Int;

use crate::Error;
use crate::students::{Activation, batch_norm_act};
use mtad_kernels::conv3x3::conv2d;
use mtad_kernels::is_flex;

/// Widths from the linear layer's reshape to the image: five up-blocks, each doubling H and W.
pub const CHANNELS: [usize; 6] = [128, 64, 32, 16, 8, 3];

/// How much the five up-blocks enlarge the starting grid.
pub const UPSCALE: usize = 1 << (CHANNELS.len() - 1);

/// Slope of the reference's `nn.LeakyReLU(0.2)`.
const NEGATIVE_SLOPE: f64 = 0.2;
/// Batch norm, then leaky ReLU with [`NEGATIVE_SLOPE`].
const LEAKY: Activation = Activation::LeakyRelu(NEGATIVE_SLOPE);

/// Configuration of the [`Decoder`]. The defaults are exactly the reference's.
#[derive(Config, Debug)]
pub struct DecoderConfig {
    /// Width of the embedding it decodes.
    #[config(default = 1000)]
    pub embedding_dim: usize,
    /// Height and width of the reconstruction; a positive multiple of 32.
    #[config(default = 224)]
    pub output_size: usize,
}

impl DecoderConfig {
    /// The decoder for square images of `output_size` (224 for the method, 32 for the demo).
    pub fn for_image_size(output_size: usize) -> crate::Result<Self> {
        let config = Self::new().with_output_size(output_size);
        config.check()?;
        Ok(config)
    }

    /// Side of the grid the linear layer's output is reshaped to: `output_size / 32`.
    pub fn grid(&self) -> usize {
        self.output_size / UPSCALE
    }

    /// An error unless `output_size` is a positive multiple of 32 and `embedding_dim` positive.
    pub fn check(&self) -> crate::Result<()> {
        if self.output_size == 0 || self.output_size % UPSCALE != 0 {
            return Err(Error::InvalidArgument(format!(
                "decoder output size {} is not a positive multiple of {UPSCALE}",
                self.output_size
            )));
        }
        if self.embedding_dim == 0 {
            return Err(Error::InvalidArgument(
                "decoder embedding width is 0".into(),
            ));
        }
        Ok(())
    }

    /// A freshly initialised decoder, as PyTorch initialises the reference's.
    ///
    /// # Panics
    /// If the configuration fails [`check`](Self::check).
    pub fn init(&self, device: &Device) -> Decoder {
        if let Err(e) = self.check() {
            panic!("{e}");
        }
        let grid = self.grid();
        let [c1, c2, c3, c4, c5, c6] = CHANNELS;
        Decoder {
            linear1: LinearConfig::new(self.embedding_dim, c1 * grid * grid).init(device),
            up1: UpBlock::new(c1, c2, device),
            up2: UpBlock::new(c2, c3, device),
            up3: UpBlock::new(c3, c4, device),
            up4: UpBlock::new(c4, c5, device),
            up5: UpBlock::new(c5, c6, device),
            grid,
        }
    }
}

/// The reference's `Student_de_class`: `[N, embedding_dim]` -> `[N, 3, output_size, output_size]`.
#[derive(Module, Debug)]
pub struct Decoder {
    pub linear1: Linear,
    pub up1: UpBlock,
    pub up2: UpBlock,
    pub up3: UpBlock,
    pub up4: UpBlock,
    pub up5: UpBlock,
    /// Side of the starting grid (7 for 224).
    pub grid: usize,
}

/// Bilinear x2 upsampling with `align_corners=True` (torch's `nn.Upsample(scale_factor=2,
/// mode='bilinear', align_corners=True)`), written as a gather of the two neighbours and a
/// linear blend along each axis: output `i` reads the input at `i * (n - 1) / (2n - 1)`.
/// Burn's `interpolate` computes the same values, but its backward pass is missing on the GPU
/// backends (wgpu and CUDA panic: "Bilinear interpolation backward is not supported by JIT
/// backend"); gathers and blends differentiate on every backend.
/// On the CPU backend, float32 tensors take our kernel ([`mtad_kernels::upsample`]).
pub fn upsample2x(x: Tensor<4>) -> Tensor<4> {
    if is_flex(&x.device()) && x.dtype() == DType::F32 {
        return mtad_kernels::upsample::upsample2x(x);
    }
    upsample2x_blend(x)
}

/// [`upsample2x`] by gathers and blends, on any backend.
fn upsample2x_blend(x: Tensor<4>) -> Tensor<4> {
    let [_, _, height, width] = x.dims();
    let x = blend_axis(x, 3, width);
    blend_axis(x, 2, height)
}

/// Doubles axis `dim` (of length `n`) by linear interpolation with aligned corners.
fn blend_axis(x: Tensor<4>, dim: usize, n: usize) -> Tensor<4> {
    let device = x.device();
    let out = 2 * n;
    let scale = if n > 1 {
        (n - 1) as f32 / (out - 1) as f32
    } else {
        0.0
    };
    let (mut low, mut high, mut weight) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..out {
        let source = scale * i as f32;
        let i0 = (source.floor() as usize).min(n - 1);
        low.push(i0 as i64);
        high.push((i0 + 1).min(n - 1) as i64);
        weight.push(source - i0 as f32);
    }
    let index = |v: Vec<i64>| Tensor::<1, Int>::from_data(TensorData::new(v, [out]), &device);
    let mut shape = [1usize; 4];
    shape[dim] = out;
    let weight = Tensor::<1>::from_data(TensorData::new(weight, [out]), &device).reshape(shape);
    let a = x.clone().select(dim, index(low));
    let b = x.select(dim, index(high));
    a.clone() + (b - a) * weight
}

/// The reference's `upsample` block. `up_conv` and `up_bn` are its `up.1` and `up.2`.
#[derive(Module, Debug)]
pub struct UpBlock {
    pub up_conv: Conv2d,
    pub up_bn: BatchNorm,
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub conv2: Conv2d,
    pub bn2: BatchNorm,
}

/// `nn.Conv2d(channels[0], channels[1], kernel_size=3, padding='same')` with PyTorch's default
/// initialisation (Burn's default initializer gives the same bounds for weight and bias).
fn conv3x3(channels: [usize; 2], device: &Device) -> Conv2d {
    Conv2dConfig::new(channels, [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(device)
}

impl UpBlock {
    fn new(in_channels: usize, out_channels: usize, device: &Device) -> Self {
        Self {
            up_conv: conv3x3([in_channels, in_channels], device),
            up_bn: BatchNormConfig::new(in_channels).init(device),
            conv1: conv3x3([in_channels, in_channels], device),
            bn1: BatchNormConfig::new(in_channels).init(device),
            conv2: conv3x3([in_channels, out_channels], device),
            bn2: BatchNormConfig::new(out_channels).init(device),
        }
    }

    /// `[N, C_in, H, W]` -> `[N, C_out, 2H, 2W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = upsample2x(x); // [N, C_in, 2H, 2W]
        let x = batch_norm_act(&self.up_bn, conv2d(&self.up_conv, x), LEAKY);
        // The reference applies conv1 twice (same weights); its BN and activation once.
        let x = conv2d(&self.conv1, conv2d(&self.conv1, x));
        let x = batch_norm_act(&self.bn1, x, LEAKY);
        batch_norm_act(&self.bn2, conv2d(&self.conv2, x), LEAKY)
    }
}

impl Decoder {
    /// Reconstructs images from embeddings.
    ///
    /// # Shapes
    /// - `z`: `[N, embedding_dim]`
    /// - output: `[N, 3, 32 * grid, 32 * grid]`
    pub fn forward(&self, z: Tensor<2>) -> Tensor<4> {
        let [n, _] = z.dims();
        let x = self.linear1.forward(z); // [N, 128 * grid * grid]
        let x = x.reshape([n, CHANNELS[0], self.grid, self.grid]); // [N, 128, grid, grid]
        let x = self.up1.forward(x);
        let x = self.up2.forward(x);
        let x = self.up3.forward(x);
        let x = self.up4.forward(x);
        self.up5.forward(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_blended_upsampling_equals_the_cpu_kernel() {
        let device = Device::flex();
        device.seed(5);
        for (h, w) in [(1, 1), (2, 3), (7, 7), (5, 12)] {
            let x: Tensor<4> =
                Tensor::random([2, 3, h, w], burn::tensor::Distribution::Default, &device);
            let want = upsample2x(x.clone())
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            let got = upsample2x_blend(x).into_data().try_to_vec::<f32>().unwrap();
            assert_eq!(want.len(), 2 * 3 * 4 * h * w);
            let worst = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "{h}x{w}: max difference {worst}");
        }
    }

    #[test]
    fn default_is_the_reference_decoder() {
        let config = DecoderConfig::new();
        assert_eq!(
            (config.embedding_dim, config.output_size, config.grid()),
            (1000, 224, 7)
        );
        let decoder = config.init(&Device::flex());
        // torch linear1.weight [6272, 1000] is [1000, 6272] in Burn's [in, out] layout.
        assert_eq!(decoder.linear1.weight.shape().dims::<2>(), [1000, 6272]);
        assert_eq!(
            decoder.up1.up_conv.weight.shape().dims::<4>(),
            [128, 128, 3, 3]
        );
        assert_eq!(
            decoder.up1.conv2.weight.shape().dims::<4>(),
            [64, 128, 3, 3]
        );
        assert_eq!(decoder.up5.conv2.weight.shape().dims::<4>(), [3, 8, 3, 3]);
        assert_eq!(decoder.up5.bn2.gamma.shape().dims::<1>(), [3]);
        // Parameter count of the reference's Student_de_class.
        let linear = 1000 * 6272 + 6272;
        let blocks: usize = CHANNELS
            .windows(2)
            .map(|c| {
                2 * (c[0] * c[0] * 9 + c[0]) + 2 * 2 * c[0] + c[1] * c[0] * 9 + c[1] + 2 * c[1]
            })
            .sum();
        assert_eq!(
            crate::students::num_learnable_params(&decoder),
            linear + blocks
        );
    }

    #[test]
    fn default_initialisation_is_pytorchs() {
        let decoder = DecoderConfig::new()
            .with_output_size(32)
            .init(&Device::flex());
        // nn.Conv2d default: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 8 * 9
        let bound = 1.0 / 72f32.sqrt();
        let conv = &decoder.up5.conv1;
        let w = conv.weight.val().abs().max().into_scalar::<f32>();
        let b = conv
            .bias
            .as_ref()
            .unwrap()
            .val()
            .abs()
            .max()
            .into_scalar::<f32>();
        assert!(w <= bound && w > 0.95 * bound, "{w} vs {bound}");
        assert!(b <= bound && b > 0.3 * bound, "{b} vs {bound}");
    }

    #[test]
    fn output_size_must_be_a_multiple_of_32() {
        assert!(DecoderConfig::for_image_size(224).is_ok());
        assert!(DecoderConfig::for_image_size(32).is_ok());
        assert!(DecoderConfig::for_image_size(0).is_err());
        assert!(DecoderConfig::for_image_size(100).is_err());
    }

    #[test]
    fn reconstructs_images_of_the_configured_size() {
        let device = Device::flex();
        let decoder = DecoderConfig::new().with_output_size(64).init(&device);
        let z = Tensor::<2>::random([2, 1000], burn::tensor::Distribution::Default, &device);
        assert_eq!(decoder.forward(z).dims(), [2, 3, 64, 64]);
    }
}
