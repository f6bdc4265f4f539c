#!/usr/bin/env bash
# SGLang's own code for the contract suite (tests/sglang_contract): the pinned sglang wheel and the
# modules its imports need, installed WITHOUT dependencies into an overlay directory (.sglang-<version>)
# that only the contract suite's SGLang-side process puts on its path. It never enters .venv: SGLang
# cannot serve without a GPU and pins its own CUDA torch. Idempotent (a stamp per pinned list); on
# failure it says why and exits non-zero, and the contract suite then skips naming the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
SGLANG_VERSION=0.5.23
OVERLAY=.sglang-$SGLANG_VERSION
# What `import sglang.srt.entrypoints.http_server` (and io_struct, server_args) needs beyond .venv,
# measured on 2026-11-30. triton: imported at module level (it imports fine without a GPU).
# torchvision: imported for multimodal preprocessing (its compiled ops need a CUDA torch; see
# tests/sglang_contract/sglang_side.py). httpx: the test client that drives SGLang's FastAPI app.
PACKAGES=(
  "sglang==$SGLANG_VERSION" triton==3.9.0 torchvision==0.28.0 msgspec==0.23.0 pybase64==1.5.1 pyzmq==27.3.0
  ipython==9.18.1 traitlets==5.16.1 dill==0.4.1 apache-tvm-ffi==0.1.15.post2 sentencepiece==0.2.3
  compressed-tensors==0.20.1 loguru==0.7.3 gguf==0.19.0 openai==3.57.0 partial-json-parser==0.2.1.1.post7
  uvloop==0.23.0 xgrammar==0.2.9 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 python-multipart==0.0.34
  httpx==0.28.1 httpcore==1.0.9
)
want=$(printf '%s\n' "${PACKAGES[@]}" | sha1sum | cut -d' ' -f1)
if [ -f "$OVERLAY/.installed" ] && [ "$(cat "$OVERLAY/.installed")" = "$want" ]; then
  exit 0
fi
. .venv/bin/activate
echo "[sglang-overlay] installing sglang $SGLANG_VERSION (no dependencies) into $OVERLAY"
rm -rf "$OVERLAY"
if ! python -m pip install -q --no-deps --target "$OVERLAY" "${PACKAGES[@]}" 2> "$OVERLAY.log"; then
  echo "[sglang-overlay] install failed (see $OVERLAY.log): the SGLang contract suite will be skipped" >&2
  tail -3 "$OVERLAY.log" >&2
  exit 1
fi
echo "$want" > "$OVERLAY/.installed"
echo "[sglang-overlay] done: $(du -sh "$OVERLAY" | cut -f1)"
