"""PyTorch micro-benchmarks of the method's three kinds of work, to compare with our Rust/Burn side.

Every case is timed the same way: W warm-up iterations, then I timed iterations measured with
time.perf_counter (wall clock); the figure is images per second = batch * I / elapsed.

Cases (select with --only, comma-separated name prefixes):
  teacher/<t>/b8      t in resnet152, vgg19, densenet201: eval-mode forward of [8, 3, 224, 224]
                      to the 1000 logits under torch.inference_mode(), at 224 whatever
                      --image-size says (ours run at 224 only: their exports are traced there).
  train/<s>/b8, b32   s in resnet18, vgg11, densenet121: one training step as our TrainStep in
                      src/training/model.rs does it, from cached teacher z-scores (no teacher
                      forward): z_T = sum_i softmax(w)_i z_i, x_T = Decoder(z_T),
                      loss_rec = MSE(x, x_T), z_S = student(x),
                      loss_kd = MSE(z_S, z_T.detach()) + mean(1 - cos(z_S, z_T.detach())),
                      (loss_rec + loss_kd).backward(), one Adam(lr 1e-3) step over student +
                      decoder + w, zero_grad, and loss.item() (our step reads the loss back).
  score/<s>/b32       eval-mode scoring as MtadModel::scores: z_S = student(x),
                      x_S = Decoder(z_S), AS_rec, AS_z, AS_cossim against the weighted cached
                      z-scores, the three [B] vectors brought to numpy.

Inputs are fixed random tensors made once per case (images uniform in [-1, 1], z-scores
standard normal); every network has random weights (weights=None).

    python benches/reference/bench.py --help
"""

import argparse
import json
import sys
import time

sys.dont_write_bytecode = True  # keep benches/reference free of __pycache__

import torch  # noqa: E402

import reference_nets as nets  # noqa: E402

TEACHER_BATCH = 8
TEACHER_SIZE = 224
TRAIN_BATCHES = (8, 32)
SCORE_BATCH = 32


def case_names():
    names = [f"teacher/{t}/b{TEACHER_BATCH}" for t in nets.TEACHERS]
    names += [f"train/{s}/b{b}" for s in nets.STUDENTS for b in TRAIN_BATCHES]
    names += [f"score/{s}/b{SCORE_BATCH}" for s in nets.STUDENTS]
    return names


def images(batch, size, device):
    """[batch, 3, size, size], uniform in [-1, 1] like Normalize(0.5, 0.5) pixels."""
    return (torch.rand(batch, 3, size, size) * 2 - 1).to(device)


def z_scores(batch, device):
    """Cached teacher z-scores, [batch, 3 teachers, 1000]."""
    return torch.randn(batch, len(nets.TEACHERS), 1000).to(device)


def teacher_case(name, batch, size, device):
    model = nets.build_teacher(name).to(device)
    x = images(batch, size, device)

    def step():
        with torch.inference_mode():
            model(x)

    return step


def train_case(student_name, batch, size, device):
    student = nets.build_student(student_name).to(device).train()
    decoder = nets.Decoder(size).to(device).train()
    weighting = nets.Weight(len(nets.TEACHERS)).to(device).train()
    params = list(student.parameters()) + list(decoder.parameters()) + list(weighting.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)  # torch defaults otherwise, as the method
    x = images(batch, size, device)
    z = z_scores(batch, device)

    def step():
        # MtadModel::losses with teachers, then TrainStep: one backward of the summed losses.
        z_t = weighting(z)
        x_t = decoder(z_t)
        loss_rec = nets.MSE(x, x_t)
        z_s = student(x)
        loss_kd = nets.distillation_loss(z_s, z_t.detach())
        loss = loss_rec + loss_kd
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()  # set_to_none=True (torch 2 default): fresh gradients next step
        loss.item()  # our step reads the loss back every iteration

    return step


def score_case(student_name, batch, size, device):
    student = nets.build_student(student_name).to(device).eval()
    decoder = nets.Decoder(size).to(device).eval()
    weighting = nets.Weight(len(nets.TEACHERS)).to(device).eval()
    x = images(batch, size, device)
    z = z_scores(batch, device)

    def step():
        # MtadModel::scores on a valid (inference-mode) module, then Scores::to_host.
        with torch.no_grad():
            z_s = student(x)
            x_s = decoder(z_s)
            z_t = weighting(z)
            as_z, as_cossim, as_rec = nets.raw_scores(z_s, x_s, z_t, x)
        for score in (as_z, as_cossim, as_rec):
            score.cpu().numpy()

    return step


def make_step(case, size, device):
    kind, net, b = case.split("/")
    batch = int(b[1:])
    if kind == "teacher":
        return batch, teacher_case(net, batch, TEACHER_SIZE, device)
    if kind == "train":
        return batch, train_case(net, batch, size, device)
    return batch, score_case(net, batch, size, device)


def run_case(case, size, iters, warmup, device):
    torch.manual_seed(0)
    batch, step = make_step(case, size, device)
    for _ in range(warmup):
        step()
    nets.device_sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    nets.device_sync(device)
    elapsed = time.perf_counter() - start
    return {
        "case": case,
        "images_per_s": batch * iters / elapsed,
        "batch": batch,
        "image_size": size,
        "seconds": elapsed,
        "iters": iters,
    }


def main():
    parser = argparse.ArgumentParser(
        description="PyTorch reference micro-benchmarks (teacher forward, training step, scoring).",
        epilog="cases: " + ", ".join(case_names()),
    )
    parser.add_argument("--image-size", type=int, default=224,
                        help="side S of the square inputs, a multiple of 32 (default 224)")
    parser.add_argument("--iters", type=int, default=10,
                        help="timed iterations per case (default 10)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed warm-up iterations per case (default 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(N) (default: torch's own default)")
    parser.add_argument("--only", type=str, default=None,
                        help="comma-separated case-name prefixes, e.g. 'teacher/,train/resnet18' "
                             "(default: every case)")
    parser.add_argument("--device", type=str, default="cpu",
                        help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per case per line instead of a table")
    parser.add_argument("--serve", action="store_true",
                        help="read case names from stdin, one per line, and answer each with its "
                             "JSON line (as --json) until stdin closes: one warm process for a "
                             "caller that interleaves its own timings (benches/speed.rs)")
    args = parser.parse_args()

    if args.image_size <= 0 or args.image_size % 32 != 0:
        parser.error("--image-size must be a positive multiple of 32")
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be at least 1 and --warmup at least 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    cases = case_names()
    if args.only:
        prefixes = [p.strip() for p in args.only.split(",") if p.strip()]
        cases = [c for c in cases if any(c.startswith(p) for p in prefixes)]
        if not cases:
            parser.error(f"--only {args.only!r} matches no case")

    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    print(f"torch {torch.__version__}, CPU capability {capability} (ATEN_CPU_CAPABILITY caps it), "
          f"device {device}, {torch.get_num_threads()} threads, "
          f"S={args.image_size}, warmup {args.warmup}, iters {args.iters}, "
          f"decoder {nets.decoder_params(args.image_size):,} parameters", file=sys.stderr)
    if args.serve:
        for line in sys.stdin:
            case = line.strip()
            if case not in cases:
                print(json.dumps({"case": case, "error": "unknown or deselected case"}),
                      flush=True)
                continue
            result = run_case(case, args.image_size, args.iters, args.warmup, device)
            print(json.dumps(result), flush=True)
        return
    for case in cases:
        result = run_case(case, args.image_size, args.iters, args.warmup, device)
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(f"{case:28s} {result['images_per_s']:10.2f} images/s "
                  f"({result['seconds']:.3f} s for {args.iters} x {result['batch']})", flush=True)


if __name__ == "__main__":
    main()
