"""recipes/countdown.py and recipes/gsm8k.py: configs validate, overrides win, tiny runs write their outputs.

YAML validation covers every file under recipes/configs/: each must open with a comment naming its
launch script; a script that defines ``validate_config(path)`` (both task recipes do) parses the
file the way a run would, so an unknown key fails. Scripts without that hook (other helpers'
recipes) get the header check only, and their validation test is skipped with that reason.
"""
import ast
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from datasets import Dataset

from eggroll_ft import EggrollConfig
from eggroll_ft.callbacks import JsonlMetricsCallback, read_metrics
from eggroll_ft.config import requested_cpu_processes
from eggroll_ft.recipe_utils import heldout_split, train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CONFIGS = sorted(glob.glob(str(ROOT / "recipes" / "configs" / "**" / "*.yaml"), recursive=True))
COUNTDOWN_TINY = ROOT / "recipes" / "configs" / "countdown" / "tiny_cpu.yaml"
GSM8K_TINY = ROOT / "recipes" / "configs" / "gsm8k" / "tiny_cpu.yaml"
ARITHMETIC_TINY = ROOT / "recipes" / "configs" / "arithmetic" / "tiny_cpu.yaml"
# A few-second tiny base (the test_tiny_base.py budget): one layer, 32 wide, 40 steps.
TINY_BASE_ARGS = ["--steps", "40", "--hidden_size", "32", "--num_layers", "1", "--num_heads", "2", "--num_train", "600",
                  "--num_eval", "8", "--batch_size", "16", "--warmup_steps", "5", "--learning_rate", "1e-2",
                  "--max_new_tokens", "12"]
# Tiny budget for the end-to-end runs: overrides on top of the tiny YAML configs.
TINY_BUDGET = ["--max_steps", "2", "--eval_steps", "1", "--num_eval", "4", "--population_size", "4",
               "--prompts_per_step", "1", "--num_train", "40", "--logging_steps", "1"]


def load_script(path: Path):
    """Import a recipe script (not a package) as a module."""
    name = "recipe_" + path.stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def launch_script(config: str) -> Path:
    """The recipe script named in the config's opening comment."""
    header = []
    for line in Path(config).read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert header, f"{config} must open with a comment holding its launch command"
    found = re.search(r"(recipes/[\w/]+\.py)", "\n".join(header))
    assert found, f"{config}: the opening comment names no recipes/*.py script"
    return ROOT / found.group(1)


def has_validate_hook(script: Path) -> bool:
    tree = ast.parse(script.read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == "validate_config" for n in tree.body)


def run(cmd: list[str], env_extra: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", **env_extra}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


# ---- configs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT / "recipes" / "configs"))
def test_config_header_names_an_existing_script(config):
    assert launch_script(config).is_file()
    assert isinstance(yaml.safe_load(Path(config).read_text()), dict)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT / "recipes" / "configs"))
def test_config_validates_against_its_script(config):
    script = launch_script(config)
    if not has_validate_hook(script):
        pytest.skip(f"{script.name} defines no validate_config(path); header checked only")
    parsed = load_script(script).validate_config(config)
    raw = yaml.safe_load(Path(config).read_text())
    if script.stem in ("countdown", "gsm8k"):
        script_args, training_args, model_args = parsed
        assert isinstance(training_args, EggrollConfig)
        values = {**vars(model_args), **vars(script_args), **{k: getattr(training_args, k) for k in raw
                                                              if hasattr(training_args, k)}}
        for key in ("population_size", "sigma", "max_completion_length", "num_eval", "model_name_or_path"):
            if key in raw:
                assert values[key] == pytest.approx(raw[key]) if isinstance(raw[key], float) else values[key] == raw[key]


def test_paper_settings_are_translated():
    """Qiu et al.: N=30 without antithetic pairs, sigma 1e-3, alpha 5e-4 -> lr = alpha * sigma, greedy, 1,024 tokens."""
    cd = load_script(ROOT / "recipes" / "countdown.py")
    for path in glob.glob(str(ROOT / "recipes" / "configs" / "countdown" / "*.yaml")):
        if "tiny" in path:
            continue
        _, args, model_args = cd.validate_config(path)
        assert args.greedy and args.max_completion_length == 1024 and args.sigma == 1e-3
        if path.endswith("-eggroll.yaml"):
            assert args.population_size >= 256 and args.rank == 1 and args.antithetic
        else:
            assert (args.population_size, args.antithetic, args.fitness_shaping) == (30, False, "zscore")
            assert args.learning_rate == pytest.approx(5e-4 * 1e-3)


def test_unknown_yaml_key_is_an_error(tmp_path):
    cd = load_script(ROOT / "recipes" / "countdown.py")
    bad = tmp_path / "bad.yaml"
    bad.write_text(COUNTDOWN_TINY.read_text() + "populaton_size: 16\n")  # misspelt
    with pytest.raises(ValueError, match="populaton_size"):
        cd.validate_config(bad)
    odd = tmp_path / "odd.yaml"
    odd.write_text(COUNTDOWN_TINY.read_text().replace("population_size: 32", "population_size: 31"))
    with pytest.raises(ValueError, match="population_size=31 must be even"):
        cd.validate_config(odd)


def test_command_line_overrides_beat_yaml():
    gs = load_script(ROOT / "recipes" / "gsm8k.py")
    script_args, args, model_args = gs.make_parser().parse_args_and_config(
        ["--config", str(GSM8K_TINY), "--population_size", "16", "--sigma", "0.5", "--num_eval", "3",
         "--template", "chat", "--no_antithetic", "--reward_funcs", "gsm8k", "rewards.gsm8k:gsm8k_reward",
         "--model_name_or_path", "some/model"])
    assert (args.population_size, args.sigma, args.antithetic) == (16, 0.5, False)
    assert (script_args.num_eval, script_args.template) == (3, "chat")
    assert script_args.reward_funcs == ["gsm8k", "rewards.gsm8k:gsm8k_reward"]
    assert model_args.model_name_or_path == "some/model"
    # everything not overridden comes from the YAML, not from the dataclass defaults
    assert (args.prompts_per_step, args.max_steps, args.eval_steps, script_args.num_train) == (2, 4, 2, 64)
    assert args.learning_rate == 0.001 and args.use_cpu and args.greedy


def test_countdown_datasets_generated_and_from_file(tmp_path):
    from rewards.countdown import generate_countdown_problems

    cd = load_script(ROOT / "recipes" / "countdown.py")
    train, held = cd.build_datasets(cd.CountdownArguments(num_train=20, num_eval=5, template="minimal",
                                                          min_numbers=3, max_numbers=3, max_value=20))
    assert len(held) == 5 and 0 < len(train) <= 20 and all(len(n) == 3 for n in train["nums"])
    assert not {(tuple(r["nums"]), r["target"]) for r in held} & {(tuple(r["nums"]), r["target"]) for r in train}
    assert held[0]["prompt"] == f"Use the numbers {held[0]['nums']} to make {held[0]['target']}.\n"
    path = tmp_path / "cd.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in generate_countdown_problems(50, seed=1)))
    train, held = cd.build_datasets(cd.CountdownArguments(dataset_path=str(path), num_train=30, num_eval=6))
    assert len(held) == 6 and 0 < len(train) <= 30 and held[0]["prompt"].startswith("A conversation")  # tinyzero
    rows = [json.loads(line) for line in path.read_text().splitlines()[:36]]  # only the first 36 rows are used
    assert {r["target"] for r in held} | {r["target"] for r in train} <= {r["target"] for r in rows}


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k" / "test.jsonl").is_file(), reason="GSM8K data not in shared/data")
def test_gsm8k_heldout_is_the_test_split():
    gs = load_script(ROOT / "recipes" / "gsm8k.py")
    train, held = gs.build_datasets(gs.GSM8KArguments(dataset_path=str(SHARED_DATA / "gsm8k"), num_train=10,
                                                      num_eval=3, template="plain"))
    first_test = json.loads((SHARED_DATA / "gsm8k" / "test.jsonl").read_text().splitlines()[0])
    assert (len(train), len(held)) == (10, 3) and held[0]["question"] == first_test["question"]
    assert held[0]["prompt"] == f"Question: {first_test['question']}\nAnswer:"


# ---- library pieces -------------------------------------------------------------------------------

def test_heldout_split_is_seeded_disjoint_and_sized():
    # 100 rows but only 10 distinct problems (nums, target): duplicates must not cross the split
    ds = Dataset.from_dict({"nums": [[i % 10, 1] for i in range(100)], "target": [i % 10 for i in range(100)],
                            "prompt": [f"p{i}" for i in range(100)]})
    train, held = heldout_split(ds, 5, num_train=40, seed=3, key_columns=("nums", "target"))
    train2, held2 = heldout_split(ds, 5, num_train=40, seed=3, key_columns=("nums", "target"))
    assert held["prompt"] == held2["prompt"] and train["prompt"] == train2["prompt"] and len(held) == 5
    held_keys = set(held["target"])
    assert not held_keys & set(train["target"]) and 0 < len(train) < 40
    rows_only, held3 = heldout_split(ds, 5, num_train=40, seed=3)  # no keys: rows, not problems, are disjoint
    assert len(rows_only) == 40 and not set(rows_only["prompt"]) & set(held3["prompt"])
    assert set(rows_only["target"]) & held_keys  # the duplicates the key check removes
    two = Dataset.from_dict({"nums": [[i % 2] for i in range(40)], "target": [i % 2 for i in range(40)]})
    with pytest.raises(ValueError, match="no training rows left"):
        heldout_split(two, 10, seed=0, key_columns=("nums", "target"))
    with pytest.raises(ValueError, match="num_eval=100"):
        heldout_split(ds, 100)


def test_jsonl_callback_appends_strict_json(tmp_path):
    cb = JsonlMetricsCallback()
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(is_world_process_zero=True,
                                                                               global_step=3, epoch=0.5)
    cb.on_log(args, state, None, logs={"reward": 0.25, "eval_reward": float("nan")})
    state.global_step = 4
    cb.on_log(args, state, None, logs={"reward": 0.5})
    state.is_world_process_zero = False
    cb.on_log(args, state, None, logs={"reward": 9.0})  # other ranks write nothing
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 3, "epoch": 0.5, "reward": 0.25, "eval_reward": None}, {"step": 4, "epoch": 0.5, "reward": 0.5}]


def test_launch_checks():
    # `accelerate launch --cpu --num_processes N` starts one process; only the launcher's argv tells N
    cpu = {"ACCELERATE_USE_CPU": "True"}
    assert requested_cpu_processes(cpu, ["accelerate", "launch", "--cpu", "--num-processes=3", "x.py"]) == 3
    assert requested_cpu_processes(cpu, ["accelerate", "launch", "--cpu", "--num_processes", "1", "x.py"]) is None
    assert requested_cpu_processes({}, ["accelerate", "launch", "--num_processes", "2", "x.py"]) is None
    assert requested_cpu_processes({**cpu, "WORLD_SIZE": "2"}, ["--num_processes", "2"]) is None
    trainer = SimpleNamespace(reward_func_names=["countdown_format_reward"])
    with pytest.raises(ValueError, match="must include 'countdown_reward'"):
        train_and_evaluate(trainer, "countdown_reward")


# ---- end to end ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """An EGGROLL_CACHE holding a few-second tiny-countdown-base, so the tiny config finds it built."""
    from scripts import make_tiny_base

    cache = tmp_path_factory.mktemp("cache")
    make_tiny_base.main(["--output_dir", str(cache / "tiny-countdown-base"), *TINY_BASE_ARGS])
    return cache


def check_outputs(out: Path, steps: int, num_eval: int, accuracy_key: str) -> dict:
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    records = read_metrics(out / "metrics.jsonl")
    evals = [r for r in records if "eval_reward" in r]
    trains = [r for r in records if "reward" in r and "train_runtime" not in r]
    assert [r["step"] for r in evals] == list(range(steps + 1))  # before training, then every step
    assert [r["step"] for r in trains] == list(range(1, steps + 1))
    results = json.loads((out / "eval_results.json").read_text())
    assert results["num_eval"] == num_eval and results["global_step"] == steps
    assert results["accuracy_before"] == evals[0][accuracy_key]
    assert results["accuracy_after"] == evals[-1][accuracy_key]
    assert 0.0 <= results["accuracy_after"] <= 1.0
    return results


def test_tiny_countdown_config_end_to_end_and_eval_only(tiny_cache, tmp_path):
    out = tmp_path / "run"
    env = {"EGGROLL_CACHE": str(tiny_cache)}
    run([sys.executable, "recipes/countdown.py", "--config", str(COUNTDOWN_TINY), "--output_dir", str(out),
         *TINY_BUDGET], env)
    results = check_outputs(out, 2, 4, "eval_rewards/countdown_reward/mean")
    # --eval_only scores the trained model on the same held-out split the same way (in-process: no second
    # interpreter start; the script's main() is what the command line runs)
    os.environ["EGGROLL_CACHE"] = str(tiny_cache)
    try:
        scored = load_script(ROOT / "recipes" / "countdown.py").main(
            ["--config", str(COUNTDOWN_TINY), *TINY_BUDGET, "--eval_only", "--model_name_or_path", str(out),
             "--output_dir", str(tmp_path / "eval")])
    finally:
        del os.environ["EGGROLL_CACHE"]
    assert scored == json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert scored["eval_only"] and scored["num_eval"] == 4
    assert scored["metrics"] == pytest.approx(results["after"])
    assert not (tmp_path / "eval" / "model.safetensors").exists()  # scoring saves no model


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "gsm8k" / "test.jsonl").is_file(), reason="GSM8K data not in shared/data")
def test_tiny_gsm8k_config_end_to_end(tmp_path):
    out = tmp_path / "run"
    run([sys.executable, "recipes/gsm8k.py", "--config", str(GSM8K_TINY), "--output_dir", str(out),
         "--dataset_path", str(SHARED_DATA / "gsm8k"), *TINY_BUDGET], {"EGGROLL_CACHE": str(tmp_path / "cache")})
    results = check_outputs(out, 2, 4, "eval_rewards/gsm8k_reward/mean")
    assert results["model"].endswith("tiny-random-llama")


@pytest.mark.slow
def test_tiny_arithmetic_config_end_to_end_with_paired_test(tmp_path):
    """The arithmetic recipe scores every held-out problem before and after and tests the change."""
    out = tmp_path / "arith"
    run([sys.executable, "recipes/arithmetic.py", "--config", str(ARITHMETIC_TINY), "--output_dir", str(out),
         "--max_steps", "2"], {"EGGROLL_CACHE": str(tmp_path / "cache")})
    results = json.loads((out / "eval_results.json").read_text())
    assert results["num_eval"] == 16 and results["global_step"] == 2
    before, after = results["per_problem_before"], results["per_problem_after"]
    assert len(before) == len(after) == 16 and set(before + after) <= {0.0, 1.0}
    assert results["accuracy_before"] == sum(before) / 16 and results["accuracy_after"] == sum(after) / 16
    gained = sum(b == 0 and a == 1 for b, a in zip(before, after))
    assert results["gained"] == gained and 0 <= results["p_value"] <= 1


def test_accelerate_two_cpu_processes_run_tiny_countdown(tiny_cache, tmp_path):
    """`accelerate launch` with two gloo processes completes and writes the outputs once (rank 0)."""
    out = tmp_path / "run"
    run(["accelerate", "launch", "--config_file", "recipes/accelerate_configs/cpu_2proc.yaml",
         "recipes/countdown.py", "--config", str(COUNTDOWN_TINY), "--output_dir", str(out), *TINY_BUDGET],
        {"EGGROLL_CACHE": str(tiny_cache)})
    check_outputs(out, 2, 4, "eval_rewards/countdown_reward/mean")
