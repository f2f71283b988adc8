//! The float image type that every dataset hands to the networks.

use crate::{Error, Result};

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

    /// An image from its values, checking that there are `channels * height * width` of them.
    pub fn new(channels: usize, height: usize, width: usize, data: Vec<f32>) -> Result<Self> {
        let image = Self {
            channels,
            height,
            width,
            data,
        };
        image.check()?;
        Ok(image)
    }

    /// Checks that the data holds `channels * height * width` values (the fields are public).
    pub fn check(&self) -> Result<()> {
        let expected = self.channels * self.height * self.width;
        if self.data.len() != expected {
            return Err(Error::InvalidArgument(format!(
                "a {}x{}x{} image needs {expected} values, got {}",
                self.channels,
                self.height,
                self.width,
                self.data.len()
            )));
        }
        Ok(())
    }

    /// `[channels, height, width]`.
    pub fn shape(&self) -> [usize; 3] {
        [self.channels, self.height, self.width]
    }

    /// The value at channel `c`, row `y`, column `x`.
    pub fn get(&self, c: usize, y: usize, x: usize) -> f32 {
        self.data[(c * self.height + y) * self.width + x]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_checks_the_value_count_and_get_is_channel_major() {
        assert!(FloatImage::new(3, 2, 2, vec![0.0; 11]).is_err());
        let image = FloatImage::new(2, 2, 3, (0..12).map(|v| v as f32).collect()).unwrap();
        assert_eq!(image.shape(), [2, 2, 3]);
        assert_eq!(image.get(1, 0, 2), 8.0);
        assert_eq!(image.get(0, 1, 0), 3.0);
    }
}
