#!/usr/bin/env bash
# The test suite, on a fresh machine: installs what it needs into .venv, then runs pytest.
# GPU tests run where CUDA, CuPy and nvCOMP are present and skip (with the reason) elsewhere.
MITHRIL_EXTRAS=test,lightning,hf
. "$(dirname "$0")/_env.sh"
python -m pytest -q -ra "$@"
