"""What the two minGRU byte-LM recipes share (``recipes/pretrain_mingru_int8.py``, ``pretrain_mingru_float.py``).

The run arguments (``RunArgs``: data, model size, budget, evaluation, bookkeeping) and the integer
ES arguments (``ESArgs``, which the float baseline accepts and ignores so one YAML serves both),
YAML-plus-flags parsing, the ``metrics.jsonl`` log, atomic checkpoints and the device choice.

Boundary: plumbing only; the models are ``models/mingru.py``, the integer update ``integer_es.py``,
the byte streams ``bytes_data.py``, and each recipe's training loop stays in the recipe.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import torch
import yaml
from transformers import HfArgumentParser

from .bytes_data import MINIPILE


@dataclass
class RunArgs:
    """Data, budget, evaluation and bookkeeping (both recipes)."""

    config: str = field(default=None, metadata={"help": "YAML file of defaults; command-line flags win"})
    data: str = field(default=MINIPILE, metadata={"help": "local text file, or a datasets name"})
    output_dir: str = field(default="runs/mingru", metadata={"help": "metrics.jsonl + checkpoint.pt"})
    max_bytes: int = field(default=0, metadata={"help": "cap on training bytes (0 = all)"})
    eval_fraction: float = field(default=0.05, metadata={"help": "tail of a local file held out"})
    d_model: int = field(default=64, metadata={"help": "width D"})
    n_layers: int = field(default=2, metadata={"help": "number of minGRU blocks L"})
    mlp_mult: int = field(default=4, metadata={"help": "MLP hidden = mlp_mult * D"})
    seq_len: int = field(default=16, metadata={"help": "bytes per window (truncation length)"})
    steps: int = field(default=1000, metadata={"help": "update steps (schedule length)"})
    max_minutes: float = field(default=0.0, metadata={"help": "stop after this training wall-clock (0 = off)"})
    stop_at_step: int = field(default=0, metadata={"help": "stop (checkpointed) here, schedule unchanged (0 = off)"})
    eval_every: int = field(default=50, metadata={"help": "steps between held-out evaluations"})
    eval_windows: int = field(default=16, metadata={"help": "held-out windows, read from a zero state"})
    eval_len: int = field(default=256, metadata={"help": "bytes scored per held-out window"})
    save_every: int = field(default=100, metadata={"help": "steps between checkpoints"})
    seed: int = field(default=0, metadata={"help": "seed of the init, the noise and the streams"})
    resume: bool = field(default=False, metadata={"help": "continue from <output_dir>/checkpoint.pt"})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard | wandb"})
    threads: int = field(default=0, metadata={"help": "torch threads (0 = torch default)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available, else cpu) | cpu | cuda | cuda:N"})

    def __post_init__(self):
        if self.report_to not in ("none", "tensorboard", "wandb"):
            raise ValueError(f"report_to={self.report_to!r} must be none, tensorboard or wandb")
        if self.device != "auto":
            torch.device(self.device)  # raises on a malformed device name
        for name in ("seq_len", "steps", "eval_every", "eval_windows", "eval_len", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


@dataclass
class ESArgs:
    """Integer EGGROLL hyper-parameters (see ``eggroll_ft.integer_es.IntegerESConfig``)."""

    population_size: int = field(default=512, metadata={"help": "members per step (even)"})
    group_size: int = field(default=2, metadata={"help": "members sharing one byte stream"})
    rank: int = field(default=1, metadata={"help": "rank of each int8 perturbation"})
    sigma_shift: int = field(default=8, metadata={"help": "perturbation = A B^T >> sigma_shift"})
    noise_reuse: int = field(default=1, metadata={"help": "steps sharing one noise draw"})
    update_fraction: float = field(default=0.05, metadata={"help": "fraction moved by +-1 at step 0"})
    update_fraction_final: float = field(default=0.005, metadata={"help": "... at the last step"})
    init_std: int = field(default=16, metadata={"help": "std of the int8 weight init"})
    member_chunk: int = field(default=0, metadata={"help": "members per forward call (0 = all)"})


def parse_config(dataclass_types, argv=None, section: str | None = None):
    """HfArgumentParser over ``dataclass_types``: ``--config`` YAML sets defaults, flags override.

    Mapping-valued keys of the YAML are sections for sibling recipes (``float:`` holds the
    baseline's keys); ``section`` names the one merged here. Unknown keys raise.
    """
    parser = HfArgumentParser(dataclass_types)
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--config" in argv:
        with open(argv[argv.index("--config") + 1]) as f:
            raw = yaml.safe_load(f) or {}
        defaults = {k: v for k, v in raw.items() if not isinstance(v, dict)}
        defaults.update(raw.get(section) or {} if section else {})
        known = {f.dest for f in parser._actions}
        unknown = sorted(set(defaults) - known)
        if unknown:
            raise ValueError(f"config {argv[argv.index('--config') + 1]} has unknown keys {unknown}")
        parser.set_defaults(**defaults)
    return parser.parse_args_into_dataclasses(args=argv)


class MetricsLog:
    """``metrics.jsonl`` always (appended, so a resumed run continues it), tensorboard/wandb on demand."""

    def __init__(self, output_dir: str, report_to: str, config: dict, resume: bool):
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "metrics.jsonl")
        self.file = open(path, "a" if resume else "w")
        self.tb = self.wandb = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(output_dir, "tb"))
        elif report_to == "wandb":
            import wandb
            self.wandb = wandb.init(config=config, dir=output_dir, resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        for k, v in metrics.items():
            if self.tb is not None:
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; any other name as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def save_atomic(obj, path: str) -> None:
    """``torch.save`` to a temporary file then ``os.replace``: a crash never leaves half a checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def truncate_metrics(output_dir: str, step: int) -> None:
    """On resume, drop metric lines written after the checkpoint (they will be produced again)
    and the extra evaluation logged when the previous run stopped early."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            keep = [ln for ln in f if json.loads(ln)["step"] <= step and "stopped" not in json.loads(ln)]
        with open(path, "w") as f:
            f.writelines(keep)
