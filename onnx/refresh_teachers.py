#!/usr/bin/env python3
"""Export the teacher networks to ONNX for multi-teacher-ad.

The three teachers of the method are torchvision's ImageNet classifiers resnet152, vgg19 and
densenet201 (IMAGENET1K_V1 weights, what the reference's `pretrained=True` loads). Each is
exported with the legacy TorchScript exporter (opset 17, dynamic batch axis) to
`onnx/<name>.onnx`: input `input` [N,3,224,224], output `output` [N,1000] (the logits). Every
export is checked against PyTorch with onnxruntime on a fixed seeded input, an onnxruntime
reference output is stored for the Rust parity tests, and `teachers.json` records the file, its
sha256, opset, shapes, weights source and versions. `build.rs` imports whatever exports exist the
next time `cargo build` runs.

    python onnx/refresh_teachers.py                    # real weights (downloads them)
    python onnx/refresh_teachers.py --weights-dir DIR  # real weights from .pth files on disk
    python onnx/refresh_teachers.py --random-weights   # same architectures, no download
    python onnx/refresh_teachers.py --tiny             # the small committed fixture teachers

Files are written to a temporary name and renamed, so an interrupted run never leaves a
half-written file.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import hashlib
import importlib
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
FULL = ("resnet152", "vgg19", "densenet201")
TINY = ("tiny_resnet", "tiny_vgg", "tiny_densenet")
OPSET = 17
# onnxruntime vs PyTorch on CPU in float32. An export bug gives errors of order 1; rounding gives
# about 1e-6 (see residual_branch_scale for why random weights need care to stay there).
MAX_RELATIVE_L2 = 1e-4
SEED = 0

# 2 is argparse's code for a usage error (also an unknown name in --only).
EXIT_USAGE = 2
EXIT_MISSING_PACKAGE = 3
EXIT_NO_WEIGHTS = 4
EXIT_WRITE_FAILED = 5
EXIT_CHECK_FAILED = 6


class Failure(Exception):
    """An error with a message for the user and an exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def require_packages():
    """Imports the packages the script needs, or explains how to install them."""
    modules = {}
    for name in ("torch", "torchvision", "onnx", "onnxruntime", "numpy"):
        try:
            modules[name] = importlib.import_module(name)
        except ImportError as e:
            raise Failure(
                f"missing Python package '{name}' ({e}).\n"
                f"Install the pinned versions with:\n"
                f"    pip install -r {os.path.relpath(HERE / 'requirements.txt')}",
                EXIT_MISSING_PACKAGE,
            )
    return modules


# ---------------------------------------------------------------------------------------------
# Networks


def tiny_networks(nn, torch):
    """The tiny teachers: one small network per family, [N,3,H,W] -> [N,1000] for H,W >= 32."""

    def stem():
        """torchvision's stem, scaled down: strided conv, BN, ReLU, max-pool."""
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )

    class Bottleneck(nn.Module):
        """torchvision's residual bottleneck: 1x1 -> 3x3 -> 1x1, with a projection shortcut."""

        def __init__(self, cin, mid, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(mid)
            self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(mid)
            self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + identity)

    class TinyResnet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = stem()
            self.layer1 = Bottleneck(8, 4, 16, 1)
            self.layer2 = Bottleneck(16, 8, 24, 2)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(24, 1000)

        def forward(self, x):
            x = self.layer2(self.layer1(self.stem(x)))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    class TinyVgg(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2, 2),
                nn.Conv2d(8, 16, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 16, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2, 2),
            )
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(
                nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 1000)
            )

        def forward(self, x):
            x = self.avgpool(self.features(x))
            return self.classifier(torch.flatten(x, 1))

    class DenseLayer(nn.Module):
        """torchvision's dense layer: BN-ReLU-1x1 conv-BN-ReLU-3x3 conv, concatenated on."""

        def __init__(self, cin, growth, bn_size):
            super().__init__()
            self.norm1 = nn.BatchNorm2d(cin)
            self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
            self.norm2 = nn.BatchNorm2d(bn_size * growth)
            self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)
            self.relu = nn.ReLU()

        def forward(self, x):
            out = self.conv1(self.relu(self.norm1(x)))
            out = self.conv2(self.relu(self.norm2(out)))
            return torch.cat([x, out], 1)

    class TinyDensenet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = stem()
            self.block1 = nn.Sequential(DenseLayer(8, 4, 2), DenseLayer(12, 4, 2))
            self.transition = nn.Sequential(
                nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1, bias=False), nn.AvgPool2d(2, 2)
            )
            self.block2 = nn.Sequential(DenseLayer(8, 4, 2), DenseLayer(12, 4, 2))
            self.norm5 = nn.BatchNorm2d(16)
            self.relu = nn.ReLU()
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(16, 1000)

        def forward(self, x):
            x = self.block2(self.transition(self.block1(self.stem(x))))
            x = self.avgpool(self.relu(self.norm5(x)))
            return self.classifier(torch.flatten(x, 1))

    return {"tiny_resnet": TinyResnet, "tiny_vgg": TinyVgg, "tiny_densenet": TinyDensenet}


def weights_enum(tv, name):
    return {
        "resnet152": tv.models.ResNet152_Weights.IMAGENET1K_V1,
        "vgg19": tv.models.VGG19_Weights.IMAGENET1K_V1,
        "densenet201": tv.models.DenseNet201_Weights.IMAGENET1K_V1,
    }[name]


def full_network(m, name, source, weights_dir):
    """A torchvision teacher with the weights `source` asks for, and a description of them."""
    torch, tv = m["torch"], m["torchvision"]
    build = getattr(tv.models, name)
    if source == "random":
        return build(weights=None), RANDOM_WEIGHTS
    weights = weights_enum(tv, name)
    file_name = os.path.basename(weights.url)
    if source == "dir":
        path = Path(weights_dir) / file_name
        if not path.is_file():
            raise Failure(
                f"{path}: not found. --weights-dir must hold torchvision's file {file_name} "
                f"(from {weights.url}).",
                EXIT_NO_WEIGHTS,
            )
        # torchvision's file names carry the start of their sha256, as torch.hub checks it.
        prefix = re.search(r"-([a-f0-9]+)\.", file_name).group(1)
        try:
            digest = sha256(path)
        except OSError as e:
            raise Failure(f"{path}: cannot read it: {e}", EXIT_NO_WEIGHTS)
        if not digest.startswith(prefix):
            raise Failure(
                f"{path}: sha256 {digest} does not start with {prefix} as torchvision's file "
                f"name promises: a corrupt or different file; download it again from "
                f"{weights.url}.",
                EXIT_NO_WEIGHTS,
            )
        model = build(weights=None)
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
            if name.startswith("densenet"):  # as torchvision's own loader does
                state_dict = remap_densenet_keys(state_dict)
            model.load_state_dict(state_dict)
        except Exception as e:  # a corrupt or foreign file
            text = str(e) if len(str(e)) <= 600 else str(e)[:600] + " ..."
            raise Failure(f"{path}: cannot load it as {name} weights: {text}", EXIT_NO_WEIGHTS)
        return model, f"IMAGENET1K_V1 from weights-dir: {path}"
    try:
        model = build(weights=weights)
    except Exception as e:  # URLError, socket errors, HTTP errors: no network
        raise Failure(
            f"cannot download the ImageNet weights of {name} from {weights.url}: {e}\n"
            f"Without internet, put torchvision's {file_name} in a folder and use "
            f"--weights-dir DIR, or export random weights for testing with --random-weights.",
            EXIT_NO_WEIGHTS,
        )
    return model, "IMAGENET1K_V1 (download)"


def remap_densenet_keys(state_dict):
    """torchvision's densenet checkpoints use 'norm.1'-style keys; the model uses 'norm1'."""
    pattern = re.compile(
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
    )
    out = {}
    for key, value in state_dict.items():
        match = pattern.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


RANDOM_WEIGHTS = (
    f"random (seed {SEED}; BatchNorm affine and zero biases randomised, residual branches "
    f"scaled, BatchNorm statistics recalibrated)"
)


def randomise_for_parity(torch, model, seed):
    """Makes random weights a demanding but well-conditioned parity test.

    - PyTorch initialises BatchNorm to scale 1 and shift 0, and torchvision vgg's biases to 0:
      an importer that dropped them would still match. They get seeded random values.
    - With random weights resnet152 is chaotic: its 36 bottlenecks in layer3 amplify a relative
      input change of 1e-6 about 1000-fold (measured), so float32 rounding alone puts onnxruntime
      and PyTorch 4e-4 apart (each as far from a float64 run). Scaling the last BatchNorm of each
      residual branch by `residual_branch_scale` (the idea of zero-gamma init) brings the
      amplification near 10 and the rounding differences near 1e-6, like real ImageNet weights.
    """
    nn = torch.nn
    generator = torch.Generator().manual_seed(seed)
    residual_branch_scale = 0.2
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                if not module.bias.any():
                    module.bias.copy_(0.01 * torch.randn(module.bias.shape, generator=generator))
        for module in model.modules():
            # torchvision's Bottleneck and the tiny one: bn3 closes the residual branch.
            if type(module).__name__ == "Bottleneck":
                module.bn3.weight.mul_(residual_branch_scale)


def recalibrate_batchnorm(torch, model, size, batches, batch_size, seed):
    """Running statistics from seeded inputs, so that random weights give outputs of sane scale."""
    bns = [mod for mod in model.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1)
    model.eval()


# ---------------------------------------------------------------------------------------------
# Export, check, references


def atomic_write(path: Path, write):
    """Calls write(tmp_path), fsyncs, then renames onto `path`; never leaves a partial file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise Failure(f"{path}: cannot write it: {e}", EXIT_WRITE_FAILED)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        hint = " (the disk is full)" if e.errno == errno.ENOSPC else ""
        raise Failure(f"{path}: cannot write it{hint}: {e}", EXIT_WRITE_FAILED)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_and_check(m, name, model, path: Path, dynamic_hw: bool, size: int, shapes):
    """Exports `model` to `path`, checked against PyTorch before it replaces an older export.

    Returns one (input, onnxruntime output, figures) per input shape. A failed check raises and
    leaves any previous export in place.
    """
    torch, onnx = m["torch"], m["onnx"]
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
    dummy = torch.zeros(1, 3, size, size)
    cases = []

    def write(tmp: Path):
        with torch.no_grad(), warnings.catch_warnings():
            # The legacy exporter is chosen on purpose (burn-onnx imports its graphs).
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
            torch.onnx.export(
                model,
                dummy,
                str(tmp),
                dynamo=False,
                opset_version=OPSET,
                do_constant_folding=True,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": axes, "output": {0: "batch"}},
            )
        onnx_model = onnx.load(str(tmp), load_external_data=False)
        onnx.checker.check_model(onnx_model)
        # The weights must be inside the file: build.rs imports the .onnx alone.
        external = [
            t.name for t in onnx_model.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL
        ]
        if external:
            raise Failure(
                f"{path}: {len(external)} weights were written as external data", EXIT_CHECK_FAILED
            )
        del onnx_model
        for i, shape in enumerate(shapes):
            cases.append(check(m, model, tmp, shape, seed=100 + i))
            f = cases[-1][2]
            print(
                f"{name}: input {f['input_shape']}: onnxruntime vs PyTorch max abs "
                f"{f['max_abs']:.2e}, relative L2 {f['relative_l2']:.2e}, argmax identical "
                f"{f['argmax_agree']}, output std {f['output_std']:.3f}",
                flush=True,
            )
            if not (f["relative_l2"] <= MAX_RELATIVE_L2 and f["argmax_agree"]):
                raise Failure(
                    f"{name}: the export differs from PyTorch (relative L2 {f['relative_l2']:.2e}, "
                    f"limit {MAX_RELATIVE_L2:.0e}, argmax identical {f['argmax_agree']}); "
                    f"{path} was not replaced",
                    EXIT_CHECK_FAILED,
                )

    atomic_write(path, write)
    return cases


def check(m, model, path: Path, shape, seed):
    """PyTorch vs onnxruntime on a seeded input: returns (input, ort output, figures)."""
    torch, np, ort = m["torch"], m["numpy"], m["onnxruntime"]
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=generator) * 2 - 1
    with torch.no_grad():
        expected = model(x).numpy().astype(np.float64)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["output"], {"input": x.numpy()})[0]
    diff = got.astype(np.float64) - expected
    figures = {
        "input_shape": list(shape),
        "max_abs": float(np.abs(diff).max()),
        "relative_l2": float(np.linalg.norm(diff) / np.linalg.norm(expected)),
        "argmax_agree": bool((got.argmax(1) == expected.argmax(1)).all()),
        "output_std": float(got.std()),
    }
    return x.numpy(), got, figures


def write_references(m, ref_dir: Path, json_path: Path, name, cases):
    """Stores input/output pairs as raw little-endian float32 and lists them in reference.json."""
    np = m["numpy"]
    entries = []
    for x, y, figures in cases:
        stem = f"{name}_{'x'.join(str(d) for d in x.shape)}"
        for suffix, array in (("input", x), ("output", y)):
            data = np.ascontiguousarray(array, dtype="<f4").tobytes()
            atomic_write(ref_dir / f"{stem}.{suffix}.bin", lambda p, d=data: p.write_bytes(d))
        entries.append(
            {
                "teacher": name,
                "input_file": f"{ref_dir.name}/{stem}.input.bin",
                "input_shape": list(x.shape),
                "output_file": f"{ref_dir.name}/{stem}.output.bin",
                "output_shape": list(y.shape),
                "onnxruntime_vs_pytorch_relative_l2": figures["relative_l2"],
            }
        )
    merged = load_json(json_path).get("cases", [])
    merged = [c for c in merged if c.get("teacher") != name] + entries
    merged.sort(key=lambda c: (c["teacher"], c["input_shape"]))
    text = json.dumps({"cases": merged}, indent=2) + "\n"
    atomic_write(json_path, lambda p: p.write_text(text))


def load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as e:
        raise Failure(f"{path}: cannot read it: {e}", EXIT_WRITE_FAILED)
    except json.JSONDecodeError as e:
        raise Failure(f"{path}: not valid JSON ({e}); delete it or fix it", EXIT_WRITE_FAILED)


def refresh(args, m, names) -> int:
    torch = m["torch"]
    tiny = args.tiny
    out_dir = Path(args.out_dir) if args.out_dir else (HERE / "tiny" if tiny else HERE)
    source = "random" if args.random_weights or tiny else ("dir" if args.weights_dir else "download")
    size = 32 if tiny else 224
    shapes = [(2, 3, 32, 32), (1, 3, 48, 40)] if tiny else [(2, 3, 224, 224)]

    json_path = out_dir / "teachers.json"
    record = load_json(json_path)
    record.setdefault("teachers", {})
    for name in names:
        torch.manual_seed(SEED)
        if tiny:
            model = tiny_networks(torch.nn, torch)[name]()
            weights = RANDOM_WEIGHTS
        else:
            model, weights = full_network(m, name, source, args.weights_dir)
        if source == "random":
            randomise_for_parity(torch, model, seed=SEED)
            recalibrate_batchnorm(torch, model, size, batches=4, batch_size=8 if tiny else 4, seed=1)
        model.eval()
        path = out_dir / f"{name}.onnx"
        print(f"{name}: exporting to {path} ...", flush=True)
        cases = export_and_check(m, name, model, path, dynamic_hw=tiny, size=size, shapes=shapes)
        write_references(m, out_dir / "reference", out_dir / "reference.json", name, cases)
        record["teachers"][name] = {
            "file": path.name,
            "sha256": sha256(path),
            "bytes": path.stat().st_size,
            "opset": OPSET,
            "input": {"name": "input", "shape": ["batch", 3, "height" if tiny else 224, "width" if tiny else 224]},
            "output": {"name": "output", "shape": ["batch", 1000]},
            "weights": weights,
            "torch": torch.__version__,
            "torchvision": m["torchvision"].__version__,
            "onnx": m["onnx"].__version__,
            "onnxruntime": m["onnxruntime"].__version__,
            "exported": datetime.date.today().isoformat() if not tiny else "fixture",
            "check": cases[0][2],
        }
        text = json.dumps(record, indent=2, sort_keys=True) + "\n"
        atomic_write(json_path, lambda p: p.write_text(text))
    print(f"wrote {json_path}. Rebuild so that build.rs imports the exports: cargo build --release")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Every export is checked against PyTorch with onnxruntime (relative L2 at most "
        f"{MAX_RELATIVE_L2:.0e}) before it replaces an older file; teachers.json keeps the entries "
        "of teachers not exported in this run. Exit codes: 0 done, 2 usage, 3 missing Python "
        "package, 4 weights unavailable (no network, missing or corrupt .pth), 5 cannot write "
        "(disk full, read-only), 6 export check failed.",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--weights-dir",
        metavar="DIR",
        help="read torchvision's ImageNet .pth files (resnet152-394f9c45.pth, vgg19-dcbb9e9d.pth, "
        "densenet201-c1103571.pth) from DIR instead of downloading them (offline machines)",
    )
    group.add_argument(
        "--random-weights",
        action="store_true",
        help="export the same architectures with seeded random weights (random BatchNorm "
        "scale/shift, scaled residual branches, BatchNorm statistics recalibrated on seeded "
        "inputs): no download (tests, offline parity checks)",
    )
    group.add_argument(
        "--tiny",
        action="store_true",
        help="write the small fixture teachers (tiny_resnet, tiny_vgg, tiny_densenet; random "
        "weights, committed in onnx/tiny/) and their onnxruntime reference outputs instead of "
        "the full-size teachers",
    )
    parser.add_argument(
        "--only",
        metavar="NAMES",
        help=f"comma-separated subset: of {','.join(FULL)} (default all), or with --tiny of "
        f"{','.join(TINY)}",
    )
    parser.add_argument(
        "--out-dir", metavar="DIR", help="where to write (default: onnx/, or onnx/tiny/ with --tiny)"
    )
    args = parser.parse_args(argv)
    names = TINY if args.tiny else FULL
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown or not wanted:
            parser.error(f"--only: unknown teacher(s) {unknown}; choose from {','.join(names)}")
        names = tuple(n for n in names if n in wanted)
    try:
        return refresh(args, require_packages(), names)
    except Failure as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
