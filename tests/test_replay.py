"""Seed-replay checkpoints (eggroll_ft/replay.py): the base model plus the log rebuild every
checkpoint of a run bit for bit, a run killed mid-step resumes from its log to the weights of an
uninterrupted run, and a log that does not fit the base or the run is refused by name."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from eggroll_ft import EggrollConfig, EggrollTrainer
from eggroll_ft.replay import LOG_NAME, read_log, replay
from eggroll_ft.replay import main as replay_main
from eggroll_ft.testing import char_fraction_reward, char_tokenizer, tiny_llama

ROOT = Path(__file__).parents[1]
ALPHABET = "abcdefgh "
OPTIMS = {"sgd": dict(optim="sgd", learning_rate=0.05),
          "adamw": dict(optim="adamw_torch", learning_rate=0.01, weight_decay=0.1, max_grad_norm=0.5)}


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=4, population_size=4, sigma=0.2, prompts_per_step=2,
                max_completion_length=4, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
                disable_tqdm=True, seed=0)
    return EggrollConfig(**{**base, **kw})


def _data():
    return Dataset.from_dict({"prompt": ["abc", "hgf", "dde", "bag", "cab", "fed"]})


def _base():
    return tiny_llama(len(char_tokenizer(ALPHABET)), init_std=0.5)


def _train(out, model=None, resume=None, peft_config=None, callbacks=None, **kw):
    tr = EggrollTrainer(model if model is not None else _base(), char_fraction_reward("a"), args=_args(out, **kw),
                        train_dataset=_data(), processing_class=char_tokenizer(ALPHABET), peft_config=peft_config,
                        callbacks=callbacks)
    tr.train(resume_from_checkpoint=resume)
    return tr


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


@pytest.mark.parametrize("optim", sorted(OPTIMS))
def test_replay_rebuilds_every_checkpoint_and_optimizer_state_bit_for_bit(tmp_path, optim):
    tr = _train(tmp_path / "run", save_strategy="steps", save_steps=1, **OPTIMS[optim])
    history = read_log(tmp_path / "run" / LOG_NAME)
    assert [s["step"] for s in history.steps] == [0, 1, 2, 3] and all("digest" in s for s in history.steps)
    assert history.header["optimizer"]["class"] == ("torch.optim.sgd:SGD" if optim == "sgd" else "torch.optim.adamw:AdamW")
    for k in range(5):
        out = replay(_base(), tmp_path / "run" / LOG_NAME, until_step=k)
        assert out.digests_checked == k
        if k == 0:
            _assert_equal(_state(out.model), _state(_base()))
            continue
        _assert_equal(_state(out.model), load_file(tmp_path / "run" / f"checkpoint-{k}" / "model.safetensors"))
        saved = torch.load(tmp_path / "run" / f"checkpoint-{k}" / "optimizer.pt", weights_only=True)["state"]
        ours = out.optimizer.state_dict()["state"]
        assert saved.keys() == ours.keys()
        for i in saved:
            assert saved[i].keys() == ours[i].keys()
            assert all(torch.equal(saved[i][n], ours[i][n]) for n in saved[i]), (k, i)
        if optim != "sgd":
            assert len(ours) == len(history.header["params"])  # Adam's moments were replayed too
    _assert_equal(_state(out.model), _state(tr.model))


def test_replay_of_a_peft_run_rebuilds_the_adapter(tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    tr = _train(tmp_path / "run", peft_config=lora, save_strategy="steps", save_steps=1)
    log = tmp_path / "run" / LOG_NAME
    assert read_log(log).header["peft_config"]["r"] == 2
    for k in range(1, 5):
        adapter = load_file(tmp_path / "run" / f"checkpoint-{k}" / "adapter_model.safetensors")
        ours = replay(_base(), log, until_step=k).model.state_dict()
        assert adapter and all(torch.equal(v, ours[n.replace(".weight", ".default.weight")]) for n, v in adapter.items())
    _assert_equal(_state(replay(_base(), log).model), _state(tr.model))
    # the command line, from a base saved on disk, writes the adapter as PEFT saves it
    base_dir = tmp_path / "base"
    _base().save_pretrained(base_dir)
    replay_main([str(base_dir), str(log), "--step", "2", "--output_dir", str(tmp_path / "replayed")])
    _assert_equal(load_file(tmp_path / "replayed" / "adapter_model.safetensors"),
                  load_file(tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors"))


def test_resume_from_a_checkpoint_cuts_the_log_at_the_checkpoint(tmp_path):
    full = _train(tmp_path / "full", max_steps=6)
    _train(tmp_path / "run", max_steps=5, save_strategy="steps", save_steps=4)  # the log runs past checkpoint-4
    assert len(read_log(tmp_path / "run" / LOG_NAME).steps) == 5
    # 3 steps per epoch: the resumed run starts one step into the second epoch, in its prompt order
    _train(tmp_path / "run", max_steps=6, resume=str(tmp_path / "run" / "checkpoint-4"))
    log = read_log(tmp_path / "run" / LOG_NAME)
    assert log.steps == read_log(tmp_path / "full" / LOG_NAME).steps
    _assert_equal(_state(replay(_base(), log).model), _state(full.model))


def test_torn_last_line_is_ignored_and_a_broken_line_is_named(tmp_path):
    _train(tmp_path / "run", max_steps=2)
    log = tmp_path / "run" / LOG_NAME
    text = log.read_text()
    log.write_text(text + '{"step": 2, "sigma": 0.2, "lr": 0.0')  # a crash mid-write
    assert len(read_log(log).steps) == 2
    lines = text.splitlines(keepends=True)
    log.write_text("".join(lines[:2] + ['{"step": 0, "dig\n'] + lines[2:]))
    with pytest.raises(ValueError, match="line 3 is not valid JSON"):
        read_log(log)


def test_wrong_base_wrong_run_and_tampered_fitness_are_refused(tmp_path):
    _train(tmp_path / "run", max_steps=2)
    log = tmp_path / "run" / LOG_NAME
    with pytest.raises(ValueError, match="base_digest"):
        replay(tiny_llama(len(char_tokenizer(ALPHABET)), init_std=0.5, seed=1), log)
    with pytest.raises(ValueError, match="the log was made with noise.rank=1, this run has noise.rank=2"):
        _train(tmp_path / "other", rank=2, resume=str(log))
    with pytest.raises(ValueError, match="sigma=0.2, this run's schedule gives 0.1"):
        _train(tmp_path / "other", sigma=0.1, resume=str(log))
    with pytest.raises(ValueError, match=r"until_step=3 must lie in \[0, 2\]"):
        replay(_base(), log, until_step=3)
    lines = log.read_text().splitlines(keepends=True)
    record = json.loads(lines[3])  # step 1
    record["fitness"][0] += 0.5
    log.write_text("".join(lines[:3] + [json.dumps(record) + "\n"] + lines[4:]))
    with pytest.raises(ValueError, match="after step 1 the replayed weights' digest"):
        replay(_base(), log)


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    sys.path.insert(0, {tests!r})
    from test_replay import OPTIMS, _train

    class Kill(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == 3:  # step 3's record is written; its update has not landed
                os.kill(os.getpid(), signal.SIGKILL)

    _train({out!r}, max_steps=6, callbacks=[Kill()], **OPTIMS[{optim!r}])
""")


@pytest.mark.parametrize("optim", ["adamw", pytest.param("sgd", marks=pytest.mark.slow)])  # ~10-40 s each
def test_run_killed_mid_step_resumes_from_its_log_to_the_uninterrupted_weights(tmp_path, optim):
    out = tmp_path / "killed"
    script = KILLED_RUN.format(tests=str(ROOT / "tests"), out=str(out), optim=optim)
    proc = subprocess.run([sys.executable, "-c", script], check=False, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    log = read_log(out / LOG_NAME)
    assert len(log.steps) == 4 and "digest" not in log.steps[3]  # killed between a record and its digest
    full = _train(tmp_path / "full", max_steps=6, save_strategy="steps", save_steps=4, **OPTIMS[optim])
    _assert_equal(_state(replay(_base(), log).model), load_file(tmp_path / "full" / "checkpoint-4" / "model.safetensors"))
    resumed = _train(out, max_steps=6, resume=str(out / LOG_NAME), **OPTIMS[optim])
    _assert_equal(_state(resumed.model), _state(full.model))
    assert read_log(out / LOG_NAME).steps == read_log(tmp_path / "full" / LOG_NAME).steps
