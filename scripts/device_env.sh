# Sourced by the device_*.sh scripts, on the device machine (see STATUS.md "GPU sessions").
# Installs the wheels carried in .whl/ (scripts/fetch_device_wheels.sh) into /tmp/site, builds
# the C helper in place, and sets OUT (where logs go; the device tool brings $OUT back).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ ! -f /tmp/site/.mithril-wheels ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        > "$OUT/pip.log" 2>&1 || { echo "wheel install failed: $(tail -3 "$OUT/pip.log")"; exit 1; }
    touch /tmp/site/.mithril-wheels
fi
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 setup.py build_ext --inplace -q > "$OUT/build.log" 2>&1 || echo "C helper not built (numpy fallback): see build.log"
