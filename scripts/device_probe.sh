#!/usr/bin/env bash
# Device call 1 (about a minute): what the GPU path depends on. carry [".whl"].
. "$(dirname "$0")/device_env.sh"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
timeout 300 python3 scripts/gpu_probe.py --out "$OUT" 2>&1 | tee "$OUT/probe.log"
