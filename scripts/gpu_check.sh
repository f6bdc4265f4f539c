#!/usr/bin/env bash
# A prepared check of the trainer's CUDA path on a one-GPU machine (tools/gpu_check.py says what it measures):
# one VESPO step bf16-on-GPU vs fp32-on-CPU, tokens/s and MFU of a model at Qwen3-30B-A3B's shapes, chunked vs
# naive log-prob peak memory, weight-export GB/s; one JSON (default outputs/gpu_check.json), under 8 minutes.
#
#   bash scripts/gpu_check.sh [--out FILE] [--dry-run] [tools/gpu_check.py options]
#
# The machine needs a CUDA build of torch; neither SGLang nor Transformer Engine (the local layer spec is
# used), and no network. The project is used from this checkout (PYTHONPATH). megatron-core comes from the
# interpreter, or, when it does not import there, from wheels in $GPU_CHECK_WHEELS (default: wheels/ in the
# checkout), installed without network or dependencies into .gpu_check_deps/. The interpreter: $PYTHON, else
# .venv/bin/python, else python3. --dry-run does everything on the CPU with small shapes (CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import megatron.core" 2>/dev/null; then
  WHEELS=${GPU_CHECK_WHEELS:-$REPO/wheels}
  if ! ls "$WHEELS"/megatron_core-*.whl >/dev/null 2>&1; then
    echo "gpu_check: megatron.core does not import with $PYTHON and there is no megatron_core wheel in $WHEELS" >&2
    exit 2
  fi
  echo "gpu_check: installing the wheels of $WHEELS into .gpu_check_deps (no network, no dependencies)"
  "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$REPO/.gpu_check_deps" "$WHEELS"/*.whl
  export PYTHONPATH="$REPO/.gpu_check_deps:$PYTHONPATH"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} CUDA_DEVICE_MAX_CONNECTIONS=1 TOKENIZERS_PARALLELISM=false
exec timeout "${GPU_CHECK_TIMEOUT_S:-480}" "$PYTHON" "$REPO/tools/gpu_check.py" "$@"
