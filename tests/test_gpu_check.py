"""The prepared GPU call (scripts/gpu_engine_check.sh), dry-run on CPU at a tiny size: every part
ends with exit 0 in its own file and the benchmark figures are there, so the one device call a
session with a GPU gets is not spent on a broken script."""
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
