"""Countdown: generator, solver, templates, datasets and the two rewards, rule by rule."""
import itertools
import json
from fractions import Fraction

import pytest

from rewards.countdown import (
    TEMPLATES,
    countdown_format_reward,
    countdown_reward,
    format_prompt,
    generate_countdown_problems,
    load_countdown,
    make_countdown_dataset,
    solve,
)

NUMS = [3, 5, 7, 34]  # (3 + 5) * 7 - 34 = 22


def score(expr_or_completion, target=22, nums=NUMS):
    text = expr_or_completion if "<answer>" in expr_or_completion else f"<answer>{expr_or_completion}</answer>"
    return countdown_reward([text], target=[target], nums=[nums])[0]


# ---- an independent brute-force solver: every value reachable from a multiset ----------------

def reachable(nums):
    """All values of expressions over exactly these numbers (set semantics on subsets)."""
    nums = tuple(Fraction(x) for x in nums)
    memo = {}

    def values(idx):  # idx: frozenset of positions
        if idx in memo:
            return memo[idx]
        if len(idx) == 1:
            out = {nums[next(iter(idx))]}
        else:
            out = set()
            items = sorted(idx)
            for r in range(1, len(items)):
                for left in itertools.combinations(items, r):
                    right = idx - frozenset(left)
                    for a in values(frozenset(left)):
                        for b in values(right):
                            out.update((a + b, a - b, a * b))
                            if b != 0:
                                out.add(a / b)
        memo[idx] = out
        return out

    return values(frozenset(range(len(nums))))


def test_generator_problems_all_solvable_by_independent_brute_force():
    problems = generate_countdown_problems(60, seed=3)
    assert len(problems) == 60
    for p in problems:
        assert 3 <= len(p["nums"]) <= 4 and all(1 <= x <= 100 for x in p["nums"])
        assert isinstance(p["target"], int) and 1 <= p["target"] <= 100
        assert Fraction(p["target"]) in reachable(p["nums"]), p
        assert score(p["solution"], p["target"], p["nums"]) == 1.0, p


def test_generator_is_deterministic_and_respects_arguments():
    a = generate_countdown_problems(20, seed=7, min_numbers=2, max_numbers=5, max_value=12)
    assert a == generate_countdown_problems(20, seed=7, min_numbers=2, max_numbers=5, max_value=12)
    assert a != generate_countdown_problems(20, seed=8, min_numbers=2, max_numbers=5, max_value=12)
    assert {len(p["nums"]) for p in a} <= {2, 3, 4, 5}
    assert all(1 <= x <= 12 for p in a for x in p["nums"]) and all(1 <= p["target"] <= 12 for p in a)
    with pytest.raises(ValueError, match="max_numbers=2"):
        generate_countdown_problems(1, min_numbers=3, max_numbers=2)
    with pytest.raises(ValueError, match="n=-1"):
        generate_countdown_problems(-1)


def test_solver_agrees_with_brute_force():
    cases = [([3, 5, 7], 22), ([1, 1], 5), ([2, 3, 7], 1), ([4, 4, 4, 4], 17), ([25, 5, 5, 2], 98),
             ([1, 5, 6, 7], 21), ([3, 3, 8, 8], 24), ([1, 2, 3], 100)]
    for nums, target in cases:
        expr = solve(nums, target)
        assert (expr is not None) == (Fraction(target) in reachable(nums)), (nums, target)
        if expr is not None:
            assert score(expr, target, nums) == 1.0, (nums, target, expr)
    assert solve([3, 3, 8, 8], 24) is not None  # needs 8 / (3 - 8 / 3): non-integer intermediates


# ---- countdown_reward, one rule at a time ---------------------------------------------------

def test_correct_expressions_score_one():
    assert score("(3 + 5) * 7 - 34") == 1.0
    assert score("  ( 3+5 )*7-34  ") == 1.0  # whitespace is free
    assert score("7 * (5 + 3) - 34") == 1.0  # any order
    assert score("((((3 + 5)) * 7)) - 34") == 1.0  # redundant parentheses


def test_each_rule_scores_zero():
    assert score("(3 + 5) * 7 - 34 + 3 - 3") == 0.0  # a number used twice
    assert score("(3 + 5) * 7 - 34 - 0") == 0.0  # a number not in the list
    assert score("3 * 5 + 7") == 0.0  # a number missing (34), even though 3*5+7 = 22
    assert score("(3 + 5) * 7 - 34", target=23) == 0.0  # wrong target
    assert score("(3 + 5) * 7 - 34 = 22") == 0.0  # an equation is not an expression
    assert score("-(34 - 7 * (3 + 5))") == 0.0  # no unary minus
    assert score("(3 + 5) * 7 - 34.0") == 0.0  # no decimals
    assert score("(3 + 5) x 7 - 34") == 0.0  # only + - * /
    assert score("(3 + 5) * 7 - 34)") == 0.0  # unbalanced
    assert score("") == 0.0 and score("<answer></answer>") == 0.0


def test_exact_rational_arithmetic():
    # 8 / (3 - 8/3) = 24 passes through 1/3: exact arithmetic gives exactly 24
    assert score("8 / (3 - 8 / 3)", target=24, nums=[3, 3, 8, 8]) == 1.0
    assert score("(1 / 3) * 3 * 5", target=5, nums=[1, 3, 3, 5]) == 1.0
    # 7 / 2 = 3.5 is not 3 (no integer division)
    assert score("7 / 2 + 0 * 1", target=3, nums=[7, 2, 0, 1]) == 0.0
    assert score("7 / 2 * 2", target=7, nums=[7, 2, 2]) == 1.0


def test_division_by_zero_scores_zero():
    assert score("5 / (3 - 3) + 2", target=2, nums=[5, 3, 3, 2]) == 0.0
    assert score("0 * (5 / 0)", target=0, nums=[0, 5, 0]) == 0.0


def test_last_answer_tag_wins():
    right, wrong = "(3 + 5) * 7 - 34", "3 + 5 + 7 + 34"
    assert score(f"<answer>{wrong}</answer> hmm, no. <answer>{right}</answer>") == 1.0
    assert score(f"<answer>{right}</answer> wait <answer>{wrong}</answer>") == 0.0
    assert score(f"<answer>{right}") == 0.0  # unclosed tag
    assert score(f"<answer>{right}</answer>\nUser: next question") == 1.0


def test_completion_shapes_and_column_types():
    chat = [{"role": "user", "content": "<answer>3 + 5 + 7 + 34</answer>"},
            {"role": "assistant", "content": "<answer>(3 + 5) * 7 - 34</answer>"}]
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "<answer>(3 + 5) * 7 - 34</answer>"}]}]
    got = countdown_reward([chat, parts, None, 42], target=["22", 22, 22, 22], nums=[NUMS] * 4)
    assert got == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="len"):
        countdown_reward(["a", "b"], target=[22], nums=[NUMS])


# ---- format reward --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "completion,expected",
    [
        (" 15 + 7 = 22 </think>\n<answer>3*5+7</answer>", 1.0),  # after a prompt ending in <think>
        ("> 15 + 7 = 22 </think>\n<answer>3*5+7</answer>\n", 1.0),  # after a prompt ending in <think
        ("<think>15 + 7</think><answer> 3*5+7 </answer>", 1.0),  # chat models open the tag
        ("<answer>3*5+7</answer>", 1.0),  # "minimal" template: no think block
        ("<think>15 + 7</think>", 0.0),  # no answer
        ("<think>15 + 7</think><answer>  </answer>", 0.0),  # blank answer
        ("<think>a</think><answer>1</answer> trailing text", 0.0),
        ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0),  # two answers
        ("<think>a<think>b</think><answer>1</answer>", 0.0),  # nested think
        ("<think>a</think><think>b</think><answer>1</answer>", 0.0),  # two think blocks
        ("reasoning without closing <answer>1</answer>", 0.0),
        ("<answer>1</answer></think>", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert countdown_format_reward([completion]) == [expected]
    assert countdown_format_reward([[{"role": "assistant", "content": completion}]]) == [expected]


# ---- templates and datasets -----------------------------------------------------------------

def test_templates():
    assert set(TEMPLATES) == {"tinyzero", "rwkv", "chat", "minimal"}
    assert format_prompt([3, 5, 7], 22, "minimal") == "Use the numbers [3, 5, 7] to make 22.\n"
    tz = format_prompt([3, 5, 7], 22, "tinyzero")
    assert "Using the numbers [3, 5, 7], create an equation that equals 22." in tz and tz.endswith("<think>")
    rw = format_prompt([3, 5, 7], 22, "rwkv")
    assert rw.startswith("User: Using the numbers [3, 5, 7]") and rw.endswith("\n\nAssistant: <think")
    chat = format_prompt([3, 5, 7], 22, "chat")
    assert [m["role"] for m in chat] == ["system", "user"] and "equals 22" in chat[1]["content"]
    with pytest.raises(ValueError, match="template='nope'"):
        format_prompt([1], 1, "nope")


def test_make_dataset():
    ds = make_countdown_dataset(8, seed=5, template="chat", max_value=30)
    assert ds.column_names == ["nums", "target", "solution", "prompt"] and len(ds) == 8
    rows = generate_countdown_problems(8, seed=5, max_value=30)
    assert ds["nums"] == [r["nums"] for r in rows] and ds["target"] == [r["target"] for r in rows]
    assert ds[0]["prompt"] == format_prompt(rows[0]["nums"], rows[0]["target"], "chat")
    good = [f"<answer>{s}</answer>" for s in ds["solution"]]
    assert countdown_reward(good, **{k: ds[k] for k in ("target", "nums")}) == [1.0] * 8


def test_load_countdown_local_files(tmp_path):
    rows = [{"target": 22, "nums": [3, 5, 7, 34]}, {"target": 24, "nums": [3, 3, 8, 8]}]
    jl = tmp_path / "cd.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_countdown(str(jl), template="rwkv")
    assert ds["target"] == [22, 24] and ds["nums"] == [r["nums"] for r in rows]
    assert ds[1]["prompt"] == format_prompt([3, 3, 8, 8], 24, "rwkv")
    pq = tmp_path / "cd.parquet"
    make_countdown_dataset(5, seed=2).to_parquet(str(pq))
    ds2 = load_countdown(str(pq), template="minimal", n=3)
    assert len(ds2) == 3 and ds2[0]["prompt"].startswith("Use the numbers [")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"x": 1}))
    with pytest.raises(ValueError, match="lacks columns"):
        load_countdown(str(bad))
