"""Task rewards and their datasets (Countdown, GSM8K, arithmetic); importing the package registers them by name.

Reward functions follow TRL's protocol: ``reward(completions, **columns) -> list[float]``,
where ``completions`` are strings or lists of chat messages and every other dataset column
arrives as a keyword argument (one entry per completion). Higher reward is better.

``import rewards`` registers the names below in ``eggroll_ft.reward_funcs.REWARD_FUNCS`` (the one
registry, which ``EggrollTrainer(reward_funcs="countdown")`` and
``eggroll_ft.reward_funcs.resolve_reward_func`` read), and the named model
``tiny-countdown-base`` (``rewards.countdown_base``). A new task registers its rewards here with one
``register_reward_func(name, func)`` line each.

The task modules (``countdown``, ``gsm8k``, ``arithmetic``) are pure functions over strings and dataset rows and
import nothing of ``eggroll_ft``; this file registers them, and ``countdown_base`` builds the tiny
base model with the library's ``tiny_base``.
"""
from __future__ import annotations

from eggroll_ft.models.named import register_named_model
from eggroll_ft.reward_funcs import register_reward_func
from rewards.arithmetic import arithmetic_format_reward, arithmetic_reward
from rewards.countdown import countdown_format_reward, countdown_reward
from rewards.countdown_base import TINY_COUNTDOWN_BASE, build_tiny_countdown_base
from rewards.gsm8k import gsm8k_reward

register_reward_func("countdown", countdown_reward)
register_reward_func("countdown_format", countdown_format_reward)
register_reward_func("gsm8k", gsm8k_reward)
register_reward_func("arithmetic", arithmetic_reward)
register_reward_func("arithmetic_format", arithmetic_format_reward)
register_named_model(TINY_COUNTDOWN_BASE, build_tiny_countdown_base)

__all__ = ["countdown_reward", "countdown_format_reward", "gsm8k_reward", "arithmetic_reward",
           "arithmetic_format_reward"]
