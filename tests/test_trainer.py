import asyncio
import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from datasets import Dataset

from eggroll_ft import EggrollConfig, EggrollTrainer
from eggroll_ft.reward_funcs import RewardLog
from eggroll_ft.testing import char_fraction_reward, char_tokenizer, tiny_llama

HERE = Path(__file__).parent
ALPHABET = "abcdefgh "


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, population_size=4, sigma=0.2, learning_rate=0.05,
                prompts_per_step=2, max_completion_length=6, report_to="none", use_cpu=True, save_strategy="no",
                logging_steps=1, disable_tqdm=True, seed=0)
    base.update(kw)
    return EggrollConfig(**base)


def _data(n=8):
    return Dataset.from_dict({"prompt": ["abc", "hgf", "dde", "bag", "cab", "fed", "ggh", "ace"][:n],
                              "target": list("aabbccdd")[:n]})


def _trainer(tmp_path, reward=None, model=None, **kw):
    tok = char_tokenizer(ALPHABET)
    model = model if model is not None else tiny_llama(len(tok), init_std=0.5)
    return EggrollTrainer(model, reward or char_fraction_reward("a"), args=_args(tmp_path, **kw),
                          train_dataset=_data(), processing_class=tok)


def test_learning_improves_reward_and_only_perturbed_weights_change(tmp_path):
    tok = char_tokenizer(ALPHABET)
    model = tiny_llama(len(tok), init_std=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr = EggrollTrainer(model, char_fraction_reward("a"), processing_class=tok, train_dataset=_data(),
                        args=_args(tmp_path, max_steps=20, population_size=32, sigma=0.2, learning_rate=0.2, greedy=True,
                                   max_completion_length=10, logging_steps=4))
    tr.train()
    rewards = [h["reward"] for h in tr.state.log_history if "reward" in h]
    assert rewards[-1] > rewards[0] + 0.3, rewards  # measured: 0.11 -> 0.66
    perturbed = set(tr.population.params)
    after = model.state_dict()
    for k, v in after.items():
        changed = not torch.equal(before[k], v)
        assert changed == (k in perturbed), k


def test_step_over_sigma_is_the_update_rms_in_units_of_sigma(tmp_path):
    """``es/step_over_sigma`` (plain SGD): the RMS change of the perturbed weights in one step / sigma."""
    tr = _trainer(tmp_path, max_steps=1, greedy=False, population_size=8, learning_rate=0.01)
    before = {n: p.weight.detach().clone() for n, p in tr.population.params.items()}
    tr.train()
    sq = sum(float((p.weight - before[n]).double().pow(2).sum()) for n, p in tr.population.params.items())
    rms = (sq / tr.population.num_perturbed_parameters()) ** 0.5
    logged = next(h["es/step_over_sigma"] for h in tr.state.log_history if "es/step_over_sigma" in h)
    assert rms > 0 and logged == pytest.approx(rms / 0.2, rel=1e-4)


def test_same_seed_same_weights_and_resume_equals_uninterrupted(tmp_path):
    def run(out, max_steps, resume=None, save_steps=None):
        tok = char_tokenizer(ALPHABET)
        model = tiny_llama(len(tok), init_std=0.5)
        kw = dict(output_dir=str(out), max_steps=max_steps, temperature=1.0)
        if save_steps:
            kw.update(save_strategy="steps", save_steps=save_steps)
        tr = EggrollTrainer(model, char_fraction_reward("a"), args=_args(tmp_path, **kw), train_dataset=_data(),
                            processing_class=tok)
        tr.train(resume_from_checkpoint=resume)
        return {k: v.clone() for k, v in model.state_dict().items()}

    full = run(tmp_path / "a", 4)
    again = run(tmp_path / "b", 4)
    assert all(torch.equal(full[k], again[k]) for k in full)
    run(tmp_path / "c", 2, save_steps=2)  # "killed" after step 2, with a checkpoint
    resumed = run(tmp_path / "c", 4, resume=str(tmp_path / "c" / "checkpoint-2"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_resume_mid_epoch_sees_the_prompts_of_the_uninterrupted_run(tmp_path):
    """Three steps per epoch, resumed after four: the resumed step must draw from the second epoch's
    order (accelerate's skip_first_batches wraps the loader; the epoch reaches the sampler anyway)."""
    seen = {}

    def reward(completions, prompts, trainer_state, **kwargs):
        seen.setdefault(trainer_state.global_step, []).append(sorted(set(prompts)))
        return [0.0] * len(completions)

    tok = char_tokenizer(ALPHABET)
    for resume in (None, str(tmp_path / "out" / "checkpoint-4")):
        tr = EggrollTrainer(tiny_llama(len(tok)), reward, processing_class=tok, train_dataset=_data(6),
                            args=_args(tmp_path, max_steps=5, save_strategy="steps", save_steps=4))
        tr.train(resume_from_checkpoint=resume)
    assert len(seen[4]) == 2 and seen[4][0] == seen[4][1], seen
    assert seen[4][0] != seen[1][0]  # epoch 0's second batch, which a sampler left at epoch 0 would give


@pytest.mark.parametrize("kw, msg", [
    (dict(population_size=7), "population_size=7 must be even when antithetic=True"),
    (dict(sigma=0.0), "sigma=0.0"), (dict(sigma=-1.0), "sigma=-1.0"), (dict(rank=0), "rank=0"),
    (dict(noise_reuse=0), "noise_reuse=0"), (dict(fitness_shaping="softmax"), "fitness_shaping='softmax'"),
    (dict(prompts_per_step=0), "prompts_per_step=0"), (dict(temperature=0.0), "temperature=0.0"),
    (dict(top_p=1.5), "top_p=1.5"), (dict(sigma_schedule="cosine"), "sigma_schedule='cosine'"),
    (dict(generation_backend="sglang"), "generation_backend='sglang'"),
    (dict(use_vllm=True, generation_backend="hf"), "use_vllm=True conflicts with generation_backend='hf'"),
    (dict(generation_backend="vllm", full_rank=True), "full_rank=True cannot run with generation_backend='vllm'"),
    (dict(vllm_mode="server"), "vllm_mode='server'"), (dict(vllm_gpu_memory_utilization=0.0), "vllm_gpu_memory_utilization=0.0"),
    (dict(vllm_max_model_length=0), "vllm_max_model_length=0"), (dict(vllm_tensor_parallel_size=0), "vllm_tensor_parallel_size=0"),
    (dict(vllm_max_loras=0), "vllm_max_loras=0"),
    (dict(sigma="abc"), "sigma='abc' must be a number"),
])
def test_invalid_config_names_field_and_value(tmp_path, kw, msg):
    with pytest.raises(ValueError) as e:
        _args(tmp_path, **kw)
    assert msg in str(e.value)


def test_numbers_written_as_yaml_strings_are_read(tmp_path):
    """YAML 1.1 reads `1e-5` (no dot) as a string; such numbers are accepted, anything else is named."""
    args = _args(tmp_path, sigma="1e-3", learning_rate="3e-6")
    assert args.sigma == 1e-3 and args.learning_rate == 3e-6


def test_use_vllm_selects_the_vllm_backend(tmp_path):
    """TRL's ``use_vllm=True`` means generation_backend='vllm'; the vLLM knobs keep TRL's names."""
    args = _args(tmp_path, use_vllm=True, vllm_gpu_memory_utilization=0.5, vllm_max_model_length=128)
    assert args.generation_backend == "vllm" and args.vllm_max_model_length == 128
    with pytest.warns(UserWarning, match="vllm_enable_sleep_mode"):
        _args(tmp_path, vllm_enable_sleep_mode=True)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_backend_without_vllm_says_how_to_install(tmp_path):
    with pytest.raises(ImportError, match=r"generation_backend='vllm' needs vLLM.*scripts/setup_vllm_env.sh"):
        _trainer(tmp_path, generation_backend="vllm")


def test_vllm_backend_rejects_peft(tmp_path):
    from peft import LoraConfig

    tok = char_tokenizer(ALPHABET)
    with pytest.raises(ValueError, match="with peft_config ES perturbs adapter matrices, which vLLM cannot"):
        EggrollTrainer(tiny_llama(len(tok)), char_fraction_reward(), args=_args(tmp_path, generation_backend="vllm"),
                       train_dataset=_data(), processing_class=tok,
                       peft_config=LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))


def test_reward_errors_name_the_function(tmp_path):
    def broken_reward(completions, **kwargs):
        raise KeyError("boom")

    def short_reward(completions, **kwargs):
        return [1.0]

    with pytest.raises(RuntimeError, match="broken_reward.*boom"):
        _trainer(tmp_path, reward=broken_reward).train()
    with pytest.raises(ValueError, match="short_reward' returned 1 rewards"):
        _trainer(tmp_path, reward=short_reward).train()


def test_dataset_errors(tmp_path):
    tok = char_tokenizer(ALPHABET)
    with pytest.raises(ValueError, match="empty"):
        EggrollTrainer(tiny_llama(len(tok)), char_fraction_reward(), args=_args(tmp_path),
                       train_dataset=Dataset.from_dict({"prompt": []}), processing_class=tok)
    with pytest.raises(ValueError, match="no 'prompt' column"):
        EggrollTrainer(tiny_llama(len(tok)), char_fraction_reward(), args=_args(tmp_path),
                       train_dataset=Dataset.from_dict({"question": ["a"]}), processing_class=tok)
    with pytest.raises(ValueError, match="train_dataset is required"):
        EggrollTrainer(tiny_llama(len(tok)), char_fraction_reward(), args=_args(tmp_path), processing_class=tok)


def test_reward_protocol_columns_async_none_and_weights(tmp_path):
    seen = {}

    def column_reward(prompts, completions, completion_ids, target, trainer_state, **kwargs):
        seen["n"], seen["target"], seen["state"] = len(completions), target[:2], trainer_state
        assert len(completion_ids) == len(completions) == len(prompts) == len(target)
        return [None if i % 2 else c.count(t) / max(len(c), 1) for i, (c, t) in enumerate(zip(completions, target))]

    async def async_reward(completions, **kwargs):
        await asyncio.sleep(0)
        return [1.0] * len(completions)

    tr = _trainer(tmp_path, reward=[column_reward, async_reward], reward_weights=[1.0, 0.5], max_steps=1)
    tr.train()
    assert seen["n"] == 4 * 2 and seen["state"] is tr.state and len(seen["target"]) == 2
    log = next(h for h in tr.state.log_history if "reward" in h)
    assert log["rewards/async_reward/mean"] == 1.0
    assert log["reward"] >= 0.5  # NaN rows of column_reward are skipped, async adds 0.5 * 1.0
    for key in ("reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
                "num_tokens", "step_time", "es/sigma", "es/update_norm", "rewards/column_reward/std"):
        assert key in log, key
    assert 0 < log["es/rollout_time"] and 0 < log["es/update_time"]
    assert log["es/rollout_time"] + log["es/update_time"] <= log["step_time"]


def test_conversational_prompts_log_completions_and_trl_accuracy_reward(tmp_path):
    """Chat prompts go through the chat template, completions come back as messages; TRL's own
    ``trl.rewards.accuracy_reward`` (math-verify, offline) runs unchanged and fills its log_extra
    columns in the completions table."""
    from trl.rewards import accuracy_reward

    tok = char_tokenizer(ALPHABET + "<>|0123456789$")
    tok.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}{% if add_generation_prompt %}|{% endif %}"
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": "abc"}], [{"role": "user", "content": "hgf"}]],
                            "solution": ["$2$", "$4$"]})
    got = []

    def chat_reward(completions, **kwargs):
        got.append(completions[0])
        return [c[-1]["content"].count("a") / 6 for c in completions]

    tr = EggrollTrainer(tiny_llama(len(tok), init_std=0.5), [chat_reward, accuracy_reward], processing_class=tok,
                        train_dataset=ds, args=_args(tmp_path, max_steps=1, log_completions=True))
    tr.train()
    assert got[0][0]["role"] == "assistant" and isinstance(got[0][0]["content"], str)
    df = pd.read_parquet(tmp_path / "out" / "completions" / "completions_00001.parquet")
    assert len(df) == 4 * 2 and {"member", "prompt", "completion", "chat_reward", "reward"} <= set(df.columns)
    assert {"accuracy_reward", "solution", "gold_parsed", "answer_parsed"} <= set(df.columns)
    assert sorted(set(df["solution"])) == ["$2$", "$4$"] and set(df["accuracy_reward"]) <= {0.0, 1.0}
    assert all(g.startswith("[") for g in df["gold_parsed"])  # math-verify parsed every gold answer


def test_a_step_without_signal_is_warned_once(tmp_path):
    """Every member gets the same reward on every prompt: the fitness is zero, the weights stay, and
    the trainer says so once, naming the metric and what to change; a run with signal is not warned."""
    def constant_reward(completions, **kwargs):
        return [1.0] * len(completions)

    tr = _trainer(tmp_path, reward=constant_reward, max_steps=3)
    before = {n: p.weight.clone() for n, p in tr.population.params.items()}
    with pytest.warns(RuntimeWarning, match="step 0: all 4 members got the same reward on each of the 2 prompts") as rec:
        tr.train()
    (message,) = [str(w.message) for w in rec if "no signal to follow" in str(w.message)]  # once
    assert "sigma=0.2 and greedy decoding" in message  # the default decoding
    assert all(torch.equal(before[n], p.weight) for n, p in tr.population.params.items())
    assert [h["frac_reward_zero_std"] for h in tr.state.log_history if "frac_reward_zero_std" in h] == [1.0] * 3

    tr = _trainer(tmp_path, max_steps=2)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        tr.train()
    assert not any("no signal to follow" in str(w.message) for w in rec)
    assert all(h["frac_reward_zero_std"] < 1 for h in tr.state.log_history if "frac_reward_zero_std" in h)


def test_evaluate_runs_the_training_rollout_through_the_configured_backend(tmp_path):
    """evaluate() goes through ``rollout`` -> ``_generate`` -> ``generation_backend``, in chunks of
    max_sequences_in_flight, greedy, on the unperturbed model. With ``generation_backend="hf"`` its
    metrics are exactly those of scoring ``model.generate``'s greedy completions directly."""
    from eggroll_ft.compare import greedy_accuracy

    tok = char_tokenizer(ALPHABET)
    evals = _data(8)
    results, calls = {}, {}
    for backend in ("engine", "hf"):
        model = tiny_llama(len(tok), init_std=0.5)
        tr = EggrollTrainer(model, char_fraction_reward("a"), processing_class=tok, train_dataset=_data(),
                            eval_dataset=evals, args=_args(tmp_path, generation_backend=backend, max_sequences_in_flight=3,
                                                           max_completion_length=8))
        real, log = tr.generation_backend.generate, calls.setdefault(backend, [])

        def spy(prompt_ids, members, seeds, max_new_tokens, sampling, real=real, log=log):
            log.append((len(prompt_ids), set(members.tolist()), max_new_tokens, sampling.greedy))
            return real(prompt_ids, members, seeds, max_new_tokens, sampling)

        tr.generation_backend.generate = spy  # the real backend runs; the spy records its calls
        results[backend] = tr.evaluate()
        if backend == "hf":
            direct = greedy_accuracy(model, tok, evals["prompt"], {"target": evals["target"]}, char_fraction_reward("a"),
                                     max_new_tokens=8, batch_size=3)
    assert calls["engine"] == calls["hf"] == [(3, {-1}, 8, True), (3, {-1}, 8, True), (2, {-1}, 8, True)]
    assert set(results["hf"]) == {"eval_reward", "eval_rewards/char_fraction/mean", "eval_completions/mean_length"}
    assert results["hf"]["eval_reward"] == pytest.approx(direct, abs=1e-6)
    assert results["engine"] == pytest.approx(results["hf"], abs=1e-6)  # the engine: the same greedy completions


def test_reward_functions_log_extra_columns_and_metrics_as_in_trl(tmp_path):
    """TRL 1.16 passes ``log_extra(column, values)`` and ``log_metric(name, value)`` to reward
    functions: extra columns join the completions table, metrics are averaged into the logs
    (training: over the logging interval; evaluation: ``eval_<name>``)."""
    logged = []

    def counting_reward(completions, target, log_extra, log_metric, **kwargs):
        counts = [c.count(t) for c, t in zip(completions, target)]
        log_extra("target_count", counts)
        logged.append(sum(n > 0 for n in counts) / len(counts))
        log_metric("hit_rate", logged[-1])
        return [float(n) for n in counts]

    tok = char_tokenizer(ALPHABET)
    tr = EggrollTrainer(tiny_llama(len(tok), init_std=0.5), counting_reward, processing_class=tok, train_dataset=_data(),
                        eval_dataset=_data(4), args=_args(tmp_path, log_completions=True, logging_steps=2))
    tr.train()
    (record,) = [h for h in tr.state.log_history if "hit_rate" in h]
    assert record["hit_rate"] == pytest.approx(sum(logged) / 2) and len(logged) == 2  # two steps, one record
    df = pd.read_parquet(tmp_path / "out" / "completions" / "completions_00002.parquet")
    assert len(df) == 4 * 2 and df["target_count"].tolist() == [int(r) for r in df["counting_reward"]]
    metrics = tr.evaluate()
    assert metrics["eval_hit_rate"] == logged[-1] and len(logged) == 3
    with pytest.raises(ValueError, match=r"log_extra\('short', ...\) received 1 values for 2 completions"):
        log = RewardLog()
        log.log_extra("short", [1])
        log.flush(2)


def test_hf_backend_and_adam(tmp_path):
    tr = _trainer(tmp_path, generation_backend="hf", optim="adamw_torch", learning_rate=0.01, max_steps=2)
    before = {n: p.weight.clone() for n, p in tr.population.params.items()}
    tr.train()
    assert all(not torch.equal(before[n], p.weight) for n, p in tr.population.params.items())


def test_peft_lora_perturbs_only_adapters_and_saves_adapter(tmp_path):
    from peft import LoraConfig

    tok = char_tokenizer(ALPHABET)
    model = tiny_llama(len(tok), init_std=0.5)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tr = EggrollTrainer(model, char_fraction_reward("a"), processing_class=tok, train_dataset=_data(),
                        args=_args(tmp_path, max_steps=2),
                        peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    assert tr.population.params and all("lora_" in n for n in tr.population.params)
    lora_before = {n: p.weight.clone() for n, p in tr.population.params.items()}
    tr.train()
    assert all(not torch.equal(lora_before[n], p.weight) for n, p in tr.population.params.items())
    merged_base = tr.model.get_base_model().state_dict()
    for k, v in base.items():  # base weights untouched
        peft_key = k.replace("q_proj.weight", "q_proj.base_layer.weight").replace("v_proj.weight", "v_proj.base_layer.weight")
        assert torch.equal(merged_base[peft_key], v), k
    tr.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def _swap_to_eggroll(src: str) -> str:
    return (src.replace("from trl import GRPOConfig, GRPOTrainer", "from eggroll_ft import EggrollConfig, EggrollTrainer")
            .replace("GRPOConfig(", "EggrollConfig(").replace("GRPOTrainer(", "EggrollTrainer("))


def _run_script(tmp_path, name, text):
    tok = char_tokenizer(ALPHABET)
    if not (tmp_path / "model").exists():
        tiny_llama(len(tok), init_std=0.5).save_pretrained(tmp_path / "model")
        tok.save_pretrained(tmp_path / "model")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(HERE.parent)}
    script = tmp_path / name
    script.write_text(text)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "model"), str(tmp_path / name[:-3])],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return float(out.stdout.split("FINAL_REWARD")[-1].split()[0])


def test_grpo_script_runs_with_eggroll_class_names(tmp_path):
    src = (HERE / "data" / "grpo_script.py").read_text()
    swapped = _swap_to_eggroll(src)
    assert swapped.count("\n") == src.count("\n") and "GRPOConfig(" not in swapped and "GRPOTrainer(" not in swapped
    assert 0.0 <= _run_script(tmp_path, "eggroll.py", swapped) <= 1.0


@pytest.mark.slow
def test_grpo_script_is_a_working_trl_script(tmp_path):
    """The unswapped script really is a TRL GRPO script (slow: TRL's GRPOTrainer on CPU)."""
    assert 0.0 <= _run_script(tmp_path, "grpo.py", (HERE / "data" / "grpo_script.py").read_text()) <= 1.0


@pytest.mark.slow
def test_compile_decode_trains_to_the_same_weights(tmp_path):
    """``compile_decode=True`` (inductor on CPU, ~30 s to compile) changes how the decode step
    runs, not what it computes: two ES steps give the eager run's weights (up to float rounding)."""
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        tr = _trainer(tmp_path / str(compiled), compile_decode=compiled, greedy=True, population_size=8)
        tr.train()
        runs.append({k: v.clone() for k, v in tr.model.state_dict().items()})
    for k in runs[0]:
        torch.testing.assert_close(runs[1][k], runs[0][k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(runs[0][k], _trainer(tmp_path / "fresh").model.state_dict()[k]) for k in runs[0])
