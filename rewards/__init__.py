"""Task rewards and their datasets (Countdown, GSM8K, arithmetic), addressable by name.

Reward functions follow TRL's protocol: ``reward(completions, **columns) -> list[float]``,
where ``completions`` are strings or lists of chat messages and every other dataset column
arrives as a keyword argument (one entry per completion). Higher reward is better.

A reward is named in recipes and on the command line by one of:

- a registered name: ``"countdown"``, ``"countdown_format"``, ``"gsm8k"``, ``"arithmetic"``,
  ``"arithmetic_format"`` (see ``REWARD_FUNCS``);
- ``"module:function"``, e.g. ``"rewards.countdown:countdown_reward"`` or ``"my_pkg.rw:score"``;
- ``"path/to/file.py:function"``, for a reward written in a loose file.

This package is independent of ``eggroll_ft``: pure functions over strings and dataset rows.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Callable

from rewards.arithmetic import arithmetic_format_reward, arithmetic_reward
from rewards.countdown import countdown_format_reward, countdown_reward
from rewards.gsm8k import gsm8k_reward

REWARD_FUNCS: dict[str, Callable[..., list[float]]] = {
    "countdown": countdown_reward,
    "countdown_format": countdown_format_reward,
    "gsm8k": gsm8k_reward,
    "arithmetic": arithmetic_reward,
    "arithmetic_format": arithmetic_format_reward,
}


def _load_file(path: str):
    """Import a .py file as a module under a name derived from its absolute path."""
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


def get_reward_func(spec: str | Callable) -> Callable[..., list[float]]:
    """Resolve a reward: a registered name, ``"module:function"`` or ``"file.py:function"``.

    A callable is returned unchanged. Errors are ``ValueError`` naming what was not found.

    >>> get_reward_func("gsm8k") is gsm8k_reward
    True
    >>> get_reward_func("rewards.countdown:countdown_format_reward") is countdown_format_reward
    True
    >>> get_reward_func("countdwn")
    Traceback (most recent call last):
    ...
    ValueError: reward 'countdwn' is not a registered name (countdown, countdown_format, gsm8k, arithmetic, arithmetic_format), nor 'module:function', nor 'path/to/file.py:function'
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec={spec!r} must be a non-empty string or a callable")
    spec = spec.strip()
    if spec in REWARD_FUNCS:
        return REWARD_FUNCS[spec]
    if ":" not in spec:
        raise ValueError(
            f"reward {spec!r} is not a registered name ({', '.join(REWARD_FUNCS)}), nor "
            "'module:function', nor 'path/to/file.py:function'"
        )
    target, func_name = spec.rsplit(":", 1)  # rsplit keeps Windows drive letters in target
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


__all__ = ["REWARD_FUNCS", "get_reward_func", "countdown_reward", "countdown_format_reward", "gsm8k_reward",
           "arithmetic_reward", "arithmetic_format_reward"]
