"""Plot held-out bits per byte over training wall-clock from minGRU recipe runs.

    python scripts/plot_mingru.py --out docs/mingru_bpb.png \
        "int8 EGGROLL=runs/mingru_int8/metrics.jsonl" "float Adam=runs/mingru_float/metrics.jsonl"

Each run is ``label=path/to/metrics.jsonl`` as written by ``recipes/pretrain_mingru_int8.py`` or
``recipes/pretrain_mingru_float.py``; the unigram entropy of the held-out bytes (logged at step 0)
is drawn as a dashed line. Prints the final held-out bits per byte of every run.
"""
from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_eval(path: str):
    rows = [json.loads(line) for line in open(path)]
    evals = [r for r in rows if "eval/bpb" in r]
    unigram = next((r["info/unigram_bits"] for r in rows if "info/unigram_bits" in r), None)
    return [r["time/train_s"] for r in evals], [r["eval/bpb"] for r in evals], unigram, rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="label=metrics.jsonl")
    parser.add_argument("--out", default="docs/mingru_bpb.png")
    parser.add_argument("--title", default="byte-level minGRU, held-out bits per byte")
    parser.add_argument("--at", default="60,300,600,1200", help="also print bpb at these seconds")
    args = parser.parse_args(argv)
    times = [float(t) for t in args.at.split(",") if t]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    unigram = None
    for spec in args.runs:
        label, path = spec.split("=", 1)
        t, bpb, uni, rows = read_eval(path)
        unigram = unigram or uni
        ax.plot(t, bpb, marker=".", label=label)
        print(f"{label}: final held-out bpb {bpb[-1]:.3f} after {rows[-1]['step']} steps, {t[-1]:.0f} s")
        for when in times:  # the last evaluation at or before each time
            seen = [b for s, b in zip(t, bpb) if s <= when]
            print(f"  at {when:.0f} s: {seen[-1]:.3f}" if seen else f"  at {when:.0f} s: -")
        reached = [s for s, b in zip(t, bpb) if unigram is not None and b < unigram]
        print(f"  first below the unigram entropy at {reached[0]:.0f} s" if reached else "  never below unigram")
    if unigram is not None:
        ax.axhline(unigram, ls="--", c="gray", label=f"unigram entropy {unigram:.2f}")
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title(args.title)
    ax.set_ylim(top=min(ax.get_ylim()[1], 9.5))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
