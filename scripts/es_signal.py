"""How much signal one ES step has at given settings: the population's rewards, without an update.

    python scripts/es_signal.py                                   # SmolLM2, 2-digit addition, the settings below
    python scripts/es_signal.py --settings '{"sigma": 0.01}' '{"greedy": false, "temperature": 0.7}'

ES learns from differences between members' rewards on the same prompts. When every member gets
the same reward on a prompt (``frac_reward_zero_std``, as the trainer logs it), that prompt adds
nothing to the step; when no prompt differs, the step has no signal at all. For each setting (a
JSON object of ``EggrollConfig`` fields over the base below) this evaluates one population on the
same ``--prompts`` training prompts, step 0, and prints one JSON line: the mean reward, the
fraction of prompts with zero spread, the range of the members' mean rewards, the mean completion
length and the seconds taken. Nothing is trained (the update is not applied).

Base settings: ``population_size`` 32, greedy, ``sigma`` 3e-3, 16 new tokens, chat template, the
``arithmetic`` reward on level ``add2``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_SETTINGS = [{"sigma": 1e-3}, {"sigma": 3e-3}, {"sigma": 1e-2}, {"sigma": 3e-2},
                    {"greedy": False, "temperature": 1.0},
                    {"greedy": False, "temperature": 0.7},
                    {"greedy": False, "temperature": 0.7, "common_sampling_noise": True}]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--level", default="add2")
    ap.add_argument("--prompts", type=int, default=16, help="training prompts every member answers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settings", nargs="+", type=json.loads, default=DEFAULT_SETTINGS,
                    help="JSON objects of EggrollConfig fields, one evaluation each")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from eggroll_ft import EggrollConfig, EggrollTrainer
    from eggroll_ft.models.loading import load_causal_lm, load_tokenizer
    from eggroll_ft.models.named import resolve_model_name
    from rewards.arithmetic import arithmetic_reward, make_arithmetic_splits

    path = resolve_model_name(a.model)
    model = load_causal_lm(path)
    tok = load_tokenizer(model, path)
    train = make_arithmetic_splits(a.level, num_train=2048)["train"]
    inputs = [train[i] for i in range(a.prompts)]
    base = dict(output_dir="runs/es_signal", report_to="none", use_cpu=True, max_steps=1, population_size=32,
                prompts_per_step=a.prompts, max_completion_length=16, greedy=True, sigma=3e-3, learning_rate=0.0,
                es_replay_log=False, disable_tqdm=True)
    results = []
    for setting in a.settings:
        args = EggrollConfig(**{**base, **setting})
        trainer = EggrollTrainer(model, arithmetic_reward, args=args, train_dataset=train, processing_class=tok)
        trainer.population.set_step(0, args.sigma)
        start = time.perf_counter()
        batch = trainer._generate_and_score_completions(inputs)
        seconds = time.perf_counter() - start
        rewards = batch["rewards"]  # (Q, N)
        member_means = rewards.mean(0)
        row = {"settings": setting, "reward": round(rewards.mean().item(), 4),
               "frac_reward_zero_std": round((rewards.std(1) == 0).float().mean().item(), 4),
               "member_reward_min": round(member_means.min().item(), 4),
               "member_reward_max": round(member_means.max().item(), 4),
               "completions/mean_length": round(sum(batch["completion_lengths"]) / len(batch["completion_lengths"]), 2),
               "seconds": round(seconds, 1)}
        print(json.dumps(row), flush=True)
        results.append(row)
        trainer.population.remove()  # the next setting hooks the same model afresh
    return results


if __name__ == "__main__":
    main()
