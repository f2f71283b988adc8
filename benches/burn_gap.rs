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

use std::process::Command;
use std::time::Instant;

use burn::nn::conv::Conv2dConfig;
use burn::nn::pool::{AvgPool2dConfig, MaxPool2dConfig};
use burn::nn::{BatchNormConfig, LinearConfig, PaddingConfig2d};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::{leaky_relu, relu};
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use mtad_kernels::adam::Adam;
use mtad_kernels::conv3x3::conv2d;
use mtad_kernels::pool::{avg_pool2d, max_pool2d};
use multi_teacher_ad::decoder::upsample2x;
use multi_teacher_ad::students::{Activation, batch_norm, batch_norm_act};
use serde_json::json;

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

/// One layer of the training step, as both sides build it (serialised for the Python side as
/// `{"op": "conv", "cin": ..}`).
#[derive(Clone, Copy, serde::Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Op {
    /// Convolution without bias (the students') or with (the decoder's), padding k/2.
    Conv {
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        bias: bool,
    },
    /// Training-mode batch norm, then ReLU (students) or leaky ReLU 0.2 (decoder).
    BnAct {
        c: usize,
        leaky: bool,
    },
    /// resnet18's 3x3 stride-2 max pooling.
    MaxPool {
        c: usize,
    },
    /// The decoder's bilinear x2 upsampling (align_corners).
    Upsample {
        c: usize,
    },
    Linear {
        inputs: usize,
        outputs: usize,
    },
    /// densenet121's transitions: 2x2 stride-2 average pooling.
    AvgPool {
        c: usize,
    },
    /// A dense layer's concatenation of its input (`c` channels) with its 32 new ones.
    Cat {
        c: usize,
    },
}

/// The distinct layers of one resnet18 training step (student + decoder, batch 8, 224x224) as
/// (op, input side, how many times a step runs it). The decoder runs once per step, on the
/// teachers' embedding; its `conv1` twice. The students' residual additions, global pooling and
/// losses are left out (elementwise, small).
fn step_layers() -> Vec<(Op, usize, usize)> {
    let conv = |cin, cout, k, stride, bias| Op::Conv {
        cin,
        cout,
        k,
        stride,
        bias,
    };
    let bn = |c| Op::BnAct { c, leaky: false };
    let mut layers = vec![
        (conv(3, 64, 7, 2, false), 224, 1),
        (bn(64), 112, 1),
        (Op::MaxPool { c: 64 }, 112, 1),
        (conv(64, 64, 3, 1, false), 56, 4),
        (bn(64), 56, 4),
    ];
    for (cin, cout, side) in [(64, 128, 56), (128, 256, 28), (256, 512, 14)] {
        let out = side / 2;
        layers.extend([
            (conv(cin, cout, 3, 2, false), side, 1),
            (conv(cin, cout, 1, 2, false), side, 1),
            (conv(cout, cout, 3, 1, false), out, 3),
            // Two per block, one after the downsampling convolution.
            (bn(cout), out, 5),
        ]);
    }
    layers.push((
        Op::Linear {
            inputs: 512,
            outputs: 1000,
        },
        1,
        1,
    ));
    layers.extend(decoder_layers());
    layers
}

/// The decoder's layers (the same behind every student): its first linear layer, then its
/// upsampling blocks.
fn decoder_layers() -> Vec<(Op, usize, usize)> {
    let conv = |cin, cout, k, stride, bias| Op::Conv {
        cin,
        cout,
        k,
        stride,
        bias,
    };
    let mut layers = vec![(
        Op::Linear {
            inputs: 1000,
            outputs: 6272,
        },
        1,
        1,
    )];
    let leaky = |c| Op::BnAct { c, leaky: true };
    for (cin, cout, side) in [
        (128, 64, 7),
        (64, 32, 14),
        (32, 16, 28),
        (16, 8, 56),
        (8, 3, 112),
    ] {
        let up = side * 2;
        layers.extend([
            (Op::Upsample { c: cin }, side, 1),
            // up_conv, then conv1 twice.
            (conv(cin, cin, 3, 1, true), up, 3),
            (leaky(cin), up, 2),
            (conv(cin, cout, 3, 1, true), up, 1),
            (leaky(cout), up, 1),
        ]);
    }
    layers
}

/// The distinct layers of one densenet121 training step (student + decoder, batch 8, 224x224),
/// as [`step_layers`]: per dense layer a batch norm + ReLU over all previous features, the 1x1
/// bottleneck to 128 channels, a batch norm + ReLU, the 3x3 convolution to 32 and the
/// concatenation; per transition a batch norm + ReLU, a 1x1 convolution halving the channels and
/// 2x2 average pooling. Its global pooling and the losses are left out.
fn densenet121_layers() -> Vec<(Op, usize, usize)> {
    let conv = |cin, cout, k, bias| Op::Conv {
        cin,
        cout,
        k,
        stride: 1,
        bias,
    };
    let bn = |c| Op::BnAct { c, leaky: false };
    let mut layers: Vec<(Op, usize, usize)> = Vec::new();
    let mut add = |op: Op, side: usize| {
        let name = case_name(op, side);
        match layers
            .iter_mut()
            .find(|(o, s, _)| case_name(*o, *s) == name)
        {
            Some(entry) => entry.2 += 1,
            None => layers.push((op, side, 1)),
        }
    };
    add(
        Op::Conv {
            cin: 3,
            cout: 64,
            k: 7,
            stride: 2,
            bias: false,
        },
        224,
    );
    add(bn(64), 112);
    add(Op::MaxPool { c: 64 }, 112);
    let (mut c, mut side) = (64, 56);
    for (i, block) in [6, 12, 24, 16].into_iter().enumerate() {
        for layer in 0..block {
            let cin = c + 32 * layer;
            add(bn(cin), side);
            add(conv(cin, 128, 1, false), side);
            add(bn(128), side);
            add(conv(128, 32, 3, false), side);
            add(Op::Cat { c: cin }, side);
        }
        c += 32 * block;
        if i < 3 {
            add(bn(c), side);
            add(conv(c, c / 2, 1, false), side);
            add(Op::AvgPool { c: c / 2 }, side);
            c /= 2;
            side /= 2;
        }
    }
    add(bn(c), side);
    add(
        Op::Linear {
            inputs: c,
            outputs: 1000,
        },
        1,
    );
    layers.extend(decoder_layers());
    layers
}

fn case_name(op: Op, side: usize) -> String {
    match op {
        Op::Conv {
            cin,
            cout,
            k,
            stride,
            ..
        } => format!("conv{k}x{k}s{stride}/{cin}-{cout}ch-{side}px"),
        Op::BnAct { c, leaky } => {
            let act = if leaky { "leakyrelu" } else { "relu" };
            format!("bn+{act}/{c}ch-{side}px")
        }
        Op::MaxPool { c } => format!("maxpool3x3s2/{c}ch-{side}px"),
        Op::Upsample { c } => format!("upsample2x/{c}ch-{side}px"),
        Op::Linear { inputs, outputs } => format!("linear/{inputs}-{outputs}"),
        Op::AvgPool { c } => format!("avgpool2x2s2/{c}ch-{side}px"),
        Op::Cat { c } => format!("cat/{c}+32ch-{side}px"),
    }
}

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
fn layers() {
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
