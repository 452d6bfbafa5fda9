"""Benchmark: reward throughput for Countdown and GSM8K, side by side with a common baseline.

    python scripts/bench_rewards.py            # 8,192 completions per task, pinned to one core

For each task it scores N synthetic-but-realistic completions (a mix of correct, wrong and
malformed answers, each with a few hundred characters of reasoning) and prints completions/s,
best of --repeats runs. Baselines, measured in the same run (math-verify on --baseline-n only):

- countdown: the usual "safe eval" alternative, an ``ast.parse`` walk that admits only numbers
  and + - * / (exact Fractions), with the same answer-tag and number checks;
- gsm8k: math-verify ``verify(parse(reference), parse(completion))``, the verifier behind TRL's
  accuracy reward (we print its agreement with ours too).

The ratio column is ours over the baseline (higher is faster).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import sys
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rewards.countdown import countdown_format_reward, countdown_reward, generate_countdown_problems  # noqa: E402
from rewards.gsm8k import gsm8k_reward, reference_answer  # noqa: E402

GSM8K_TEST = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
FILLER = ("Let me try combining the largest numbers first and see how close I get to the target. "
          "If that overshoots, I will subtract the smaller ones. ")


def countdown_batch(n: int, seed: int):
    """n completions for n generated problems: 1/3 correct, 1/3 wrong value, 1/3 malformed."""
    rng = random.Random(seed)
    problems = generate_countdown_problems(n, seed=seed)
    completions = []
    for i, p in enumerate(problems):
        think = " " + FILLER * rng.randint(1, 4) + "</think>\n"
        if i % 3 == 0:
            completions.append(think + f"<answer>{p['solution']}</answer>")
        elif i % 3 == 1:
            completions.append(think + f"<answer>{' + '.join(map(str, p['nums']))}</answer>")
        else:
            completions.append(think + f"The answer is {p['solution']}")  # no tags
    return completions, [p["target"] for p in problems], [p["nums"] for p in problems]


def gsm8k_batch(n: int, seed: int):
    """n completions built from real test references when present: correct, off by one, words."""
    if GSM8K_TEST.exists():
        rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines() if line.strip()]
    else:  # synthetic fallback with the same shape
        rows = [{"answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i} apples.\n#### {2 * i}"} for i in range(1, 500)]
    rng = random.Random(seed)
    completions, answers = [], []
    for i in range(n):
        answer = rows[rng.randrange(len(rows))]["answer"]
        body, final = answer.rsplit("####", 1)
        ref = reference_answer(answer)
        kind = i % 4
        if kind == 0:
            completions.append(answer)
        elif kind == 1:
            completions.append(f"{body}#### {Fraction(ref) + 1}")
        elif kind == 2:
            completions.append(f"<think>{body}</think>The answer is {final.strip()}.")
        else:
            completions.append(f"{body}So the final answer is $\\boxed{{{ref}}}$.")
        answers.append(answer)
    return completions, answers


# ---- baselines ------------------------------------------------------------------------------

_AST_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
            ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def _ast_eval(node, literals):
    if isinstance(node, ast.Expression):
        return _ast_eval(node.body, literals)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
        return _AST_OPS[type(node.op)](_ast_eval(node.left, literals), _ast_eval(node.right, literals))
    raise ValueError("disallowed node")


def ast_countdown_reward(completions, target, nums):
    out = []
    for text, t, ns in zip(completions, target, nums):
        found = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
        try:
            literals = []
            value = _ast_eval(ast.parse(found[-1].strip(), mode="eval"), literals)
            out.append(float(value == t and Counter(literals) == Counter(ns)))
        except (IndexError, SyntaxError, ValueError, ZeroDivisionError, RecursionError):
            out.append(0.0)
    return out


def math_verify_reward(completions, answers):
    from math_verify import parse, verify

    return [float(verify(parse(reference_answer(a)), parse(c))) for c, a in zip(completions, answers)]


def best_time(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8192, help="completions per task")
    ap.add_argument("--baseline-n", type=int, default=512, help="completions for the baselines")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    m = args.baseline_n

    cd_completions, targets, nums = countdown_batch(args.n, args.seed)
    gs_completions, answers = gsm8k_batch(args.n, args.seed)
    ours = {
        "countdown": lambda: countdown_reward(cd_completions, target=targets, nums=nums),
        "countdown_format": lambda: countdown_format_reward(cd_completions),
        "gsm8k": lambda: gsm8k_reward(gs_completions, answer=answers),
    }
    # (label, completions scored, baseline, ours on the same completions for the agreement)
    baselines = {
        "countdown": ("ast walk", args.n, lambda: ast_countdown_reward(cd_completions, targets, nums),
                      ours["countdown"]),
        "gsm8k": ("math-verify", m, lambda: math_verify_reward(gs_completions[:m], answers[:m]),
                  lambda: gsm8k_reward(gs_completions[:m], answer=answers[:m])),
    }
    math_verify_reward(gs_completions[:2], answers[:2])  # import sympy/latex2sympy outside the timing

    print(f"{args.n} completions per task, best of {args.repeats}, one core; math-verify on {m}")
    print(f"{'reward':<18}{'seconds':>9}{'compl/s':>11}{'mean reward':>13}   "
          f"{'baseline':<12}{'compl/s':>9}{'ours/base':>11}{'agree':>8}")
    for name, full in ours.items():
        seconds = best_time(full, args.repeats)
        rate = args.n / seconds
        line = f"{name:<18}{seconds:>9.3f}{rate:>11,.0f}{sum(full()) / args.n:>13.3f}   "
        if name in baselines:
            label, count, base, same = baselines[name]
            base_rate = count / best_time(base, 1 if name == "gsm8k" else args.repeats)
            agree = sum(a == b for a, b in zip(same(), base())) / count
            line += f"{label:<12}{base_rate:>9,.0f}{rate / base_rate:>10.1f}x{agree:>8.3f}"
        print(line)


if __name__ == "__main__":
    main()
