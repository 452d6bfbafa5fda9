"""Untrusted model output: every reward must return 0.0/1.0 quickly, never raise, never execute.

Each adversarial input is scored by all three rewards in three shapes (bare, inside
<answer> tags, as a chat message). The "under 10 ms" bound is a safety property (no input can
make scoring hang), measured as the median thread CPU time of 5 repeats so that a loaded
machine does not make the test flaky.
"""
import builtins
import os
import statistics
import time

import pytest

from rewards.countdown import countdown_format_reward, countdown_reward
from rewards.gsm8k import gsm8k_reward

def adversarial_inputs(sentinel: str) -> list:
    """Inputs to score; the first ones create ``sentinel`` if anything executes them."""
    SENTINEL = sentinel
    return [
        f"__import__('os').system('touch {SENTINEL}')",
        f"open('{SENTINEL}', 'w').write('x')",
        f"exec(\"open('{SENTINEL}', 'w')\")",
        f"eval(\"open('{SENTINEL}', 'w')\")",
        f"import os; os.system('touch {SENTINEL}')",
        "__import__('builtins').__setattr__('PWNED_BY_REWARD', 1)",
        "().__class__.__bases__[0].__subclasses__()",
        "(3).__class__.__mro__",
        "3 .real + 5 .imag",
        "'{0.__class__}'.format(1)",
        "lambda: 0",
        "[x for x in range(10**9)]",
        "globals()['__builtins__']",
        "sys.exit(1)",
        "raise SystemExit",
        "2**10**10",
        "9**9**9**9",
        "10**100000",
        "(3 + 5) ** 7 - 34",
        "3 ^ 5 ^ 7 ^ 34",
        "1e308 * 1e308",
        "float('inf')",
        "float('nan')",
        "0x1F + 0b11 + 0o7",
        "1_000 + 3",
        "3 // 5 % 7 - 34",
        "~3 + +5 + 7 + 34",
        "(" * 1000 + "3" + ")" * 1000,
        "(" * 1000,
        ")" * 1000,
        "1+" * 5000 + "1",
        "9" * 10000,
        "-" * 10000,
        "((3+5)*7-34)" + " " * 10000,
        "\uff13 + \uff15 * \uff17 - \uff13\uff14",  # fullwidth digits
        "\u0663 + \u0665",  # arabic-indic digits
        "\u00b2\u00b3",  # superscripts
        "\U0001d7d1 + \U0001d7d3",  # mathematical bold digits
        "\u202e3+5\u202c",  # right-to-left override
        "3\x005\x007\x0034",
        "\x00" * 1000,
        "",
        None,
        42,
        3.5,
        b"<answer>(3 + 5) * 7 - 34</answer>",
        {"role": "assistant"},
        [{"role": "assistant", "content": None}],
        [{"content": ["not", "dicts"]}],
        [],
        "<answer>" * 5000,
        "</answer>" * 5000,
        "<answer>" + "(" * 10000 + "</answer>",
        "<think>" * 3000 + "</think>" * 3000,
        " " * 50000 + "<answer>",
        "<answer>" + "a" * 50000,
        "\\boxed{" * 3000,
        "\\boxed{9^{9^{9^9}}}",
        "\\boxed{\\sqrt{" + "9" * 5000 + "}}",
        "\\boxed{\\frac{1}{0}}",
        "#### " + "9" * 10000,
        "#### 1/0",
        "The answer is " + "1," * 5000,
        "1/0",
        "5 / (3 - 3) + 7 + 34",
        "3 + 5 \x0b+ 7 \x0c- 34",
        "a" * 100000 + "<answer>1</answer>",
    ]


def shapes(x):
    if isinstance(x, str):
        return [x, f"<answer>{x}</answer>", [{"role": "assistant", "content": x}]]
    return [x]


def cpu_ms(fn, repeats=5):
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        times.append((time.thread_time() - t0) * 1e3)
    return statistics.median(times)


def test_adversarial_inputs_never_raise_never_execute_and_score_fast(tmp_path):
    sentinel = str(tmp_path / "pwned")
    inputs = adversarial_inputs(sentinel)
    assert len(inputs) >= 50
    slow = []
    for x in inputs:
        for c in shapes(x):
            calls = {
                "countdown": lambda: countdown_reward([c], target=[22], nums=[[3, 5, 7, 34]]),
                "countdown_format": lambda: countdown_format_reward([c]),
                "gsm8k": lambda: gsm8k_reward([c], answer=["#### 22"]),
            }
            for name, call in calls.items():
                result = call()
                # the format reward may rightly accept <answer>junk</answer>; nothing is correct
                allowed = ([0.0], [1.0]) if name == "countdown_format" else ([0.0],)
                assert result in allowed, (name, repr(c)[:120], result)
                ms = cpu_ms(call)
                if ms >= 10.0:
                    slow.append((name, repr(c)[:80], round(ms, 2)))
    assert slow == []
    assert not os.path.exists(sentinel)
    assert not hasattr(builtins, "PWNED_BY_REWARD")


@pytest.mark.parametrize("nums,target", [([3, 5, 7, 34], 22), ([10 ** 11, 10 ** 11, 10 ** 11], 1)])
def test_magnitudes_stay_bounded(nums, target):
    # 12-digit literals multiplied: exact, bounded, and fast
    expr = " * ".join(str(n) for n in nums) if target != 22 else "(3 + 5) * 7 - 34"
    expected = 1.0 if target == 22 else 0.0
    assert countdown_reward([f"<answer>{expr}</answer>"], target=[target], nums=[nums]) == [expected]
    deep = "(" * 33 + "3 + 5" + ")" * 33 + " * 7 - 34"  # deeper than the parser's 32 levels
    assert countdown_reward([f"<answer>{deep}</answer>"], target=[22], nums=[[3, 5, 7, 34]]) == [0.0]
    ok = "(" * 30 + "3 + 5" + ")" * 30 + " * 7 - 34"
    assert countdown_reward([f"<answer>{ok}</answer>"], target=[22], nums=[[3, 5, 7, 34]]) == [1.0]
