#!/usr/bin/env bash
# Optional device call (about 2 minutes, after the GPU steps): issue 10's CPU thread scaling on the
# device host's cores, 1 GB bf16 and fp32, file to file, full log in $OUT.
. "$(dirname "$0")/device_env.sh"
timeout 240 python3 benchmarks/bench_scaling.py --threads 1,2,4,8,16 --runs 4 --mb 1024 2>&1 | tee "$OUT/bench_scaling.log"
