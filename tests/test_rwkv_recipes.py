"""recipes/configs/rwkv/: the RWKV-7 configs parse with their recipe's parser, keep the paper's settings,
state the learning-rate mapping they use, and the tiny CPU config runs the Countdown recipe end to end."""
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from eggroll_ft import EggrollConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs" / "rwkv"
sys.path.insert(0, str(ROOT))
from scripts.make_tiny_rwkv import ensure_tiny_rwkv  # noqa: E402

# config -> (script, paper settings that must hold)
PAPER = {
    # learning_rate = lr_scale * sigma^2 * sqrt(N) with zscore fitness: the reference code's update (Tables 26, 28)
    "countdown_rwkv7_1.5b.yaml": ("countdown", dict(sigma=7e-4, rank=1, population_size=256, prompts_per_step=6,
                                                    greedy=True, max_completion_length=1000, optim="sgd",
                                                    fitness_shaping="zscore", learning_rate=0.125 * 7e-4 ** 2 * 256 ** 0.5)),
    "gsm8k_rwkv7_7b.yaml": ("gsm8k", dict(sigma=2e-3, rank=1, population_size=512, prompts_per_step=16, optim="sgd",
                                          perturb_modules=None, exclude_modules=None, greedy=True,
                                          fitness_shaping="zscore", learning_rate=5.43e-6)),
    "countdown_rwkv7_tiny_cpu.yaml": ("countdown", dict(rank=1, greedy=True, use_cpu=True)),
    "gsm8k_rwkv7_tiny_cpu.yaml": ("gsm8k", dict(rank=1, use_cpu=True)),
}


def load_script(name: str):
    key = "recipe_" + name
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


def test_every_rwkv_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(PAPER)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_config_parses_and_keeps_the_paper_settings(name):
    script, expected = PAPER[name]
    text = (CONFIGS / name).read_text()
    assert f"recipes/{script}.py --config recipes/configs/rwkv/{name}" in text  # launch command in the header
    script_args, args, model_args = load_script(script).validate_config(CONFIGS / name)
    assert isinstance(args, EggrollConfig) and args.antithetic and script_args.template == "rwkv"
    for key, value in expected.items():
        got = getattr(args, key)
        got = getattr(got, "value", got)  # optim is an enum
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, key
    # the header states the reference code's mapping (with its lr_scale), and the value obeys it
    lr_scale = float(re.search(r"lr_scale (?:= )?([0-9.]+)", text).group(1))
    assert "learning_rate = lr_scale * sigma^2 * sqrt(N)" in text and args.fitness_shaping == "zscore"
    assert args.learning_rate == pytest.approx(lr_scale * args.sigma ** 2 * args.population_size ** 0.5, rel=1e-2)
    if "tiny" not in name:
        assert model_args.model_name_or_path.endswith(".pth") and model_args.dtype == "bfloat16"


def test_tiny_countdown_config_end_to_end(tmp_path, monkeypatch):
    """The recipe loads the RWKV-7 directory through EggrollTrainer, trains, scores and saves; the saved
    directory (a transformers.Trainer save: no config.json) scores again with --eval_only."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = ensure_tiny_rwkv(str(tmp_path / "tiny"), hidden_size=32, num_layers=1)
    cd = load_script("countdown")
    budget = ["--max_steps", "1", "--eval_steps", "1", "--num_eval", "2", "--num_train", "20", "--population_size", "4",
              "--prompts_per_step", "1", "--max_completion_length", "4"]
    out = tmp_path / "run"
    results = cd.main(["--config", str(CONFIGS / "countdown_rwkv7_tiny_cpu.yaml"), *budget, "--model_name_or_path", model,
                       "--output_dir", str(out)])
    assert results["global_step"] == 1 and results["num_eval"] == 2
    assert json.loads((out / "eval_results.json").read_text()) == results
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    scored = cd.main(["--config", str(CONFIGS / "countdown_rwkv7_tiny_cpu.yaml"), *budget, "--eval_only",
                      "--model_name_or_path", str(out), "--output_dir", str(tmp_path / "eval")])
    assert scored["metrics"] == pytest.approx(results["after"])
