"""Networks, losses and scores of the method in PyTorch, shared by bench.py and end_to_end.py.

The decoder (`Upsample`, `Decoder`) and the teacher weighting (`Weight`) are copied verbatim
from tests/fixtures/networks/make_fixtures.py, which writes out the reference's finTS.py
(`upsample`, `Student_de_class`, `Weight_Class`) with the output size made configurable the way
src/decoder.rs does it: the linear layer maps 1000 -> 128 * (S/32)^2 and the five x2 up-blocks
start from a [128, S/32, S/32] grid (S = 224 gives the reference's Linear(1000 -> 6272) and
[128, 7, 7]).

Every network is randomly initialised (`weights=None`): the benchmarks measure speed only.
"""

import numpy as np
import torch
import torchvision
from torch import nn

# torchvision's parameter counts (1000 classes), the same as src/students/mod.rs checks.
STUDENT_PARAMS = {"resnet18": 11_689_512, "vgg11": 132_863_336, "densenet121": 7_978_856}
STUDENTS = tuple(STUDENT_PARAMS)
TEACHERS = ("resnet152", "vgg19", "densenet201")


# ---- The reference's decoder and weighting (finTS.py), output size configurable ----
# The definitions our Rust decoder and weighting are tested against (their PyTorch fixtures):
# tests/fixtures/networks/make_fixtures.py, loaded from there rather than copied.


def _load_fixture_networks():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests",
                        "fixtures", "networks", "make_fixtures.py")
    spec = importlib.util.spec_from_file_location("make_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_fixtures = _load_fixture_networks()
Upsample = _fixtures.Upsample
Weight = _fixtures.Weight


class Decoder(_fixtures.Decoder):
    """The fixture decoder, refusing an output size that is not a positive multiple of 32."""

    def __init__(self, output_size=224, embedding_dim=1000):
        if output_size <= 0 or output_size % 32 != 0:
            raise ValueError(f"decoder output size {output_size} is not a positive multiple of 32")
        super().__init__(output_size, embedding_dim)


# ---- Builders ----


def num_params(module: nn.Module) -> int:
    """Learnable parameters, as torch counts them (batch-norm running statistics excluded)."""
    return sum(p.numel() for p in module.parameters())


def decoder_params(image_size: int) -> int:
    """Closed form of the decoder's parameter count, for the report (equals num_params)."""
    g = image_size // 32
    total = 1000 * 128 * g * g + 128 * g * g  # linear1
    for c_in, c_out in [(128, 64), (64, 32), (32, 16), (16, 8), (8, 3)]:
        total += 2 * (9 * c_in * c_in + c_in) + 2 * (2 * c_in)  # up conv + conv1, their BNs
        total += 9 * c_in * c_out + c_out + 2 * c_out  # conv2 + bn2
    return total


def build_student(name: str) -> nn.Module:
    """A torchvision student with default (random) initialisation; checks its parameter count."""
    if name not in STUDENT_PARAMS:
        raise ValueError(f"unknown student {name!r}; one of {', '.join(STUDENTS)}")
    model = getattr(torchvision.models, name)(weights=None)
    count = num_params(model)
    if count != STUDENT_PARAMS[name]:
        raise AssertionError(f"{name}: {count} parameters, expected {STUDENT_PARAMS[name]}")
    return model


TINY_TEACHERS = ("tiny_resnet", "tiny_vgg", "tiny_densenet")


def build_teacher(name: str) -> nn.Module:
    """A torchvision teacher, random weights (no internet here), in eval mode like the reference's.
    `tiny_*`: the tiny fixture teachers of onnx/refresh_teachers.py (the ones our tests and CPU
    demo use, same architectures as their committed ONNX exports; random weights)."""
    if name in TINY_TEACHERS:
        import importlib.util
        import os
        path = os.path.join(os.path.dirname(__file__), "..", "..", "onnx", "refresh_teachers.py")
        spec = importlib.util.spec_from_file_location("refresh_teachers", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.tiny_networks(nn, torch)[name]().eval()
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; one of {', '.join(TEACHERS)}")
    return getattr(torchvision.models, name)(weights=None).eval()


# ---- Losses and scores (as src/students/mod.rs and finTS.py) ----

MSE = nn.MSELoss()  # mean over every element
COS = nn.CosineSimilarity(dim=1, eps=1e-8)  # finTS.py's nn.CosineSimilarity() defaults


def distillation_loss(z_s, z_t_detached):
    """MSE(z_S, z_T) + mean(1 - cos(z_S, z_T)); pass z_T detached."""
    return MSE(z_s, z_t_detached) + torch.mean(1 - COS(z_s, z_t_detached))


def raw_scores(z_s, x_s, z_t, x):
    """AS_z, AS_cossim, AS_rec of every input, [N] each."""
    as_z = torch.mean((z_s - z_t) ** 2, dim=1)
    as_cossim = 1 - COS(z_s, z_t)
    as_rec = torch.mean((x_s - x) ** 2, dim=[1, 2, 3])
    return as_z, as_cossim, as_rec


def score_columns(as_z, as_cossim, as_rec):
    """The reference's 69 columns: the 3 raw scores, then the 66 mixes r1*AS_z + r2*AS_cossim +
    r3*AS_rec, with r1, r2 and r3 computed exactly as finTS.py does (float32 torch.linspace and
    int((1 - r1) / 0.1 + 1) steps, which gives 11 + 10 + ... + 1 = 66 mixes)."""
    columns = [as_z, as_cossim, as_rec]
    for r1 in torch.linspace(0, 1, 11):
        for r2 in torch.linspace(0, (1 - r1), int((1 - r1) / 0.1 + 1)):
            r3 = 1 - r1 - r2
            columns.append(r1 * as_z + r2 * as_cossim + r3 * as_rec)
    return columns


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC, equal to sklearn's roc_auc_score: the probability that an anomalous input
    (label 1) scores higher than a normal one, ties counted 1/2 (Mann-Whitney U, average ranks)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC is undefined when only one class is present in the labels")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # 1-based ranks, averaged over each run of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.size]  # exclusive
    avg_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = np.repeat(avg_rank, ends - starts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def device_sync(device: torch.device):
    """Waits for queued GPU work, so that wall-clock timings are complete (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
