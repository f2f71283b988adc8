#!/usr/bin/env bash
# The GPU benchmark: our binary on a GPU backend against the PyTorch reference on the same GPU,
# in one run, with the peak GPU memory. See docs/PERFORMANCE.md, "GPU backends".
#
#   benches/gpu.sh SPEED_BIN [more options of the speed bench]
#
# SPEED_BIN is the speed bench built with a GPU backend, on any machine with the same
# architecture and glibc (the GPU machine needs no Rust toolchain):
#   cargo bench --no-run --features wgpu --bench speed     # prints target/release/deps/speed-*
# On an NVIDIA machine the wgpu build runs through Vulkan (libvulkan1 and the NVIDIA driver's
# Vulkan ICD); a `--features cuda` build runs through CUDA (MTAD_DEVICE=cuda).
#
# It runs, each ours then PyTorch's in turn, medians of ROUNDS rounds:
#   the teachers (batch 8, at 224; skipped unless the ImageNet exports were compiled in), every
#   student's training step at batch 8 and 32, scoring at batch 32, one CPU-demo epoch (ours),
#   and one CIFAR-sized class end to end (ours with the teacher cache, the reference's way
#   with the teachers at every epoch).
# Environment: MTAD_BIN (the mtad binary of the same build, for the end-to-end class; carry it
# with the bench), MTAD_DEVICE (wgpu), TORCH_DEVICE (cuda when torch sees one, else cpu),
# ROUNDS (3), ITERS (5), MTAD_PYTHON (python3), E2E (1: also the end-to-end class; 0: not),
# ONLY (the cases, as the bench's --only: teacher/,train/,score/,demo-epoch/).
# More options go to the speed bench, e.g. --image-size 64 --only train/ --e2e-train 500.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${1:?usage: benches/gpu.sh SPEED_BIN [speed bench options]}"
shift
export MTAD_REFERENCE_DIR="$here/reference"
python="${MTAD_PYTHON:-python3}"
device="${MTAD_DEVICE:-wgpu}"
torch_device="${TORCH_DEVICE:-$("$python" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo cpu)}"
rounds="${ROUNDS:-3}"
iters="${ITERS:-5}"

echo "== machine"
date -u
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
grep -m1 'model name' /proc/cpuinfo || true
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>/dev/null || echo "no torch: the reference columns stay empty"
echo "ours: --device $device; PyTorch: --torch-device $torch_device"

# Peak GPU memory (all processes on the GPU, sampled every 100 ms by nvidia-smi).
peak_file="$(mktemp)"
sampler=""
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$peak_file" 2>/dev/null &
  sampler=$!
fi
peak() {
  if [ -n "$sampler" ]; then
    echo "peak GPU memory so far: $(sort -n "$peak_file" | tail -1) MiB"
  else
    echo "peak GPU memory: not measured (no nvidia-smi)"
  fi
}
trap '[ -n "$sampler" ] && kill "$sampler" 2>/dev/null; rm -f "$peak_file"' EXIT

echo "== cases"
"$bin" --device "$device" --torch-device "$torch_device" --rounds "$rounds" --iters "$iters" \
  --warmup 2 --only "${ONLY:-teacher/,train/,score/,demo-epoch/}" "$@"
peak
if [ "${E2E:-1}" = 1 ]; then
  echo "== one class end to end"
  # No case starts with `none/`: only the end-to-end run.
  "$bin" --device "$device" --torch-device "$torch_device" --only none/ --end-to-end "$@"
  peak
fi
