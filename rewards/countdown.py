"""Countdown: problems, prompts and rewards for the arithmetic-puzzle task of EGGROLL Sec. 6.

A problem is a list of integers ``nums`` and a ``target``; the model must write an expression
that uses every number exactly once, only ``+ - * /`` and parentheses, and equals the target
(the TinyZero task, Pan et al. 2025, used by the EGGROLL paper, Sarkar et al., arXiv 2511.16652).

This module knows nothing of models or of the trainer: it makes dataset rows (``nums``,
``target``, ``solution``, ``prompt``) and scores completion strings. The reward functions
follow TRL's protocol (``reward(completions, **dataset_columns) -> list[float]``) so the same
functions serve ``EggrollTrainer`` and ``trl.GRPOTrainer``. Answers are parsed by
``rewards._arith`` (a bounded recursive-descent parser), never ``eval``-ed.
"""
from __future__ import annotations

import itertools
import os
import random
from fractions import Fraction

from rewards._arith import ArithError, evaluate, tree_to_str
from rewards._text import completion_text, fill_template

_INSTRUCTION = (
    "Using the numbers {nums}, create an equation that equals {target}. You can use basic "
    "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work "
    "in <think> </think> tags. And return the final answer in <answer> </answer> tags, for "
    "example <answer> (1 + 2) / 3 </answer>."
)

TEMPLATES = {
    # TinyZero's base-model prompt: the completion continues inside the open <think> tag.
    "tinyzero": (
        "A conversation between User and Assistant. The user asks a question, and the Assistant "
        "solves it. The assistant first thinks about the reasoning process in the mind and then "
        "provides the user with the answer.\nUser: " + _INSTRUCTION + "\nAssistant: Let me "
        "solve this step by step.\n<think>"
    ),
    # The EGGROLL RWKV chat format: the completion continues right after "<think".
    "rwkv": "User: " + _INSTRUCTION + "\n\nAssistant: <think",
    # Conversational (chat models): a list of messages; TRL applies the chat template.
    "chat": [
        {
            "role": "system",
            "content": "You are a helpful assistant. You first think about the reasoning process "
            "in the mind and then provide the user with the answer.",
        },
        {"role": "user", "content": _INSTRUCTION},
    ],
    # For tiny character-level models trained from scratch: expected completion <answer>EXPR</answer>.
    "minimal": "Use the numbers {nums} to make {target}.\n",
}


def _nums_str(nums) -> str:
    # str(list) would print numpy scalars as "np.int64(3)"
    return "[" + ", ".join(str(int(x)) for x in nums) + "]"


def format_prompt(nums, target, template: str = "tinyzero") -> str | list[dict]:
    """The prompt for one problem: a string, or a list of messages for ``template="chat"``.

    >>> format_prompt([3, 5, 7], 22, "minimal")
    'Use the numbers [3, 5, 7] to make 22.\\n'
    >>> format_prompt([3, 5, 7], 22, "rwkv").endswith("Assistant: <think")
    True
    >>> format_prompt([3, 5, 7], 22, "chat")[1]["content"][:38]
    'Using the numbers [3, 5, 7], create an'
    """
    return fill_template(TEMPLATES, template, nums=_nums_str(nums), target=int(target))


# ---- solver and generator ----------------------------------------------------------------

_COMBINE = (
    ("+", lambda a, b: a + b),
    ("-", lambda a, b: a - b),
    ("*", lambda a, b: a * b),
    ("/", lambda a, b: a / b if b != 0 else None),
)


def _canonical_tree(nums: list[int], target: Fraction):
    """The first canonical expression tree equal to ``target``, or None (see ``solve``)."""
    combine = dict(_COMBINE)
    for perm in itertools.permutations(range(len(nums))):
        for ops in itertools.product("+-*/", repeat=len(nums) - 1):  # a left-to-right chain
            value, tree = Fraction(nums[perm[0]]), nums[perm[0]]
            for op, i in zip(ops, perm[1:]):
                value = combine[op](value, Fraction(nums[i]))
                if value is None:
                    break
                tree = (op, tree, nums[i])
            if value is not None and value == target:
                return tree
    if len(nums) == 4:  # the balanced (a op b) op (c op d)
        for perm in itertools.permutations(range(4)):
            a, b, c, d = (nums[i] for i in perm)
            for o1, o2, o3 in itertools.product("+-*/", repeat=3):
                left, right = combine[o1](Fraction(a), Fraction(b)), combine[o3](Fraction(c), Fraction(d))
                value = None if left is None or right is None else combine[o2](left, right)
                if value is not None and value == target:
                    return (o2, (o1, a, b), (o3, c, d))
    return None


def solve(nums: list[int], target: int, general: bool = True) -> str | None:
    """An expression using every number of ``nums`` exactly once that equals ``target``, or None.

    Canonical forms first, in one fixed order: left-to-right chains ``((a op b) op c) op d`` over
    the orderings of ``nums`` (in the order given, operators ``+ - * /``), then for four numbers
    the balanced ``(a op b) op (c op d)``. One fixed search order gives one answer per problem,
    which a tiny model learns more easily (``rewards/countdown_base.py`` trains on them). Unless
    ``general=False``, an exhaustive search over all expression trees follows: pairs of remaining
    values and the four operators (both operand orders), in exact ``Fraction`` arithmetic, skipping
    multisets of values already known to fail.

    >>> solve([3, 5, 7], 22), solve([10, 10, 1, 1], 50)
    ('3 * 5 + 7', '10 * 10 / (1 + 1)')
    >>> solve([10, 6, 2], 7), solve([10, 6, 2], 7, general=False)
    ('10 - 6 / 2', None)
    >>> solve([1, 1], 5) is None
    True
    """
    nums, target = [int(x) for x in nums], Fraction(int(target))
    tree = _canonical_tree(nums, target)
    if tree is not None or not general:
        return None if tree is None else tree_to_str(tree)
    failed: set[tuple[Fraction, ...]] = set()

    def search(items):  # items: list of (value, tree)
        if len(items) == 1:
            return items[0][1] if items[0][0] == target else None
        key = tuple(sorted(v for v, _ in items))
        if key in failed:
            return None
        for i in range(len(items)):
            for j in range(len(items)):
                if i == j:
                    continue
                (a, ta), (b, tb) = items[i], items[j]
                rest = [items[k] for k in range(len(items)) if k not in (i, j)]
                for op, fn in _COMBINE:
                    if op in "+*" and i > j:  # commutative: one order suffices
                        continue
                    value = fn(a, b)
                    if value is None:
                        continue
                    found = search(rest + [(value, (op, ta, tb))])
                    if found is not None:
                        return found
        failed.add(key)
        return None

    tree = search([(Fraction(x), x) for x in nums])
    return None if tree is None else tree_to_str(tree)


def _random_tree(nums: list[int], rng: random.Random):
    """Combine the numbers in a random order with random operators; (value, tree) or None."""
    items = [(Fraction(x), x) for x in nums]
    rng.shuffle(items)
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        (a, ta), (b, tb) = items[i], items[j]
        op, fn = rng.choice(_COMBINE)
        value = fn(a, b)
        if value is None:
            return None
        items = [items[k] for k in range(len(items)) if k not in (i, j)] + [(value, (op, ta, tb))]
    return items[0]


def generate_countdown_problems(
    n: int, seed: int = 0, min_numbers: int = 3, max_numbers: int = 4, max_value: int = 100
) -> list[dict]:
    """``n`` solvable problems ``{"nums", "target", "solution"}``, deterministic in ``seed``.

    Each problem draws ``min_numbers..max_numbers`` integers from ``1..max_value`` and combines
    all of them in a random expression; it is kept when the value is an integer in
    ``1..max_value`` (the target). That expression is the ``solution``, and it is re-checked by
    the same parser that scores model answers, so every problem is verified solvable.

    >>> p = generate_countdown_problems(1, seed=0)[0]
    >>> sorted(p) == ["nums", "solution", "target"] and countdown_reward(
    ...     [f"<answer>{p['solution']}</answer>"], [p["target"]], [p["nums"]]) == [1.0]
    True
    """
    for name, value, low in (("n", n, 0), ("min_numbers", min_numbers, 1), ("max_value", max_value, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an int >= {low}")
    if not isinstance(max_numbers, int) or max_numbers < min_numbers:
        raise ValueError(f"max_numbers={max_numbers!r} must be an int >= min_numbers={min_numbers}")
    rng = random.Random(seed)
    problems = []
    while len(problems) < n:
        nums = [rng.randint(1, max_value) for _ in range(rng.randint(min_numbers, max_numbers))]
        for _ in range(64):  # random expressions over these numbers before drawing new ones
            drawn = _random_tree(nums, rng)
            if drawn is None:
                continue
            value, tree = drawn
            if value.denominator == 1 and 1 <= value <= max_value:
                solution = tree_to_str(tree)
                if not _check_answer(solution, int(value), nums):  # the scoring parser must agree
                    raise RuntimeError(f"generated solution {solution!r} does not verify for {nums} -> {value}")
                problems.append({"nums": nums, "target": int(value), "solution": solution})
                break
    return problems


# ---- datasets -------------------------------------------------------------------------------

def _add_prompts(ds, template: str):
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r} is not one of {sorted(TEMPLATES)}")
    prompts = [format_prompt(nums, target, template) for nums, target in zip(ds["nums"], ds["target"])]
    if "prompt" in ds.column_names:
        ds = ds.remove_columns("prompt")
    return ds.add_column("prompt", prompts)


def make_countdown_dataset(n: int, seed: int = 0, template: str = "tinyzero", **gen_kwargs):
    """A ``datasets.Dataset`` of generated problems: columns nums, target, solution, prompt.

    ``gen_kwargs`` go to :func:`generate_countdown_problems` (min_numbers, max_numbers, max_value).

    >>> ds = make_countdown_dataset(4, seed=1, template="minimal", max_value=20)
    >>> ds.column_names, ds[0]["prompt"] == format_prompt(ds[0]["nums"], ds[0]["target"], "minimal")
    (['nums', 'target', 'solution', 'prompt'], True)
    """
    import datasets

    rows = generate_countdown_problems(n, seed=seed, **gen_kwargs)
    ds = datasets.Dataset.from_dict(
        {k: [r[k] for r in rows] for k in ("nums", "target", "solution")},
        features=datasets.Features(
            {"nums": datasets.Sequence(datasets.Value("int64")), "target": datasets.Value("int64"),
             "solution": datasets.Value("string")}
        ),
    )
    return _add_prompts(ds, template)


_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_countdown(
    path_or_id: str = "Jiayi-Pan/Countdown-Tasks-3to4", template: str = "tinyzero",
    split: str = "train", n: int | None = None,
):
    """Load Countdown problems (columns nums, target) and add a ``prompt`` column.

    ``path_or_id`` is a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file, a local directory
    (handed to ``datasets.load_dataset``), or a hub id such as the standard
    ``Jiayi-Pan/Countdown-Tasks-3to4``. ``n`` keeps the first ``n`` rows.
    """
    import datasets

    if n is not None and (not isinstance(n, int) or n < 0):
        raise ValueError(f"n={n!r} must be None or an int >= 0")
    ext = os.path.splitext(str(path_or_id))[1].lower()
    if os.path.isfile(path_or_id):
        if ext not in _LOCAL_BUILDERS:
            raise ValueError(f"path_or_id={path_or_id!r}: extension {ext!r} is not one of {sorted(_LOCAL_BUILDERS)}")
        ds = datasets.load_dataset(_LOCAL_BUILDERS[ext], data_files=str(path_or_id), split="train")
    else:
        ds = datasets.load_dataset(path_or_id, split=split)
    missing = {"nums", "target"} - set(ds.column_names)
    if missing:
        raise ValueError(f"path_or_id={path_or_id!r} lacks columns {sorted(missing)}; has {ds.column_names}")
    if n is not None:
        ds = ds.select(range(min(n, len(ds))))
    return _add_prompts(ds, template)


# ---- rewards ------------------------------------------------------------------------------

def _well_formed(text: str) -> bool:
    """The shape checked by countdown_format_reward, with C-speed string methods (no regex)."""
    counts = {tag: text.count(tag) for tag in ("<think>", "</think>", "<answer>", "</answer>")}
    if counts["<answer>"] != 1 or counts["</answer>"] != 1 or counts["<think>"] > counts["</think>"] or counts["</think>"] > 1:
        return False
    body = text.strip()
    if not body.endswith("</answer>"):
        return False
    start = body.find("<answer>")
    if not body[start + len("<answer>"):-len("</answer>")].strip():
        return False  # blank answer
    head = body[:start].rstrip()  # everything before <answer>: empty, or the think block
    if counts["</think>"] == 0:
        return head == ""
    if not head.endswith("</think>"):
        return False
    return counts["<think>"] == 0 or head.startswith("<think>")


def _last_answer(text: str) -> str | None:
    """Content of the last <answer>...</answer> pair, or None."""
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    return None if start < 0 else text[start + len("<answer>"):end]


def _check_answer(expression: str, target, nums) -> bool:
    try:
        value, literals = evaluate(expression)
        return value == int(target) and sorted(literals) == sorted(int(x) for x in nums)
    except (ArithError, TypeError, ValueError, OverflowError):
        return False


def countdown_reward(completions, target, nums, **kwargs) -> list[float]:
    """1.0 when the last ``<answer>...</answer>`` is a correct expression, else 0.0.

    Correct means: only integer literals, ``+ - * /``, parentheses and whitespace (no unary
    minus, no ``=``); every number of ``nums`` used exactly once (as a multiset); value equal to
    ``target`` in exact rational arithmetic. Division by zero, malformed or oversized input
    scores 0.0. ``target`` and ``nums`` are the dataset columns (one entry per completion).

    >>> countdown_reward(["<think>...</think><answer>(3 + 5) * 7 - 34</answer>",
    ...                   "<answer>3 * 5 + 7 + 34</answer>",
    ...                   [{"role": "assistant", "content": "<answer> 7 * 3 + 5 - 34 </answer>"}]],
    ...                  target=[22, 22, 22], nums=[[3, 5, 7, 34]] * 3)
    [1.0, 0.0, 0.0]
    """
    if not (len(completions) == len(target) == len(nums)):
        raise ValueError(
            f"len(completions)={len(completions)}, len(target)={len(target)}, len(nums)={len(nums)} must match"
        )
    rewards = []
    for completion, t, ns in zip(completions, target, nums):
        answer = _last_answer(completion_text(completion))
        rewards.append(1.0 if answer is not None and _check_answer(answer, t, ns) else 0.0)
    return rewards


def countdown_format_reward(completions, **kwargs) -> list[float]:
    """1.0 when the completion has the think/answer shape, else 0.0.

    Exactly, after leading whitespace: an optional think block, then one ``<answer>`` block,
    then only whitespace. The think block is reasoning ending in ``</think>``, optionally opened
    by ``<think>``, or by ``>`` to close a prompt that ends in ``<think`` (the "rwkv" template);
    a prompt ending in ``<think>`` ("tinyzero") needs no opener. Neither the reasoning nor the
    answer may contain another ``<think>``/``</think>``/``<answer>``/``</answer>`` tag, and the
    answer must not be blank. The answer's content is not checked here (see
    :func:`countdown_reward`). A bare ``<answer>EXPR</answer>`` (the "minimal" template) passes.

    >>> countdown_format_reward(["> 3*5=15, 15+7=22 </think>\\n<answer>3*5+7</answer>",
    ...                          "<answer>3*5+7</answer>", "3*5+7", "</think><answer></answer>",
    ...                          "<think>a</think><answer>1</answer><answer>2</answer>"])
    [1.0, 1.0, 0.0, 0.0, 0.0]
    """
    return [1.0 if _well_formed(completion_text(c)) else 0.0 for c in completions]
