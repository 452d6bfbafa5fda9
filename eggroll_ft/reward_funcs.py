"""Reward functions, TRL's protocol: resolve them and call them.

A reward function is a plain callable (or ``async def``) called with keyword arguments:
``prompts``, ``completions``, ``completion_ids``, every other dataset column (one value per
completion), and ``trainer_state``; it returns one ``float`` or ``None`` per completion
(``None`` = no reward for that completion, kept as NaN). This module knows nothing of the
population or the update: it turns completions into a ``(num_completions, num_funcs)`` table.
"""
from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import math
from pathlib import Path

import torch


def resolve_reward_func(spec):
    """A callable from a callable, a registered name of the ``rewards`` package (``"countdown"``),
    ``"module:function"`` or ``"path/to/file.py:function"``."""
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"reward function {spec!r} must be a callable or a string")
    if ":" not in spec:
        try:
            from rewards import get_reward_func  # the task rewards shipped beside the library
        except ImportError as e:
            raise ValueError(f"reward function {spec!r}: not 'module:function' and the `rewards` package "
                             f"is not importable ({e})") from e
        return get_reward_func(spec)
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"reward function {spec!r}: file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    func = getattr(module, name, None)
    if not callable(func):
        raise ValueError(f"reward function {spec!r}: {target} has no callable {name!r}")
    return func


def reward_func_name(func) -> str:
    """The name used in metrics (``rewards/<name>/mean``), as TRL does."""
    return getattr(func, "__name__", None) or type(func).__name__


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


def call_reward_funcs(funcs, names, prompts, completions, completion_ids, columns: dict, trainer_state=None) -> torch.Tensor:
    """Call every reward function once on all completions. Returns float32 ``(num_completions, num_funcs)``.

    An exception inside a function is re-raised naming the function.
    """
    n = len(completions)
    out = torch.full((n, len(funcs)), math.nan, dtype=torch.float32)
    kwargs = dict(columns)
    kwargs["trainer_state"] = trainer_state
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
