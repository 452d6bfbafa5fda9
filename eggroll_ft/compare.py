"""Pieces of a fair method comparison (``scripts/compare_grpo.py``): budgets, counting, held-out scoring.

Boundary: everything here works on any ``transformers.Trainer`` (``EggrollTrainer`` or TRL's
``GRPOTrainer``) through the public callback protocol and the model's own ``generate``; nothing
knows how a method produces its update. The same code measures both methods, which is the point:

- ``CountingReward`` wraps a reward function and counts the completions it scored, so "completions
  generated" is counted the same way for both trainers (every generated completion is scored once).
- ``greedy_accuracy`` scores the unperturbed model greedily with Hugging Face ``generate`` (not
  ES's population engine, not TRL's sampler), so both methods are judged by identical code.
- ``BudgetCallback`` stops training once a wall-clock or completions budget is spent and scores
  the model at step 0, every ``eval_every_seconds`` of training time, and at the end. Time spent
  scoring is excluded from the training clock.
"""
from __future__ import annotations

import functools
import math
import resource
import time

import torch
from transformers import TrainerCallback


class CountingReward:
    """``reward(completions, **columns)`` that also counts the completions it has scored.

    >>> r = CountingReward(lambda completions, **kw: [1.0] * len(completions))
    >>> r(["a", "b"]), r.count
    ([1.0, 1.0], 2)
    """

    def __init__(self, func):
        self.func, self.count = func, 0
        functools.update_wrapper(self, func)  # keeps __name__: both trainers name metrics by it

    def __call__(self, completions, **kwargs):
        self.count += len(completions)
        return self.func(completions, **kwargs)


def resident_mb() -> float | None:
    """Resident memory of this process now (``VmRSS``, Linux), in MiB; None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            return round(next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024, 1)
    except (OSError, StopIteration, ValueError):
        return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def greedy_accuracy(model, tokenizer, prompts: list, columns: dict, reward_func, max_new_tokens: int,
                    batch_size: int = 64, per_problem: bool = False):
    """Mean of ``reward_func`` over greedy completions of ``prompts`` (``columns``: one entry per prompt).

    Prompts are strings, or chat messages (rendered with the tokenizer's chat template and the
    generation prompt, as both trainers do).

    ``per_problem=True`` returns the list of per-prompt rewards instead (for paired tests).
    """
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation continues the prompt's last token
    if prompts and isinstance(prompts[0], list):
        prompts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    texts = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, top_p=None, top_k=None,
                                 temperature=None, pad_token_id=tokenizer.pad_token_id)
            texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    rewards = reward_func(texts, **columns)
    return [float(r) for r in rewards] if per_problem else sum(rewards) / len(rewards)


def paired_change(before: list[float], after: list[float]) -> dict:
    """Exact McNemar test of a change in 0/1 scores on the same problems.

    ``gained``: problems wrong before and right after; ``lost``: the reverse. ``p_value`` is the
    two-sided exact binomial probability of a split at least this uneven among the
    ``gained + lost`` problems that changed, if a change were equally likely either way.

    >>> paired_change([0, 0, 1, 1], [1, 1, 1, 0])
    {'gained': 2, 'lost': 1, 'p_value': 1.0}
    """
    if len(before) != len(after):
        raise ValueError(f"before has {len(before)} scores, after {len(after)}: score the same problems")
    gained = sum(1 for b, a in zip(before, after) if b < 0.5 <= a)
    lost = sum(1 for b, a in zip(before, after) if a < 0.5 <= b)
    n, k = gained + lost, min(gained, lost)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return {"gained": gained, "lost": lost, "p_value": p}


class BudgetCallback(TrainerCallback):
    """Stop at a budget, and append a row per held-out evaluation to ``self.rows``.

    Args:
        evaluate: ``() -> accuracy`` of the current model (``greedy_accuracy`` bound to the eval set),
            or ``() -> per-problem scores`` (a list): the row then holds their mean as
            ``eval_accuracy`` and the list as ``eval_per_problem``.
        counter: the ``CountingReward`` of the training run (completions generated so far).
        max_seconds: training wall-clock budget (evaluation time excluded); None or 0 = no limit.
        max_completions: completions budget; None or 0 = no limit. Checked after each step, so the
            last step may overshoot by at most one step's completions.
        eval_every_seconds: training seconds between evaluations (plus step 0 and the end).
        method: the ``method`` column of every row.

    Rows: ``method, step, wall_clock_s, completions, train_reward, eval_accuracy, peak_rss_mb``;
    ``train_reward`` is the mean logged ``reward`` of the steps since the previous row (needs
    ``logging_steps=1``).
    """

    def __init__(self, evaluate, counter: CountingReward, max_seconds=None, max_completions=None,
                 eval_every_seconds: float = 60.0, method: str = ""):
        if not eval_every_seconds or eval_every_seconds <= 0:
            raise ValueError(f"eval_every_seconds={eval_every_seconds!r} must be > 0")
        if not max_seconds and not max_completions:
            raise ValueError(f"max_seconds={max_seconds!r} and max_completions={max_completions!r}: set at least one budget")
        self.evaluate, self.counter, self.method = evaluate, counter, method
        self.max_seconds, self.max_completions = max_seconds or math.inf, max_completions or math.inf
        self.eval_every = eval_every_seconds
        self.rows: list[dict] = []
        self._rewards: list[float] = []
        self._train_seconds, self._since = 0.0, None

    def _clock(self) -> float:
        """Training seconds so far (the clock runs between evaluations only)."""
        return self._train_seconds + (time.perf_counter() - self._since if self._since is not None else 0.0)

    def _record(self, step: int):
        self._train_seconds, self._since = self._clock(), None  # pause the clock while scoring
        train_reward = sum(self._rewards) / len(self._rewards) if self._rewards else math.nan
        score = self.evaluate()
        per_problem = list(score) if isinstance(score, (list, tuple)) else None
        accuracy = sum(per_problem) / len(per_problem) if per_problem is not None else score
        row = {"method": self.method, "step": step, "wall_clock_s": round(self._train_seconds, 2),
               "completions": self.counter.count, "train_reward": train_reward,
               "eval_accuracy": accuracy, "peak_rss_mb": round(peak_rss_mb(), 1)}
        print(f"[budget] {row} resident_mb={resident_mb()}", flush=True)  # progress in the run's log
        if per_problem is not None:
            row["eval_per_problem"] = per_problem
        self.rows.append(row)
        self._rewards = []
        self._since = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self._record(state.global_step)  # the base model (step 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "reward" not in logs:
            return
        self._rewards.append(float(logs["reward"]))
        spent = self._clock() >= self.max_seconds or self.counter.count >= self.max_completions
        if spent:
            control.should_training_stop = True
        last_eval = self.rows[-1]["wall_clock_s"] if self.rows else 0.0
        if spent or self._clock() - last_eval >= self.eval_every:
            self._record(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.rows and self.rows[-1]["step"] != state.global_step:  # stopped by max_steps, not the budget
            self._record(state.global_step)


def first_reaching(rows: list[dict], level: float, key: str) -> float | None:
    """``rows[key]`` of the first row whose eval_accuracy is >= level (rows in time order), else None."""
    return next((r[key] for r in rows if r["eval_accuracy"] >= level), None)
