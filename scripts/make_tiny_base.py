"""Build the tiny character-level Countdown base model (``tiny-countdown-base``) from the command line.

    python scripts/make_tiny_base.py [--output_dir DIR] [--steps N --seed S ...]

The model and its data are ``eggroll_ft.tiny_base`` and ``rewards/countdown_base.py``; every field
of ``TinyBaseConfig`` and ``CountdownBaseData`` is a flag. Without ``--output_dir`` it builds into
the cache (``$EGGROLL_CACHE/tiny-countdown-base``), where ``model_name_or_path: tiny-countdown-base``
finds it; a checkpoint already at the target is kept (delete it to rebuild). From code, the name is
enough: ``import rewards`` registers it and ``EggrollTrainer(model="tiny-countdown-base")`` builds it
on first use.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # rewards/ lives beside the package
    sys.path.insert(0, str(ROOT))

from eggroll_ft.models.named import cache_dir  # noqa: E402
from eggroll_ft.tiny_base import TinyBaseConfig  # noqa: E402
from rewards.countdown_base import INFO_FILE, TINY_COUNTDOWN_BASE, CountdownBaseData, build_tiny_countdown_base  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_dir = os.path.join(cache_dir(), TINY_COUNTDOWN_BASE)
    parser.add_argument("--output_dir", default=None, help=f"where to build (default: {default_dir})")
    for cls in (TinyBaseConfig, CountdownBaseData):
        for f in dataclasses.fields(cls):
            parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    args = vars(parser.parse_args(argv))
    output_dir = args.pop("output_dir") or default_dir
    names = {f.name for f in dataclasses.fields(TinyBaseConfig)}
    cfg = TinyBaseConfig(**{k: v for k, v in args.items() if k in names})
    data = CountdownBaseData(**{k: v for k, v in args.items() if k not in names})
    build_tiny_countdown_base(output_dir, cfg, data)
    with open(os.path.join(output_dir, INFO_FILE)) as f:
        info = json.load(f)
    print(f"{output_dir}: {info['params']:,} params, {info['steps']} steps in {info['train_seconds']}s, "
          f"loss {info['first_loss']:.3f} -> {info['final_loss']:.3f}, "
          f"held-out greedy accuracy {info['heldout_accuracy']:.1%} on {info['heldout_problems']} problems; "
          f"built in {info['build_seconds']}s")
    return info


if __name__ == "__main__":
    main()
