#!/usr/bin/env bash
# Optional device call (about 4 minutes, after the GPU steps): issue 10's CPU thread scaling on the
# device host's cores (1 GB bf16 and fp32, file to file), then issue 11's delta save against a full
# save at 2, 8 and 16 threads (needs the run's two checkpoints: carry
# benchmarks/out/run/bf16-299.mth and benchmarks/out/run/bf16-300.mth with .whl). Full logs in $OUT.
. "$(dirname "$0")/device_env.sh"
timeout 200 python3 benchmarks/bench_scaling.py --threads 1,2,4,8,16 --runs 4 --mb 1024 2>&1 | tee "$OUT/bench_scaling.log"
if [ -f benchmarks/out/run/bf16-299.mth ] && [ -f benchmarks/out/run/bf16-300.mth ]; then
    timeout 200 python3 benchmarks/bench_ckpt_speed.py --threads 2,8,16 --runs 3 2>&1 | tee "$OUT/bench_ckpt_speed.log"
else
    echo "bench_ckpt_speed skipped: benchmarks/out/run/bf16-299.mth and bf16-300.mth were not carried" | tee "$OUT/bench_ckpt_speed.log"
fi
