"""Arithmetic with EGGROLL: ES fine-tuning of a chat model to answer "What is 47 + 85?" correctly.

    python recipes/arithmetic.py --config recipes/configs/arithmetic/smollm2_cpu.yaml      # SmolLM2, CPU
    accelerate launch --config_file recipes/accelerate_configs/cpu_2proc.yaml recipes/arithmetic.py \\
        --config recipes/configs/arithmetic/smollm2_cpu.yaml
    python recipes/arithmetic.py --config <config> --eval_only --model_name_or_path <trained dir>

The project's reference task on a real model (``rewards/arithmetic.py``): SmolLM2-135M-Instruct
gets 2-digit additions right only some of the time, and often answers at length, so a short
completion budget cuts its answer off. What the script does, top to bottom:

1. Parse ``ArithmeticArguments``, ``EggrollConfig`` and TRL's ``ModelConfig`` with ``trl.TrlParser``
   (a YAML file plus command-line overrides; an unknown YAML key is an error).
2. Data: generated problems of one difficulty ``level`` with fixed test and validation splits
   (``make_arithmetic_splits``); the model is scored on ``eval_split`` ("test": the held-out
   problems to report; "validation": the ones to tune on).
3. Model: a hub id, a path, a ``.gguf`` file, or a named model (``smollm2-135m-instruct`` is built
   into the cache on first use).
4. Greedy accuracy per problem before and after training (the mean of ``arithmetic_reward``), and
   the exact McNemar test of the change on the same problems: ``eval_results.json`` holds
   ``accuracy_before``, ``accuracy_after``, ``gained``, ``lost`` and ``p_value``.
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
from eggroll_ft.recipe_utils import RecipeArguments, run_recipe  # noqa: E402
import rewards  # noqa: E402,F401  (registers the task rewards)
from rewards.arithmetic import LEVELS, TEMPLATES, make_arithmetic_splits  # noqa: E402


@dataclass
class ArithmeticArguments(RecipeArguments):
    """Arithmetic data and evaluation (``RecipeArguments`` holds the fields every task shares)."""

    level: str = field(default="add2", metadata={"help": f"Difficulty: one of {sorted(LEVELS)}."})
    template: str = field(default="chat", metadata={"help": f"Prompt template: one of {sorted(TEMPLATES)}."})
    reward_funcs: list[str] = field(default_factory=lambda: ["arithmetic"], metadata={
        "help": "Reward functions; 'arithmetic' (final-answer correctness) is required, it defines the accuracy."})
    num_train: int | None = field(default=2048, metadata={"help": "Training problems (generated)."})
    num_eval: int = field(default=512, metadata={"help": "Problems scored before/after training (of eval_split)."})
    eval_split: str = field(default="test", metadata={
        "help": "'test' (the fixed held-out problems: report these) or 'validation' (tune on these)."})

    def __post_init__(self):
        super().__post_init__()
        if self.level not in LEVELS:
            raise ValueError(f"level={self.level!r} must be one of {sorted(LEVELS)}")
        if self.template not in TEMPLATES:
            raise ValueError(f"template={self.template!r} must be one of {sorted(TEMPLATES)}")
        if self.eval_split not in ("test", "validation"):
            raise ValueError(f"eval_split={self.eval_split!r} must be 'test' or 'validation'")


def make_parser() -> TrlParser:
    return TrlParser((ArithmeticArguments, EggrollConfig, ModelConfig))


def validate_config(path: str) -> tuple:
    """Parse a YAML config as the script would (unknown keys raise ``ValueError``); used by the tests."""
    return make_parser().parse_args_and_config(["--config", str(path)])


def build_datasets(a: ArithmeticArguments):
    """``(train, scored)``: generated training problems and the ``eval_split`` problems (disjoint)."""
    sizes = {"num_test": a.num_eval, "num_validation": 256} if a.eval_split == "test" else \
        {"num_test": 512, "num_validation": a.num_eval}
    splits = make_arithmetic_splits(a.level, num_train=a.num_train or 2048, template=a.template, seed=a.dataset_seed,
                                    **sizes)
    return splits["train"], splits[a.eval_split]


def main(argv: list[str] | None = None) -> dict:
    script_args, training_args, model_args = make_parser().parse_args_and_config(argv)
    return run_recipe(script_args, training_args, model_args, build_datasets, "arithmetic_reward", paired=True)


if __name__ == "__main__":
    main()
