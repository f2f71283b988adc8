//! The float image type that every dataset hands to the networks.

/// A float image in channel-major layout `[C, H, W]`, row-major inside each channel.
#[derive(Debug, Clone, PartialEq)]
pub struct FloatImage {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// `channels * height * width` values.
    pub data: Vec<f32>,
}

impl FloatImage {
    /// An image of the given shape filled with zeros.
    pub fn zeros(channels: usize, height: usize, width: usize) -> Self {
        Self {
            channels,
            height,
            width,
            data: vec![0.0; channels * height * width],
        }
    }

    /// The value at channel `c`, row `y`, column `x`.
    pub fn get(&self, c: usize, y: usize, x: usize) -> f32 {
        self.data[(c * self.height + y) * self.width + x]
    }
}
