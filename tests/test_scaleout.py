"""Scale-out: 1 and 2 processes give bit-identical results; failures stop every rank."""
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest

from eggroll_ft import EggrollConfig
from eggroll_ft.config import warn_if_cpu_multiprocess_ignored
from eggroll_ft.distributed import local_chunks
from eggroll_ft.testing import free_port

SCRIPT = Path(__file__).parent / "data" / "scaleout_script.py"
ROOT = Path(__file__).parents[1]


def _run(out, nproc, *extra, timeout=400, launcher="torchrun"):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT), str(out), *extra]
    elif launcher == "accelerate":  # as a user types it: `accelerate launch --multi_gpu --num_processes K script.py`
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(SCRIPT), str(out), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), str(SCRIPT), str(out), *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    return proc, time.time() - t0


def _result(out):
    return json.loads((Path(out) / "result.json").read_text())


def test_one_and_two_processes_are_bit_identical_in_training_and_evaluation(tmp_path):
    """Two processes launched as a user would on a machine without a GPU, `accelerate launch
    --multi_gpu --num_processes 2 script.py` with use_cpu left False, share the work (EggrollConfig
    joins them to their gloo group) instead of each training alone. Training gives the one-process
    weights, rewards and completions table (with a reward's log_extra column); evaluation runs the
    same sharded rollout: each process scores half of the 8 eval jobs, both report the one-process
    metrics."""
    one, _ = _run(tmp_path / "one", 1, "--eval")
    assert one.returncode == 0, one.stderr[-3000:]
    two, _ = _run(tmp_path / "two", 2, "--eval", "--no-use-cpu", launcher="accelerate")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "terminate called" not in two.stderr
    r1, r2 = _result(tmp_path / "one"), _result(tmp_path / "two")
    assert r1["world_size"] == 1 and r2["world_size"] == 2 and r2["use_cpu"]
    assert r1["weights_sha256"] == r2["weights_sha256"]
    assert r1["rewards"] == r2["rewards"] and len(r1["rewards"]) == 3
    assert r1["eval"] == r2["eval"] and set(r1["eval"]) >= {"eval_reward", "eval_rewards/target_fraction/mean"}
    scored = {run: [json.loads((tmp_path / run / f"eval_scored_rank{r}.json").read_text()) for r in range(n)]
              for run, n in (("one", 1), ("two", 2))}
    assert scored == {"one": [8], "two": [4, 4]}
    tables = [pd.read_parquet(tmp_path / run / "completions" / "completions_00003.parquet") for run in ("one", "two")]
    assert len(tables[0]) == 16 and "target_count" in tables[0] and tables[0].equals(tables[1])


def test_a_launch_this_process_cannot_join_fails_naming_the_fix(tmp_path, monkeypatch):
    """WORLD_SIZE=2 on a machine taken to have a GPU (so use_cpu is not set for the user) while this
    process has no rank: it would train alone, so the config refuses."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr("eggroll_ft.config._has_distributed_accelerator", lambda: True)
    with pytest.raises(ValueError, match="WORLD_SIZE=2 processes were launched but this process joined world_size=1"):
        EggrollConfig(str(tmp_path), report_to="none")


def test_process_group_is_destroyed_at_exit(tmp_path):
    """The trainer's exit handler destroys the process group before interpreter finalization (a
    two-process CPU run that had finished and written its results aborted at exit in 14 of 44
    launches without it: gloo threads, pytorch/pytorch#179291). An exit handler registered before
    ours runs after it (LIFO) and sees the group gone."""
    script = f"""
import atexit
import torch.distributed as dist
from eggroll_ft.distributed import destroy_process_group_at_exit
dist.init_process_group("gloo", init_method="file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
atexit.register(lambda: print("initialized at exit:", dist.is_initialized()))
print("registered:", destroy_process_group_at_exit(), destroy_process_group_at_exit())
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:2] == ["registered: True False", "initialized at exit: False"], proc.stdout


def test_reward_error_on_one_rank_stops_all_ranks(tmp_path):
    proc, seconds = _run(tmp_path / "fail", 2, "--fail-rank", "1", timeout=300)
    assert proc.returncode != 0
    assert "The reward function 'target_fraction' raised ValueError: reward server unreachable" in proc.stderr
    assert proc.stderr.count("reward server unreachable") >= 2  # both ranks raise it, none waits


@pytest.mark.slow
def test_dead_rank_ends_the_run(tmp_path):
    proc, seconds = _run(tmp_path / "die", 2, "--die-rank", "1", timeout=300)
    assert proc.returncode != 0
    assert "exitcode" in proc.stderr or "ChildFailedError" in proc.stderr


@pytest.mark.slow
def test_resume_with_another_number_of_processes(tmp_path):
    full, _ = _run(tmp_path / "full", 1)
    assert full.returncode == 0, full.stderr[-3000:]
    part, _ = _run(tmp_path / "res", 2, "--steps", "2", "--save-steps", "2")
    assert part.returncode == 0, part.stderr[-3000:]
    resumed, _ = _run(tmp_path / "res", 1, "--steps", "3", "--resume", str(tmp_path / "res" / "checkpoint-2"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _result(tmp_path / "res")["weights_sha256"] == _result(tmp_path / "full")["weights_sha256"]


def test_chunks_cover_every_job_once_for_any_world_size():
    for world in (1, 2, 3, 5):
        seen = sorted(j for r in range(world) for c in local_chunks(37, 4, world, r) for j in c)
        assert seen == list(range(37))


def test_cpu_flag_with_many_processes_is_detected(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.warns(UserWarning, match="--multi_gpu --num_processes"):
        assert warn_if_cpu_multiprocess_ignored()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_cpu_multiprocess_ignored()
