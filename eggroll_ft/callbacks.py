"""Trainer callbacks for recipes: a plain-file record of every log, readable without any logger.

Boundary: callbacks only observe ``transformers.TrainerCallback`` events (``on_log``); they never
touch the model, the population or the update.
"""
from __future__ import annotations

import json
import math
import os

from transformers import TrainerCallback


def _jsonable(value):
    """NaN/inf become None (strict JSON has no NaN); tensors and numpy scalars become Python numbers."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # not a scalar
            value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class JsonlMetricsCallback(TrainerCallback):
    """Append every log record (train metrics, ``eval_*`` metrics) to ``metrics.jsonl``.

    One JSON object per line, ``{"step": global_step, "epoch": ..., **logs}``, written by the world
    process zero only and flushed at once, so a crashed or resumed run keeps what it logged.
    ``path`` defaults to ``<output_dir>/metrics.jsonl``. Non-finite numbers are written as ``null``.
    """

    def __init__(self, path: str | None = None):
        self.path = path

    def _file(self, args) -> str:
        return self.path or os.path.join(args.output_dir, "metrics.jsonl")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        path = self._file(args)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with open(path, "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")


def read_metrics(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl`` file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
