"""Arithmetic task: problem generation, fixed disjoint splits, templates, the two rewards."""
import pytest

from rewards.arithmetic import (LEVELS, Level, _key, _parse, arithmetic_format_reward, arithmetic_reward,
                                eval_free_check, format_prompt, generate_arithmetic_problems, make_arithmetic_splits)


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_every_level_generates_distinct_correct_problems(level):
    n = 40 if level == "add1" else 200  # one-digit addition has 55 distinct problems
    problems = generate_arithmetic_problems(n, level, seed=3)
    assert len({_key(*_parse(p["expression"])) for p in problems}) == n
    assert eval_free_check(problems)
    lv = LEVELS[level]
    for p in problems:
        operands, ops = _parse(p["expression"])
        assert len(operands) == lv.num_operands and set(ops) <= set(lv.operations)
        assert all(len(str(x)) == d or (d == 1 and x == 0) for x, d in zip(operands, lv.digits))


def test_values_follow_precedence_exactly():
    assert eval_free_check([{"expression": "2 + 3 * 4", "answer": 14}, {"expression": "10 - 4 - 3", "answer": 3},
                            {"expression": "7 * 8 - 60", "answer": -4}, {"expression": "99 * 99", "answer": 9801}])
    assert not eval_free_check([{"expression": "2 + 3 * 4", "answer": 20}])


def test_splits_are_fixed_disjoint_and_seeded():
    a = make_arithmetic_splits("add2", num_train=1000, num_validation=100, num_test=200, seed=0)
    b = make_arithmetic_splits("add2", num_train=500, num_validation=100, num_test=300, seed=7, template="plain")
    assert a["test"]["expression"] == b["test"]["expression"][:200]  # the same held-out stream, extended
    keys = {name: {_key(*_parse(e)) for e in ds["expression"]} for name, ds in a.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    assert len(keys["train"]) == 1000  # commuted duplicates ("a + b", "b + a") count once
    assert a["train"]["expression"] != b["train"]["expression"][:500]  # seed draws the training problems
    assert b["test"][0]["prompt"] == format_prompt(b["test"][0]["expression"], "plain")


def test_too_many_problems_and_bad_levels_are_named():
    with pytest.raises(ValueError, match="too few distinct problems"):
        generate_arithmetic_problems(60, "add1")  # 55 distinct unordered pairs of one digit
    with pytest.raises(ValueError, match="level='add9'"):
        make_arithmetic_splits("add9")
    with pytest.raises(ValueError, match="digits="):
        Level(digits=(1, 2, 3), num_operands=2)
    with pytest.raises(ValueError, match="operations='/'"):
        Level(operations="/")
    with pytest.raises(ValueError, match="template='x'"):
        format_prompt("1 + 2", "x")


def test_correctness_reward_reads_final_answers_and_never_evaluates():
    answers = [132] * 9
    completions = ["132", "47 + 85 = 132", "The answer is 132.", "\\boxed{132}", "1 3 2", "47 + 85", "132 + 1",
                   [{"role": "assistant", "content": "It is 132"}], "__import__('os').system('x')"]
    assert arithmetic_reward(completions, answer=answers) == [1, 1, 1, 1, 0, 0, 0, 1, 0]
    assert arithmetic_reward(["-1,234", "1,234", None, 5, "9" * 100_000], answer=[-1234, -1234, 0, 5, 1]) == \
        [1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="len"):
        arithmetic_reward(["1"], answer=[1, 2])


def test_format_reward_wants_just_the_number():
    assert arithmetic_format_reward(["132", "-7.", " 1,320 \n", "132 apples", "It is 132", "٣", "1" * 65, ""]) == \
        [1, 1, 1, 0, 0, 0, 0, 0]
