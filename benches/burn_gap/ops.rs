//! The layers of one training step (resnet18's or densenet121's, with the decoder) that
//! `--layers` times, and their case names.

/// One layer of the training step, as both sides build it (serialised for the Python side as
/// `{"op": "conv", "cin": ..}`).
#[derive(Clone, Copy, serde::Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Op {
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
pub(crate) fn step_layers() -> Vec<(Op, usize, usize)> {
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
pub(crate) fn densenet121_layers() -> Vec<(Op, usize, usize)> {
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

pub(crate) fn case_name(op: Op, side: usize) -> String {
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
