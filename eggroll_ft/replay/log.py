"""The replay log ``es_replay.jsonl``: digests, the header, reading, and ``ReplayLog``, which writes
it during training.

Boundary: this module turns a run's state into log lines and log lines back into ``ReplayHistory``;
re-running the steps is ``rebuild.py``'s job.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import json
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import xxhash
from transformers import TrainerCallback

from ..noise import noise_block, stream_key
from ..population import Population

LOG_NAME = "es_replay.jsonl"
FORMAT = "eggroll_ft.es_replay"
VERSION = 1
# header fields that fix what a step does: a resumed run must agree on every one
RUN_FIELDS = ("noise", "noise_fingerprint", "population_size", "params", "optimizer", "max_grad_norm", "peft_config")


# ---- digests --------------------------------------------------------------------------------
def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """xxh3-128 over each tensor's name, dtype, shape and raw bytes, in name order.

    Any changed bit changes it. It detects divergence (another base, other code, another device),
    it is not a cryptographic signature. About 4 GB/s on one CPU core: 0.1 s for a 135M model.
    """
    h = xxhash.xxh3_128()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}\x1f{str(t.dtype).removeprefix('torch.')}\x1f{tuple(t.shape)}\x1e".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
    return h.hexdigest()


def perturbed_digest(pop: Population) -> str:
    """Digest of the perturbed weights (the only ones an ES step changes)."""
    return weights_digest({name: p.weight for name, p in pop.params.items()})


def model_digest(model: torch.nn.Module) -> str:
    """Digest of every tensor of ``model.state_dict()``: the base a log starts from."""
    return weights_digest(model.state_dict())


def noise_fingerprint(seed: int, device) -> str:
    """Digest of a few values of the noise generator: differs when ``noise.py`` or the device's
    float math makes other noise than the run's."""
    values = noise_block(stream_key(seed, "replay-fingerprint"), torch.arange(4, device=device), 64, device)
    return weights_digest({"noise": values})


# ---- the log's header -----------------------------------------------------------------------
def _json_value(x):
    """Tuples as lists, sets sorted, enums and other objects as strings: what JSON round-trips."""
    return json.loads(json.dumps(x, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def _unwrap(optimizer):
    return getattr(optimizer, "optimizer", optimizer) if type(optimizer).__name__ == "AcceleratedOptimizer" else optimizer


def optimizer_spec(optimizer) -> dict:
    """The optimizer's class and its one parameter group's hyperparameters (the learning rate is
    logged per step)."""
    opt = _unwrap(optimizer)
    if len(opt.param_groups) != 1:
        raise ValueError(f"the optimizer has {len(opt.param_groups)} parameter groups; replay logs one")
    hyper = {k: v for k, v in opt.param_groups[0].items() if k not in ("params", "lr", "initial_lr")}
    return {"class": f"{type(opt).__module__}:{type(opt).__qualname__}", "hyperparameters": _json_value(hyper)}


def build_optimizer(spec: dict, params: list[torch.nn.Parameter]):
    """A fresh optimizer of the logged class and hyperparameters over ``params``."""
    module, _, qualname = spec["class"].partition(":")
    cls = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["hyperparameters"].items()}
    accepted = inspect.signature(cls.__init__).parameters  # e.g. fused=, foreach= also act in __init__
    kwargs = {k: v for k, v in hyper.items() if k in accepted}
    return cls([{"params": params, **hyper}], **{**kwargs, "lr": 0.0})


def _peft_config(model) -> dict | None:
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    active = getattr(model, "active_adapter", None)  # PeftModel: a name (transformers' adapter mixin: a method)
    return _json_value(configs[active if isinstance(active, str) else next(iter(configs))].to_dict())


def params_spec(pop: Population) -> list:
    """``[name, shape, dtype]`` of each perturbed weight, in the population's (and optimizer's) order."""
    return [[name, list(p.weight.shape), str(p.weight.dtype).removeprefix("torch.")] for name, p in pop.params.items()]


def run_header(pop: Population, model, optimizer, max_grad_norm: float) -> dict:
    """The header of a run's log; ``model`` holds the base weights when it is called."""
    first = next(iter(pop.params.values())).weight
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        version = importlib.metadata.version("eggroll-ft")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "format": FORMAT, "version": VERSION, "digest": "xxh3_128",
        "base": str(getattr(getattr(base_model, "config", None), "_name_or_path", "") or ""),
        "base_digest": model_digest(model),
        "dtype": str(next(p.dtype for p in base_model.parameters() if p.is_floating_point())).removeprefix("torch."),
        "device": first.device.type,
        "noise": dataclasses.asdict(pop.noise),
        "noise_fingerprint": noise_fingerprint(pop.noise.seed, first.device),
        "population_size": pop.population_size,
        "params": params_spec(pop),
        "optimizer": optimizer_spec(optimizer),
        "max_grad_norm": float(max_grad_norm),
        "peft_config": _peft_config(model),
        "versions": {"eggroll_ft": version, "torch": torch.__version__},
    }


def check_same_run(logged: dict, ours: dict, where: str, fields=RUN_FIELDS) -> None:
    """Raise naming the first field where the log's header and this run differ."""
    for key in fields:
        a, b = logged.get(key), ours.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            sub = next(k for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k))
            key, a, b = f"{key}.{sub}", a.get(sub), b.get(sub)
        raise ValueError(f"{where}: the log was made with {key}={a!r}, this run has {key}={b!r}")


# ---- reading and writing ----------------------------------------------------------------------
def _float32_text(values: torch.Tensor) -> str:
    """A JSON array of float32 values in their shortest exact form (``-0.70710677``, not the
    float64 ``-0.7071067690849304``): about 11 characters a value. Each is checked to read back as
    the same float32 through a float64 parse (what ``json`` does), else written in full; NaN and
    infinities as the strings ``"nan"``, ``"inf"``, ``"-inf"``."""
    out = []
    for x in values.detach().to(torch.float32).cpu().numpy():
        if not np.isfinite(x):
            out.append(f'"{x}"')
            continue
        short = str(x)
        out.append(short if np.float32(float(short)) == x else repr(float(x)))
    return "[" + ",".join(out) + "]"


def fitness_tensor(values: list) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


@dataclass
class ReplayHistory:
    """A log as read: its header and its complete steps (``steps[k]["step"] == k``; ``digest`` is
    absent for a step whose update was not known to be applied)."""

    path: str
    header: dict
    steps: list[dict]


def is_replay_log(path) -> bool:
    """True when ``path`` is a file whose first line is a replay log's header."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        first = f.readline()
    try:
        return json.loads(first).get("format") == FORMAT
    except (ValueError, AttributeError):
        return False


def read_log(path) -> ReplayHistory:
    """Parse a log. Whatever follows the last newline is a torn write and is ignored; any other
    malformed line raises, naming its line number."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")[:-1]  # the last piece is b"" or a torn line
    if not lines:
        raise ValueError(f"{path}: empty replay log (no complete header line)")
    entries = []
    for i, line in enumerate(lines, 1):
        try:
            entries.append(json.loads(line))
        except ValueError as e:
            raise ValueError(f"{path}: line {i} is not valid JSON ({e}); only the last line may be torn") from None
    header = entries[0]
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path}: line 1 is not a replay log header (format={FORMAT!r})")
    if header.get("version") != VERSION:
        raise ValueError(f"{path}: log version={header.get('version')!r}, this eggroll_ft reads version {VERSION}")
    steps: list[dict] = []
    for i, e in enumerate(entries[1:], 2):
        if "fitness" in e and e.get("step") == len(steps):
            steps.append(dict(e))
        elif "digest" in e and steps and e.get("step") == len(steps) - 1 and "digest" not in steps[-1]:
            steps[-1]["digest"] = e["digest"]
        else:
            raise ValueError(f"{path}: line {i} is out of order: {json.dumps(e)[:120]} after {len(steps)} steps")
    return ReplayHistory(path, header, steps)


def _step_line(step: int, sigma: float, lr: float, fitness: torch.Tensor) -> str:
    return (f'{{"step": {int(step)}, "sigma": {float(sigma)!r}, "lr": {float(lr)!r}, '
            f'"fitness": {_float32_text(fitness.flatten())}}}')


def _digest_line(step: int, digest: str) -> str:
    return json.dumps({"step": int(step), "digest": digest})


def _fsync_line(f, text: str) -> None:
    f.write(text + "\n")
    f.flush()
    os.fsync(f.fileno())


class ReplayLog(TrainerCallback):
    """Writes ``es_replay.jsonl`` during training (on the main process only).

    ``EggrollTrainer`` registers it as a callback and calls ``write_step`` just before each update.
    At train begin it writes the header (a fresh run) or keeps the first ``global_step`` steps of
    the log it resumes from (``resume_history`` for a run resumed from a log, else the file itself:
    a run resumed from a normal checkpoint cuts the steps after that checkpoint away).
    """

    def __init__(self, population: Population, path: str):
        self.population, self.path = population, os.fspath(path)
        self.resume_history: ReplayHistory | None = None
        self._file = None
        self._logged_step: int | None = None  # the step whose line awaits its digest line

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.close()
        if not state.is_world_process_zero:
            return
        try:
            header, problem, steps = run_header(self.population, model, optimizer, args.max_grad_norm), None, []
        except ValueError as e:  # an optimizer replay cannot rebuild
            problem = str(e)
        if problem is None and state.global_step > 0:
            problem, history = self._kept_history(header, state.global_step)
            if history is not None:
                header, steps = history.header, history.steps
        if problem is not None:
            warnings.warn(f"{self.path}: not written by this run (at step {state.global_step}): {problem}",
                          RuntimeWarning, stacklevel=2)
            return
        self._rewrite(header, steps)

    def _kept_history(self, header: dict, start: int) -> tuple[str | None, ReplayHistory | None]:
        """The log this resumed run continues, or why there is none to continue."""
        history = self.resume_history
        if history is None:
            if not os.path.isfile(self.path):
                return "there is no log of its first steps", None
            history = read_log(self.path)
        try:
            check_same_run(history.header, header, history.path)
        except ValueError as e:
            return str(e), None
        if len(history.steps) < start:
            return f"the log has only {len(history.steps)} steps", None
        steps = [dict(s) for s in history.steps[:start]]
        digest = perturbed_digest(self.population)
        if steps[-1].setdefault("digest", digest) != digest:  # a step replayed unchecked gets its digest now
            return f"the weights differ from the log's after step {start - 1} (another run's log?)", None
        return None, ReplayHistory(history.path, history.header, steps)

    def _rewrite(self, header: dict, steps: list[dict]) -> None:
        """Write header and steps to a temporary file, fsync and rename it over the log (atomic)."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"  # one writer: the main process
        with open(tmp, "w") as f:
            f.write(json.dumps(header) + "\n")
            for s in steps:
                f.write(_step_line(s["step"], s["sigma"], s["lr"], fitness_tensor(s["fitness"])) + "\n")
                if "digest" in s:
                    f.write(_digest_line(s["step"], s["digest"]) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")

    def write_step(self, step: int, sigma: float, lr: float, fitness: torch.Tensor) -> None:
        """Log step ``step`` as the update will see it; durable before the update is applied."""
        if self._file is not None:
            _fsync_line(self._file, _step_line(step, sigma, lr, fitness))
            self._logged_step = int(step)

    def on_step_end(self, args, state, control, **kwargs):
        if self._file is not None and self._logged_step == state.global_step - 1:  # after the optimizer step
            _fsync_line(self._file, _digest_line(self._logged_step, perturbed_digest(self.population)))

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
