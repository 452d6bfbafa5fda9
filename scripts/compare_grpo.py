"""Head-to-head: EggrollTrainer vs TRL's GRPOTrainer on one model, one data set, one reward, one budget.

    python scripts/compare_grpo.py --config scripts/configs/compare_grpo.yaml [--budget_seconds 600 ...]
    python scripts/compare_grpo.py --config scripts/configs/compare_grpo.yaml --sweep true   # tune first

What makes the comparison fair, top to bottom:

1. Same base model: each method loads a fresh copy from the same checkpoint (default: the tiny
   character-level Countdown model of ``rewards/countdown_base.py``, built into the cache on first use).
2. Same data and reward: the same generated training prompts (disjoint from the held-out ones) and
   the same reward functions and weights (``rewards/``) for both trainers.
3. Same budget: training wall-clock seconds (evaluation time excluded) or completions generated,
   counted by the same wrapper around the first reward function (``eggroll_ft.compare``).
4. Same judge: the unperturbed model is scored greedily with Hugging Face ``generate`` on the same
   held-out prompts (task accuracy = mean ``countdown_reward``) at step 0 and every
   ``eval_every_seconds`` of training.
5. Each method runs in its own subprocess with the same torch thread count, so its peak RSS
   (``getrusage(RUSAGE_SELF).ru_maxrss``) is its own; the RSS right after imports is reported too.
6. Method settings come from the config (``eggroll:`` and ``grpo:`` blocks); ``--sweep true`` first
   runs short runs over GRPO's learning rate and EGGROLL's sigma x learning rate, scored on a
   separate validation set, keeps them in ``sweep.csv`` and uses the best of each.

Outputs in ``output_dir``: results.csv, curves.png, summary.md (+ sweep.csv, runs/<name>/rows.json).
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Union

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # rewards/ and scripts/ live beside the package
    sys.path.insert(0, str(ROOT))

METHODS = ("grpo", "eggroll")
TASKS = ("countdown", "arithmetic")
COLUMNS = ["method", "step", "wall_clock_s", "completions", "train_reward", "eval_accuracy", "peak_rss_mb"]


@dataclass
class CompareArguments:
    """Everything a comparison needs; ``eggroll``/``grpo`` hold each trainer's own config fields."""

    output_dir: str = field(default="runs/compare_grpo", metadata={"help": "Where results.csv, curves.png, summary.md go."})
    model_name_or_path: str = field(default="tiny-countdown-base", metadata={
        "help": "Base model: a path, a hub id or a named model ('smollm2-135m-instruct', 'tiny-countdown-base': "
                "built into the cache on first use)."})
    task: str = field(default="countdown", metadata={"help": f"Task, one of {TASKS}: its prompts, rewards and accuracy."})
    level: str = field(default="add2", metadata={"help": "Arithmetic difficulty (rewards/arithmetic.py LEVELS)."})
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": f"Methods to run, of {METHODS}."})
    budget_seconds: float = field(default=600.0, metadata={"help": "Training wall-clock budget per method (0 = none)."})
    budget_completions: int = field(default=0, metadata={"help": "Completions-generated budget per method (0 = none)."})
    eval_every_seconds: float = field(default=60.0, metadata={"help": "Training seconds between held-out evaluations."})
    num_train: int = field(default=5000, metadata={"help": "Generated training problems."})
    num_eval: int = field(default=128, metadata={"help": "Held-out problems scored greedily."})
    dataset_seed: int = field(default=1, metadata={"help": "Seed of the training problems."})
    eval_seed: int = field(default=1_000_003, metadata={
        "help": "Countdown: seed of the held-out problems (make_tiny_base's held-out set). Arithmetic has fixed splits."})
    sweep_eval_seed: int = field(default=2_000_003, metadata={"help": "Countdown: seed of the sweep's validation problems."})
    min_numbers: int = field(default=3, metadata={"help": "Fewest numbers per problem."})
    max_numbers: int = field(default=3, metadata={"help": "Most numbers per problem."})
    max_value: int = field(default=100, metadata={"help": "Numbers and targets in 1..max_value."})
    template: str = field(default="minimal", metadata={"help": "Prompt template of rewards/countdown.py."})
    reward_funcs: list[str] = field(default_factory=lambda: ["countdown", "countdown_format"], metadata={
        "help": "Training rewards (rewards/ names); the first one's calls count completions."})
    reward_weights: list[float] = field(default_factory=lambda: [1.0, 0.1], metadata={"help": "Weight of each reward."})
    max_completion_length: int = field(default=40, metadata={"help": "Most tokens per completion (training and eval)."})
    seed: int = field(default=0, metadata={"help": "Training seed of both trainers."})
    threads: int = field(default=1, metadata={"help": "torch threads of each method's process (the same for both)."})
    isolate: bool = field(default=True, metadata={
        "help": "Run each method in its own subprocess (per-method peak RSS); false: in this process, one after "
                "the other (faster start; peak RSS is then the process's peak so far, not per method)."})
    accuracy_levels: list[float] = field(default_factory=lambda: [0.3, 0.35, 0.4], metadata={
        "help": "summary.md reports time and completions to first reach each held-out accuracy."})
    eggroll: Union[dict, str] = field(default_factory=dict, metadata={"help": "EggrollConfig fields (YAML mapping)."})
    grpo: Union[dict, str] = field(default_factory=dict, metadata={"help": "GRPOConfig fields (YAML mapping)."})
    eval_split: str = field(default="test", metadata={
        "help": "Problems the main runs are scored on: 'test' (held out: report these) or 'validation' (tune on these)."})
    sweep: bool = field(default=False, metadata={"help": "Tune each method with short runs before the main runs."})
    sweep_budget_seconds: float = field(default=60.0, metadata={"help": "Budget of each sweep run."})
    sweep_grpo_learning_rate: list[float] = field(default_factory=lambda: [1e-5, 1e-4, 1e-3], metadata={
        "help": "GRPO learning rates tried by the sweep."})
    sweep_eggroll_sigma: list[float] = field(default_factory=lambda: [0.01, 0.03], metadata={"help": "EGGROLL sigmas tried."})
    sweep_eggroll_learning_rate: list[float] = field(default_factory=lambda: [0.003, 0.01, 0.03], metadata={
        "help": "EGGROLL learning rates tried (each with every sigma)."})

    def __post_init__(self):
        for name in ("eggroll", "grpo"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, json.loads(getattr(self, name) or "{}"))
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods={self.methods!r} must be a non-empty list of {METHODS}")
        if self.budget_seconds <= 0 and self.budget_completions <= 0:
            raise ValueError(f"budget_seconds={self.budget_seconds} and budget_completions={self.budget_completions}: set one > 0")
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights={self.reward_weights} needs one weight per reward in {self.reward_funcs}")
        if self.eval_split not in ("test", "validation"):
            raise ValueError(f"eval_split={self.eval_split!r} must be 'test' or 'validation'")
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} must be one of {TASKS}")
        if self.num_eval < 1 or self.num_train < 1 or self.threads < 1:
            raise ValueError(f"num_eval={self.num_eval}, num_train={self.num_train}, threads={self.threads} must be >= 1")


# ---- one method, in its own process ---------------------------------------------------------------

def datasets_for(a: CompareArguments, split: str):
    """``(train, eval_set, accuracy_reward, eval_columns)``: ``split`` is "test" (held out) or "validation".

    Training never contains an evaluation problem. Countdown draws its evaluation problems from
    ``eval_seed`` / ``sweep_eval_seed``; arithmetic has fixed test and validation splits.
    """
    if a.task == "arithmetic":
        from rewards.arithmetic import arithmetic_reward, make_arithmetic_splits

        num_test, num_val = (a.num_eval, 256) if split == "test" else (512, a.num_eval)
        splits = make_arithmetic_splits(a.level, num_train=a.num_train, num_validation=num_val, num_test=num_test,
                                        template=a.template, seed=a.dataset_seed)
        ev = splits[split]
        return splits["train"], ev, arithmetic_reward, {"answer": ev["answer"]}
    from rewards.countdown import countdown_reward, make_countdown_dataset

    kw = dict(template=a.template, min_numbers=a.min_numbers, max_numbers=a.max_numbers, max_value=a.max_value)
    heldout = make_countdown_dataset(a.num_eval, seed=a.eval_seed if split == "test" else a.sweep_eval_seed, **kw)
    held = {(tuple(n), t) for n, t in zip(heldout["nums"], heldout["target"])}
    train = make_countdown_dataset(a.num_train, seed=a.dataset_seed, **kw)
    train = train.filter(lambda r: (tuple(r["nums"]), r["target"]) not in held)
    return train, heldout, countdown_reward, {"nums": heldout["nums"], "target": heldout["target"]}


def run_method(spec: dict) -> None:
    """Train one method under the budget and write ``<run_dir>/rows.json`` (called in a subprocess)."""
    import torch
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from eggroll_ft import EggrollConfig, EggrollTrainer
    from eggroll_ft.compare import BudgetCallback, CountingReward, greedy_accuracy, peak_rss_mb
    import rewards  # noqa: F401  (registers the task rewards)
    from eggroll_ft.reward_funcs import resolve_reward_func

    a, method, settings, run_dir = CompareArguments(**spec["args"]), spec["method"], spec["settings"], spec["run_dir"]
    torch.set_num_threads(a.threads)
    rss_after_imports = peak_rss_mb()
    train, heldout, accuracy_reward, columns = datasets_for(a, spec["split"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    counter = CountingReward(resolve_reward_func(a.reward_funcs[0]))
    reward_funcs = [counter, *(resolve_reward_func(r) for r in a.reward_funcs[1:])]
    common = dict(output_dir=run_dir, max_steps=10**7, logging_steps=1, save_strategy="no", report_to="none",
                  seed=a.seed, use_cpu=True, lr_scheduler_type="constant", disable_tqdm=True,
                  max_completion_length=a.max_completion_length, reward_weights=a.reward_weights)
    if method == "grpo":
        args = GRPOConfig(**{**common, "bf16": False, "gradient_checkpointing": False, **settings})
        trainer = GRPOTrainer(model=spec["model_path"], reward_funcs=reward_funcs, args=args, train_dataset=train,
                              processing_class=tokenizer)
    else:
        args = EggrollConfig(**{**common, **settings})
        trainer = EggrollTrainer(model=spec["model_path"], reward_funcs=reward_funcs, args=args, train_dataset=train,
                                 processing_class=tokenizer)

    def evaluate():
        return greedy_accuracy(trainer.model, tokenizer, heldout["prompt"], columns, accuracy_reward,
                               a.max_completion_length, per_problem=True)

    budget = BudgetCallback(evaluate, counter, max_seconds=a.budget_seconds, max_completions=a.budget_completions,
                            eval_every_seconds=a.eval_every_seconds, method=spec["name"])
    trainer.add_callback(budget)
    trainer.train()
    with open(os.path.join(run_dir, "rows.json"), "w") as f:
        json.dump({"rows": budget.rows, "rss_after_imports_mb": round(rss_after_imports, 1), "settings": settings,
                   "threads": torch.get_num_threads()}, f, indent=1)


def launch(a: CompareArguments, name: str, method: str, settings: dict, model_path: str, split: str,
           budget_seconds: float | None = None) -> dict:
    """Run one method in a fresh Python process; returns its rows.json content."""
    run_dir = os.path.join(a.output_dir, "runs", name)
    os.makedirs(run_dir, exist_ok=True)
    args = {**asdict(a), **({"budget_seconds": budget_seconds} if budget_seconds is not None else {})}
    spec = {"args": args, "name": name, "method": method, "settings": settings, "run_dir": run_dir,
            "model_path": model_path, "split": split}
    spec_path = os.path.join(run_dir, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=1)
    print(f"[compare_grpo] {name}: {settings}", flush=True)
    if not a.isolate:
        run_method(spec)
        return json.loads(Path(run_dir, "rows.json").read_text())
    with open(os.path.join(run_dir, "log.txt"), "w") as log:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--run_spec", spec_path],
                              stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
    if proc.returncode != 0:
        tail = Path(run_dir, "log.txt").read_text()[-3000:]
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); end of {run_dir}/log.txt:\n{tail}")
    with open(os.path.join(run_dir, "rows.json")) as f:
        return json.load(f)


# ---- sweep, report ------------------------------------------------------------------------------

def run_sweep(a: CompareArguments, model_path: str) -> dict:
    """Short runs on the validation problems; writes sweep.csv; returns the best settings per method."""
    grid = {"grpo": [{"learning_rate": lr} for lr in a.sweep_grpo_learning_rate],
            "eggroll": [{"sigma": s, "learning_rate": lr}
                        for s, lr in itertools.product(a.sweep_eggroll_sigma, a.sweep_eggroll_learning_rate)]}
    results, best = [], {}
    for method in a.methods:
        for k, change in enumerate(grid[method]):
            settings = {**getattr(a, method), **change}
            out = launch(a, f"sweep_{method}_{k}", method, settings, model_path, "validation", a.sweep_budget_seconds)
            last = out["rows"][-1]
            results.append({"method": method, **change, "steps": last["step"], "completions": last["completions"],
                            "val_accuracy_start": out["rows"][0]["eval_accuracy"], "val_accuracy_end": last["eval_accuracy"]})
            if method not in best or last["eval_accuracy"] > best[method][0]:  # first best wins ties
                best[method] = (last["eval_accuracy"], settings)
    with open(os.path.join(a.output_dir, "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in results for k in r}, key=lambda k: (k != "method", k)))
        writer.writeheader()
        writer.writerows(results)
    return {m: s for m, (_, s) in best.items()}


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        for ax, key in zip(axes, ("wall_clock_s", "completions")):
            ax.plot([r[key] for r in mine], [r["eval_accuracy"] for r in mine], marker="o", label=method)
    axes[0].set(xlabel="training wall-clock (s)", ylabel="held-out greedy accuracy")
    axes[1].set(xlabel="completions generated")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(a: CompareArguments, outs: dict, rows: list[dict], load: str) -> str:
    lines = [f"# EGGROLL vs GRPO on {a.model_name_or_path}, task {a.task}", "",
             f"Budget per method: {a.budget_seconds or 'no'} training seconds, {a.budget_completions or 'no'} completions; "
             f"{a.num_eval} {'held-out' if a.eval_split == 'test' else 'validation'} problems, greedy; torch threads {a.threads}; load average at start: {load}.",
             "Peak RSS: " + ("getrusage(RUSAGE_SELF).ru_maxrss of each method's own subprocess." if a.isolate else
                             "isolate=false, one process ran all methods in turn: each figure is that process's peak "
                             "so far (includes the methods before it)."), "",
             "| method | steps | train s | completions | accuracy start | accuracy end | best | peak RSS MiB | RSS after imports MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, out in outs.items():
        r0, r1 = out["rows"][0], out["rows"][-1]
        best = max(r["eval_accuracy"] for r in out["rows"])
        lines.append(f"| {name} | {r1['step']} | {r1['wall_clock_s']:.0f} | {r1['completions']} | {r0['eval_accuracy']:.3f} | "
                     f"{r1['eval_accuracy']:.3f} | {best:.3f} | {r1['peak_rss_mb']:.0f} | {out['rss_after_imports_mb']:.0f} |")
    from eggroll_ft.compare import first_reaching, paired_change

    lines += ["", "Change of held-out accuracy from the base model to the end of training, on the same problems "
              "(exact McNemar test: problems gained and lost; p = two-sided probability of a split this uneven "
              "by chance):", "", "| method | start -> end | gained | lost | p |", "| --- | --- | --- | --- | --- |"]
    for name, out in outs.items():
        r0, r1 = out["rows"][0], out["rows"][-1]
        if "eval_per_problem" in r0 and "eval_per_problem" in r1:
            c = paired_change(r0["eval_per_problem"], r1["eval_per_problem"])
            lines.append(f"| {name} | {r0['eval_accuracy']:.3f} -> {r1['eval_accuracy']:.3f} | {c['gained']} | "
                         f"{c['lost']} | {c['p_value']:.3g} |")

    lines += ["", "Training seconds / completions to first reach a held-out accuracy (- = never):", "",
              "| method | " + " | ".join(f">= {lvl:g}" for lvl in a.accuracy_levels) + " |",
              "| --- |" + " --- |" * len(a.accuracy_levels)]
    for name, out in outs.items():
        cells = []
        for lvl in a.accuracy_levels:
            s, c = first_reaching(out["rows"], lvl, "wall_clock_s"), first_reaching(out["rows"], lvl, "completions")
            cells.append("-" if s is None else f"{s:.0f} s / {c}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Settings:", ""] + [f"- {name}: `{json.dumps(out['settings'])}`" for name, out in outs.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    from trl import TrlParser

    (a,) = TrlParser((CompareArguments,)).parse_args_and_config(argv)
    os.makedirs(a.output_dir, exist_ok=True)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    import rewards  # noqa: F401  (registers the task rewards and the named model tiny-countdown-base)
    from eggroll_ft.models.named import resolve_model_name

    model_path = resolve_model_name(a.model_name_or_path)  # a named model is built here once, not per method
    settings = {m: getattr(a, m) for m in a.methods}
    if a.sweep:
        settings = run_sweep(a, model_path)
    start = time.time()
    outs = {m: launch(a, m, m, settings[m], model_path, a.eval_split) for m in a.methods}
    rows = [r for out in outs.values() for r in out["rows"]]
    with open(os.path.join(a.output_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if isinstance(r[k], float) and math.isnan(r[k]) else r[k]) for k in COLUMNS}
                         for r in rows)
    plot(rows, os.path.join(a.output_dir, "curves.png"),
         f"{a.task} on {os.path.basename(str(a.model_name_or_path))}: EGGROLL vs GRPO, same prompts, reward and budget")
    summary = summarize(a, outs, rows, load)
    Path(a.output_dir, "summary.md").write_text(summary)
    print(summary + f"\n[compare_grpo] done in {time.time() - start:.0f}s; outputs in {a.output_dir}")
    return outs


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--run_spec":
        run_method(json.loads(Path(sys.argv[2]).read_text()))
    else:
        main()
