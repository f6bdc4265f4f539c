#!/usr/bin/env bash
# Run the Megatron-dependent tests against the newest supported megatron-core (0.19.x) as well.
# megatron-core 0.19 declares Python >= 3.12 but works on 3.11 (docs/dependencies.md): it is installed, with
# triton, into an overlay directory (.mcore019) that shadows the 0.16.1 of .venv via PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
MCORE_NEW=${MCORE_NEW:-0.19.2}
OVERLAY=.mcore019
if [ ! -f "$OVERLAY/.installed-$MCORE_NEW" ]; then
  echo "[compat] installing megatron-core $MCORE_NEW into $OVERLAY"
  rm -rf "$OVERLAY"
  python -m pip install -q --no-deps --ignore-requires-python --target "$OVERLAY" "megatron-core==$MCORE_NEW" triton
  touch "$OVERLAY/.installed-$MCORE_NEW"
fi
export PYTHONPATH="$PWD/$OVERLAY${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -c "import megatron.core as m; v = m.__version__; print('[compat] megatron-core', v); assert v.split('+')[0] == '$MCORE_NEW', v" 2>/dev/null
workers=${PYTEST_WORKERS:-2}
xdist=()
if [ "$workers" != 0 ]; then xdist=(-n "$workers" --dist loadfile); fi  # as scripts/test.sh
exec python -m pytest "${xdist[@]}" tests/unit/test_provider.py tests/unit/test_platform.py tests/unit/test_layout.py \
  tests/multiproc/test_model_layouts.py tests/multiproc/test_pipeline_p2p.py tests/multiproc/test_train_guards.py \
  tests/multiproc/test_hf_parity.py tests/multiproc/test_checkpoint_reshard.py tests/multiproc/test_init_weights.py \
  tests/unit/test_training_checkpoint.py tests/unit/test_recompute.py tests/unit/test_routing_replay.py \
  tests/multiproc/test_routing_flip_layouts.py tests/multiproc/test_offload.py "$@"
