//! The single operations behind the gap between our training step on the CPU and PyTorch's,
//! in Burn's CPU backend (flex) and in PyTorch (`benches/reference/burn_gap.py`), timed the same
//! way in the same run: a 1024x1024 matmul, a 3x3 convolution of a resnet18 layer (64 channels at
//! 56x56) and one of the decoder's last block (8 channels at 224x224), forward and
//! forward+backward, and the decoder's batch norm + leaky ReLU (Burn's layer, and ours).
//!
//! ```text
//! cargo bench --bench burn_gap
//! ```

use std::process::Command;
use std::time::Instant;

use burn::nn::conv::Conv2dConfig;
use burn::nn::{BatchNormConfig, LinearConfig, PaddingConfig2d};
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::leaky_relu;

const WARMUP: usize = 1;
const ITERS: usize = 5;

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

fn main() {
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
            let _ = a.clone().matmul(b.clone()).into_data();
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
                let _ = conv.forward(x.clone()).into_data();
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
                let _ = x.grad(&grads).map(|g| g.into_data());
            }),
        ));
    }

    let bn = BatchNormConfig::new(8).init(&ad);
    let x: Tensor<4> = Tensor::random([8, 8, 224, 224], Distribution::Default, &ad).require_grad();
    ours.push((
        "batchnorm+leakyrelu/8ch-224px/forward+backward".into(),
        timed(|| {
            let grads = leaky_relu(bn.forward(x.clone()), 0.2).sum().backward();
            let _ = x.grad(&grads).map(|g| g.into_data());
        }),
    ));

    ours.push((
        "leakyrelu/8ch-224px/forward+backward".into(),
        timed(|| {
            let grads = leaky_relu(x.clone(), 0.2).sum().backward();
            let _ = x.grad(&grads).map(|g| g.into_data());
        }),
    ));
    ours.push((
        "sum/8ch-224px/forward+backward".into(),
        timed(|| {
            let grads = x.clone().sum().backward();
            let _ = x.grad(&grads).map(|g| g.into_data());
        }),
    ));

    // Adam over 12.25M parameters (resnet18 + the decoder at 32x32 have 12.3M): one linear
    // layer with a batch of one, so that the step dominates the forward and backward passes.
    let mut linear = Some(LinearConfig::new(3500, 3500).with_bias(false).init(&ad));
    let mut optim = AdamConfig::new().init();
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

    let python = std::env::var("MTAD_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/reference/burn_gap.py");
    let theirs: Vec<(String, f64)> = Command::new(&python)
        .args([script, "--json", "--iters", &ITERS.to_string()])
        .args(["--warmup", &WARMUP.to_string()])
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
