#!/usr/bin/env bash
# Issues 4 and 17's GPU figures in one device call (docs/benchmarks.md, "Generation engine"), in four
# timed parts, each writing its own file to $OUT (the device tool) or ./gpu_check, so a part that runs
# out of time or fails leaves the others' results:
#   1. bench_eager.txt: the engine on a random ~0.5B Llama (Qwen2.5-0.5B's shape, config built in
#      code) in bf16, 1,024 sequences in flight: every ratio of bench_engine.py against a baseline
#      timed in the same run (plain generation, naive ES, HF generate, train-step memory). On CUDA
#      the population adds its low-rank term through the Triton kernel (noise made in-kernel,
#      nothing read: Population(noise_kernel="auto"));
#   2. tests_cuda.txt: the engine tests on CUDA (EGGROLL_TEST_DEVICE=cuda), with the CUDA-graph test
#      (compile_decode=True records the decode step as a CUDA graph, replays give eager's
#      completions), and the Triton kernel's tests compiled on the GPU (equal to the torch path);
#   3. bench_torch_noise.txt: the eager ratios again with the low-rank term read from factors built
#      per block in torch (--noise-kernel torch), to set beside part 1's;
#   4. bench_compiled.txt: the same engines with the decode step captured (CUDA graphs), compiled /
#      eager and population / plain, graphs recorded and skipped, compiled-vs-eager agreement.
# Time limits: 180 s (eager), 150 s (tests), 90 s (torch noise), and what is left of 570 s for the
# captured part (its two compilations are the least predictable), so the whole script ends inside
# one 600 s device call.
#   5. bench_vllm.txt, a second device call (PARTS=vllm, limit T_VLLM=540 s): generation_backend='vllm'
#      (scripts/bench_vllm.py) on the same model, bf16: vLLM population / vLLM plain, vLLM population /
#      engine population, per-step adapter writing and weight push. It needs vLLM importable by
#      $VLLM_PYTHON (default python) on the GPU machine, which reaches no package index: a CUDA vLLM
#      wheel and its dependencies are far over the device tool's 64 MiB carry, so unless the machine
#      comes with vLLM the part writes "skipped: ..." and exits 0.
#
#   bash scripts/gpu_engine_check.sh                                  # on the GPU machine
#   PARTS=vllm bash scripts/gpu_engine_check.sh                       # the vLLM part, in its own call
#   DEVICE=cpu DTYPE=float32 SIZE="--hidden 64 --layers 2 --intermediate 128 --heads 4 --kv-heads 2 --vocab 512" \
#     POP=16 NEW=8 bash scripts/gpu_engine_check.sh                  # dry run of the same script on CPU
#   DEVICE=cpu DTYPE=float32 SIZE="--hidden 128 --layers 1 --intermediate 256 --heads 4 --kv-heads 2 --vocab 512" \
#     POP=8 NEW=4 PARTS=vllm VLLM_PYTHON=~/.cache/eggroll_ft/venv-vllm/bin/python VLLM_KV_GB=0.25 \
#     bash scripts/gpu_engine_check.sh                                # dry run of the vLLM part (head size >= 32)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT_DIR="${OUT:-gpu_check}"
mkdir -p "$OUT_DIR"
DEVICE="${DEVICE:-cuda}" DTYPE="${DTYPE:-bfloat16}" POP="${POP:-1024}" NEW="${NEW:-128}"
SIZE="${SIZE:---hidden 896 --layers 24 --intermediate 4864 --heads 14 --kv-heads 2 --vocab 151936}"
T_TOTAL="${T_TOTAL:-570}" T_EAGER="${T_EAGER:-180}" T_TESTS="${T_TESTS:-150}" T_TORCH_NOISE="${T_TORCH_NOISE:-90}"
T_VLLM="${T_VLLM:-540}"
PARTS="${PARTS:-eager tests torch_noise compiled}" VLLM_PYTHON="${VLLM_PYTHON:-python}" VLLM_KV_GB="${VLLM_KV_GB:-8}"
has() { [[ " $PARTS " == *" $1 "* ]]; }

part() {  # part NAME SECONDS COMMAND...: run with a time limit, output to $OUT_DIR/NAME.txt
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee "$OUT_DIR/$name.txt"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT_DIR/$name.txt"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$OUT_DIR/$name.txt"
}

{ python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv || true; } 2>&1 | tee "$OUT_DIR/env.txt"
# shellcheck disable=SC2086
BENCH=(python scripts/bench_engine.py --device "$DEVICE" --dtype "$DTYPE" $SIZE --population "$POP" --new-tokens "$NEW" --reps 3)
has eager && part bench_eager "$T_EAGER" "${BENCH[@]}" --naive-members 4 --naive-reps 1
has tests && EGGROLL_TEST_DEVICE="$DEVICE" part tests_cuda "$T_TESTS" python -m pytest -q -p no:cacheprovider \
  tests/test_engine.py tests/test_noise_kernel.py -rs
has torch_noise && part bench_torch_noise "$T_TORCH_NOISE" "${BENCH[@]}" --noise-kernel torch --reps 2 --naive-members 0 \
  --skip-hf --skip-memory
left=$((T_TOTAL - SECONDS)); [ "$left" -lt 60 ] && left=60
has compiled && part bench_compiled "${T_COMPILED:-$left}" "${BENCH[@]}" --compile --naive-members 0 --skip-hf --skip-memory
if has vllm; then
  if "$VLLM_PYTHON" -c "import vllm" >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    part bench_vllm "$T_VLLM" "$VLLM_PYTHON" scripts/bench_vllm.py --model "" --device "$DEVICE" --dtype "$DTYPE" $SIZE \
      --population "$POP" --new-tokens "$NEW" --max-loras "$(( POP < 256 ? POP : 256 ))" --kv-cache-gb "$VLLM_KV_GB" --reps 3
  else
    echo "== bench_vllm: skipped: vllm is not importable by $VLLM_PYTHON (see the header of this script)" | tee "$OUT_DIR/bench_vllm.txt"
  fi
fi
