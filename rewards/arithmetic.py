"""Arithmetic: generated "What is 47 + 85?" problems, fixed splits, a correctness and a format reward.

A task a small chat model can learn on a CPU: SmolLM2-135M-Instruct answers 2-digit additions
right only some of the time, and often at length ("To add 59 and 63, we need...") so that a short
completion budget cuts the answer off. Fine-tuning has room and, from the first step, a signal.

* Problems: ``num_operands`` integers of ``digits`` digits each (an int, or one per operand),
  joined by operations drawn from ``operations`` (``+``, ``-``, ``*``), valued with the usual
  precedence in exact integer arithmetic (never ``eval``). ``LEVELS`` names common settings
  (``add2``: 2-digit addition, ``mul1x2``: 1-digit times 2-digit, ``mixed3``: three operands ...).
* Splits: ``make_arithmetic_splits`` draws the test (held-out) and validation problems from fixed
  streams of their own seeds, and the training problems from a third, without any problem (up to
  the order of a commutative expression) that is in test or validation. Tune on validation; report
  on test.
* Rewards (TRL protocol, column ``answer``): ``arithmetic_reward`` is 1.0 when the completion's
  final answer (last number, ``\\boxed{}``, "the answer is", commas, negatives: ``rewards._numbers``)
  equals the answer; ``arithmetic_format_reward`` is 1.0 when the completion is just a number.

This module knows nothing of models or trainers.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from rewards._numbers import extract_final_answer, to_fraction
from rewards._text import completion_text, fill_template

OPERATIONS = "+-*"
TEMPLATES = {
    # chat models: the tokenizer's chat template is applied by the trainer
    "chat": [{"role": "user", "content": "What is {expression}? Answer with just the number."}],
    # base models
    "plain": "Question: What is {expression}?\nAnswer:",
}


@dataclass(frozen=True)
class Level:
    """A difficulty: operand digits (one int for all, or one per operand), operations, operand count."""

    digits: int | tuple[int, ...] = 2
    operations: str = "+"
    num_operands: int = 2

    def __post_init__(self):
        digits = (self.digits,) * self.num_operands if isinstance(self.digits, int) else tuple(self.digits)
        if not isinstance(self.num_operands, int) or self.num_operands < 2:
            raise ValueError(f"num_operands={self.num_operands!r} must be an int >= 2")
        if len(digits) != self.num_operands or any(not isinstance(d, int) or not 1 <= d <= 9 for d in digits):
            raise ValueError(f"digits={self.digits!r} must be an int in 1..9 or {self.num_operands} of them")
        if not self.operations or any(op not in OPERATIONS for op in self.operations):
            raise ValueError(f"operations={self.operations!r} must be a non-empty string of {OPERATIONS!r}")
        object.__setattr__(self, "digits", digits)


LEVELS = {
    "add1": Level(1, "+"),
    "add2": Level(2, "+"),
    "add3": Level(3, "+"),
    "addsub2": Level(2, "+-"),
    "mul1x2": Level((1, 2), "*"),
    "mul2": Level(2, "*"),
    "mixed3": Level((1, 2, 1), "+-*", num_operands=3),
}


def _level(level: str | Level) -> Level:
    if isinstance(level, Level):
        return level
    if level not in LEVELS:
        raise ValueError(f"level={level!r} is not one of {sorted(LEVELS)} (or pass an arithmetic.Level)")
    return LEVELS[level]


def _value(operands: list[int], ops: list[str]) -> int:
    """The expression's value with ``*`` before ``+``/``-``, left to right: exact integers, no eval.

    >>> _value([2, 3, 4], ["+", "*"]), _value([10, 4, 3], ["-", "-"])
    (14, 3)
    """
    terms, signs = [operands[0]], [1]
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            terms[-1] *= x
        else:
            terms.append(x)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms))


def _key(operands: list[int], ops: list[str]) -> tuple:
    """Identity of a problem up to reordering a sum or a product (``a + b`` is ``b + a``)."""
    if len(set(ops)) == 1 and ops[0] in "+*":
        return (ops[0], tuple(sorted(operands)))
    return (tuple(operands), tuple(ops))


def generate_arithmetic_problems(n: int, level: str | Level = "add2", seed: int = 0, exclude=()) -> list[dict]:
    """``n`` distinct problems ``{"expression", "answer"}``, deterministic in ``(level, seed)``.

    ``exclude``: problem keys never drawn (another split's). Raises when the level has fewer
    distinct problems than asked for.

    >>> p = generate_arithmetic_problems(2, "add2", seed=0)
    >>> [sorted(x) for x in p] == [["answer", "expression"]] * 2 and eval_free_check(p)
    True
    """
    lv = _level(level)
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r} must be an int >= 0")
    rng = random.Random(f"arithmetic:{seed}")  # str seeds hash deterministically (sha512)
    seen, problems = set(exclude), []
    misses = 0
    while len(problems) < n:
        operands = [rng.randint(10 ** (d - 1) if d > 1 else 0, 10 ** d - 1) for d in lv.digits]
        ops = [rng.choice(lv.operations) for _ in range(lv.num_operands - 1)]
        key = _key(operands, ops)
        if key in seen:
            misses += 1
            if misses > 100 * (n + 100):
                raise ValueError(f"level {lv} has too few distinct problems for n={n} (with {len(exclude)} excluded)")
            continue
        seen.add(key)
        expression = " ".join([str(operands[0])] + [f"{op} {x}" for op, x in zip(ops, operands[1:])])
        problems.append({"expression": expression, "answer": _value(operands, ops), "key": key})
    for p in problems:
        p.pop("key")
    return problems


def eval_free_check(problems: list[dict]) -> bool:
    """Re-derive every answer from its expression text by the same no-eval evaluator (for tests)."""
    for p in problems:
        parts = p["expression"].split()
        if _value([int(x) for x in parts[0::2]], parts[1::2]) != p["answer"]:
            return False
    return True


def format_prompt(expression: str, template: str = "chat") -> str | list[dict]:
    """The prompt for one problem: a string, or a list of chat messages for ``template="chat"``.

    >>> format_prompt("47 + 85", "plain")
    'Question: What is 47 + 85?\\nAnswer:'
    >>> format_prompt("47 + 85", "chat")[0]["content"]
    'What is 47 + 85? Answer with just the number.'
    """
    return fill_template(TEMPLATES, template, expression=expression)


def _dataset(problems: list[dict], template: str):
    import datasets

    return datasets.Dataset.from_dict({
        "prompt": [format_prompt(p["expression"], template) for p in problems],
        "expression": [p["expression"] for p in problems],
        "answer": [p["answer"] for p in problems],
    })


TEST_SEED, VALIDATION_SEED = 1_000_003, 2_000_003  # fixed: every run scores the same held-out problems


def make_arithmetic_splits(level: str | Level = "add2", num_train: int = 2048, num_validation: int = 256,
                           num_test: int = 512, template: str = "chat", seed: int = 0):
    """``datasets.DatasetDict`` with ``train``, ``validation`` and ``test`` (columns prompt, expression, answer).

    Test and validation come from fixed seeds (``TEST_SEED``, ``VALIDATION_SEED``), so they are the
    same problems whatever ``seed`` and ``num_train`` are (a larger ``num_test`` extends the same
    stream); ``seed`` draws the training problems. No problem is in two splits.

    >>> s = make_arithmetic_splits("add2", num_train=8, num_validation=4, num_test=4)
    >>> {k: len(v) for k, v in s.items()}
    {'train': 8, 'validation': 4, 'test': 4}
    """
    import datasets

    lv = _level(level)
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r} is not one of {sorted(TEMPLATES)}")
    test = generate_arithmetic_problems(num_test, lv, TEST_SEED)
    keys = {_key(*_parse(p["expression"])) for p in test}
    validation = generate_arithmetic_problems(num_validation, lv, VALIDATION_SEED, exclude=keys)
    keys |= {_key(*_parse(p["expression"])) for p in validation}
    train = generate_arithmetic_problems(num_train, lv, seed, exclude=keys)
    return datasets.DatasetDict({"train": _dataset(train, template), "validation": _dataset(validation, template),
                                 "test": _dataset(test, template)})


def _parse(expression: str) -> tuple[list[int], list[str]]:
    parts = expression.split()
    return [int(x) for x in parts[0::2]], parts[1::2]


# ---- rewards -----------------------------------------------------------------------------------

def arithmetic_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion's final answer equals ``answer`` (an int column), else 0.0.

    The final answer is the number after ``####``, in the last ``\\boxed{}``, after "the answer
    is", else the last number (``rewards._numbers.extract_final_answer``); commas and signs are
    read, nothing is evaluated.

    >>> arithmetic_reward(["132", "47 + 85 = 132.", "The answer is 1,320", "-5", "\\\\boxed{132}", "12"],
    ...                   answer=[132, 132, 1320, -5, 132, 132])
    [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    """
    if len(completions) != len(answer):
        raise ValueError(f"len(completions)={len(completions)} != len(answer)={len(answer)}")
    rewards = []
    for completion, ref in zip(completions, answer):
        pred = extract_final_answer(completion_text(completion))
        value = None if pred is None else to_fraction(pred)
        rewards.append(1.0 if value is not None and value == int(ref) else 0.0)
    return rewards


_JUST_A_NUMBER = re.compile(r"\s*-?\d{1,3}(?:,?\d{3})*(?:\.\d+)?\s*\.?\s*", re.ASCII)


def arithmetic_format_reward(completions, **kwargs) -> list[float]:
    """1.0 when the whole completion is one number (commas, a sign, a final period allowed), else 0.0.

    >>> arithmetic_format_reward(["132", " 1,320.", "-7\\n", "The answer is 132", "132 apples", ""])
    [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    """
    texts = [completion_text(c) for c in completions]
    return [1.0 if len(t) <= 64 and _JUST_A_NUMBER.fullmatch(t) else 0.0 for t in texts]
