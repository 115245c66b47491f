#!/usr/bin/env bash
# The checks that need a GPU, as one prepared run for a lent machine (about 8 minutes on one H100/H200):
#   build (the CUDA extension when nvcc is there), the GPU tests (compiled Triton, CUDA kernels), the SGE target
#   (M = 8192, d = 784, float32: under 100 ms), a quick kernel benchmark, and training-step throughput on digits.
# Every step has its own time limit and the script goes on when one fails; logs and JSON go to $OUT (the device
# tool's result folder) or benchmarks/results/gpu. At most 8 files, so that all of them come back.
#
#   bash benchmarks/gpu_checks.sh            # on the GPU machine, from the repository root
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_checks.sh   # a dry run of the script itself on a CPU machine
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, report the status, never stop the script
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@"
    echo "== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"; } \
  > "$OUT/summary.txt" 2>&1

step build 300 bash -c "$PY -m pip install -q --no-build-isolation --no-deps -e . > '$OUT/build.log' 2>&1 && \
  $PY -c 'import steinops._C as C; print(\"has_cuda\", C.has_cuda())' >> '$OUT/build.log' 2>&1"
tail -3 "$OUT/build.log"

if [ "$DEVICE" = cuda ]; then
    step gpu-tests 240 bash -c "$PY -m pytest -q -ra -m gpu -p no:cacheprovider > '$OUT/gpu-tests.log' 2>&1"
    tail -5 "$OUT/gpu-tests.log"
fi

if [ "$QUICK" = 1 ]; then SGE_ARGS="--samples 512 --dim 16 --repeats 1"; else SGE_ARGS="--repeats 5"; fi
step sge-time 120 $PY benchmarks/sge_time.py --device "$DEVICE" $SGE_ARGS --out "$OUT/sge-time.json"
step kernels 180 $PY benchmarks/kernels.py --device "$DEVICE" --quick --out "$OUT/kernels.json"
if [ "$QUICK" = 1 ]; then TT_ARGS="--steps 2 --rounds 1 --warmup 1 --cases dsm stein"; else TT_ARGS="--steps 20 --rounds 5"; fi
step train-throughput 240 $PY benchmarks/train_throughput.py --preset digits --device "$DEVICE" $TT_ARGS \
    --out "$OUT/train-throughput-digits.json"
cat "$OUT/summary.txt"
