"""Benchmark: a seed-replay log against a full checkpoint, on SmolLM2-135M-Instruct.

    taskset -c 0 python scripts/bench_replay.py --steps 4
    taskset -c 0 python scripts/bench_replay.py --hashes    # the digest: xxh3-128 against blake2b, sha256

Trains ``--steps`` ES steps twice, with plain SGD and with AdamW (population ``--population``, one
prompt per step of the arithmetic task (``rewards/arithmetic.py``, 2-digit additions,
``arithmetic_reward`` plus 0.1 ``arithmetic_format_reward``, the plain template, as
``recipes/configs/arithmetic/tiny_cpu.yaml``), ``--tokens`` new tokens), each writing ``es_replay.jsonl`` and saving the
final checkpoint as ``transformers.Trainer`` does. For each run it prints:

- the log's bytes per step (and its header) against the full checkpoint's (``model.safetensors``,
  plus ``optimizer.pt`` for AdamW);
- what logging costs per step: the digest of the perturbed weights and two fsynced lines (wall
  time), against the training step's CPU time in the same run;
- what replaying costs per step (``replay(base, log)`` over ``replay(base, log, until_step=0)``,
  which only loads and checks the base), against loading the saved checkpoint, and whether the
  replayed weights equal the checkpoint's bit for bit.

Times are CPU seconds of the process (one thread), except the fsync's wall time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from eggroll_ft import EggrollConfig, EggrollTrainer  # noqa: E402
from eggroll_ft.models.loading import load_causal_lm  # noqa: E402
from eggroll_ft.models.named import resolve_model_name  # noqa: E402
from eggroll_ft.replay import LOG_NAME, perturbed_digest, read_log, replay  # noqa: E402
from rewards.arithmetic import arithmetic_format_reward, arithmetic_reward, make_arithmetic_splits  # noqa: E402


def timed(fn, repeats: int = 1, clock=time.process_time) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls, and the last result. CPU seconds of this process by
    default, not wall time: the benchmark runs on one thread on a core other jobs share."""
    times, result = [], None
    for _ in range(repeats):
        t = clock()
        result = fn()
        times.append(clock() - t)
    return statistics.median(times), result


class StepCPUTime(TrainerCallback):
    """CPU seconds of each training step, from its begin to its end (the update included)."""

    def __init__(self):
        self.seconds, self._t = [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.process_time() - self._t)


def run(base: str, optim: str, a, out: str) -> dict:
    lr = {"sgd": 1e-4, "adamw_torch": 1e-5}[optim]
    args = EggrollConfig(output_dir=out, max_steps=a.steps, population_size=a.population, prompts_per_step=1,
                         max_completion_length=a.tokens, sigma=0.01, reward_weights=[1.0, 0.1], learning_rate=lr, optim=optim, seed=0,
                         save_strategy="steps", save_steps=a.steps, report_to="none", use_cpu=True, logging_steps=1,
                         disable_tqdm=True)
    clock = StepCPUTime()
    train = make_arithmetic_splits("add2", num_train=64, num_validation=4, num_test=4, template=a.template)["train"]
    trainer = EggrollTrainer(base, [arithmetic_reward, arithmetic_format_reward], args=args, train_dataset=train, callbacks=[clock])
    trainer.train()
    step_time = statistics.mean(clock.seconds)  # the log's digest (a callback after this one's) not included
    digest_s, _ = timed(lambda: perturbed_digest(trainer.population), repeats=3)
    log = os.path.join(out, LOG_NAME)
    with open(log, "rb") as f:
        header_bytes = len(f.readline())
    checkpoint = os.path.join(out, f"checkpoint-{a.steps}")
    files = {name: os.path.getsize(os.path.join(checkpoint, name)) for name in os.listdir(checkpoint)}
    with tempfile.NamedTemporaryFile("w", dir=out) as f:  # one fsynced line, as ReplayLog writes them
        with open(log) as g:
            line = g.read().splitlines()[1]
        fsync_s, _ = timed(lambda: (f.write(line + "\n"), f.flush(), os.fsync(f.fileno())), repeats=20,
                           clock=time.perf_counter)  # wall: the disk's time, not this process's
    load_s, _ = timed(lambda: replay(base, log, until_step=0))
    full_s, replayed = timed(lambda: replay(base, log))
    ckpt_load_s, _ = timed(lambda: load_causal_lm(checkpoint))
    saved = load_file(os.path.join(checkpoint, "model.safetensors"))
    ours = replayed.model.state_dict()
    return {
        "optim": optim, "steps": a.steps, "nonzero_fitness_steps": sum(any(x != 0 for x in s["fitness"])
                                                                     for s in read_log(log).steps),
        "log_bytes": os.path.getsize(log), "header_bytes": header_bytes,
        "log_bytes_per_step": (os.path.getsize(log) - header_bytes) / a.steps,
        "model_bytes": files["model.safetensors"], "optimizer_bytes": files.get("optimizer.pt", 0),
        "checkpoint_bytes": sum(files.values()),
        "step_time_s": step_time, "digest_s": digest_s, "fsync_s": fsync_s,
        "replay_load_s": load_s, "replay_per_step_s": (full_s - load_s) / a.steps, "checkpoint_load_s": ckpt_load_s,
        "identical": all(torch.equal(saved[k], ours[k]) for k in saved),
    }


def compare_hashes(base: str) -> None:
    """CPU seconds to digest the perturbed weights with xxh3-128 (what the log uses) and with the
    standard library's blake2b and sha256 (the baselines), best of 3."""
    import hashlib

    import xxhash

    from eggroll_ft.noise import NoiseConfig
    from eggroll_ft.population import Population

    pop = Population(load_causal_lm(base), NoiseConfig(), 2, 1e-3)
    arrays = [p.weight.detach().contiguous().view(torch.uint8).numpy() for _, p in sorted(pop.params.items())]

    def digest(make):
        h = make()
        for a in arrays:
            h.update(a)
        return h.hexdigest()

    print(f"{sum(a.nbytes for a in arrays):,} bytes of perturbed weights")
    for name, make in [("xxh3_128", xxhash.xxh3_128), ("blake2b", hashlib.blake2b), ("sha256", hashlib.sha256)]:
        print(f"{name}: {min(timed(lambda make=make: digest(make))[0] for _ in range(3)):.3f} s")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4)
    p.add_argument("--optims", default="sgd,adamw_torch")
    p.add_argument("--template", default="plain", help="'plain' (Question: ... Answer:) answers in a few tokens; "
                   "under 'chat' the model writes a sentence first, so 4 tokens give every member reward 0")
    p.add_argument("--hashes", action="store_true", help="only compare digest functions over the weights")
    a = p.parse_args()
    torch.set_num_threads(1)
    base = resolve_model_name("smollm2-135m-instruct")
    if a.hashes:
        return compare_hashes(base)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for optim in a.optims.split(","):
            rows.append(run(base, optim, a, os.path.join(tmp, optim)))
            print(rows[-1], flush=True)
    print(f"\nSmolLM2-135M-Instruct, {a.steps} steps, population {a.population}, 1 prompt, {a.tokens} new tokens, "
          f"template {a.template}\n")
    print("| optim | log bytes/step (header) | checkpoint bytes (model + optimizer) | checkpoint / log-step "
          "| digest s/step | fsync s/line | train s/step | logging / train step | replay s/step "
          "| replay load+checks s | checkpoint load s | replay / train step | bit-identical |")
    print("| --- " * 13 + "|")
    for r in rows:
        log_cost = r["digest_s"] + 2 * r["fsync_s"]
        print(f"| {r['optim']} | {r['log_bytes_per_step']:,.0f} ({r['header_bytes']:,}) "
              f"| {r['checkpoint_bytes']:,} ({r['model_bytes']:,} + {r['optimizer_bytes']:,}) "
              f"| {r['checkpoint_bytes'] / r['log_bytes_per_step']:,.0f}x | {r['digest_s']:.3f} | {r['fsync_s']:.4f} "
              f"| {r['step_time_s']:.2f} | {log_cost / r['step_time_s']:.1%} | {r['replay_per_step_s']:.2f} "
              f"| {r['replay_load_s']:.2f} | {r['checkpoint_load_s']:.2f} "
              f"| {r['replay_per_step_s'] / r['step_time_s']:.2f} | {r['identical']} |")


if __name__ == "__main__":
    main()
