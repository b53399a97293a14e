#!/usr/bin/env bash
# Every GPU measurement of the project in one call, written to reports/gpu/gpu-<UTC date-time>.txt and copied
# to reports/gpu/latest.txt (the file README.md quotes):
#
#   benchmarks/gpu.sh            # on a CUDA machine, from the repository root or anywhere (a few minutes)
#   benchmarks/gpu.sh --smoke    # (or SMOKE=1) every step on CPU at tiny sizes, to prove the script runs;
#                                # writes reports/gpu/smoke-<date-time>.txt only (not latest.txt)
#   COMPILE=1 benchmarks/gpu.sh  # also time the training step under torch.compile (minutes more)
#
# Steps (each one's command is printed before its output; a failing step is reported and the others still run):
#   a. training step, PSPNet-50 at 473x473, bf16 autocast + channels-last: images/s and MFU against the
#      device's dense bf16 peak (benchmarks/train_step.py's table), batch 8 (with the fp32 eager reference)
#      and batch 16 (reported as not fitting when it runs out of memory); the goal is >= 45 % MFU;
#   b. evaluation: the ms6+flip sliding-window protocol on one 512x683 image in fp32 and bf16, at the
#      ade20k benchmark's eval.batch_size and at 16 crops per pass (benchmarks/eval_device.py);
#   c. the data loader of one GPU with the ade20k benchmark's train.loader_workers on ADE20K-sized stand-in
#      rows through the real prepare, TrainTransform and DataLoader path (benchmarks/loader_throughput.py).
# Exit status: 0 when every step ran, 1 otherwise (the report is written either way), 2 without a CUDA
# device (and no --smoke) or on a bad argument.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
smoke=${SMOKE:-0}
for arg in "$@"; do
  case $arg in
    --smoke) smoke=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$arg' (expected --smoke or --help)" >&2; exit 2 ;;
  esac
done
[[ $smoke == 0 || $smoke == 1 ]] || { echo "gpu.sh: SMOKE must be 0 or 1, got '$smoke'" >&2; exit 2; }

PY=python
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1
failed=()

# step TITLE COMMAND...: run one measurement; exit status 3 means "did not fit in memory"
step() {
  local title=$1 started=$SECONDS rc=0
  shift
  printf '\n== %s\n$ %s\n' "$title" "$*"
  "$@" || rc=$?
  if ((rc == 3)); then
    echo "-- $title: did not fit in GPU memory (not counted as a failure)"
  elif ((rc != 0)); then
    echo "!! $title: failed with exit status $rc"
    failed+=("$title")
  fi
  echo "-- $title: $((SECONDS - started)) s"
}

header() {
  echo "PSPNet GPU measurements ($([[ $smoke == 1 ]] && echo 'SMOKE RUN on CPU at tiny sizes: not results' ||
    echo 'benchmarks/gpu.sh'))"
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); host: $(hostname); CPU cores: $(nproc)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo n/a)$(git diff --quiet HEAD 2>/dev/null || echo ' (working tree modified)')"
  echo "nvidia-smi -L:"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L 2>&1 || true
    nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 || true
  else
    echo "  (nvidia-smi not found)"
  fi
  "$PY" - <<'EOF'
import torch
cuda = torch.cuda.is_available()
print(f"python {__import__('sys').version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version() if cuda else 'n/a'}, "
      f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, "
      f"TF32 convolutions {torch.backends.cudnn.allow_tf32}, TF32 matmul {torch.backends.cuda.matmul.allow_tf32}")
EOF
}

measure_gpu() {
  step "a1. train step 473, batch 8" "$PY" benchmarks/train_step.py --size 473 --batch 8 --iters 20
  step "a2. train step 473, batch 16" "$PY" benchmarks/train_step.py --size 473 --batch 16 --iters 20 --no-reference
  if [[ ${COMPILE:-0} == 1 ]]; then
    step "a3. train step 473, batch 8, torch.compile" \
      "$PY" benchmarks/train_step.py --size 473 --batch 8 --iters 20 --no-reference --compile
  fi
  step "b1. evaluation ms6+flip, eval.batch_size" "$PY" benchmarks/eval_device.py --device cuda
  step "b2. evaluation ms6+flip, 16 crops per pass" "$PY" benchmarks/eval_device.py --device cuda --batch-size 16
  step "c. data loader per GPU (train.loader_workers)" "$PY" benchmarks/loader_throughput.py --device cuda
}

measure_smoke() {
  step "a1. train step (smoke: 65 px, batch 2, dummy peak 1 TFLOP/s)" \
    "$PY" benchmarks/train_step.py --size 65 --batch 2 --iters 1 --peak-tflops 1
  step "a2. train step (smoke: batch 4, no reference)" \
    "$PY" benchmarks/train_step.py --size 65 --batch 4 --iters 1 --no-reference
  step "b. evaluation (smoke: 48x64 image, crop 33)" \
    "$PY" benchmarks/eval_device.py --device cpu --size 48 --base 48 --crop 33 --repeats 1
  step "c. data loader (smoke: 48 rows of 96x128, crop 65)" \
    "$PY" benchmarks/loader_throughput.py --device cpu --rows 48 --height 96 --crop 65 --batches 10 --warmup 2
}

run_all() {
  header
  if [[ $smoke == 1 ]]; then
    measure_smoke
  else
    measure_gpu
  fi
  echo
  if ((${#failed[@]})); then
    echo "FAILED steps: ${failed[*]}"
    return 1
  fi
  echo "all steps ran"
}

if [[ $smoke == 0 ]] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu.sh: no CUDA device visible to $PY; run on a GPU machine, or 'benchmarks/gpu.sh --smoke' to check the script" >&2
  exit 2
fi
mkdir -p reports/gpu
stamp=$(date -u +%Y-%m-%d-%H%M%S)
report=reports/gpu/$([[ $smoke == 1 ]] && echo smoke || echo gpu)-$stamp.txt
status=0
run_all 2>&1 | tee "$report" || status=$?
if [[ $smoke == 0 ]]; then
  cp "$report" reports/gpu/latest.txt
  echo "written: $report and reports/gpu/latest.txt"
else
  echo "written: $report (a smoke run: latest.txt is left alone)"
fi
exit "$status"
