"""GSM8K: answer extraction, the reward on real reference solutions, templates and loading."""
import json
import threading
from fractions import Fraction

import pytest

from conftest import SHARED_DATA
from rewards.gsm8k import (
    TEMPLATES,
    extract_final_answer,
    format_prompt,
    gsm8k_reward,
    load_gsm8k,
    reference_answer,
)

GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"


def variants(answer: str) -> list[str]:
    """[reference, final number changed, '#### N' as words, words with the number changed]."""
    body, final = answer.rsplit("####", 1)
    wrong = Fraction(reference_answer(answer)) + 1
    return [answer, f"{body}#### {wrong}", f"{body}The answer is {final.strip()}.", f"{body}The answer is {wrong}."]


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason=f"{GSM8K_TEST} is absent")
def test_every_gsm8k_test_item_reference_scores_one_and_changed_scores_zero():
    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines() if line.strip()]
    assert len(rows) == 1319
    completions, answers = [], []
    for row in rows:
        completions += variants(row["answer"])
        answers += [row["answer"]] * 4
    scores = gsm8k_reward(completions, answer=answers)
    failures = [(i // 4, i % 4, s) for i, s in enumerate(scores) if s != [1.0, 0.0, 1.0, 0.0][i % 4]]
    assert failures == []


@pytest.mark.parametrize(
    "text,expected",
    [
        ("9 * 2 = 18\n#### 18", "18"),
        ("#### 1,080 dollars", "1080"),
        ("#### 18\n\nQuestion: next one has 99 apples", "18"),  # base models keep generating
        ("The answer is $18.", "18"),
        ("the answer is: 2,125.", "2125"),
        ("Final answer: 3.75", "3.75"),
        ("He has -4 dollars left", "-4"),
        ("It costs \u22127 degrees", "-7"),  # unicode minus
        ("5-3 = 2", "2"),  # subtraction is not a sign
        ("she needs 3/4 of a cup", "3/4"),
        ("Total: 40%", "40"),
        ("... 1,000,000 grains.", "1000000"),
        ("I think 12.</think> so the answer is 14", "14"),
        ("<think>the answer is 12</think>", None),  # nothing after </think>
        ("\\boxed{18}", "18"),
        ("\\boxed{\\$1{,}250}", "1250"),
        ("\\boxed{18 \\text{ dollars}}", "18"),
        ("\\boxed{\\dfrac{7}{2}}", "7/2"),
        ("\\boxed{\\sqrt{324}}", "\\sqrt{324}"),  # left for math-verify
        ("7 then \\boxed{8} and finally 9", "8"),  # boxed beats the last number
        ("no numbers", None),
        ("", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_reward_compares_numerically():
    ref = "Some steps <<3*6=18>>\n#### 18"
    good = ["18", "18.0", "$18.00", "18 dollars", "36/2", "\\boxed{\\frac{36}{2}}", "\\boxed{18}",
            "The answer is 18.", "#### 18", "<think>17?</think>It is 18", "\\boxed{\\sqrt{324}}",
            "\\boxed{2 \\times 9}", [{"role": "assistant", "content": "#### 18"}]]
    bad = ["17", "18.5", "180", "1/18", "\\boxed{19}", "#### 17\nso 18", "<think>18</think>", "", None,
           "The answer is 17. Maybe 18", "\\boxed{9^{9^{9^9}}}"]
    assert gsm8k_reward(good, answer=[ref] * len(good)) == [1.0] * len(good)
    assert gsm8k_reward(bad, answer=[ref] * len(bad)) == [0.0] * len(bad)
    assert gsm8k_reward(["-0.5", "-1/2", "0.5"], answer=["#### -0.5"] * 3) == [1.0, 1.0, 0.0]
    assert gsm8k_reward(["1,080", "1080", "1.080"], answer=["#### 1,080"] * 3) == [1.0, 1.0, 0.0]


def test_math_verify_fallback_is_skipped_off_the_main_thread():
    out = {}
    worker = threading.Thread(target=lambda: out.update(
        r=gsm8k_reward(["\\boxed{\\sqrt{324}}", "\\boxed{18}"], answer=["#### 18"] * 2)))
    worker.start()
    worker.join(timeout=30)
    assert out["r"] == [0.0, 1.0]  # no signal error, no hang; fast path still works


def test_reference_answer():
    assert reference_answer("x\n#### 70000") == "70000"
    assert reference_answer("x\n#### -3") == "-3"
    assert reference_answer("42") == "42" and reference_answer(42) == "42"
    with pytest.raises(ValueError, match="no final number"):
        reference_answer("#### none")
    with pytest.raises(ValueError, match="len"):
        gsm8k_reward(["1"], answer=["#### 1", "#### 2"])


def test_templates():
    assert set(TEMPLATES) == {"plain", "rwkv", "chat"}
    assert format_prompt("Q?", "rwkv") == "User: Q?\n\nAssistant: <think"
    assert format_prompt("Q?", "plain") == "Question: Q?\nAnswer:"
    assert format_prompt("a {b}?", "chat") == [
        {"role": "user", "content": "a {b}?\nPlease reason step by step, and put your final answer within \\boxed{}."}]
    with pytest.raises(ValueError, match="template='x'"):
        format_prompt("Q?", "x")


def test_load_local_jsonl(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"} for i in range(5)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_gsm8k("train", path=str(tmp_path), template="rwkv", n=3)
    assert ds.column_names == ["prompt", "question", "answer"] and len(ds) == 3
    assert ds[2]["prompt"] == "User: What is 2 + 1?\n\nAssistant: <think"
    assert gsm8k_reward(ds["answer"], answer=ds["answer"]) == [1.0] * 3
    chat = load_gsm8k("train", path=str(tmp_path / "train.jsonl"), template="chat")
    assert len(chat) == 5 and chat[0]["prompt"][0]["role"] == "user"
    with pytest.raises(ValueError, match="test.jsonl"):
        load_gsm8k("test", path=str(tmp_path))


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason=f"{GSM8K_TEST} is absent")
def test_load_real_test_split():
    ds = load_gsm8k("test", path=str(GSM8K_TEST.parent), template="plain")
    assert len(ds) == 1319 and ds[0]["prompt"].startswith("Question: Janet")
    assert reference_answer(ds[0]["answer"]) == "18"
