"""GSM8K: grade-school math word problems (Cobbe et al. 2021), prompts and an answer reward.

The second LLM task of the EGGROLL paper (Sarkar et al., arXiv 2511.16652). Reference
solutions end in ``#### N``; the reward is 1.0 when the model's final answer equals N.

This module knows nothing of models or of the trainer. Answer comparison has two paths:

1. Fast path (covers nearly every completion): a linear-time regex finds the final answer
   (after ``####``, else in the last ``\\boxed{}``, else after "the answer is", else the last
   number), normalises commas, ``$``, units, signs, decimals, ``a/b`` and ``\\frac{a}{b}``, and
   compares it with the reference as an exact ``Fraction``.
2. Fallback, only when the boxed answer is LaTeX the fast path cannot read (``\\sqrt{324}``,
   ``2 \\times 9``): ``math-verify`` (the verifier behind TRL's accuracy reward) with a 1 s
   timeout, and only when the input is short and free of exponents/factorials (sympy can hang
   on ``9^{9^{9^9}}``) and we are in the main thread (math-verify times out with
   ``signal.alarm``, which works only there; elsewhere the fallback is skipped and scores 0).
"""
from __future__ import annotations

import functools
import os
import re
import threading
from fractions import Fraction

from rewards._numbers import extract_final_answer, first_number, to_fraction  # noqa: F401  (re-exported)
from rewards._text import completion_text, fill_template

TEMPLATES = {
    # lm-evaluation-harness style zero-shot prompt for base models.
    "plain": "Question: {question}\nAnswer:",
    # The EGGROLL RWKV chat format: the completion continues right after "<think".
    "rwkv": "User: {question}\n\nAssistant: <think",
    # Conversational (chat models): a list of messages; TRL applies the chat template.
    "chat": [
        {
            "role": "user",
            "content": "{question}\nPlease reason step by step, and put your final answer "
            "within \\boxed{{}}.",
        }
    ],
}


def format_prompt(question: str, template: str = "plain") -> str | list[dict]:
    """The prompt for one question: a string, or a list of messages for ``template="chat"``.

    >>> format_prompt("What is 2 + 3?", "rwkv")
    'User: What is 2 + 3?\\n\\nAssistant: <think'
    >>> format_prompt("What is 2 + 3?", "chat")[0]["content"].endswith("within \\\\boxed{}.")
    True
    """
    return fill_template(TEMPLATES, template, question=question)


def load_gsm8k(split: str = "train", path: str | None = None, template: str = "plain", n: int | None = None):
    """GSM8K as a ``datasets.Dataset`` with columns prompt, question, answer.

    ``path=None`` loads the hub dataset ``openai/gsm8k`` (config ``main``); otherwise ``path`` is
    a jsonl file with fields question/answer, or a directory holding ``{split}.jsonl``.
    ``n`` keeps the first ``n`` rows.
    """
    import datasets

    if template not in TEMPLATES:
        raise ValueError(f"template={template!r} is not one of {sorted(TEMPLATES)}")
    if n is not None and (not isinstance(n, int) or n < 0):
        raise ValueError(f"n={n!r} must be None or an int >= 0")
    if path is None:
        ds = datasets.load_dataset("openai/gsm8k", "main", split=split)
    else:
        file = os.path.join(path, f"{split}.jsonl") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ValueError(f"path={path!r}: no such file {file!r} (give a .jsonl file or a directory with {split}.jsonl)")
        ds = datasets.load_dataset("json", data_files=file, split="train")
    missing = {"question", "answer"} - set(ds.column_names)
    if missing:
        raise ValueError(f"GSM8K data at path={path!r} lacks columns {sorted(missing)}; has {ds.column_names}")
    if n is not None:
        ds = ds.select(range(min(n, len(ds))))
    ds = ds.select_columns(["question", "answer"])
    prompts = [format_prompt(q, template) for q in ds["question"]]
    ds = ds.add_column("prompt", prompts)
    return ds.select_columns(["prompt", "question", "answer"])


def reference_answer(answer: str) -> str:
    """The number after the last ``####`` of a GSM8K reference solution, commas removed.

    Without ``####`` (a bare number, or a solution in words) the final answer is extracted as
    for model output. Raises ValueError when there is no number.

    >>> reference_answer("He sprints 3*3=<<3*3=9>>9 times\\n#### 1,080")
    '1080'
    >>> reference_answer("-4")
    '-4'
    """
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise ValueError(f"answer={answer!r} must be a string")
    if "####" in answer:
        number = first_number(answer.rsplit("####", 1)[1])
    else:
        number = extract_final_answer(answer)
    if number is None or to_fraction(number) is None:
        raise ValueError(f"answer={answer[-80:]!r} has no final number (expected '#### N')")
    return number


@functools.lru_cache(maxsize=65536)
def _reference_value(answer: str) -> int | Fraction:
    return to_fraction(reference_answer(answer))


# ---- math-verify fallback ----------------------------------------------------------------

_LATEX_COMMANDS = re.compile(r"\\(?:[dt]?frac|sqrt|cdot|times|div)(?![a-zA-Z])")
_LATEX_ALLOWED = re.compile(r"[0-9\s{}()\[\].,+\-*/]*")
_LONG_DIGITS = re.compile(r"[0-9]{13}")


def _math_verify_equal(reference: int | Fraction, latex: str) -> bool:
    """math-verify's verdict on a short, exponent-free LaTeX answer; False when not safe to ask."""
    if len(latex) > 64 or threading.current_thread() is not threading.main_thread():
        return False
    body = _LATEX_COMMANDS.sub(" ", latex)
    if not _LATEX_ALLOWED.fullmatch(body) or _LONG_DIGITS.search(body) or not re.search(r"\d", body):
        return False
    try:
        import sympy
        from math_verify import LatexExtractionConfig, parse, verify

        pred = parse("$" + latex + "$", extraction_config=[LatexExtractionConfig()], parsing_timeout=1)
        reference = Fraction(reference)
        gold = [sympy.Rational(reference.numerator, reference.denominator)]
        return bool(pred) and bool(verify(gold, pred, timeout_seconds=1))
    except Exception:  # ImportError, timeouts, sympy errors: not verified
        return False


def gsm8k_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion's final answer equals the number after ``####`` in ``answer``.

    ``answer`` is the dataset column (the reference solution, one per completion). The
    comparison is numeric and exact: ``18``, ``18.0``, ``$18``, ``18 dollars``, ``36/2`` and
    ``\\boxed{\\frac{36}{2}}`` all equal 18. See :func:`extract_final_answer` for where the
    answer is looked for.

    >>> gsm8k_reward(["3 + 4 = 7 apples, so\\n#### 7", "The answer is 7.", "<think>7</think>8",
    ...               [{"role": "assistant", "content": "\\\\boxed{7}"}]], answer=["... #### 7"] * 4)
    [1.0, 1.0, 0.0, 1.0]
    """
    if len(completions) != len(answer):
        raise ValueError(f"len(completions)={len(completions)} != len(answer)={len(answer)}")
    rewards = []
    for completion, ref in zip(completions, answer):
        reference = _reference_value(ref if isinstance(ref, str) else str(ref))
        pred = extract_final_answer(completion_text(completion))
        if pred is None:
            rewards.append(0.0)
            continue
        value = to_fraction(pred)
        if value is not None:
            rewards.append(1.0 if value == reference else 0.0)
        elif "\\" not in pred:  # not LaTeX (e.g. a 1/0 or a 10,000-digit number): no fallback
            rewards.append(0.0)
        else:
            rewards.append(1.0 if _math_verify_equal(reference, pred) else 0.0)
    return rewards
