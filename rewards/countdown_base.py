"""The tiny Countdown base model (``tiny-countdown-base``): Countdown worked examples for a tiny LM.

``eggroll_ft.tiny_base`` pretrains a 203k-parameter character-level Llama on ``(prompt,
completion)`` pairs; this module supplies them for Countdown and judges the result. Prompts use the
"minimal" template (``"Use the numbers [3, 5, 7] to make 22.\\n"``), completions are
``"<answer>EXPR</answer>"`` with the canonical solution of ``countdown.solve`` (general=False;
the generator's own solution where no canonical form exists). The held-out accuracy is the mean
``countdown_reward`` of greedy completions on 3-number problems (``eggroll_ft.compare``).

``import rewards`` registers the name, so ``EggrollTrainer(model="tiny-countdown-base")``, the
recipes and the scripts build it into ``$EGGROLL_CACHE`` (default ``~/.cache/eggroll_ft``) on
first use (about 3.5 CPU minutes on one core) and reuse it after.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import time

from eggroll_ft.compare import greedy_accuracy
from eggroll_ft.models.named import build_dir_atomically
from eggroll_ft.tiny_base import TinyBaseConfig, pretrain, torch_threads
from rewards.countdown import countdown_reward, format_prompt, generate_countdown_problems, solve

TINY_COUNTDOWN_BASE = "tiny-countdown-base"
TEMPLATE = "minimal"
INFO_FILE = "tiny_base_info.json"  # written beside the checkpoint: how it was built and how it scores


@dataclasses.dataclass
class CountdownBaseData:
    """The training and held-out problems of the tiny base; recorded in its build info."""

    num_train: int = 20_000
    """Generated training problems (deduplicated, disjoint from the held-out set)."""
    max_value: int = 100
    """Numbers and targets lie in 1..max_value (countdown.generate_countdown_problems)."""
    four_number_fraction: float = 0.0
    """Fraction of training problems with four numbers (the rest, and all held-out ones, have three)."""
    num_eval: int = 256
    """Held-out problems for the final greedy accuracy."""
    eval_seed: int = 1_000_003
    """Seed of the held-out problems (fixed, so every build is scored on the same problems)."""

    def __post_init__(self):
        for name in ("num_train", "max_value", "num_eval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0.0 <= self.four_number_fraction <= 1.0:
            raise ValueError(f"four_number_fraction={self.four_number_fraction} must lie in [0, 1]")


def _problems(n: int, num_count: int, max_value: int, seed: int) -> list[dict]:
    """n problems with ``num_count`` numbers in 1..max_value, with canonical solutions (no spaces)."""
    out = []
    for p in generate_countdown_problems(n, seed=seed, min_numbers=num_count, max_numbers=num_count,
                                         max_value=max_value):
        canonical = solve(p["nums"], p["target"], general=False)
        solution = canonical.replace(" ", "") if canonical else p["solution"]  # the generator's as a fallback
        out.append({"nums": list(p["nums"]), "target": p["target"], "solution": solution})
    return out


def heldout_problems(n: int = CountdownBaseData.num_eval, seed: int = CountdownBaseData.eval_seed,
                     max_value: int = CountdownBaseData.max_value) -> list[dict]:
    """The held-out distribution the reported accuracy is measured on: 3 numbers in 1..max_value."""
    return _problems(n, 3, max_value, seed)


def training_problems(data: CountdownBaseData, seed: int) -> list[dict]:
    """``data.num_train`` problems (3 and 4 numbers) from ``seed``, none of which is a held-out problem."""
    held = {(tuple(p["nums"]), p["target"]) for p in heldout_problems(data.num_eval, data.eval_seed, data.max_value)}
    n4 = round(data.num_train * data.four_number_fraction)
    pool = _problems(data.num_train - n4, 3, data.max_value, seed)
    pool += _problems(n4, 4, data.max_value, seed + 1) if n4 else []
    pool = [p for p in pool if (tuple(p["nums"]), p["target"]) not in held]
    random.Random(seed).shuffle(pool)
    return pool


def sft_pairs(problems: list[dict]) -> list[tuple[str, str]]:
    """``(prompt, "<answer>solution</answer>")`` for each problem."""
    return [(format_prompt(p["nums"], p["target"], template=TEMPLATE), f"<answer>{p['solution']}</answer>")
            for p in problems]


def heldout_accuracy(model, tokenizer, problems: list[dict], max_new_tokens: int = 40, batch_size: int = 128) -> float:
    """Mean ``countdown_reward`` (0 or 1) of the model's greedy completions of ``problems``."""
    prompts = [format_prompt(p["nums"], p["target"], template=TEMPLATE) for p in problems]
    columns = {"nums": [p["nums"] for p in problems], "target": [p["target"] for p in problems]}
    return greedy_accuracy(model, tokenizer, prompts, columns, countdown_reward, max_new_tokens, batch_size)


def build_tiny_countdown_base(path: str, cfg: TinyBaseConfig | None = None, data: CountdownBaseData | None = None,
                              progress: bool = True) -> str:
    """The tiny base checkpoint at ``path``, built there unless one is already (atomic: an interrupted
    build leaves nothing). Returns ``path``."""
    return build_dir_atomically(path, lambda tmp: _build(tmp, cfg, data or CountdownBaseData(), progress))


def _build(output_dir: str, cfg: TinyBaseConfig | None, data: CountdownBaseData, progress: bool) -> dict:
    cfg = cfg or TinyBaseConfig()
    build_start = time.perf_counter()
    with torch_threads(cfg.threads):
        model, tokenizer, info = pretrain(sft_pairs(training_problems(data, cfg.seed)), cfg, progress=progress)
        heldout = heldout_problems(data.num_eval, data.eval_seed, data.max_value)
        start = time.perf_counter()
        accuracy = heldout_accuracy(model, tokenizer, heldout, cfg.max_new_tokens)
        eval_seconds = time.perf_counter() - start
        start = time.perf_counter()
        heldout_accuracy(model, tokenizer, heldout[:64], cfg.max_new_tokens, batch_size=64)  # sizing ES/GRPO runs
        greedy_64_seconds = time.perf_counter() - start
    info = {"model": TINY_COUNTDOWN_BASE, **info, "heldout_accuracy": accuracy, "heldout_problems": len(heldout),
            "heldout_eval_seconds": round(eval_seconds, 1), "greedy_64_seconds": round(greedy_64_seconds, 2),
            "template": TEMPLATE,
            "config": {**dataclasses.asdict(cfg), **dataclasses.asdict(data)}}
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    info["build_seconds"] = round(time.perf_counter() - build_start, 1)  # data + training + eval + save
    with open(os.path.join(output_dir, INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)
    return info
