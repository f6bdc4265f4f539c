#!/usr/bin/env bash
# The project's test command (README, CI): set up .venv if needed, then run the whole suite.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -k vespo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# SGLang's own code for the contract suite; if it cannot be installed, that suite skips and says why.
bash scripts/sglang_overlay.sh || true
. .venv/bin/activate
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
# Two pytest workers (pytest-xdist), one test file per worker at a time so that module fixtures are built
# once: the suite keeps both cores busy between its multi-process tests. PYTEST_WORKERS=0 runs serially.
workers=${PYTEST_WORKERS:-2}
xdist=()
if [ "$workers" != 0 ]; then xdist=(-n "$workers" --dist loadfile); fi
exec python -m pytest "${xdist[@]}" "${@:-tests}"
