#!/usr/bin/env bash
# Issue 4's GPU figures in one device call (docs/benchmarks.md, "Generation engine"): the engine on a
# random ~0.5B Llama (Qwen2.5-0.5B's shape, config built in code) in bf16, 1,024 sequences in flight,
# eager and with the decode step captured (compile_decode: CUDA graphs), each ratio against a
# baseline timed in the same run. Results go to $OUT (the device tool) or ./gpu_check.
#
#   bash scripts/gpu_engine_check.sh                                  # on the GPU machine
#   DEVICE=cpu DTYPE=float32 SIZE="--hidden 64 --layers 2 --intermediate 128 --heads 4 --kv-heads 2 --vocab 512" \
#     POP=16 NEW=8 bash scripts/gpu_engine_check.sh                  # dry run of the same script on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT_DIR="${OUT:-gpu_check}"
mkdir -p "$OUT_DIR"
DEVICE="${DEVICE:-cuda}" DTYPE="${DTYPE:-bfloat16}" POP="${POP:-1024}" NEW="${NEW:-128}"
SIZE="${SIZE:---hidden 896 --layers 24 --intermediate 4864 --heads 14 --kv-heads 2 --vocab 151936}"
{ python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv || true; } | tee "$OUT_DIR/env.txt"
# shellcheck disable=SC2086
python scripts/bench_engine.py --device "$DEVICE" --dtype "$DTYPE" $SIZE --population "$POP" --new-tokens "$NEW" \
  --reps 3 --naive-members 4 --naive-reps 1 --compile 2>&1 | tee "$OUT_DIR/bench_engine.txt"
