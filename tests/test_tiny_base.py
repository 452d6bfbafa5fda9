"""The tiny Countdown base model (eggroll_ft.tiny_base + rewards/countdown_base.py): builds, loads
offline, generates, learns; a named model built into the cache on first use."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eggroll_ft.models.named import resolve_model_name
from eggroll_ft.tiny_base import TinyBaseConfig, build_model, build_tokenizer, pretrain, train
from rewards import countdown_base as cb
from rewards.countdown import countdown_reward, format_prompt
from scripts import make_tiny_base

# A few-second build: a one-layer, 32-wide model for 40 steps on 600 problems.
TINY = ["--steps", "40", "--hidden_size", "32", "--num_layers", "1", "--num_heads", "2", "--num_train", "600",
        "--num_eval", "8", "--batch_size", "16", "--warmup_steps", "5", "--learning_rate", "1e-2",
        "--max_new_tokens", "12"]
TINY_CFG = TinyBaseConfig(steps=40, hidden_size=32, num_layers=1, num_heads=2, batch_size=16, warmup_steps=5,
                          learning_rate=1e-2, max_new_tokens=12)
TINY_DATA = cb.CountdownBaseData(num_train=600, num_eval=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "base"
    info = make_tiny_base.main(["--output_dir", str(out), *TINY])
    return out, info


def test_tokenizer_round_trips_prompt_and_completion():
    tok = build_tokenizer()
    text = format_prompt([3, 5, 7], 22, "minimal") + "<answer>(7+3)*5/2 - 3</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and len(tok) == 100  # one token per character
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in tok("Use The Numbers [1, 2] <think>x</think>.,\n\n", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    batch = tok(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0][:2] == [tok.pad_token_id] * 2 and batch["attention_mask"][0] == [0, 0, 1, 1]


def test_training_data_are_correct_canonical_solutions():
    problems = cb.heldout_problems(40, seed=3)
    completions = [f"<answer>{p['solution']}</answer>" for p in problems]
    rewards = countdown_reward(completions, [p["target"] for p in problems], [p["nums"] for p in problems])
    assert rewards == [1.0] * 40
    assert cb.sft_pairs(problems[:1]) == [(format_prompt(problems[0]["nums"], problems[0]["target"], "minimal"),
                                           f"<answer>{problems[0]['solution']}</answer>")]
    data = cb.CountdownBaseData(num_train=200, num_eval=100)
    held = {(tuple(p["nums"]), p["target"]) for p in cb.heldout_problems(data.num_eval)}
    train_set = cb.training_problems(data, seed=0)
    assert 180 < len(train_set) <= 200 and not held & {(tuple(p["nums"]), p["target"]) for p in train_set}


def test_build_saves_loadable_checkpoint_that_generates(built):
    out, info = built
    info_file = json.loads((out / cb.INFO_FILE).read_text())
    assert info_file == info and info["steps"] == 40 and info["seed"] == 0
    assert info["config"]["num_train"] == 600 and info["config"]["learning_rate"] == 1e-2
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
    assert cb.heldout_accuracy(model, tok, cb.heldout_problems(8), 12) == info["heldout_accuracy"]


def test_training_loss_falls_and_is_deterministic(built):
    _, info = built
    assert info["first_loss"] > 2.5  # ~ln(vocab) at initialisation
    assert info["final_loss"] < 0.6 * info["first_loss"]
    pairs = cb.sft_pairs(cb.training_problems(TINY_DATA, seed=0))
    tok = build_tokenizer()
    losses = train(build_model(tok, TINY_CFG), tok, pairs, TINY_CFG, progress=False)
    head = 4  # min(50, steps // 10), as in pretrain
    assert sum(losses[:head]) / head == pytest.approx(info["first_loss"], rel=1e-5)
    assert sum(losses[-head:]) / head == pytest.approx(info["final_loss"], rel=1e-5)
    _, _, again = pretrain(pairs[:64], TinyBaseConfig(steps=2, hidden_size=32, num_layers=1, num_heads=2), progress=False)
    assert again["train_examples"] == 64 and again["steps"] == 2


def test_named_model_builds_once_into_the_cache_and_atomically(tmp_path, monkeypatch, built):
    out, _ = built
    marker = out / "marker"
    marker.write_text("x")
    assert cb.build_tiny_countdown_base(str(out)) == str(out) and marker.exists()  # complete: not rebuilt

    def interrupted(output_dir, cfg, data, progress):
        with open(os.path.join(output_dir, "config.json"), "w") as f:
            f.write("{")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(cb, "_build", interrupted)
    target = tmp_path / "cache" / "base"
    with pytest.raises(KeyboardInterrupt):
        cb.build_tiny_countdown_base(str(target))
    assert not target.exists() and os.listdir(tmp_path / "cache") == []
    # `import rewards` registered the name: it resolves to $EGGROLL_CACHE/tiny-countdown-base
    cache = tmp_path / "envcache"
    (cache / cb.TINY_COUNTDOWN_BASE).mkdir(parents=True)
    (cache / cb.TINY_COUNTDOWN_BASE / "config.json").write_text("{}")  # a finished build there is reused
    monkeypatch.setenv("EGGROLL_CACHE", str(cache))
    assert resolve_model_name(cb.TINY_COUNTDOWN_BASE) == str(cache / cb.TINY_COUNTDOWN_BASE)


def test_config_errors_name_field():
    with pytest.raises(ValueError, match="hidden_size=30"):
        TinyBaseConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="steps=0"):
        TinyBaseConfig(steps=0)
    with pytest.raises(ValueError, match="four_number_fraction=2"):
        cb.CountdownBaseData(four_number_fraction=2)


@pytest.mark.slow
def test_default_build_is_partly_competent(tmp_path):
    torch.manual_seed(0)
    path = cb.build_tiny_countdown_base(str(tmp_path / "base"))
    info = json.loads(open(os.path.join(path, cb.INFO_FILE)).read())
    assert 0.05 < info["heldout_accuracy"] < 0.9
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert cb.heldout_accuracy(model, tok, cb.heldout_problems(64)) > 0.03  # the saved checkpoint, reloaded, still solves
