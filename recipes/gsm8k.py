"""GSM8K with EGGROLL: ES fine-tuning of a causal LM (transformers or RWKV-7) on grade-school math.

    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml recipes/gsm8k.py \\
        --config recipes/configs/gsm8k/qwen2.5-1.5b-instruct.yaml [--any_field value ...]
    python recipes/gsm8k.py --config recipes/configs/gsm8k/tiny_cpu.yaml --dataset_path /work/shared/data/gsm8k
    python recipes/gsm8k.py --config <config> --eval_only --model_name_or_path <trained dir>

The second LLM task of EGGROLL (Sarkar et al. 2025, arXiv 2511.16652; Cobbe et al. 2021's data).
What the script does, top to bottom:

1. Parse ``GSM8KArguments``, ``EggrollConfig`` and TRL's ``ModelConfig`` with ``trl.TrlParser``:
   a YAML file (``--config``; a key no dataclass knows is an error) plus command-line overrides.
2. Data: ``rewards.gsm8k.load_gsm8k``: the hub's ``openai/gsm8k`` or, with ``--dataset_path``, a
   directory holding ``train.jsonl`` and ``test.jsonl`` (offline). The first ``num_eval`` test
   problems are the held-out split; training uses the first ``num_train`` train problems.
3. Model: a hub id or path (``tiny-random-llama``: a random smoke-run model built in code).
   LoRA when ``use_peft`` (ES then perturbs only the adapters).
4. Greedy held-out accuracy (mean of ``gsm8k_reward``) before training, every ``eval_steps``
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
from eggroll_ft.recipe_utils import RecipeArguments, run_recipe  # noqa: E402
import rewards  # noqa: E402,F401  (registers the task rewards)
from rewards.gsm8k import TEMPLATES, load_gsm8k  # noqa: E402


@dataclass
class GSM8KArguments(RecipeArguments):
    """GSM8K data and evaluation (``RecipeArguments`` holds the fields every task shares)."""

    dataset_path: str | None = field(default=None, metadata={
        "help": "A directory with train.jsonl/test.jsonl (offline); None: the hub's openai/gsm8k."})
    template: str = field(default="chat", metadata={"help": f"Prompt template: one of {sorted(TEMPLATES)}."})
    reward_funcs: list[str] = field(default_factory=lambda: ["gsm8k"], metadata={
        "help": "Reward functions; 'gsm8k' (final-answer correctness) is required, it defines the accuracy."})

    def __post_init__(self):
        super().__post_init__()
        if self.template not in TEMPLATES:
            raise ValueError(f"template={self.template!r} must be one of {sorted(TEMPLATES)}")


def make_parser() -> TrlParser:
    return TrlParser((GSM8KArguments, EggrollConfig, ModelConfig))


def validate_config(path: str) -> tuple:
    """Parse a YAML config as the script would (unknown keys raise ``ValueError``); used by the tests."""
    return make_parser().parse_args_and_config(["--config", str(path)])


def build_datasets(script_args: GSM8KArguments):
    """``(train, heldout)`` with columns prompt, question, answer: the train split and the test split."""
    a = script_args
    train = load_gsm8k("train", path=a.dataset_path, template=a.template, n=a.num_train)
    heldout = load_gsm8k("test", path=a.dataset_path, template=a.template, n=a.num_eval)
    return train, heldout


def main(argv: list[str] | None = None) -> dict:
    script_args, training_args, model_args = make_parser().parse_args_and_config(argv)
    return run_recipe(script_args, training_args, model_args, build_datasets, "gsm8k_reward")


if __name__ == "__main__":
    main()
