"""Samples per second of EggrollTrainer with K processes over 1 process, measured in one run.

    python scripts/bench_scaleout.py                  # 2 processes vs 1, one thread each
    python scripts/bench_scaleout.py --threads 2      # baseline 1 process with 2 threads too

Each configuration runs the same short training (same seed, same population, same prompts) in a
fresh subprocess; the worker reports completions generated per second of training, excluding
start-up. Runs are interleaved (1, K, 1, K, ...) and medians reported, so a loaded machine biases
both sides alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def worker(out: str, steps: int, hidden: int, layers: int, population: int, prompts: int, tokens: int):
    from datasets import Dataset

    from eggroll_ft import EggrollConfig, EggrollTrainer
    from eggroll_ft.testing import char_fraction_reward, char_tokenizer, tiny_llama

    tok = char_tokenizer("abcdefgh ")
    model = tiny_llama(len(tok), hidden=hidden, layers=layers, init_std=0.5)
    ds = Dataset.from_dict({"prompt": ["abc", "hgf", "dde", "bag", "cab", "fed", "ace", "bad"]})
    jobs = population * prompts
    args = EggrollConfig(output_dir=out, max_steps=steps, population_size=population, sigma=0.1,
                         learning_rate=0.01, prompts_per_step=prompts, max_completion_length=tokens,
                         max_sequences_in_flight=jobs // 2, report_to="none",
                         use_cpu=True, save_strategy="no", logging_steps=steps, disable_tqdm=True)
    trainer = EggrollTrainer(model, char_fraction_reward("a"), args=args, train_dataset=ds, processing_class=tok)
    trainer.train()  # warm-up step timing is included in step_time; we use the median step
    if trainer.is_world_process_zero():
        with open(os.path.join(out, "bench.json"), "w") as f:
            json.dump({"train_runtime": trainer.state.log_history[-1]["train_runtime"], "jobs": jobs,
                       "steps": steps}, f)


def run(nproc: int, threads: int, a) -> float:
    out = tempfile.mkdtemp(prefix=f"scaleout{nproc}_")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    worker_args = ["--worker", out, "--steps", str(a.steps), "--hidden", str(a.hidden), "--layers", str(a.layers),
                   "--population", str(a.population), "--prompts", str(a.prompts), "--tokens", str(a.tokens)]
    if nproc == 1:
        cmd = [sys.executable, __file__, *worker_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), __file__, *worker_args]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    with open(os.path.join(out, "bench.json")) as f:
        r = json.load(f)
    return r["jobs"] * r["steps"] / r["train_runtime"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--worker", default=None)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the 1-process baseline")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--population", type=int, default=32)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--tokens", type=int, default=24)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.steps, a.hidden, a.layers, a.population, a.prompts, a.tokens)
    one, many = [], []
    for _ in range(a.repeats):
        one.append(run(1, a.threads, a))
        many.append(run(a.nproc, 1, a))
        print(f"1 process ({a.threads} thread(s)): {one[-1]:.1f} samples/s   {a.nproc} processes: {many[-1]:.1f} samples/s",
              flush=True)
    m1, mk = statistics.median(one), statistics.median(many)
    print(f"median samples/s: 1 process {m1:.1f}, {a.nproc} processes {mk:.1f}; ratio {mk / m1:.2f}x "
          f"(load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
