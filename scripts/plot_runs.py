"""Plot several compare_grpo runs on one figure: accuracy against training wall-clock and completions.

    python scripts/plot_runs.py --output docs/smollm2_tuning.png --title "..." \\
        B3=runs/smollm2_tuning/B3 G1=runs/smollm2_tuning/G1 ...

Each argument is ``LABEL=DIR`` where ``DIR`` is an ``output_dir`` of ``scripts/compare_grpo.py``
(its ``results.csv``); a run holding several methods gets one curve per method, labelled
``LABEL/method``. The plot is ``compare_grpo.plot``'s.
"""
from __future__ import annotations

import argparse
import csv
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=DIR, a compare_grpo output_dir")
    ap.add_argument("--output", required=True, help="the PNG to write")
    ap.add_argument("--title", default="held-out accuracy")
    a = ap.parse_args(argv)
    rows = []
    for spec in a.runs:
        label, sep, directory = spec.partition("=")
        if not sep:
            ap.error(f"{spec!r}: expected LABEL=DIR")
        rows += load_rows(label, directory)
    plot(rows, a.output, a.title)
    print(a.output)


if __name__ == "__main__":
    main()
