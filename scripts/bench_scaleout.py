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

from transformers import TrainerCallback

from eggroll_ft.testing import free_port


class StepTimer(TrainerCallback):
    """Wall-clock of each training step (every process leaves a step together: the rewards gather)."""

    def __init__(self):
        self.times, self._t = [], None

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)


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
    phases = {"step": 0.0, "generate": 0.0, "rewards": 0.0, "generate+score+gather": 0.0, "update": 0.0}

    def timed(name, fn):
        def run(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[name] += time.perf_counter() - t
        return run

    class PhaseTimedTrainer(EggrollTrainer):
        """Seconds spent in each phase of the ES step, summed over the run (this process)."""

        def training_step(self, *a, **kw):
            return timed("step", super().training_step)(*a, **kw)

        def _generate(self, *a, **kw):
            return timed("generate", super()._generate)(*a, **kw)

        def _calculate_rewards(self, *a, **kw):
            return timed("rewards", super()._calculate_rewards)(*a, **kw)

        def _generate_and_score_completions(self, *a, **kw):
            return timed("generate+score+gather", super()._generate_and_score_completions)(*a, **kw)

        def _es_update(self, *a, **kw):
            return timed("update", super()._es_update)(*a, **kw)

    step_times = StepTimer()
    trainer = PhaseTimedTrainer(model, char_fraction_reward("a"), args=args, train_dataset=ds, processing_class=tok,
                                callbacks=[step_times])
    trainer.train()
    rank = trainer.args.process_index
    with open(os.path.join(out, f"phases{rank}.json"), "w") as f:
        json.dump(phases, f)
    if trainer.is_world_process_zero():
        with open(os.path.join(out, "bench.json"), "w") as f:
            json.dump({"train_runtime": trainer.state.log_history[-1]["train_runtime"], "jobs": jobs,
                       "steps": steps, "step_times": step_times.times}, f)


def ceiling_worker(hidden: int, seconds_out: str):
    """The machine's own limit: a fixed decode-like torch workload (small linears, one thread), no
    eggroll_ft, no communication. Run alone and as two concurrent copies by ``ceiling``."""
    import torch

    torch.set_num_threads(1)
    x, w = torch.randn(64, hidden), torch.randn(hidden, hidden)
    for _ in range(200):
        torch.nn.functional.linear(x, w)
    t = time.perf_counter()
    for _ in range(20000 * 128 // hidden):
        torch.nn.functional.linear(x, w)
    with open(seconds_out, "w") as f:
        f.write(str(time.perf_counter() - t))


def ceiling(nproc: int, hidden: int) -> float:
    """Throughput of ``nproc`` concurrent copies of ``ceiling_worker`` over one copy alone."""
    def launch(k):
        with tempfile.TemporaryDirectory(prefix="ceiling_") as tmp:
            outs = [os.path.join(tmp, str(i)) for i in range(k)]
            procs = [subprocess.Popen([sys.executable, __file__, "--ceiling-worker", o, "--hidden", str(hidden)],
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}) for o in outs]
            for p in procs:
                p.wait()
            return [float(open(o).read()) for o in outs]

    alone = launch(1)[0]
    together = launch(nproc)
    return nproc * alone / max(together)


def run(nproc: int, threads: int, a) -> tuple[float, float, list[dict]]:
    """(samples/s over the whole training, samples/s of the median step after the first, each
    process's seconds per phase)."""
    out = tempfile.mkdtemp(prefix=f"scaleout{nproc}_")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    worker_args = ["--worker", out, "--steps", str(a.steps), "--hidden", str(a.hidden), "--layers", str(a.layers),
                   "--population", str(a.population), "--prompts", str(a.prompts), "--tokens", str(a.tokens)]
    if nproc == 1:
        cmd = [sys.executable, __file__, *worker_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), __file__, *worker_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "bench.json")) as f:
        r = json.load(f)
    phases = [json.loads(open(os.path.join(out, f"phases{k}.json")).read()) for k in range(nproc)]
    return r["jobs"] * r["steps"] / r["train_runtime"], r["jobs"] / statistics.median(r["step_times"][1:]), phases


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--worker", default=None)
    p.add_argument("--ceiling-worker", default=None)
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
    if a.ceiling_worker:
        return ceiling_worker(a.hidden, a.ceiling_worker)
    if a.worker:
        return worker(a.worker, a.steps, a.hidden, a.layers, a.population, a.prompts, a.tokens)
    one, many = [], []
    for _ in range(a.repeats):
        one.append(run(1, a.threads, a))
        many.append(run(a.nproc, 1, a))
        print(f"1 process ({a.threads} thread(s)): {one[-1][0]:.1f} samples/s (median step {one[-1][1]:.1f})   "
              f"{a.nproc} processes: {many[-1][0]:.1f} samples/s (median step {many[-1][1]:.1f})", flush=True)
    for k, what in ((0, "whole training (train_runtime)"), (1, "median step (steady state)")):
        m1, mk = statistics.median(r[k] for r in one), statistics.median(r[k] for r in many)
        print(f"{what}: median samples/s 1 process {m1:.1f}, {a.nproc} processes {mk:.1f}; ratio {mk / m1:.2f}x")
    for label, r in (("1 process", one[-1]), (f"{a.nproc} processes", many[-1])):
        for rank, ph in enumerate(r[2]):
            rest = ph["generate+score+gather"] - ph["generate"] - ph["rewards"]
            print(f"phases, last run, {label}, rank {rank}: step {ph['step']:.2f} s = generate {ph['generate']:.2f} + "
                  f"rewards {ph['rewards']:.2f} + gather/bookkeeping {rest:.2f} + update {ph['update']:.2f} + other "
                  f"{ph['step'] - ph['generate+score+gather'] - ph['update']:.2f}")
    ceilings = [ceiling(a.nproc, a.hidden) for _ in range(a.repeats)]
    print(f"machine ceiling ({a.nproc} concurrent copies of a plain torch decode-like loop over 1, no eggroll_ft): "
          f"{statistics.median(ceilings):.2f}x ({', '.join(f'{c:.2f}' for c in ceilings)})")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
