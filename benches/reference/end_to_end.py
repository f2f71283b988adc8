"""One CIFAR-10 normal class trained and evaluated the reference's way (maye127/multi-teacher-AD,
finTS.py + MY_Data.py), in PyTorch, to compare wall time with a whole run of ours.

What the reference does, and so what this script does (random weights everywhere: no internet):
  * Data (MY_Data.CIFAR10.get): a torchvision-CIFAR10-like dataset whose __getitem__ turns the
    uint8 HWC image into a PIL image and applies ToTensor -> Normalize(0.5, 0.5) -> Resize (bilinear)
    -> CenterCrop, on every access, every epoch (DataLoader, num_workers=0; training shuffled,
    test in order). The reference resizes to 256 and crops 224; at a reduced size S this script
    resizes to round(S * 256 / 224) and crops S, as our run does (src/training/run.rs).
  * Statistics, once per class before training (finTS.py computes them unless meanstd<k>.data
    exists; a first run has no such file): every training image through the three teachers,
    per-dimension mean and unbiased std of the 1000 logits, a std of 0 becomes 1e-3.
  * Training, every batch of every epoch: the three teachers forwarded again on the batch
    (no cache), then the reference's two updates with its three Adam optimisers (weighting +
    decoder on MSE(x, x_T), then the student on the distillation loss against the *updated*
    weighting's z_T), then the two losses recomputed and read back with .item() for its
    progress line.
  * Evaluation every --eval-every epochs and at the last one: the whole test set through the
    student, the decoder, the three teachers again (not cached across evaluations) and the
    decoder on z_T (computed and unused, as the reference does); AS_z, AS_cossim, AS_rec; the
    69 columns; ROC AUC of each; the best (max) AUC is kept over evaluations.
Not reproduced: the reference's CSV writes, torch.save of the best scores, model saving
(off by default there), and its loop over all ten classes (this is one class).

Data is synthetic CIFAR-shaped uint8 images from --seed unless --cifar points at a
cifar-10-batches-py folder.

    python benches/reference/end_to_end.py --help
"""

import argparse
import json
import os
import pickle
import sys
import time

sys.dont_write_bytecode = True  # keep benches/reference free of __pycache__

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402

import reference_nets as nets  # noqa: E402

CLASSES = 10


# ---- Data ----


class CifarLike(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: PIL image from the HWC uint8 array, then
    the transform (so the reference's per-image preprocessing cost is paid on every access)."""

    def __init__(self, data: np.ndarray, targets, transform):
        self.data = data  # [N, 32, 32, 3] uint8
        self.targets = list(targets)
        self.transform = transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        img = Image.fromarray(self.data[index])
        return self.transform(img), self.targets[index]


def reference_transform(image_size: int):
    """MY_Data.CIFAR10's transform, with 256/224 scaled to the image size: the same order as the
    reference (Normalize *before* Resize: the tensor is resized, bilinear)."""
    resize = round(image_size * 256 / 224)
    return transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        transforms.Resize(size=(resize, resize)),
        transforms.CenterCrop(size=(image_size, image_size)),
    ])


def synthetic_cifar(n_train: int, n_test: int, normal: int, seed: int):
    """CIFAR-shaped uint8 images from a seed: noise plus a per-class colour tint (so the AUC is
    not pure chance). Training: n_train images of the normal class (what the reference keeps of
    the training set). Test: n_test images, classes 0..9 in equal turns, shuffled."""
    rng = np.random.default_rng(seed)
    tints = rng.integers(-40, 41, size=(CLASSES, 1, 1, 3))

    def images(labels):
        noise = rng.integers(0, 256, size=(len(labels), 32, 32, 3))
        return np.clip(noise + tints[labels], 0, 255).astype(np.uint8)

    train_labels = np.full(n_train, normal)
    test_labels = rng.permutation(np.arange(n_test) % CLASSES)
    return images(train_labels), train_labels, images(test_labels), test_labels


def read_cifar_batch(path: str):
    """A cifar-10-batches-py pickle, read as torchvision reads it: data [N, 32, 32, 3] uint8."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = entry["labels"] if "labels" in entry else entry["fine_labels"]
    return data, np.asarray(labels)


def read_cifar_binary(path: str):
    """A cifar-10-batches-bin file: records of 1 label byte + 3072 planar RGB bytes."""
    records = np.fromfile(path, dtype=np.uint8).reshape(-1, 3073)
    data = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(data), records[:, 0].astype(np.int64)


def real_cifar(root: str, n_train: int, n_test: int, normal: int):
    """The reference's one-class split of real CIFAR-10: the training images of the normal class
    (file order, first n_train) and the first n_test test images. `root` holds either layout
    (cifar-10-batches-py pickles or cifar-10-batches-bin records)."""
    if os.path.exists(os.path.join(root, "data_batch_1.bin")):
        read, suffix = read_cifar_binary, ".bin"
    else:
        read, suffix = read_cifar_batch, ""
    train = [read(os.path.join(root, f"data_batch_{i}{suffix}")) for i in range(1, 6)]
    train_data = np.concatenate([d for d, _ in train])
    train_labels = np.concatenate([l for _, l in train])
    keep = np.flatnonzero(train_labels == normal)[:n_train]
    test_data, test_labels = read(os.path.join(root, f"test_batch{suffix}"))
    return train_data[keep], train_labels[keep], test_data[:n_test], test_labels[:n_test]


# ---- The reference's run for one class ----


def teachers_z(teachers, stats, image):
    """z_i = (T_i(x) - mean_i) / std_i for the three teachers, without gradient (finTS.py)."""
    with torch.no_grad():
        return [(t(image) - mean) / std for t, (mean, std) in zip(teachers, stats)]


def run(args, train_data, train_labels, test_data, test_labels, device):
    counters = {"teacher_inputs": 0}
    times = {}
    transform = reference_transform(args.image_size)
    generator = torch.Generator().manual_seed(args.seed)
    data_loader = torch.utils.data.DataLoader(
        CifarLike(train_data, train_labels, transform), batch_size=args.batch_size, shuffle=True,
        generator=generator)
    data_loader_test = torch.utils.data.DataLoader(
        CifarLike(test_data, test_labels, transform), batch_size=args.batch_size, shuffle=False)
    label_test = np.zeros(len(test_labels))
    label_test[np.asarray(test_labels) != args.normal_class] = 1  # as MY_Data: anomalous = 1

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    names = nets.TINY_TEACHERS if args.tiny_teachers else nets.TEACHERS
    teachers = [nets.build_teacher(name).to(device) for name in names]
    net_sen = nets.build_student(args.student).to(device)
    net_sde = nets.Decoder(args.image_size).to(device)
    net_weight = nets.Weight(len(teachers)).to(device)
    # The reference's three optimisers, torch defaults (lr 1e-3).
    opt_sen = torch.optim.Adam(net_sen.parameters())
    opt_sde = torch.optim.Adam(net_sde.parameters())
    opt_weight = torch.optim.Adam(net_weight.parameters())
    mse, cos_sim = nets.MSE, nets.COS
    times["build"] = time.perf_counter() - started

    # Mean and std of each teacher's outputs on the normal training images (the "except" branch
    # of finTS.py: no meanstd<k>.data yet).
    t = time.perf_counter()
    outputs = [[] for _ in teachers]
    for image, _ in data_loader:
        image = image.to(device)
        with torch.no_grad():
            for out, teacher in zip(outputs, teachers):
                out.append(teacher(image))
        counters["teacher_inputs"] += image.shape[0]
    stats = []
    for out in outputs:
        y = torch.cat(out)
        mean = torch.mean(y, dim=0)
        std = torch.std(y, dim=0)  # unbiased
        std[std == 0] = 1e-3
        stats.append((mean, std))
    del outputs
    times["statistics"] = time.perf_counter() - t

    times["train"] = 0.0
    times["eval"] = 0.0
    best_auc = 0.0
    progress = sys.stderr.isatty()
    for e in range(args.epochs):
        t = time.perf_counter()
        net_sen.train()
        net_sde.train()
        net_weight.train()
        for i, (image, _) in enumerate(data_loader):
            image = image.to(device)

            # "experiment 2": the decoder only gets inputs from the teachers.
            opt_weight.zero_grad()
            opt_sde.zero_grad()
            z1, z2, z3 = teachers_z(teachers, stats, image)  # teachers re-run every step
            counters["teacher_inputs"] += image.shape[0]
            z_t = net_weight(torch.stack([z1, z2, z3], dim=1))
            x_t = net_sde(z_t)
            loss_weight = mse(image, x_t)
            loss_weight.backward()
            opt_weight.step()
            opt_sde.step()

            # The student against z_T recomputed with the just-updated weighting.
            opt_sen.zero_grad()
            z_t = net_weight(torch.stack([z1, z2, z3], dim=1))
            z_s = net_sen(image)
            loss_sen = mse(z_t.detach(), z_s) + torch.mean(1 - cos_sim(z_t.detach(), z_s))
            loss_sen.backward()
            opt_sen.step()

            # Recomputed for the progress line, read back every batch (finTS.py's print).
            loss_rec_t = mse(image, x_t)
            loss_kd = mse(z_t, z_s) + torch.mean(1 - cos_sim(z_t, z_s))
            line = (f"Training Student: batch, {i + 1} / {len(data_loader)} ; epoch, {e + 1} / "
                    f"{args.epochs} ; loss, KD: {loss_kd.item()} TRec {loss_rec_t.item()} "
                    f"{torch.softmax(net_weight.w, dim=0).data.T.tolist()}")
            if progress:
                print("\r" + line, end="", file=sys.stderr)
        times["train"] += time.perf_counter() - t

        if (e + 1) % args.eval_every == 0 or (e + 1) == args.epochs:
            t = time.perf_counter()
            net_sen.eval()
            net_sde.eval()
            net_weight.eval()
            as_z, as_cossim, as_rec = [], [], []
            for image, _ in data_loader_test:
                image = image.to(device)
                with torch.no_grad():
                    z_s = net_sen(image)
                    x_s = net_sde(z_s)
                    z1, z2, z3 = teachers_z(teachers, stats, image)  # teachers re-run every eval
                    z_t = net_weight(torch.stack([z1, z2, z3], dim=1))
                    net_sde(z_t)  # x_T: computed and unused by the reference
                counters["teacher_inputs"] += image.shape[0]
                s_z, s_cos, s_rec = nets.raw_scores(z_s, x_s, z_t, image)
                as_z.append(s_z)
                as_cossim.append(s_cos)
                as_rec.append(s_rec)
            as_z = torch.cat(as_z).cpu()
            as_cossim = torch.cat(as_cossim).cpu()
            as_rec = torch.cat(as_rec).cpu()

            res_class = []
            columns = nets.score_columns(as_z, as_cossim, as_rec)
            assert len(columns) == 69, len(columns)
            for anomaly_score in columns:
                # One score per image (the max over an image's patches: identity for CIFAR).
                anomaly_score = anomaly_score.reshape(label_test.size, -1)
                anomaly_score = torch.max(anomaly_score, dim=1).values
                res_class.append(nets.roc_auc(label_test, anomaly_score.numpy()))
            epoch_auc = max(res_class)
            best_auc = max(best_auc, epoch_auc)
            times["eval"] += time.perf_counter() - t
            if progress:
                print(file=sys.stderr)
            print(f"max AUC: {epoch_auc:.4f}, for class {args.normal_class}, epoch: {e + 1}",
                  file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    nets.device_sync(device)
    seconds = time.perf_counter() - started
    return seconds, times, counters["teacher_inputs"], best_auc


def main():
    parser = argparse.ArgumentParser(
        description="One CIFAR-10 normal class, trained and evaluated the reference's way "
                    "(teachers re-run at every step and every evaluation), timed end to end.")
    parser.add_argument("--student", default="resnet18", choices=nets.STUDENTS,
                        help="student network (default resnet18)")
    parser.add_argument("--image-size", type=int, default=32,
                        help="side S of the network inputs, a multiple of 32; CIFAR images are "
                             "resized to round(S*256/224) and centre-cropped to S (default 32; "
                             "the reference uses 224)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (default 1)")
    parser.add_argument("--eval-every", type=int, default=50,
                        help="evaluate every N epochs, and always after the last one "
                             "(default 50, the reference's --evalepoch)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--train", type=int, default=5000,
                        help="normal training images (default 5000, all of a CIFAR class)")
    parser.add_argument("--test", type=int, default=10000,
                        help="test images, all classes (default 10000, the CIFAR test set)")
    parser.add_argument("--normal-class", type=int, default=0, help="normal class 0..9 (default 0)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the synthetic data, the initialisation and the shuffling "
                             "(default 0)")
    parser.add_argument("--cifar", type=str, default=None,
                        help="a cifar-10-batches-py or cifar-10-batches-bin folder: use its "
                             "images (first --train of the normal class, first --test of the "
                             "test set)")
    parser.add_argument("--tiny-teachers", action="store_true",
                        help="the tiny fixture teachers of onnx/refresh_teachers.py instead of "
                             "resnet152, vgg19 and densenet201 (as `mtad train --tiny-teachers`)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(N) (default: torch's own default)")
    parser.add_argument("--device", type=str, default="cpu",
                        help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON line with the case's figures on stdout (the "
                             "summary goes to stderr)")
    args = parser.parse_args()

    if args.image_size <= 0 or args.image_size % 32 != 0:
        parser.error("--image-size must be a positive multiple of 32")
    if min(args.epochs, args.eval_every, args.batch_size, args.train, args.test) < 1:
        parser.error("--epochs, --eval-every, --batch-size, --train and --test must be positive")
    if not 0 <= args.normal_class < CLASSES:
        parser.error("--normal-class must be in 0..9")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.cifar:
        data = real_cifar(args.cifar, args.train, args.test, args.normal_class)
    else:
        data = synthetic_cifar(args.train, args.test, args.normal_class, args.seed)
    train_data, _, _, test_labels = data
    anomalous = int(np.sum(np.asarray(test_labels) != args.normal_class))
    if anomalous in (0, len(test_labels)):
        parser.error("the test set needs both normal and anomalous images (raise --test)")
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads; "
          f"{args.student}, S={args.image_size}, {len(train_data)} train, {len(test_labels)} test "
          f"({anomalous} anomalous), {args.epochs} epochs, eval every {args.eval_every}",
          file=sys.stderr)

    seconds, times, teacher_inputs, best_auc = run(args, *data, device)
    # With --json, stdout holds only the JSON line; the summary goes to stderr.
    print(f"wall time {seconds:.2f} s (build {times['build']:.2f}, statistics "
          f"{times['statistics']:.2f}, training {times['train']:.2f}, evaluation "
          f"{times['eval']:.2f}); {teacher_inputs} teacher inputs; best AUC {best_auc:.4f}",
          file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({
            "case": f"end_to_end/{args.student}",
            "seconds": seconds,
            "epochs": args.epochs,
            "image_size": args.image_size,
            "train": len(train_data),
            "test": len(test_labels),
            "teacher_inputs": teacher_inputs,
            "best_auc": best_auc,
        }), flush=True)


if __name__ == "__main__":
    main()
