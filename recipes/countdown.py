"""Countdown with EGGROLL: ES fine-tuning of a causal LM (transformers or RWKV-7) on arithmetic puzzles.

    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml recipes/countdown.py \\
        --config recipes/configs/countdown/qwen2.5-1.5b-instruct.yaml [--any_field value ...]
    python recipes/countdown.py --config recipes/configs/countdown/tiny_cpu.yaml     # CPU smoke run
    python recipes/countdown.py --config <config> --eval_only --model_name_or_path <trained dir>

The task of EGGROLL Sec. 6 (Sarkar et al. 2025, arXiv 2511.16652) and Qiu et al. 2025 (arXiv 2509.24372):
use every number once with + - * / to reach the target. What the script does, top to bottom:

1. Parse ``CountdownArguments``, ``EggrollConfig`` and TRL's ``ModelConfig`` with ``trl.TrlParser``:
   a YAML file (``--config``; a key no dataclass knows is an error) plus command-line overrides.
2. Data: generated problems (``rewards.countdown.make_countdown_dataset``, offline) or a file /
   hub dataset (``load_countdown``), split into training rows and ``num_eval`` held-out rows.
3. Model: a hub id or path, or a named model built into the cache on first use:
   ``tiny-countdown-base`` (the small character-level Countdown model of
   ``rewards/countdown_base.py``), ``tiny-random-llama`` (a random one). LoRA when ``use_peft``
   (ES then perturbs only the adapters).
4. Greedy held-out accuracy (mean of ``countdown_reward``) before training, every ``eval_steps``
   (``eval_strategy: steps``) and after; ``metrics.jsonl``, ``eval_results.json`` and the model
   are written to ``output_dir``. ``--eval_only`` scores a model without training.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # rewards/ lives beside the package
    sys.path.insert(0, str(ROOT))

from trl import ModelConfig, TrlParser  # noqa: E402

from eggroll_ft import EggrollConfig  # noqa: E402
from eggroll_ft.recipe_utils import RecipeArguments, heldout_split, run_recipe  # noqa: E402
import rewards  # noqa: E402,F401  (registers the task rewards and tiny-countdown-base)
from rewards.countdown import TEMPLATES, load_countdown, make_countdown_dataset  # noqa: E402


@dataclass
class CountdownArguments(RecipeArguments):
    """Countdown data and evaluation (``RecipeArguments`` holds the fields every task shares)."""

    template: str = field(default="tinyzero", metadata={"help": f"Prompt template: one of {sorted(TEMPLATES)}."})
    reward_funcs: list[str] = field(default_factory=lambda: ["countdown", "countdown_format"], metadata={
        "help": "Reward functions; 'countdown' (correctness) is required, it defines the accuracy."})
    num_train: int | None = field(default=10_000, metadata={"help": "Training problems (generated, or rows loaded)."})
    min_numbers: int = field(default=3, metadata={"help": "Generated problems: fewest numbers per problem."})
    max_numbers: int = field(default=4, metadata={"help": "Generated problems: most numbers per problem."})
    max_value: int = field(default=100, metadata={"help": "Generated problems: numbers and targets in 1..max_value."})

    def __post_init__(self):
        super().__post_init__()
        if self.template not in TEMPLATES:
            raise ValueError(f"template={self.template!r} must be one of {sorted(TEMPLATES)}")


def make_parser() -> TrlParser:
    return TrlParser((CountdownArguments, EggrollConfig, ModelConfig))


def validate_config(path: str) -> tuple:
    """Parse a YAML config as the script would (unknown keys raise ``ValueError``); used by the tests."""
    return make_parser().parse_args_and_config(["--config", str(path)])


def build_datasets(script_args: CountdownArguments):
    """``(train, heldout)`` with columns prompt, nums, target (and solution when generated)."""
    a = script_args
    if a.dataset_path is None:
        total = (a.num_train or 10_000) + a.num_eval
        ds = make_countdown_dataset(total, seed=a.dataset_seed, template=a.template, min_numbers=a.min_numbers,
                                    max_numbers=a.max_numbers, max_value=a.max_value)
    else:  # the first num_train + num_eval rows (hub sets are already shuffled), then the seeded split
        ds = load_countdown(a.dataset_path, template=a.template, n=a.num_train and a.num_train + a.num_eval)
    return heldout_split(ds, a.num_eval, a.num_train, seed=a.dataset_seed, key_columns=("nums", "target"))


def main(argv: list[str] | None = None) -> dict:
    script_args, training_args, model_args = make_parser().parse_args_and_config(argv)
    return run_recipe(script_args, training_args, model_args, build_datasets, "countdown_reward")


if __name__ == "__main__":
    main()
