#!/usr/bin/env bash
# Create (or reuse) the project virtualenv at .venv and install megatron-vespo with its CPU
# dependencies. Idempotent: a second run only checks that everything is in place.
# Never installs transformer-engine, apex or sglang (GPU-only; see docs/dependencies.md and the `gpu` extra).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.megatron_vespo_installed
want=$(cat setup.py scripts/setup_env.sh | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] .venv up to date"
  exit 0
fi
python -m pip install -q --upgrade pip wheel
# torch first, pinned to the CPU wheel when there is no GPU: a loose requirement resolved by pip
# alone would fetch a multi-GB CUDA build.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[rl,dev]"
echo "$want" > "$stamp"
echo "[setup] done: $(python -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)' 2>/dev/null)"
