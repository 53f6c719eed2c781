#!/usr/bin/env bash
# Every benchmark's full mode in one call on the GPU machine (no network, no ComfyUI there):
# installs the carried wheels into a target folder on top of the machine's own Python (its
# CUDA torch stays in use), points COMFYUI_PATH at the carried ComfyUI and runs
# benchmarks/run_all.py within a time budget. Writes $OUT/bench.jsonl (one JSON line per
# figure and per script outcome) and $OUT/log.txt (everything).
# Build .carry/ first, here: `bash benchmarks/make_carry.sh`; then the device call carries ".carry".
#
#   bash benchmarks/gpu_all.sh [run_all.py options, e.g. --quick --only ecac_cost]
# Environment: PB_PYTHON (default python3), PB_BENCH_TOTAL_S (run_all's budget, default 450),
# PB_SITE (wheel target, default /tmp/pb_site), OMP_NUM_THREADS (default 8 here).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pb_bench_out}
mkdir -p "$OUT"
export OUT
PY=${PB_PYTHON:-python3}
SITE=${PB_SITE:-/tmp/pb_site}
TOTAL=${PB_BENCH_TOTAL_S:-450}

main() {
    echo "## gpu_all.sh $(date -u +%FT%TZ) on $(uname -m), $($PY --version 2>&1) at $(command -v "$PY")"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    [ -d .carry/ComfyUI ] && ls .carry/wheels/*.whl >/dev/null 2>&1 \
        || { echo "ERROR: no .carry/ComfyUI or .carry/wheels: run benchmarks/make_carry.sh and carry .carry"; return 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .carry/wheels/*.whl || { echo "ERROR: pip install of the carried wheels failed"; return 3; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export COMFYUI_PATH="$PWD/.carry/ComfyUI"
    # Caches (stand-in checkpoints, datasets) and the photos live outside the repo copy.
    export PORTRAITBOOTH_HOST=${PORTRAITBOOTH_HOST:-/tmp/pb_host}
    mkdir -p "$PORTRAITBOOTH_HOST/cache/photos"
    cp .carry/photos/* "$PORTRAITBOOTH_HOST/cache/photos/"
    export PYTHONUNBUFFERED=1
    # Threads only feed the GPU and build the random stand-ins here; every header prints them.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
    "$PY" -c "import torch, torchsde, av, retinaface, onnx2torch, onnxruntime; \
print('## torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', '| onnxruntime', \
onnxruntime.__version__, onnxruntime.get_available_providers())" || { echo "ERROR: imports failed"; return 4; }
    # The outer timeout is a backstop; run_all keeps to its own budget and reports each script.
    timeout -k 10 $((TOTAL + 40)) "$PY" benchmarks/run_all.py --total-s "$TOTAL" --jsonl "$OUT/bench.jsonl" "$@"
}

main "$@" 2>&1 | tee "$OUT/log.txt"
