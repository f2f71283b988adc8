"""PyTorch side of benches/burn_gap.rs: the single operations where Burn's CPU backend loses
time against PyTorch, timed the same way (warm-up, then timed iterations, wall clock).

One JSON line per case with --json: {"case", "ms"} (milliseconds per iteration).
With --layers JSON (written by burn_gap.rs --layers), the listed layers' forward+backward
instead."""

import argparse
import json
import time

import torch
import torch.nn as nn


def timed(step, warmup, iters):
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) * 1e3 / iters


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=5, help="timed iterations (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up iterations (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(N) (default: torch's own default)")
    parser.add_argument("--json", action="store_true", help="one JSON line per case")
    parser.add_argument("--layers", default=None,
                        help="JSON list of layers to time forward+backward (from burn_gap.rs)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = layer_cases(json.loads(args.layers), args) if args.layers else op_cases(args)
    for case, ms in results:
        if args.json:
            print(json.dumps({"case": case, "ms": ms}))
        else:
            print(f"{case:<50} {ms:10.2f} ms")


class Cat(nn.Module):
    """A dense layer's concatenation of its input with 32 new channels (a parameter here, so
    that zero_grad clears its gradient)."""

    def __init__(self, n, side):
        super().__init__()
        self.new = nn.Parameter(torch.randn(n, 32, side, side))

    def forward(self, x):
        return torch.cat([x, self.new], 1)


def layer_cases(layers, args):
    """Forward+backward (input gradient included) of each layer, as burn_gap.rs builds it."""
    results = []
    for spec in layers:
        n, side, op = spec["batch"], spec["side"], spec["op"]
        if op == "conv":
            k = spec["k"]
            module = nn.Conv2d(spec["cin"], spec["cout"], k, stride=spec["stride"],
                               padding=k // 2, bias=spec["bias"])
            shape = (n, spec["cin"], side, side)
        elif op == "bn_act":
            act = nn.LeakyReLU(0.2) if spec["leaky"] else nn.ReLU()
            module = nn.Sequential(nn.BatchNorm2d(spec["c"]).train(), act)
            shape = (n, spec["c"], side, side)
        elif op == "max_pool":
            module = nn.MaxPool2d(3, stride=2, padding=1)
            shape = (n, spec["c"], side, side)
        elif op == "upsample":
            module = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            shape = (n, spec["c"], side, side)
        elif op == "avg_pool":
            module = nn.AvgPool2d(2, stride=2)
            shape = (n, spec["c"], side, side)
        elif op == "cat":
            module = Cat(n, side)
            shape = (n, spec["c"], side, side)
        elif op == "linear":
            module = nn.Linear(spec["inputs"], spec["outputs"])
            shape = (n, spec["inputs"])
        else:
            raise SystemExit(f"unknown layer op {op!r}")
        x = torch.randn(*shape, requires_grad=True)

        def step():
            module.zero_grad(set_to_none=True)
            x.grad = None
            module(x).sum().backward()
        results.append((spec["case"], timed(step, args.warmup, args.iters)))
    return results


def op_cases(args):
    """The single operations of the default run."""
    results = []

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    results.append(("matmul/1024", timed(lambda: a @ b, args.warmup, args.iters)))

    # (name, batch, channels in, channels out, side): a resnet18 layer-1 convolution and the
    # decoder's last block (few channels at full resolution).
    for name, n, cin, cout, side in [("conv3x3/64ch-56px", 8, 64, 64, 56),
                                     ("conv3x3/8ch-224px", 8, 8, 8, 224)]:
        conv = nn.Conv2d(cin, cout, 3, padding=1)
        x = torch.randn(n, cin, side, side)
        with torch.no_grad():
            results.append((f"{name}/forward", timed(lambda: conv(x), args.warmup, args.iters)))
        xg = x.clone().requires_grad_(True)

        def step():
            conv.zero_grad(set_to_none=True)
            xg.grad = None
            conv(xg).sum().backward()
        results.append((f"{name}/forward+backward", timed(step, args.warmup, args.iters)))

    bn = nn.BatchNorm2d(8).train()
    x = torch.randn(8, 8, 224, 224, requires_grad=True)

    def bn_step():
        x.grad = None
        nn.functional.leaky_relu(bn(x), 0.2).sum().backward()
    results.append(("batchnorm+leakyrelu/8ch-224px/forward+backward",
                    timed(bn_step, args.warmup, args.iters)))

    def relu_step():
        x.grad = None
        nn.functional.leaky_relu(x, 0.2).sum().backward()
    results.append(("leakyrelu/8ch-224px/forward+backward", timed(relu_step, args.warmup, args.iters)))

    def sum_only():
        x.grad = None
        x.sum().backward()
    results.append(("sum/8ch-224px/forward+backward", timed(sum_only, args.warmup, args.iters)))

    linear = nn.Linear(3500, 3500, bias=False)
    adam = torch.optim.Adam(linear.parameters(), lr=1e-3)
    row = torch.randn(1, 3500)

    def adam_step():
        linear(row).sum().backward()
        adam.step()
        adam.zero_grad(set_to_none=True)
    results.append(("adam/12.25M-params/forward+backward+step",
                    timed(adam_step, args.warmup, args.iters)))
    return results


if __name__ == "__main__":
    main()
