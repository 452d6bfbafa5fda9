"""RWKV-7 in EggrollTrainer: loading every checkpoint form, learning a toy reward, save/resume.

Tiny models are built in code (``RWKV7Config.from_size``); nothing reaches a hub.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import save_file

from eggroll_ft import EggrollConfig, EggrollTrainer
from eggroll_ft.models.loading import is_rwkv7_checkpoint, load_causal_lm, load_tokenizer
from eggroll_ft.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
from eggroll_ft.models.rwkv_tokenizer import RWKVWorldTokenizer
from eggroll_ft.testing import char_fraction_reward, char_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scripts.make_tiny_rwkv import build_tiny_rwkv, ensure_tiny_rwkv  # noqa: E402

ALPHABET = "abcdefgh "
PROMPTS = ["abc", "hgf", "dde", "bag", "cab", "fed", "ggh", "ace"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def char_rwkv(tok, seed=0, width=64, layers=2):
    torch.manual_seed(seed)
    return RWKV7ForCausalLM(RWKV7Config.from_size(width, layers, vocab_size=len(tok), head_size=32))


def world_rwkv(seed=0):
    """Full 65,536-row vocabulary (the World tokenizer's), 32 wide, 1 layer."""
    torch.manual_seed(seed)
    return RWKV7ForCausalLM(RWKV7Config.from_size(32, 1, head_size=32))


def args(out, **kw):
    base = dict(output_dir=str(out), max_steps=2, population_size=4, sigma=0.2, learning_rate=0.05, prompts_per_step=2,
                max_completion_length=6, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
                disable_tqdm=True, seed=0)
    base.update(kw)
    return EggrollConfig(**base)


def data(n=8):
    return Dataset.from_dict({"prompt": PROMPTS[:n]})


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- loading -----------------------------------------------------------------------------------

def test_checkpoint_detection(tmp_path):
    m = world_rwkv()
    torch.save(m.official_state_dict(), tmp_path / "g1.pth")
    m.save_pretrained(tmp_path / "ours")
    (tmp_path / "fla").mkdir()
    save_file({k: v.contiguous() for k, v in m.fla_state_dict().items()}, str(tmp_path / "fla" / "model.safetensors"))
    (tmp_path / "fla" / "config.json").write_text(json.dumps({"model_type": "rwkv7_fla"}))
    (tmp_path / "trainer").mkdir()  # transformers.Trainer's save of a non-PreTrainedModel: weights, no config.json
    save_file(m.state_dict(), str(tmp_path / "trainer" / "model.safetensors"))
    torch.save({"python": 0}, tmp_path / "trainer" / "rng_state.pth")  # as in checkpoint-N/: not a model file
    (tmp_path / "one_pth").mkdir()
    torch.save(m.official_state_dict(), tmp_path / "one_pth" / "rwkv7-g1-tiny.pth")
    tok = char_tokenizer(ALPHABET)
    tiny_llama(len(tok)).save_pretrained(tmp_path / "llama")
    (tmp_path / "empty").mkdir()
    for name in ("g1.pth", "ours", "fla", "trainer", "one_pth"):
        assert is_rwkv7_checkpoint(str(tmp_path / name)), name
        loaded = load_causal_lm(str(tmp_path / name))
        assert isinstance(loaded, RWKV7ForCausalLM) and same(weights(loaded), weights(m)), name
    for name in ("llama", "empty", "missing"):
        assert not is_rwkv7_checkpoint(str(tmp_path / name)), name
    assert not is_rwkv7_checkpoint("BlinkDL/rwkv7-g1")  # a hub id is not a local checkpoint
    (tmp_path / "fla" / "config.json").write_text(json.dumps({"model_type": "rwkv7"}))
    assert is_rwkv7_checkpoint(str(tmp_path / "fla"))


def test_load_causal_lm_dtype_and_kwargs(tmp_path):
    m = world_rwkv()
    torch.save({k: v.to(torch.bfloat16) for k, v in m.official_state_dict().items()}, tmp_path / "bf16.pth")
    path = str(tmp_path / "bf16.pth")
    dtypes = lambda model: {p.dtype for p in model.parameters()}  # noqa: E731
    assert dtypes(load_causal_lm(path)) == {torch.bfloat16}  # default: the checkpoint's dtype
    assert dtypes(load_causal_lm(path, dtype="auto")) == {torch.bfloat16}
    assert dtypes(load_causal_lm(path, dtype="float32")) == {torch.float32}
    assert dtypes(load_causal_lm(path, torch_dtype=torch.float32)) == {torch.float32}
    # the recipes' ModelConfig kwargs: HF-only options are ignored, dtype honoured
    got = load_causal_lm(path, revision="main", dtype="float32", attn_implementation="sdpa", device_map={"": "cpu"})
    assert dtypes(got) == {torch.float32}
    assert torch.equal(got.head.weight, m.head.weight.to(torch.bfloat16).float())
    with pytest.raises(ValueError, match=r"model_init_kwargs \['quantization_config'\]"):
        load_causal_lm(path, quantization_config=object())
    with pytest.raises(ValueError, match="dtype='float33'"):
        load_causal_lm(path, dtype="float33")


def test_load_tokenizer_prefers_the_saved_one(tmp_path):
    m = world_rwkv()
    m.save_pretrained(tmp_path / "bare")
    assert isinstance(load_tokenizer(m, str(tmp_path / "bare")), RWKVWorldTokenizer)  # default_tokenizer()
    tok = char_tokenizer(ALPHABET)
    tok.save_pretrained(tmp_path / "bare")
    got = load_tokenizer(m, str(tmp_path / "bare"))
    assert got("bag")["input_ids"] == tok("bag")["input_ids"] and got.padding_side == "left"


# ---- training ----------------------------------------------------------------------------------

def test_training_improves_toy_reward_and_changes_only_matrices(tmp_path):
    tok = char_tokenizer(ALPHABET)
    model = char_rwkv(tok)
    before = weights(model)
    tr = EggrollTrainer(model, char_fraction_reward("a"), processing_class=tok, train_dataset=data(),
                        args=args(tmp_path, max_steps=16, population_size=32, sigma=0.2, learning_rate=0.2, greedy=True,
                                  max_completion_length=10, logging_steps=4))
    start = tr.evaluate(data())["eval_reward"]  # greedy, unperturbed
    tr.train()
    end = tr.evaluate(data())["eval_reward"]
    rewards = [h["reward"] for h in tr.state.log_history if "reward" in h]
    # measured (seed 0): greedy 0.00 -> 0.94; population mean 0.36 -> 0.81 (seeds 0-3: >= 0.90 after, <= 0.28 before)
    assert start < 0.3 and end > 0.75, (start, end)
    assert rewards[-1] > rewards[0] + 0.3, rewards
    perturbed = set(tr.population.params)  # parameter names
    assert len(perturbed) == 12 + 14  # every matrix of both blocks (layer 0 has no value-residual LoRA)
    for k, v in model.state_dict().items():
        assert (not torch.equal(before[k], v)) == (k in perturbed), k


def test_trainer_from_official_pth_with_world_tokenizer(tmp_path):
    m = world_rwkv(seed=1)
    torch.save(m.official_state_dict(), tmp_path / "rwkv7-g1-tiny.pth")
    tr = EggrollTrainer(str(tmp_path / "rwkv7-g1-tiny.pth"), char_fraction_reward("a"), train_dataset=data(4),
                        args=args(tmp_path / "out", max_steps=1, max_completion_length=4))
    assert isinstance(tr.processing_class, RWKVWorldTokenizer) and tr.eos_token_ids == [0]
    assert same(weights(tr.model), weights(m))
    tr.train()
    assert tr.state.global_step == 1
    assert not same(weights(tr.model), weights(m))


def test_trainer_from_save_pretrained_dir_and_save_model_round_trip(tmp_path):
    path = ensure_tiny_rwkv(str(tmp_path / "tiny"), hidden_size=32, num_layers=1)
    assert ensure_tiny_rwkv(path) == path  # reused, not rebuilt
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "rwkv_vocab_v20230424.txt",
                                        "tokenizer_config.json"]
    tr = EggrollTrainer(path, char_fraction_reward("a"), train_dataset=data(4),
                        args=args(tmp_path / "out", max_steps=1, max_completion_length=4))
    assert isinstance(tr.processing_class, RWKVWorldTokenizer)
    tr.train()
    tr.save_model(str(tmp_path / "saved"))  # transformers.Trainer: our state dict + the tokenizer, no config.json
    assert is_rwkv7_checkpoint(str(tmp_path / "saved"))
    again = EggrollTrainer(str(tmp_path / "saved"), char_fraction_reward("a"), train_dataset=data(4),
                           args=args(tmp_path / "out2", max_steps=1))
    assert same(weights(again.model), weights(tr.model))
    assert isinstance(again.processing_class, RWKVWorldTokenizer)


def test_resume_equals_uninterrupted_run(tmp_path):
    tok = char_tokenizer(ALPHABET)

    def run(out, max_steps, resume=None, save_steps=None):
        kw = dict(save_strategy="steps", save_steps=save_steps) if save_steps else {}
        tr = EggrollTrainer(char_rwkv(tok, width=32, layers=1), char_fraction_reward("a"),
                            args=args(out, max_steps=max_steps, temperature=1.0, **kw), train_dataset=data(),
                            processing_class=tok)
        tr.train(resume_from_checkpoint=resume)
        return weights(tr.model)

    full = run(tmp_path / "a", 4)
    assert same(full, run(tmp_path / "b", 4))  # same seed, same weights
    run(tmp_path / "c", 2, save_steps=2)  # "killed" after step 2, with a checkpoint
    checkpoint = str(tmp_path / "c" / "checkpoint-2")
    assert same(full, run(tmp_path / "c", 4, resume=checkpoint))
    # the checkpoint directory itself loads as a model (its rng_state.pth is not taken for weights)
    assert is_rwkv7_checkpoint(checkpoint)
    assert same(weights(load_causal_lm(checkpoint)), run(tmp_path / "d", 2))  # the weights after step 2


def test_build_tiny_rwkv_is_seeded(tmp_path):
    a = load_causal_lm(build_tiny_rwkv(str(tmp_path / "a"), hidden_size=32, num_layers=1, seed=3))
    b = load_causal_lm(build_tiny_rwkv(str(tmp_path / "b"), hidden_size=32, num_layers=1, seed=3))
    c = load_causal_lm(build_tiny_rwkv(str(tmp_path / "c"), hidden_size=32, num_layers=1, seed=4))
    assert same(weights(a), weights(b)) and not same(weights(a), weights(c))
    assert (a.config.hidden_size, a.config.num_hidden_layers, a.config.vocab_size) == (32, 1, 65536)
