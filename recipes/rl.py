"""Reinforcement learning: EGGROLL against full-rank OpenES and PPO on gymnasium / minigrid.

    python recipes/rl.py --config recipes/configs/rl/cartpole.yaml [--runs eggroll_r1 ppo]

The paper's RL study (Sarkar et al. 2025, arXiv 2511.16652, Sec. 6.1) in PyTorch:

1. Policies are 3 x 256 MLPs with relu(layernorm(x)) made of plain ``nn.Linear`` layers, so the
   same ``Population`` hooks as the language models perturb them: the whole population is one
   batched forward per environment step, row ``b`` playing member ``b`` in vector env ``b``.
2. EGGROLL (rank 1, 2, 4) and full-rank OpenES differ only in ``NoiseConfig(full_rank=...)``;
   both update through ``apply_es_update`` with SGD or Adam and sigma / learning-rate decay.
3. PPO is stable-baselines3's, with the same environments, the same environment-step budget, and
   the same evaluation (deterministic policy, same episodes).
4. Curves are the evaluation return over environment steps and over training wall-clock
   (evaluation time excluded for every method).

A config holds the environment-wide settings at top level and one entry per run under ``runs``
(each overriding any ``RLConfig`` field). Output, in ``--output_dir``: ``metrics.jsonl`` (one
record per generation / PPO rollout, tagged with its run), ``returns.png`` and ``results.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import yaml

from eggroll_ft.rl import RLConfig, train_es, train_ppo


def load_runs(path: str | os.PathLike, only: list[str] | None = None) -> dict[str, RLConfig]:
    """``{run name: RLConfig}`` from a YAML config: top-level fields apply to every run."""
    raw = yaml.safe_load(Path(path).read_text())
    runs = raw.pop("runs", None)
    if not runs:
        raise ValueError(f"{path}: config has no 'runs' entry")
    unknown = sorted(set(only or []) - set(runs))
    if unknown:
        raise ValueError(f"--runs {unknown} not in {path} (has {sorted(runs)})")
    return {name: RLConfig.from_dict({**raw, **(over or {})}) for name, over in runs.items()
            if not only or name in only}


def read_metrics(path: Path) -> dict[str, list[dict]]:
    """``metrics.jsonl`` -> ``{run: [records in order]}``."""
    out: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["run"], []).append(rec)
    return out


def summarize(records: list[dict], threshold: float) -> dict:
    """Final and best evaluation return, and steps / wall-clock when the threshold was first met."""
    evals = [r for r in records if r.get("eval_return") is not None and not math.isnan(r["eval_return"])]
    hit = next((r for r in evals if r["eval_return"] >= threshold), None)
    return {"final_return": evals[-1]["eval_return"] if evals else math.nan,
            "best_return": max((r["eval_return"] for r in evals), default=math.nan),
            "env_steps": records[-1]["env_steps"], "wall_s": records[-1]["wall_s"],
            "cpu_s": records[-1].get("cpu_s", math.nan),
            "steps_to_threshold": hit["env_steps"] if hit else None,
            "wall_to_threshold": hit["wall_s"] if hit else None,
            "cpu_to_threshold": hit.get("cpu_s", math.nan) if hit else None}


def markdown_table(metrics: dict[str, list[dict]], env_id: str, threshold: float) -> str:
    """One row per run: the numbers ``docs/benchmarks.md`` quotes."""
    lines = [f"### {env_id} (threshold {threshold:g})", "",
             "| run | final return | best return | env steps | train wall-clock (s) | train CPU (s) | steps to threshold "
             "| wall-clock to threshold (s) | CPU to threshold (s) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run, recs in metrics.items():
        s = summarize(recs, threshold)
        to_steps = f"{s['steps_to_threshold']:,}" if s["steps_to_threshold"] is not None else "not reached"
        to_wall, to_cpu = ((f"{s['wall_to_threshold']:.1f}", f"{s['cpu_to_threshold']:.1f}")
                           if s["wall_to_threshold"] is not None else ("not reached", "not reached"))
        lines.append(f"| {run} | {s['final_return']:.1f} | {s['best_return']:.1f} | {s['env_steps']:,} | "
                     f"{s['wall_s']:.1f} | {s['cpu_s']:.1f} | {to_steps} | {to_wall} | {to_cpu} |")
    return "\n".join(lines) + "\n"


def plot(metrics: dict[str, list[dict]], env_id: str, threshold: float, path: Path) -> None:
    """Evaluation return over environment steps, training wall-clock and training CPU time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("env_steps", "wall_s", "cpu_s")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    for run, recs in metrics.items():
        pts = [r for r in recs if r.get("eval_return") is not None]
        for ax, key in zip(axes, keys):
            ax.plot([r.get(key, math.nan) for r in pts], [r["eval_return"] for r in pts], marker=".", label=run)
    for ax, xlabel in zip(axes, ("environment steps", "training wall-clock (s)", "training CPU time (s)")):
        ax.axhline(threshold, color="grey", ls="--", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("evaluation return (mean policy)")
    axes[0].legend()
    fig.suptitle(env_id)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="recipes/configs/rl/<env>.yaml")
    ap.add_argument("--runs", nargs="*", help="run names from the config (default: all)")
    ap.add_argument("--output_dir", help="default: runs/rl/<config name>")
    ap.add_argument("--total_env_steps", type=int, help="override the budget of every run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (same for every method)")
    ap.add_argument("--plot_only", action="store_true", help="redraw the plot and table from metrics.jsonl")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    runs = load_runs(args.config, args.runs)
    if args.total_env_steps:
        runs = {n: RLConfig.from_dict({**c.to_dict(), "total_env_steps": args.total_env_steps}) for n, c in runs.items()}
    first = next(iter(runs.values()))
    out = Path(args.output_dir or Path("runs/rl") / Path(args.config).stem)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"

    if not args.plot_only:
        cfg_path = out / "config.json"  # merged, so runs launched one by one all appear
        merged = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        cfg_path.write_text(json.dumps({**merged, **{n: c.to_dict() for n, c in runs.items()}}, indent=1))
        done = set(read_metrics(metrics_path)) if metrics_path.exists() else set()
        with metrics_path.open("a") as f:
            for name, cfg in runs.items():
                if name in done:  # re-running the recipe resumes a comparison run by run
                    print(f"[{name}] already in {metrics_path}, skipped", flush=True)
                    continue

                def log(rec, name=name):
                    rec = {"run": name, **rec}
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    if rec.get("eval_return") is not None:
                        print(f"[{name}] steps={rec['env_steps']:>9,} wall={rec['wall_s']:7.1f}s "
                              f"train={rec['train_return']:8.2f} eval={rec['eval_return']:8.2f}", flush=True)

                (train_ppo if cfg.method == "ppo" else train_es)(cfg, log)

    metrics = {n: r for n, r in read_metrics(metrics_path).items() if n in runs}
    table = markdown_table(metrics, first.env_id, first.threshold)
    (out / "results.md").write_text(table)
    plot(metrics, first.env_id, first.threshold, out / "returns.png")
    print(table)
    print(f"wrote {metrics_path}, {out / 'results.md'}, {out / 'returns.png'}")


if __name__ == "__main__":
    sys.exit(main())
