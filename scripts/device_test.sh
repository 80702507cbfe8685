#!/usr/bin/env bash
# Device call 2 (about 4 minutes): the GPU tests, full log in $OUT, no -x.
# Optional, if device time is left (each under 5 minutes, run as their own calls):
#   FULL=1      also the whole suite on the device host (CI runs it without a GPU anyway)
#   SANITIZE=1  also the kernel tests under compute-sanitizer (memcheck, initcheck: the kernels use no
#               shared memory, so racecheck could find nothing)
. "$(dirname "$0")/device_env.sh"
timeout 300 python3 -m pytest -q -ra -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" | tail -40
if [ "${FULL:-0}" = 1 ]; then
    timeout 280 python3 -m pytest -q -ra -p no:cacheprovider tests > "$OUT/test_all.log" 2>&1; tail -30 "$OUT/test_all.log"
fi
if [ "${SANITIZE:-0}" = 1 ]; then
    for tool in memcheck initcheck; do
        timeout 140 compute-sanitizer --tool $tool --error-exitcode 99 python3 -m pytest -q -p no:cacheprovider \
            tests/test_gpu.py -k "kernels or digests or unaligned" > "$OUT/sanitize_$tool.log" 2>&1
        echo "compute-sanitizer $tool: exit $? ($(grep -c 'ERROR SUMMARY: 0 errors' "$OUT/sanitize_$tool.log") clean summaries)"
        tail -3 "$OUT/sanitize_$tool.log"
    done
fi
