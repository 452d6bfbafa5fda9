"""scripts/make_tiny_base.py: the tiny Countdown base model builds, loads offline, generates, learns."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rewards.countdown import countdown_reward, format_prompt
from scripts import make_tiny_base as mtb

# A few-second build: a one-layer, 32-wide model for 40 steps on 600 problems.
TINY = ["--steps", "40", "--hidden_size", "32", "--num_layers", "1", "--num_heads", "2", "--num_train", "600",
        "--num_eval", "8", "--batch_size", "16", "--warmup_steps", "5", "--lr", "1e-2", "--max_new_tokens", "12"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "base"
    info = mtb.main(["--output_dir", str(out), *TINY])
    return out, info


def test_tokenizer_round_trips_prompt_and_completion():
    tok = mtb.build_tokenizer()
    text = format_prompt([3, 5, 7], 22, "minimal") + "<answer>(7+3)*5/2 - 3</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in tok("Use The Numbers [1, 2] <think>x</think>.,", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    batch = tok(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0][:2] == [tok.pad_token_id] * 2 and batch["attention_mask"][0] == [0, 0, 1, 1]


def test_solver_writes_correct_canonical_solutions():
    problems = mtb.heldout_problems(40, seed=3)
    completions = [f"<answer>{p['solution']}</answer>" for p in problems]
    rewards = countdown_reward(completions, [p["target"] for p in problems], [p["nums"] for p in problems])
    assert rewards == [1.0] * 40
    assert mtb.solve_countdown([4, 6, 9, 1], 61) is not None and mtb.solve_countdown([1, 1, 1], 50) is None


def test_build_saves_loadable_checkpoint_that_generates(built):
    out, info = built
    info_file = json.loads((out / "tiny_base_info.json").read_text())
    assert info_file["steps"] == 40 and info_file["seed"] == 0 and info_file["params"] == info["params"]
    assert 0.0 <= info["heldout_accuracy"] <= 1.0
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == info["params"] < 100_000
    assert tok.padding_side == "left" and model.generation_config.eos_token_id == tok.eos_token_id
    prompt = format_prompt([3, 5, 7], 22, "minimal")
    assert tok.decode(tok(prompt)["input_ids"]) == prompt
    enc = tok([prompt, format_prompt([10, 2, 30], 5, "minimal")], return_tensors="pt", padding=True)
    gen = model.generate(**enc, max_new_tokens=10, do_sample=False)
    assert gen.shape[0] == 2 and enc["input_ids"].shape[1] < gen.shape[1] <= enc["input_ids"].shape[1] + 10
    # 40 steps are enough to learn the answer tag that every completion starts with.
    text = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.startswith("<answer>"), text


def test_training_loss_falls_and_is_deterministic(built):
    _, info = built
    assert info["first_loss"] > 2.5  # ~ln(vocab) at initialisation
    assert info["final_loss"] < 0.6 * info["first_loss"]
    cfg = mtb.TinyBaseConfig(steps=40, hidden_size=32, num_layers=1, num_heads=2, num_train=600, num_eval=8,
                             batch_size=16, warmup_steps=5, lr=1e-2, max_new_tokens=12)
    tok = mtb.build_tokenizer()
    problems = mtb.training_problems(cfg)
    losses = mtb.train(mtb.build_model(tok, cfg), tok, problems, cfg, progress=False)
    head = 4  # min(50, steps // 10), as in build_tiny_base
    assert sum(losses[:head]) / head == pytest.approx(info["first_loss"], rel=1e-5)
    assert sum(losses[-head:]) / head == pytest.approx(info["final_loss"], rel=1e-5)


def test_ensure_tiny_base_reuses_and_is_atomic(tmp_path, monkeypatch, built):
    out, _ = built
    marker = out / "marker"
    marker.write_text("x")
    assert mtb.ensure_tiny_base(str(out)) == str(out) and marker.exists()  # complete: not rebuilt

    def interrupted(output_dir, cfg=None, progress=True):
        with open(os.path.join(output_dir, "config.json"), "w") as f:
            f.write("{")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(mtb, "build_tiny_base", interrupted)
    target = tmp_path / "cache" / "base"
    with pytest.raises(KeyboardInterrupt):
        mtb.ensure_tiny_base(str(target))
    assert not target.exists() and os.listdir(tmp_path / "cache") == []
    monkeypatch.setenv("EGGROLL_CACHE", str(tmp_path / "envcache"))
    assert mtb.default_path() == str(tmp_path / "envcache" / "tiny-countdown-base")


def test_config_errors_name_field():
    with pytest.raises(ValueError, match="hidden_size=30"):
        mtb.TinyBaseConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="steps=0"):
        mtb.TinyBaseConfig(steps=0)


@pytest.mark.slow
def test_default_build_is_partly_competent(tmp_path):
    torch.manual_seed(0)
    path = mtb.ensure_tiny_base(str(tmp_path / "base"))
    info = json.loads(open(os.path.join(path, "tiny_base_info.json")).read())
    assert 0.05 < info["heldout_accuracy"] < 0.9
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    problems = mtb.heldout_problems(64)
    assert mtb.greedy_accuracy(model, tok, problems) > 0.03  # the saved checkpoint, reloaded, still solves
