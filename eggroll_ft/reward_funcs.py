"""Reward functions, TRL's protocol: name them, resolve them, call them.

A reward function is a plain callable (or ``async def``) called with keyword arguments:
``prompts``, ``completions``, ``completion_ids``, every other dataset column (one value per
completion), ``trainer_state``, and TRL 1.16's logging callbacks ``log_extra(column, values)`` (one
value per completion: a column of the completions table) and ``log_metric(name, value)`` (a scalar,
averaged into the logs). It returns one ``float`` or ``None`` per completion (``None`` = no reward
for that completion, kept as NaN).

Names: ``REWARD_FUNCS`` is the one registry of named rewards. The library registers none; task
packages fill it on import (``import rewards`` registers ``"countdown"``, ``"gsm8k"`` ...) with
``register_reward_func``. ``resolve_reward_func`` also accepts ``"module:function"`` and
``"path/to/file.py:function"``.

This module knows nothing of the population or the update: it turns completions into a
``(num_completions, num_funcs)`` table.
"""
from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import sys
from collections import defaultdict
from typing import Callable

import torch

REWARD_FUNCS: dict[str, Callable] = {}


def register_reward_func(name: str, func: Callable) -> None:
    """Make ``name`` resolve to ``func``. Registering the same function again is a no-op; another
    function under a taken name is an error."""
    if not isinstance(name, str) or not name.strip() or ":" in name or name != name.strip():
        raise ValueError(f"reward name={name!r} must be a non-empty string without ':' or surrounding spaces")
    if not callable(func):
        raise TypeError(f"reward {name!r}: {func!r} is not callable")
    if REWARD_FUNCS.get(name, func) is not func:
        raise ValueError(f"reward name {name!r} is already registered to {REWARD_FUNCS[name]!r}")
    REWARD_FUNCS[name] = func


def _load_file(path: str):
    """Import a .py file once, as a module named after its absolute path."""
    if not os.path.isfile(path):
        raise ValueError(f"reward file {path!r} does not exist")
    abspath = os.path.abspath(path)
    name = "_reward_file_" + hashlib.sha1(abspath.encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, abspath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def resolve_reward_func(spec) -> Callable:
    """A callable from a callable (returned as is), a registered name (``REWARD_FUNCS``),
    ``"module:function"`` or ``"path/to/file.py:function"``. Errors are ``ValueError`` naming what
    was not found.

    >>> resolve_reward_func("math:sqrt")(4.0)
    2.0
    >>> resolve_reward_func("no_such_reward")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: reward 'no_such_reward' is not a registered name, nor 'module:function', nor ...
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec={spec!r} must be a non-empty string or a callable")
    spec = spec.strip()
    if spec in REWARD_FUNCS:
        return REWARD_FUNCS[spec]
    if ":" not in spec:
        raise ValueError(f"reward {spec!r} is not a registered name, nor 'module:function', nor "
                         f"'path/to/file.py:function' (registered: {', '.join(sorted(REWARD_FUNCS)) or 'none'}; "
                         "task rewards register on import, e.g. `import rewards`)")
    target, func_name = spec.rsplit(":", 1)  # rsplit keeps a Windows drive letter in the target
    if not target or not func_name:
        raise ValueError(f"reward spec={spec!r} must look like 'module:function' or 'file.py:function'")
    if target.endswith(".py") or os.sep in target or "/" in target:
        module = _load_file(target)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"reward spec={spec!r}: cannot import module {target!r} ({e})") from e
    func = getattr(module, func_name, None)
    if func is None:
        raise ValueError(f"reward spec={spec!r}: {target!r} has no attribute {func_name!r}")
    if not callable(func):
        raise ValueError(f"reward spec={spec!r}: {target}.{func_name} is a {type(func).__name__}, not callable")
    return func


def reward_func_name(func) -> str:
    """The name used in metrics (``rewards/<name>/mean``), as TRL does."""
    return getattr(func, "__name__", None) or type(func).__name__


class RewardLog:
    """What reward functions log through TRL's callbacks, until the caller takes it (``flush``).

    ``log_extra(column, values)``: values of a completions-table column, one per completion scored.
    ``log_metric(name, value)``: a scalar; the logged metric is the mean of all values.
    """

    def __init__(self):
        self.extra: dict[str, list] = defaultdict(list)
        self.metrics: dict[str, list[float]] = defaultdict(list)

    def log_extra(self, column: str, values: list) -> None:
        self.extra[column].extend(values)

    def log_metric(self, name: str, value: float) -> None:
        self.metrics[name].append(float(value))

    def flush(self, num_completions: int) -> tuple[dict[str, list], dict[str, tuple[float, int]]]:
        """``(extra columns, {metric: (sum, count)})`` logged since the last flush; then empty.

        >>> log = RewardLog(); log.log_extra("parsed", ["1", "2"]); log.log_metric("hit", 1.0); log.log_metric("hit", 0.0)
        >>> log.flush(2)
        ({'parsed': ['1', '2']}, {'hit': (1.0, 2)})
        """
        extra = dict(self.extra)
        metrics = {k: (sum(v), len(v)) for k, v in self.metrics.items()}
        self.extra, self.metrics = defaultdict(list), defaultdict(list)
        for column, values in extra.items():
            if len(values) != num_completions:
                raise ValueError(f"log_extra({column!r}, ...) received {len(values)} values for {num_completions} "
                                 "completions: a column needs one value per completion")
        return extra, metrics


def _check(name: str, output, expected: int) -> list[float]:
    if output is None or isinstance(output, (str, bytes)) or not hasattr(output, "__len__"):
        raise ValueError(f"The reward function '{name}' returned {type(output).__name__}, expected a list of "
                         f"{expected} floats (one per completion)")
    if len(output) != expected:
        raise ValueError(f"The reward function '{name}' returned {len(output)} rewards, but {expected} were "
                         "expected (one per prompt-completion pair)")
    values = []
    for r in output:
        if r is None:
            values.append(math.nan)
            continue
        try:
            values.append(float(r))
        except (TypeError, ValueError) as e:
            raise ValueError(f"The reward function '{name}' returned a non-numeric reward {r!r}") from e
    return values


def call_reward_funcs(funcs, names, prompts, completions, completion_ids, columns: dict, trainer_state=None,
                      log: RewardLog | None = None) -> torch.Tensor:
    """Call every reward function once on all completions. Returns float32 ``(num_completions, num_funcs)``.

    ``log`` collects what the functions pass to ``log_extra`` / ``log_metric`` (a fresh, discarded
    one when None). An exception inside a function is re-raised naming the function.
    """
    n = len(completions)
    out = torch.full((n, len(funcs)), math.nan, dtype=torch.float32)
    log = log if log is not None else RewardLog()
    kwargs = dict(columns)
    kwargs.update(trainer_state=trainer_state, log_extra=log.log_extra, log_metric=log.log_metric)
    pending = []
    for i, (func, name) in enumerate(zip(funcs, names)):
        if inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None)):
            pending.append((i, func, name))
            continue
        try:
            result = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        except Exception as e:
            raise RuntimeError(f"The reward function '{name}' raised {type(e).__name__}: {e}") from e
        out[:, i] = torch.tensor(_check(name, result, n), dtype=torch.float32)
    if pending:
        async def run_all():
            return await asyncio.gather(*(f(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                            **kwargs) for _, f, _ in pending), return_exceptions=True)
        results = asyncio.run(run_all())
        for (i, _, name), result in zip(pending, results):
            if isinstance(result, BaseException):
                raise RuntimeError(f"The reward function '{name}' raised {type(result).__name__}: {result}") from result
            out[:, i] = torch.tensor(_check(name, result, n), dtype=torch.float32)
    return out


def combine_rewards(per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over functions skipping NaN (TRL); a row where every function gave None is NaN.

    >>> combine_rewards(torch.tensor([[1., float('nan')], [float('nan'), float('nan')]]), torch.tensor([1., 2.]))
    tensor([1., nan])
    """
    total = (per_func * weights[None, :]).nansum(dim=1)
    return torch.where(torch.isnan(per_func).all(dim=1), torch.nan, total)
