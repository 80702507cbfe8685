# Sourced by demo.sh and test.sh: a virtual environment in .venv with mithril-gpu installed.
# torch is pinned to 2.13.0 (a CPU wheel is on disk here; a looser pin can pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "setting up .venv: torch 2.13.0 (CPU)..." >&2
python -m pip install -q "torch==2.13.0"
echo "setting up .venv: mithril-gpu and its extras ($MITHRIL_EXTRAS)..." >&2
python -m pip install -q -e ".[$MITHRIL_EXTRAS]"
