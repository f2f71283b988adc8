//! The learned teacher weighting of the method, the reference's `Weight_Class` (`finTS.py`):
//! a parameter `w` `[k, 1]` initialised to zeros, `a = softmax(w)` over the teachers and
//! `z_T = sum_i a_i z_i` (METHOD.md, "Teacher weighting").

use burn::module::Param;
use burn::nn::Initializer;
use burn::prelude::*;
use burn::tensor::activation::softmax;

/// Configuration of [`TeacherWeighting`].
#[derive(Config, Debug)]
pub struct TeacherWeightingConfig {
    /// Number of teachers `k`; the method has three.
    #[config(default = 3)]
    pub num_teachers: usize,
}

impl TeacherWeightingConfig {
    /// Weights that start uniform (`w = 0`, so every `a_i = 1/k`).
    pub fn init(&self, device: &Device) -> TeacherWeighting {
        assert!(
            self.num_teachers > 0,
            "the teacher weighting needs at least one teacher"
        );
        TeacherWeighting {
            w: Initializer::Zeros.init([self.num_teachers, 1], device),
        }
    }
}

/// `z_T = sum_i softmax(w)_i z_i`.
#[derive(Module, Debug)]
pub struct TeacherWeighting {
    /// The reference's `w`, `[k, 1]`.
    pub w: Param<Tensor<2>>,
}

impl TeacherWeighting {
    /// Number of teachers `k`.
    pub fn num_teachers(&self) -> usize {
        self.w.shape().dims::<2>()[0]
    }

    /// `a = softmax(w)` over the teachers, `[k]`.
    pub fn weights(&self) -> Tensor<1> {
        softmax(self.w.val(), 0).squeeze_dim::<1>(1)
    }

    /// The current `a`, for logging.
    pub fn weights_vec(&self) -> Vec<f32> {
        self.weights()
            .into_data()
            .try_into_vec::<f32>()
            .expect("the weights are f32")
    }

    /// Weighted sum of the stacked teachers' z-scores.
    ///
    /// # Shapes
    /// - `z`: `[N, k, D]`, teacher `i` at `z[:, i, :]` (the reference's `torch.stack(.., dim=1)`)
    /// - output: `[N, D]`
    pub fn forward(&self, z: Tensor<3>) -> Tensor<2> {
        let a = softmax(self.w.val(), 0).unsqueeze::<3>(); // [1, k, 1]
        (z * a).sum_dim(1).squeeze_dim::<2>(1)
    }

    /// [`forward`](Self::forward) on the teachers' z-scores given one `[N, D]` tensor each,
    /// in the order of `w`.
    pub fn forward_list(&self, z: Vec<Tensor<2>>) -> Tensor<2> {
        assert_eq!(z.len(), self.num_teachers(), "one embedding per teacher");
        self.forward(Tensor::stack(z, 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_uniform_and_averages() {
        let device = Device::flex();
        let weighting = TeacherWeightingConfig::new().init(&device);
        assert_eq!(weighting.num_teachers(), 3);
        for a in weighting.weights_vec() {
            assert!((a - 1.0 / 3.0).abs() < 1e-7, "{a}");
        }
        let z: Vec<Tensor<2>> = [1.0f32, 2.0, 6.0]
            .iter()
            .map(|v| Tensor::full([2, 4], *v, &device))
            .collect();
        let z_t = weighting
            .forward_list(z)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        assert_eq!(z_t.len(), 8);
        assert!(z_t.iter().all(|v| (v - 3.0).abs() < 1e-6), "{z_t:?}");
    }

    #[test]
    fn softmax_of_the_learned_w_weights_the_sum() {
        let device = Device::flex();
        let mut weighting = TeacherWeightingConfig::new().init(&device);
        let w = [0.5f32, -1.0, 2.0];
        weighting.w = Param::from_data(TensorData::new(w.to_vec(), [3, 1]), &device);
        let exp: Vec<f64> = w.iter().map(|v| (*v as f64).exp()).collect();
        let total: f64 = exp.iter().sum();
        let a: Vec<f64> = exp.iter().map(|e| e / total).collect();
        for (got, want) in weighting.weights_vec().iter().zip(&a) {
            assert!((*got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        }
        // teacher i contributes (i + 1) * (column + 1) in a [1, 3, 2] stack
        let values: Vec<f32> = (0..3)
            .flat_map(|i| (0..2).map(move |d| ((i + 1) * (d + 1)) as f32))
            .collect();
        let z = Tensor::<3>::from_data(TensorData::new(values, [1, 3, 2]), &device);
        let z_t = weighting
            .forward(z)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let base: f64 = a.iter().enumerate().map(|(i, a)| a * (i + 1) as f64).sum();
        assert!((z_t[0] as f64 - base).abs() < 1e-5 && (z_t[1] as f64 - 2.0 * base).abs() < 1e-5);
    }
}
