//! `--layers`: forward + backward of each layer of a training step, ours against PyTorch's,
//! weighted by how often a step runs it.

use burn::nn::conv::Conv2dConfig;
use burn::nn::pool::{AvgPool2dConfig, MaxPool2dConfig};
use burn::nn::{BatchNormConfig, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::{leaky_relu, relu};
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use mtad_kernels::conv3x3::conv2d;
use mtad_kernels::pool::{avg_pool2d, max_pool2d};
use multi_teacher_ad::decoder::upsample2x;
use multi_teacher_ad::students::{Activation, batch_norm, batch_norm_act};
use serde_json::json;

use crate::ops::{Op, case_name, densenet121_layers, step_layers};
use crate::{keep_grad, timed, torch_side};

/// The JSON description `burn_gap.py --layers` builds the same layers from.
fn op_json(op: Op, side: usize, case: &str) -> serde_json::Value {
    let mut v = serde_json::to_value(op).unwrap();
    v["case"] = json!(case);
    v["side"] = json!(side);
    v["batch"] = json!(LAYER_BATCH);
    v
}

const LAYER_BATCH: usize = 8;

/// Forward + backward of one layer on `ad` (input gradient included), in milliseconds.
fn time_layer(op: Op, side: usize, ad: &Device, burn_only: bool) -> f64 {
    let n = LAYER_BATCH;
    let input =
        |dims: Vec<usize>| Tensor::<4>::random(dims, Distribution::Default, ad).require_grad();
    let backward = |y: Tensor<4>, x: &Tensor<4>| {
        let grads = y.sum().backward();
        keep_grad(x.grad(&grads));
    };
    match op {
        Op::Conv {
            cin,
            cout,
            k,
            stride,
            bias,
        } => {
            let p = k / 2;
            let conv = Conv2dConfig::new([cin, cout], [k, k])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
                .with_bias(bias)
                .init(ad);
            let x = input(vec![n, cin, side, side]);
            if burn_only {
                timed(|| backward(conv.forward(x.clone()), &x))
            } else {
                timed(|| backward(conv2d(&conv, x.clone()), &x))
            }
        }
        Op::BnAct { c, leaky } => {
            let norm = BatchNormConfig::new(c).init(ad);
            let x = input(vec![n, c, side, side]);
            let activation = if leaky {
                Activation::LeakyRelu(0.2)
            } else {
                Activation::Relu
            };
            timed(|| {
                let y = if burn_only {
                    let y = batch_norm(&norm, x.clone());
                    if leaky { leaky_relu(y, 0.2) } else { relu(y) }
                } else {
                    batch_norm_act(&norm, x.clone(), activation)
                };
                backward(y, &x)
            })
        }
        Op::MaxPool { c } => {
            let pool = MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init();
            let x = input(vec![n, c, side, side]);
            timed(|| {
                let y = if burn_only {
                    pool.forward(x.clone())
                } else {
                    max_pool2d(&pool, x.clone())
                };
                backward(y, &x)
            })
        }
        Op::Upsample { c } => {
            let x = input(vec![n, c, side, side]);
            timed(|| {
                let y = if burn_only {
                    let options = InterpolateOptions::new(InterpolateMode::Bilinear)
                        .with_align_corners(true)
                        .with_output_size([2 * side, 2 * side]);
                    interpolate(x.clone(), options)
                } else {
                    upsample2x(x.clone())
                };
                backward(y, &x)
            })
        }
        Op::AvgPool { c } => {
            let pool = AvgPool2dConfig::new([2, 2]).with_strides([2, 2]).init();
            let x = input(vec![n, c, side, side]);
            timed(|| {
                let y = if burn_only {
                    pool.forward(x.clone())
                } else {
                    avg_pool2d(&pool, x.clone())
                };
                backward(y, &x)
            })
        }
        Op::Cat { c } => {
            let x = input(vec![n, c, side, side]);
            let new = input(vec![n, 32, side, side]);
            timed(|| {
                let grads = Tensor::cat(vec![x.clone(), new.clone()], 1)
                    .sum()
                    .backward();
                keep_grad(x.grad(&grads));
                keep_grad(new.grad(&grads));
            })
        }
        Op::Linear { inputs, outputs } => {
            let linear = LinearConfig::new(inputs, outputs).init(ad);
            let x: Tensor<2> =
                Tensor::random([n, inputs], Distribution::Default, ad).require_grad();
            timed(|| {
                let grads = linear.forward(x.clone()).sum().backward();
                keep_grad(x.grad(&grads));
            })
        }
    }
}

/// `--layers [densenet121]`: the per-layer profile of one resnet18 (or densenet121) training
/// step.
pub(crate) fn layers() {
    let burn_only = std::env::args().any(|a| a == "--burn");
    let student = if std::env::args().any(|a| a == "densenet121") {
        "densenet121"
    } else {
        "resnet18"
    };
    let ad = Device::flex().autodiff();
    ad.seed(0);
    let layers = match student {
        "densenet121" => densenet121_layers(),
        _ => step_layers(),
    };
    let names: Vec<String> = layers
        .iter()
        .map(|&(op, side, _)| case_name(op, side))
        .collect();
    let specs: Vec<serde_json::Value> = layers
        .iter()
        .zip(&names)
        .map(|(&(op, side, _), case)| op_json(op, side, case))
        .collect();
    let theirs = torch_side(&["--layers".into(), serde_json::to_string(&specs).unwrap()]);
    println!(
        "Per-layer forward+backward of a {student} training step (batch {LAYER_BATCH}, 224x224), \
         {} on flex ({} rayon threads) against PyTorch; ms per call, x calls per step",
        if burn_only {
            "Burn's own layers"
        } else {
            "the models' layers (our CPU kernels where they apply)"
        },
        rayon::current_num_threads()
    );
    println!(
        "{:<34} {:>5} {:>10} {:>10} {:>12} {:>12} {:>9}",
        "layer", "calls", "ours ms", "torch ms", "ours/step", "torch/step", "ratio"
    );
    // (kind, burn ms per step, torch ms per step) summed over the layers of each kind.
    let mut kinds: Vec<(String, f64, f64)> = Vec::new();
    let (mut burn_total, mut torch_total) = (0.0, 0.0);
    for (&(op, side, calls), case) in layers.iter().zip(&names) {
        let ms = time_layer(op, side, &ad, burn_only);
        let t = theirs.iter().find(|(c, _)| c == case).map(|(_, v)| *v);
        let per_step = ms * calls as f64;
        let torch_step = t.map(|v| v * calls as f64);
        println!(
            "{case:<34} {calls:>5} {ms:>10.2} {:>10} {per_step:>12.1} {:>12} {:>9}",
            t.map_or("-".into(), |v| format!("{v:.2}")),
            torch_step.map_or("-".into(), |v| format!("{v:.1}")),
            t.map_or("-".into(), |v| format!("{:.2}x", ms / v)),
        );
        burn_total += per_step;
        torch_total += torch_step.unwrap_or(0.0);
        let kind = case.split('/').next().unwrap().to_string();
        match kinds.iter_mut().find(|(k, _, _)| *k == kind) {
            Some(entry) => {
                entry.1 += per_step;
                entry.2 += torch_step.unwrap_or(0.0);
            }
            None => kinds.push((kind, per_step, torch_step.unwrap_or(0.0))),
        }
    }
    println!(
        "{:<34} {:>5} {:>10} {:>10} {burn_total:>12.1} {torch_total:>12.1} {:>9}",
        "one step (sum of the layers)",
        "",
        "",
        "",
        format!("{:.2}x", burn_total / torch_total)
    );
    kinds.sort_by(|a, b| (b.1 - b.2).total_cmp(&(a.1 - a.2)));
    println!("\nBy layer kind, most time lost first (ms per step):");
    println!(
        "{:<16} {:>10} {:>10} {:>10} {:>13}",
        "kind", "ours", "torch", "lost", "share of loss"
    );
    let lost_total = burn_total - torch_total;
    for (kind, b, t) in kinds {
        println!(
            "{kind:<16} {b:>10.1} {t:>10.1} {:>10.1} {:>12.0}%",
            b - t,
            100.0 * (b - t) / lost_total
        );
    }
}
