#!/usr/bin/env bash
# Device call 3 (under 10 minutes): GPU-written fixtures for CI, then the GPU benchmark.
. "$(dirname "$0")/device_env.sh"
timeout 120 python3 scripts/make_gpu_fixtures.py --out "$OUT" 2>&1 | tee "$OUT/fixtures.log"
timeout 420 python3 benchmarks/bench_gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_gpu.log"
