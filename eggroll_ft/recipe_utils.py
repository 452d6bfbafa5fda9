"""Plumbing shared by the task recipes (``recipes/countdown.py``, ``recipes/gsm8k.py``).

What a recipe needs besides its task: the script arguments every task has (``RecipeArguments``),
``ModelConfig`` -> ``from_pretrained`` keyword arguments, a held-out split, tiny offline models
for smoke runs, and the evaluate -> train -> evaluate -> save sequence that writes
``eval_results.json``. (The launch itself is checked by ``EggrollConfig``.)

Boundary: this module drives an ``EggrollTrainer`` through its public methods (``evaluate``,
``train``, ``save_model``); it builds no prompts and computes no reward itself.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

# named models (built into the cache on first use) live with the model loaders; re-exported for recipes
from .models.named import (TINY_RANDOM_LLAMA, build_dir_atomically, build_tiny_random_llama,  # noqa: F401
                           cache_dir, resolve_model_name)


@dataclass
class RecipeArguments:
    """Script arguments of every task recipe; a task subclasses it to add fields and set defaults."""

    dataset_path: str | None = field(default=None, metadata={
        "help": "Local file/directory or hub id of the task's data; None: the task's default source."})
    num_train: int | None = field(default=None, metadata={"help": "Training problems kept (None: all)."})
    num_eval: int = field(default=200, metadata={"help": "Held-out problems scored greedily before/after training."})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of problem generation and of the held-out split."})
    template: str = field(default="chat", metadata={"help": "Prompt template (see rewards/<task>.py TEMPLATES)."})
    reward_funcs: list[str] = field(default_factory=list, metadata={
        "help": "Reward functions: registered names ('countdown', 'gsm8k' ...) or 'module:function'."})
    eval_only: bool = field(default=False, metadata={
        "help": "Only score the model on the held-out split (greedy, through the engine); no training."})
    eval_before_training: bool = field(default=True, metadata={
        "help": "Score the starting model on the held-out split before training."})

    def __post_init__(self):
        if not isinstance(self.num_eval, int) or self.num_eval < 1:
            raise ValueError(f"num_eval={self.num_eval!r} must be an int >= 1")
        if self.num_train is not None and (not isinstance(self.num_train, int) or self.num_train < 1):
            raise ValueError(f"num_train={self.num_train!r} must be None or an int >= 1")
        if not self.reward_funcs:
            raise ValueError(f"reward_funcs={self.reward_funcs!r} must name at least one reward function")


def model_init_kwargs(model_args) -> dict:
    """``from_pretrained`` keyword arguments from TRL's ``ModelConfig`` (as TRL's own scripts build them)."""
    from trl import get_quantization_config

    kwargs = {"revision": model_args.model_revision, "dtype": model_args.dtype,
              "attn_implementation": model_args.attn_implementation}
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        from accelerate import PartialState

        kwargs.update(quantization_config=quantization, device_map={"": PartialState().local_process_index})
    return {k: v for k, v in kwargs.items() if v is not None}


def heldout_split(dataset, num_eval: int, num_train: int | None = None, seed: int = 0,
                  key_columns: tuple[str, ...] = ()):
    """``(train, heldout)``: the first ``num_eval`` rows of a seeded shuffle are held out.

    Training rows are the next ``num_train`` rows (all the rest when None), minus any whose
    ``key_columns`` values equal a held-out row's (a duplicated problem must not leak into
    training), so ``train`` may hold slightly fewer than ``num_train`` rows.
    """
    if num_eval < 1 or num_eval >= len(dataset):
        raise ValueError(f"num_eval={num_eval} must lie in [1, {len(dataset) - 1}] for a dataset of {len(dataset)} rows")
    shuffled = dataset.shuffle(seed=seed)
    heldout = shuffled.select(range(num_eval))
    end = len(shuffled) if num_train is None else min(len(shuffled), num_eval + num_train)
    train = shuffled.select(range(num_eval, end))
    if key_columns:
        def key(row):
            return tuple(tuple(row[c]) if isinstance(row[c], list) else row[c] for c in key_columns)

        held = {key(row) for row in heldout}
        train = train.filter(lambda row: key(row) not in held)
    if len(train) == 0:
        raise ValueError(f"no training rows left after holding out num_eval={num_eval} of {len(dataset)}")
    return train, heldout


def _final_eval(trainer) -> dict:
    """The ``eval_*`` metrics of the trained model: reused when the last logged evaluation ran at the
    final step (``eval_steps`` dividing ``max_steps``), otherwise a fresh ``trainer.evaluate()``."""
    last = next((h for h in reversed(trainer.state.log_history) if "eval_reward" in h), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return {k: v for k, v in last.items() if k.startswith("eval_")}
    return trainer.evaluate()


def run_recipe(script_args, training_args, model_args, build_datasets, accuracy_reward: str,
               paired: bool = False) -> dict:
    """What every task recipe does once its arguments are parsed; returns ``eval_results.json``'s content.

    Resolves the model (a named model is built by rank 0 first, the other ranks then reuse it),
    builds ``(train, eval)`` with ``build_datasets(script_args)``, trains an ``EggrollTrainer`` with
    the task's ``reward_funcs`` (and LoRA when ``use_peft``), and scores before and after
    (``train_and_evaluate``; ``--eval_only`` scores only).
    """
    from trl import get_peft_config

    from .callbacks import JsonlMetricsCallback
    from .models.named import NAMED_MODELS
    from .trainer import EggrollTrainer

    if model_args.model_name_or_path is None:
        raise ValueError("model_name_or_path=None: give a hub id, a local path, a .gguf file or a named model "
                         f"({', '.join(sorted(NAMED_MODELS))})")
    with training_args.main_process_first(desc="model and data"):
        model_path = resolve_model_name(model_args.model_name_or_path)
        train_dataset, eval_dataset = build_datasets(script_args)
    training_args.model_init_kwargs = {**model_init_kwargs(model_args), **(training_args.model_init_kwargs or {})}
    trainer = EggrollTrainer(
        model=model_path,
        reward_funcs=script_args.reward_funcs,
        args=training_args,
        train_dataset=eval_dataset if script_args.eval_only else train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
        callbacks=[JsonlMetricsCallback()],
    )
    results = train_and_evaluate(trainer, accuracy_reward, eval_only=script_args.eval_only,
                                 eval_before_training=script_args.eval_before_training, paired=paired)
    trainer.end()
    return results


def train_and_evaluate(trainer, accuracy_reward: str, eval_only: bool = False,
                       eval_before_training: bool = True, paired: bool = False) -> dict:
    """Score -> train -> score -> save; writes ``<output_dir>/eval_results.json`` and returns it.

    ``accuracy_reward`` names the reward function whose held-out greedy mean is the accuracy
    (``eval_rewards/<name>/mean``). With ``eval_only`` the model is only scored (no training, no
    save). ``paired``: the results also hold each problem's score before and after
    (``per_problem_before``/``_after``) and the exact McNemar test of the change (``gained``,
    ``lost``, ``p_value``; the accuracy reward must be 0/1). Prints a one-line summary. Every
    evaluation is also a log record (``metrics.jsonl`` through the callbacks).
    """
    if accuracy_reward not in trainer.reward_func_names:
        raise ValueError(f"reward_funcs={trainer.reward_func_names} must include {accuracy_reward!r}: the held-out "
                         "accuracy is its mean (give it weight 0 in reward_weights to train on the others only)")
    key = f"eval_rewards/{accuracy_reward}/mean"
    args = trainer.args
    results = {"model": str(getattr(trainer.model.config, "_name_or_path", "")), "accuracy_metric": key,
               "num_eval": len(trainer.eval_dataset), "eval_only": eval_only}
    if eval_only:
        metrics = trainer.evaluate()
        results.update(accuracy=metrics[key], metrics=metrics)
    else:
        column = trainer.reward_func_names.index(accuracy_reward)
        per_problem = {}
        if eval_before_training or paired:
            before = trainer.evaluate()
            per_problem["before"] = trainer.last_eval_rewards[:, column].nan_to_num(0.0).tolist()
            results.update(accuracy_before=before[key], before=before)
        train_output = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        after = trainer.evaluate() if paired else _final_eval(trainer)
        if paired:
            from .compare import paired_change

            per_problem["after"] = trainer.last_eval_rewards[:, column].nan_to_num(0.0).tolist()
            results.update(paired_change(per_problem["before"], per_problem["after"]),
                           per_problem_before=per_problem["before"], per_problem_after=per_problem["after"])
        results.update(accuracy_after=after[key], after=after, global_step=trainer.state.global_step,
                       train_metrics=train_output.metrics)
        trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "eval_results.json"), "w") as f:
            json.dump(results, f, indent=2)
        n = results["num_eval"]
        if eval_only:
            print(f"held-out accuracy of {results['model']}: {results['accuracy']:.3f} on {n} problems")
        else:
            before = f"{results['accuracy_before']:.3f}" if eval_before_training else "n/a"
            change = f" (gained {results['gained']}, lost {results['lost']}, exact McNemar p = {results['p_value']:.3g})" \
                if paired else ""
            print(f"held-out accuracy: {before} -> {results['accuracy_after']:.3f} on {n} problems{change}; "
                  f"model saved to {os.path.abspath(args.output_dir)}")
    return results
