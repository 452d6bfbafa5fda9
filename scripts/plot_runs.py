"""Several compare_grpo runs together: one plot, and each run's final answers against one run's.

    python scripts/plot_runs.py --output docs/smollm2_tuning.png --title "..." \\
        B3=runs/smollm2_tuning/B3 G1=runs/smollm2_tuning/G1 ...
    python scripts/plot_runs.py --against D0 D0=runs/D0 C2=runs/C2 ...

Each argument is ``LABEL=DIR`` where ``DIR`` is an ``output_dir`` of ``scripts/compare_grpo.py``
(its ``results.csv``); a run holding several methods gets one curve per method, labelled
``LABEL/method``. The plot is ``compare_grpo.plot``'s. ``--against LABEL`` prints, for every other
run, the exact McNemar test of its last evaluation's answers against that run's, problem by
problem (``compare.paired_change``; runs of one method each, scored on the same problems).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.compare_grpo import plot  # noqa: E402


def load_rows(label: str, directory: str) -> list[dict]:
    """``results.csv`` of one run as plot rows, methods relabelled."""
    path = Path(directory) / "results.csv"
    if not path.exists():
        raise FileNotFoundError(f"{label}={directory}: no results.csv there (is it a compare_grpo output_dir?)")
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r["eval_accuracy"] not in ("", "nan")]
    methods = {r["method"] for r in rows}
    return [{"method": label if len(methods) == 1 else f"{label}/{r['method']}",
             "wall_clock_s": float(r["wall_clock_s"]), "completions": int(r["completions"]),
             "eval_accuracy": float(r["eval_accuracy"])} for r in rows]


def final_answers(label: str, directory: str) -> list[float]:
    """Per-problem scores of the last evaluation of a one-method run (its ``runs/<method>/rows.json``)."""
    found = sorted(Path(directory).glob("runs/*/rows.json"))
    if len(found) != 1:
        raise ValueError(f"{label}={directory}: expected one method's runs/<method>/rows.json, found {len(found)}")
    rows = [r for r in json.loads(found[0].read_text())["rows"] if r.get("eval_per_problem")]
    if not rows:
        raise ValueError(f"{label}={directory}: no evaluation with per-problem scores")
    return rows[-1]["eval_per_problem"]


def against(reference: str, runs: dict[str, str]) -> dict[str, dict]:
    """``paired_change`` of every run's final answers against run ``reference``'s."""
    from eggroll_ft.compare import paired_change

    if reference not in runs:
        raise ValueError(f"--against {reference}: not among the runs {sorted(runs)}")
    base = final_answers(reference, runs[reference])
    out = {}
    for label, directory in runs.items():
        if label != reference:
            answers = final_answers(label, directory)
            if len(answers) != len(base):
                raise ValueError(f"{label}: {len(answers)} problems scored, {reference}: {len(base)}")
            out[label] = paired_change(base, answers)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=DIR, a compare_grpo output_dir")
    ap.add_argument("--output", help="the PNG to write")
    ap.add_argument("--against", metavar="LABEL", help="print each run's final answers against this run's")
    ap.add_argument("--title", default="held-out accuracy")
    a = ap.parse_args(argv)
    if not a.output and not a.against:
        ap.error("give --output, --against or both")
    runs = {}
    for spec in a.runs:
        label, sep, directory = spec.partition("=")
        if not sep:
            ap.error(f"{spec!r}: expected LABEL=DIR")
        runs[label] = directory
    if a.output:
        plot([r for label, d in runs.items() for r in load_rows(label, d)], a.output, a.title)
        print(a.output)
    if a.against:
        print(f"| run | against {a.against}: gained | lost | exact McNemar p |\n| --- | ---: | ---: | ---: |")
        for label, c in against(a.against, runs).items():
            print(f"| {label} | {c['gained']} | {c['lost']} | {c['p_value']:.2g} |")


if __name__ == "__main__":
    main()
