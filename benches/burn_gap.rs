//! The single operations behind the gap between our training step on the CPU and PyTorch's,
//! in Burn's CPU backend (flex) and in PyTorch (`benches/reference/burn_gap.py`), timed the same
//! way in the same run: a 1024x1024 matmul, a 3x3 convolution of a resnet18 layer (64 channels at
//! 56x56) and one of the decoder's last block (8 channels at 224x224), forward and
//! forward+backward, batch norm (Burn's layer) + leaky ReLU, leaky ReLU and a sum alone, and an
//! Adam step (ours, `mtad_kernels::adam`, as training runs it).
//!
//! With `--layers`, a per-layer profile of the resnet18 training step at 224x224, batch 8: every
//! distinct layer of the student and the decoder (convolution, batch norm + activation, pooling,
//! upsampling, linear), forward+backward, weighted by how often one step runs it, in both
//! frameworks, then the layer kinds sorted by the time each loses against PyTorch
//! (`--layers densenet121`: the same for densenet121's step). Our side runs
//! the layers as the models do, with our own CPU kernels where they apply (`crates/mtad-kernels`:
//! convolutions, batch norm + activation, pooling, upsampling); add `--burn` for Burn's own
//! layers throughout.
//!
//! ```text
//! cargo bench --bench burn_gap
//! cargo bench --bench burn_gap -- --layers
//! cargo bench --bench burn_gap -- --layers densenet121
//! cargo bench --bench burn_gap -- --layers --burn
//! ```

#[path = "burn_gap/ops.rs"]
mod ops;
#[path = "burn_gap/profile.rs"]
mod profile;

use std::process::Command;
use std::time::Instant;

use burn::nn::conv::Conv2dConfig;
use burn::nn::{BatchNormConfig, LinearConfig, PaddingConfig2d};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::leaky_relu;
use mtad_kernels::adam::Adam;
use profile::layers;

const WARMUP: usize = 1;
const ITERS: usize = 5;

/// Checks that the input had a gradient, without copying it out: flex computes every gradient
/// in `backward()` (and every output in its operation), as PyTorch's side leaves its gradient in
/// `x.grad`. `into_data` would add a copy into freshly faulted pages that neither PyTorch's side
/// nor a training step makes (about 45 ms for the stem's 25 MB on the development machine).
fn keep_grad<const D: usize>(grad: Option<Tensor<D>>) {
    assert!(grad.is_some(), "the input has no gradient");
}

fn timed(mut step: impl FnMut()) -> f64 {
    for _ in 0..WARMUP {
        step();
    }
    let started = Instant::now();
    for _ in 0..ITERS {
        step();
    }
    started.elapsed().as_secs_f64() * 1e3 / ITERS as f64
}

/// Large blocks kept for reuse across training steps (`mtad_alloc`).
#[global_allocator]
static ALLOCATOR: mtad_alloc::BlockCache = mtad_alloc::BlockCache::new();

fn main() {
    if std::env::args().any(|a| a == "--layers") {
        return layers();
    }
    let device = Device::flex();
    let ad = device.clone().autodiff();
    device.seed(0);
    ad.seed(0);
    let mut ours: Vec<(String, f64)> = Vec::new();

    let a: Tensor<2> = Tensor::random([1024, 1024], Distribution::Default, &device);
    let b: Tensor<2> = Tensor::random([1024, 1024], Distribution::Default, &device);
    ours.push((
        "matmul/1024".into(),
        timed(|| {
            let _ = a.clone().matmul(b.clone());
        }),
    ));

    for (name, n, cin, cout, side) in [
        ("conv3x3/64ch-56px", 8, 64, 64, 56),
        ("conv3x3/8ch-224px", 8, 8, 8, 224),
    ] {
        let conv = Conv2dConfig::new([cin, cout], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&device);
        let x: Tensor<4> = Tensor::random([n, cin, side, side], Distribution::Default, &device);
        ours.push((
            format!("{name}/forward"),
            timed(|| {
                let _ = conv.forward(x.clone());
            }),
        ));
        let conv = Conv2dConfig::new([cin, cout], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&ad);
        let x: Tensor<4> =
            Tensor::random([n, cin, side, side], Distribution::Default, &ad).require_grad();
        ours.push((
            format!("{name}/forward+backward"),
            timed(|| {
                let grads = conv.forward(x.clone()).sum().backward();
                keep_grad(x.grad(&grads));
            }),
        ));
    }

    let bn = BatchNormConfig::new(8).init(&ad);
    let x: Tensor<4> = Tensor::random([8, 8, 224, 224], Distribution::Default, &ad).require_grad();
    ours.push((
        "batchnorm+leakyrelu/8ch-224px/forward+backward".into(),
        timed(|| {
            let grads = leaky_relu(bn.forward(x.clone()), 0.2).sum().backward();
            keep_grad(x.grad(&grads));
        }),
    ));

    ours.push((
        "leakyrelu/8ch-224px/forward+backward".into(),
        timed(|| {
            let grads = leaky_relu(x.clone(), 0.2).sum().backward();
            keep_grad(x.grad(&grads));
        }),
    ));
    ours.push((
        "sum/8ch-224px/forward+backward".into(),
        timed(|| {
            let grads = x.clone().sum().backward();
            keep_grad(x.grad(&grads));
        }),
    ));

    // Adam over 12.25M parameters (resnet18 + the decoder at 32x32 have 12.3M): one linear
    // layer with a batch of one, so that the step dominates the forward and backward passes. Our
    // Adam (`mtad_kernels::adam`), as a training run steps.
    let mut linear = Some(LinearConfig::new(3500, 3500).with_bias(false).init(&ad));
    let mut optim = Adam::module_optimizer();
    let row: Tensor<2> = Tensor::random([1, 3500], Distribution::Default, &ad);
    ours.push((
        "adam/12.25M-params/forward+backward+step".into(),
        timed(|| {
            let l = linear.take().unwrap();
            let grads = GradientsParams::from_grads(l.forward(row.clone()).sum().backward(), &l);
            let l = optim.step(1e-3, l, grads);
            let _ = l.weight.val().slice([0..1, 0..1]).into_data();
            linear = Some(l);
        }),
    ));

    let theirs = torch_side(&[]);
    println!(
        "Burn flex ({} rayon threads) against PyTorch, {WARMUP} warm-up + {ITERS} timed iterations",
        rayon::current_num_threads()
    );
    println!(
        "{:<50} {:>10} {:>10} {:>12}",
        "case", "burn ms", "torch ms", "burn/torch"
    );
    for (case, ms) in &ours {
        let t = theirs.iter().find(|(c, _)| c == case).map(|(_, v)| *v);
        println!(
            "{case:<50} {ms:>10.2} {:>10} {:>12}",
            t.map_or("-".into(), |v| format!("{v:.2}")),
            t.map_or("-".into(), |v| format!("{:.2}x slower", ms / v))
        );
    }
}

/// PyTorch's timings of the same cases (`benches/reference/burn_gap.py`), empty without torch.
/// `extra` are more arguments for the script.
fn torch_side(extra: &[String]) -> Vec<(String, f64)> {
    let python = std::env::var("MTAD_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/reference/burn_gap.py");
    let theirs: Vec<(String, f64)> = Command::new(&python)
        .args([script, "--json", "--iters", &ITERS.to_string()])
        .args(["--warmup", &WARMUP.to_string()])
        .args(extra)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter_map(|v| Some((v["case"].as_str()?.to_string(), v["ms"].as_f64()?)))
                .collect()
        })
        .unwrap_or_default();
    if theirs.is_empty() {
        println!("({python} with torch not found: set MTAD_PYTHON; Burn's side only)");
    }
    theirs
}
