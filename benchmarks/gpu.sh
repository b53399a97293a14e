#!/usr/bin/env bash
# Every GPU measurement of the project in one call, written to reports/gpu/gpu-<UTC date-time>.txt and copied
# to reports/gpu/latest.txt (the file README.md quotes):
#
#   benchmarks/gpu.sh            # on a CUDA machine, from the repository root or anywhere (a few minutes)
#   benchmarks/gpu.sh --smoke    # (or SMOKE=1) every step on CPU at tiny sizes, to prove the script runs;
#                                # writes reports/gpu/smoke-<date-time>.txt only (not latest.txt)
#   COMPILE=1 benchmarks/gpu.sh  # also time the training step under torch.compile (minutes more)
#   PYTHON=/usr/bin/python3 benchmarks/gpu.sh   # this interpreter (default: .venv/bin/python, python, python3)
#
# It needs torch (a CUDA build for the measurements), OpenCV, numpy, pyarrow, PyYAML and tqdm; not Ray,
# MLflow or DVC, no network, no install of this project (each script puts the repository root on sys.path).
# Its first lines say which interpreter and which torch it uses.
#
# Steps (each one's command is printed before its output; a failing step is reported and the others still run):
#   0. the training path on one GPU without Ray (benchmarks/train_smoke.py): the Ray workers' own functions,
#      bf16 autocast, channels-last, SyncBatchNorm, DDP on a world-size-1 NCCL group, the validation's
#      all-reduce, the training state saved and restored with map_location;
#   a. training step, PSPNet-50 at 473x473, bf16 autocast + channels-last: images/s and MFU against the
#      device's dense bf16 peak (benchmarks/train_step.py's table), batch 8 (with the fp32 eager reference)
#      and batch 16 (reported as not fitting when it runs out of memory); the goal is >= 45 % MFU;
#   b. evaluation: the ms6+flip sliding-window protocol on one 512x683 image in fp32 and bf16, at the
#      ade20k benchmark's eval.batch_size and at 16 crops per pass (benchmarks/eval_device.py);
#   c. the data loader of one GPU with the ade20k benchmark's train.loader_workers on ADE20K-sized stand-in
#      rows through the real prepare, TrainTransform and DataLoader path (benchmarks/loader_throughput.py).
# The smoke run takes the synthetic benchmark's small PSPNet in steps a and b and runs step 0 on CPU (gloo,
# no SyncBN).
# Exit status: 0 when every step ran, 1 otherwise (the report is written either way), 2 without a CUDA
# device (and no --smoke) or on a bad argument, 3 when there is no interpreter that can import torch.
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

PY=${PYTHON:-}
if [[ -z $PY ]]; then
  if [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
  elif command -v python >/dev/null; then
    PY=python
  elif command -v python3 >/dev/null; then
    PY=python3
  else
    echo "gpu.sh: no Python found (.venv/bin/python, python, python3); set PYTHON" >&2
    exit 3
  fi
fi
export PYTHONUNBUFFERED=1

# The interpreter and its torch, before anything else; exit status 3: no torch, 4: torch sees no CUDA device.
probe() {
  "$PY" - <<'EOF'
import sys

print(f"interpreter: {sys.executable} (python {sys.version.split()[0]})")
try:
    import torch
except Exception as exc:  # any failure to import is "no torch" here
    print(f"torch: cannot be imported: {type(exc).__name__}: {exc}")
    sys.exit(3)
build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
cuda = torch.cuda.is_available()
print(f"torch: {torch.__version__}, {build}, from {torch.__file__.rsplit('/', 2)[0]}; "
      f"CUDA devices visible: {torch.cuda.device_count() if cuda else 0}")
print(f"cuDNN {torch.backends.cudnn.version() if cuda else 'n/a'}, "
      f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, "
      f"TF32 convolutions {torch.backends.cudnn.allow_tf32}, TF32 matmul {torch.backends.cuda.matmul.allow_tf32}")
if not cuda and torch.version.cuda:
    print(f"torch: a CUDA {torch.version.cuda} build that sees no device (no GPU, a driver older than the "
          "build's CUDA, or CUDA_VISIBLE_DEVICES)")
sys.exit(0 if cuda else 4)
EOF
}
machine=$(probe 2>&1) && probe_rc=0 || probe_rc=$?
((probe_rc == 0 || (probe_rc == 4 && smoke == 1))) || echo "$machine" >&2
if ((probe_rc == 3)); then
  echo "gpu.sh: no torch in $PY; run PYTHON=<an interpreter with torch> benchmarks/gpu.sh" >&2
  exit 3
elif ((probe_rc == 4 && smoke == 0)); then
  echo "gpu.sh: torch in $PY sees no CUDA device; run on a GPU machine, or 'benchmarks/gpu.sh --smoke' to check the script" >&2
  exit 2
elif ((probe_rc != 0 && probe_rc != 4)); then
  echo "gpu.sh: $PY failed to start (exit status $probe_rc)" >&2
  exit 3
fi
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
  echo "$machine"
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); host: $(hostname); CPU cores: $(nproc)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo n/a)$(git diff --quiet HEAD 2>/dev/null || echo ' (working tree modified)')"
  echo "nvidia-smi -L:"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L 2>&1 || true
    nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 || true
  else
    echo "  (nvidia-smi not found)"
  fi
}

measure_gpu() {
  step "0. training path on the GPU, no Ray" "$PY" benchmarks/train_smoke.py --device cuda
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
  step "0. training path (smoke: CPU, no Ray)" "$PY" benchmarks/train_smoke.py --device cpu
  step "a1. train step (smoke: the synthetic benchmark's model, 65 px, batch 2, dummy peak 1 TFLOP/s)" \
    "$PY" benchmarks/train_step.py --benchmark synthetic --size 65 --batch 2 --iters 1 --rounds 1 --peak-tflops 1
  step "a2. train step (smoke: batch 4, no reference)" \
    "$PY" benchmarks/train_step.py --benchmark synthetic --size 65 --batch 4 --iters 1 --rounds 1 --no-reference
  step "b. evaluation (smoke: the synthetic benchmark's model, 48x64 image, crop 33)" \
    "$PY" benchmarks/eval_device.py --device cpu --benchmark synthetic --size 48 --base 48 --crop 33 --repeats 1
  step "c. data loader (smoke: 16 rows of 96x128, crop 65, 2 loader processes)" \
    "$PY" benchmarks/loader_throughput.py --device cpu --rows 16 --height 96 --crop 65 --loader-workers 2 \
    --batches 4 --warmup 2
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
