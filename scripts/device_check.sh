#!/usr/bin/env bash
# Everything that needs a GPU, in one call on the device machine (see STATUS.md):
#   device run: carry [".whl"], command: bash scripts/device_check.sh
# Installs the carried wheels, builds the C helper, runs the whole suite (GPU tests included)
# and the GPU benchmark; logs and results go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MITHRIL_GPU_EXPERIMENTAL=1
python3 setup.py build_ext --inplace -q > "$OUT/build.log" 2>&1 || echo "C helper not built (numpy fallback)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -m pytest -q -ra -x tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log"
python3 -m pytest -q -ra tests 2>&1 | tail -5 | tee "$OUT/test_all.log"
python3 benchmarks/bench_gpu.py --out "$OUT" 2>&1 | tee "$OUT/bench_gpu.log"
