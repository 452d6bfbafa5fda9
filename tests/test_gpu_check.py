"""The prepared GPU call (scripts/gpu_engine_check.sh), dry-run on CPU at a tiny size: every part
ends with exit 0 in its own file and the benchmark figures are there, so the one device call a
session with a GPU gets is not spent on a broken script."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _figures(text: str) -> dict:
    lines = text.splitlines()
    start = lines.index("{")
    end = len(lines) - 1 - lines[::-1].index("}")
    return json.loads("\n".join(lines[start:end + 1]))


@pytest.mark.slow
def test_gpu_engine_check_dry_run_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "DEVICE": "cpu", "DTYPE": "float32", "POP": "8", "NEW": "4",
           "SIZE": "--hidden 32 --layers 1 --intermediate 64 --heads 4 --kv-heads 2 --vocab 128",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", str(ROOT / "scripts" / "gpu_engine_check.sh")], env=env, check=True,
                   capture_output=True, timeout=600)
    parts = {name: (tmp_path / f"{name}.txt").read_text()
             for name in ("bench_eager", "tests_cuda", "bench_torch_noise", "bench_compiled")}
    for name, text in parts.items():
        assert text.rstrip().splitlines()[-1].startswith(f"== {name}: exit 0 after"), (name, text[-2000:])
    eager = _figures(parts["bench_eager"])
    assert eager["population_over_naive"] > 1 and eager["memory"]["train_over_infer"] > 0
    assert eager["population_over_hf_generate"] > 0 and eager["slots"] == 8
    assert _figures(parts["bench_torch_noise"])["population_over_plain"] > 0
    compiled = _figures(parts["bench_compiled"])
    assert compiled["compiled_vs_eager_completions"] == {"jobs_equal": 1.0, "first_token_equal": 1.0}
    assert compiled["compiled_over_eager_population"] > 0 and "cuda_graphs" not in compiled
    assert " passed" in parts["tests_cuda"] and "CUDA graphs: run with EGGROLL_TEST_DEVICE=cuda" in parts["tests_cuda"]


VLLM_PYTHON = Path(os.environ.get("VLLM_VENV", Path.home() / ".cache" / "eggroll_ft" / "venv-vllm")) / "bin" / "python"


def _vllm_part(tmp_path, python: str) -> str:
    env = {**os.environ, "OUT": str(tmp_path), "DEVICE": "cpu", "DTYPE": "float32", "POP": "8", "NEW": "4",
           "PARTS": "vllm", "VLLM_PYTHON": python, "VLLM_KV_GB": "0.25",
           "SIZE": "--hidden 128 --layers 1 --intermediate 256 --heads 4 --kv-heads 2 --vocab 512",  # head size 32
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", str(ROOT / "scripts" / "gpu_engine_check.sh")], env=env, check=True,
                   capture_output=True, timeout=600)
    assert not (tmp_path / "bench_eager.txt").exists()  # PARTS=vllm runs that part alone
    return (tmp_path / "bench_vllm.txt").read_text()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed in this environment")
def test_gpu_engine_check_vllm_part_says_when_vllm_is_missing(tmp_path):
    assert "bench_vllm: skipped: vllm is not importable by python" in _vllm_part(tmp_path, "python")


@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"no vLLM environment at {VLLM_PYTHON} (scripts/setup_vllm_env.sh)")
def test_gpu_engine_check_vllm_part_dry_run_on_cpu(tmp_path):
    text = _vllm_part(tmp_path, str(VLLM_PYTHON))
    assert text.rstrip().splitlines()[-1].startswith("== bench_vllm: exit 0 after"), text[-2000:]
    figures = _figures(text)
    assert figures["vllm_population_over_vllm_plain"] > 0 and figures["vllm_population_over_engine_population"] > 0
    assert figures["adapter_write_seconds_per_step"] > 0 and figures["max_loras"] == 8
