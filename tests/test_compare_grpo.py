"""scripts/compare_grpo.py: end to end on a tiny random model, the budget pieces, the shipped configs."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eggroll_ft.compare import BudgetCallback, CountingReward, first_reaching, greedy_accuracy, paired_change
from eggroll_ft.recipe_utils import build_tiny_random_llama
from eggroll_ft.testing import char_tokenizer, tiny_llama
from scripts import compare_grpo

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "scripts" / "configs" / "compare_grpo_tiny.yaml"


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    return build_tiny_random_llama(str(tmp_path_factory.mktemp("cmp") / "rand"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _check_outputs(out: Path, budget_completions: int):
    assert {"results.csv", "curves.png", "summary.md"} <= set(os.listdir(out))
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert list(rows[0]) == compare_grpo.COLUMNS
    for method, per_step in (("grpo", 8), ("eggroll", 16)):  # completions per step of the tiny config
        mine = [r for r in rows if r["method"] == method]
        assert [int(r["step"]) for r in mine][0] == 0 and int(mine[0]["completions"]) == 0  # the base model first
        last = mine[-1]
        # the budget stops training at the first step that reaches it: no earlier, no later
        assert budget_completions <= int(last["completions"]) < budget_completions + per_step
        assert int(last["completions"]) == int(last["step"]) * per_step
        assert all(0.0 <= float(r["eval_accuracy"]) <= 1.0 and float(r["peak_rss_mb"]) > 50 for r in mine)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "| grpo |" in summary and "| eggroll |" in summary and "peak RSS" in summary
    assert "exact McNemar" in summary and summary.count(" -> ") >= 2  # the paired start -> end test, per method
    return rows


def test_end_to_end_in_process_writes_all_outputs(random_model, tmp_path):
    out = tmp_path / "run"
    outs = compare_grpo.main(["--config", str(TINY), "--model_name_or_path", random_model, "--output_dir", str(out),
                              "--isolate", "false"])
    assert set(outs) == {"grpo", "eggroll"}
    _check_outputs(out, 48)


@pytest.mark.slow  # six short runs: ~20 s on an idle machine, minutes on a loaded one
def test_sweep_keeps_results_and_uses_the_best(random_model, tmp_path):
    out = tmp_path / "sweep"
    compare_grpo.main(["--config", str(TINY), "--model_name_or_path", random_model, "--output_dir", str(out),
                       "--isolate", "false", "--sweep", "true", "--budget_completions", "16"])
    sweep = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["method"], float(r["learning_rate"])) for r in sweep] == [
        ("grpo", 1e-4), ("grpo", 1e-3), ("eggroll", 0.01), ("eggroll", 0.03)]
    assert all(r["sigma"] == "" for r in sweep[:2]) and all(float(r["sigma"]) == 0.01 for r in sweep[2:])
    _check_outputs(out, 16)


@pytest.mark.slow
def test_script_runs_each_method_in_its_own_process(random_model, tmp_path):
    out = tmp_path / "iso"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_grpo.py"), "--config", str(TINY),
                    "--model_name_or_path", random_model, "--output_dir", str(out)], check=True, cwd=ROOT,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _check_outputs(out, 48)


def test_budget_callback_stops_and_records_rows():
    counter = CountingReward(lambda completions, **kw: [0.5] * len(completions))
    scores = iter([0.1, 0.2, 0.3, 0.4])
    cb = BudgetCallback(lambda: next(scores), counter, max_completions=20, eval_every_seconds=1e9, method="m")

    class State:
        global_step = 0

    class Control:
        should_training_stop = False

    state, control = State(), Control()
    cb.on_train_begin(None, state, control)
    for step in (1, 2, 3):
        counter(["x"] * 8)
        state.global_step = step
        cb.on_log(None, state, control, logs={"reward": float(step)})
        assert control.should_training_stop == (step == 3)  # 24 >= 20 completions
    cb.on_train_end(None, state, control)  # already recorded at the stopping step: no extra row
    assert [(r["step"], r["completions"], r["eval_accuracy"]) for r in cb.rows] == [(0, 0, 0.1), (3, 24, 0.2)]
    assert math.isnan(cb.rows[0]["train_reward"]) and cb.rows[1]["train_reward"] == 2.0  # mean of steps 1..3
    assert first_reaching(cb.rows, 0.15, "completions") == 24 and first_reaching(cb.rows, 0.9, "step") is None
    with pytest.raises(ValueError, match="set at least one budget"):
        BudgetCallback(lambda: 0.0, counter)


def test_per_problem_scores_and_the_paired_test():
    counter = CountingReward(lambda completions, **kw: [0.0] * len(completions))
    scores = iter([[0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    cb = BudgetCallback(lambda: next(scores), counter, max_completions=1, eval_every_seconds=1e9, method="m")

    class State:
        global_step = 0

    class Control:
        should_training_stop = False

    cb.on_train_begin(None, State, Control)
    counter(["x"])
    cb.on_log(None, State, Control, logs={"reward": 0.0})
    assert [r["eval_accuracy"] for r in cb.rows] == [0.25, 0.75]
    assert cb.rows[1]["eval_per_problem"] == [1.0, 1.0, 1.0, 0.0]
    # exact McNemar: 10 gained, 0 lost -> 2 * 0.5^10; a 5/5 split is no evidence at all
    c = paired_change([0.0] * 10 + [1.0] * 5, [1.0] * 15)
    assert (c["gained"], c["lost"]) == (10, 0) and c["p_value"] == pytest.approx(2 / 1024)
    assert paired_change([0] * 5 + [1] * 5, [1] * 5 + [0] * 5)["p_value"] == 1.0
    assert paired_change([1, 0], [1, 0]) == {"gained": 0, "lost": 0, "p_value": 1.0}
    with pytest.raises(ValueError, match="same problems"):
        paired_change([1], [1, 0])


def test_counting_reward_keeps_name_and_greedy_accuracy_scores():
    def exact(completions, answer, **kw):
        return [float(c == a) for c, a in zip(completions, answer)]

    counter = CountingReward(exact)
    assert counter.__name__ == "exact"
    tok = char_tokenizer()
    model = tiny_llama(len(tok), seed=0)
    prompts = ["ab", "bca", "cab"]
    refs = []
    for p in prompts:  # unbatched, unpadded greedy continuations
        enc = tok([p], return_tensors="pt", add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        refs.append(tok.decode(out[0, len(p):], skip_special_tokens=True))
    # batched with left padding, the same continuations: two answers match, the third never can
    acc = greedy_accuracy(model, tok, prompts, {"answer": [refs[0], refs[1], "<no>"]}, counter, max_new_tokens=3,
                          batch_size=2)
    assert acc == pytest.approx(2 / 3) and counter.count == 3
    assert tok.padding_side == "left" and not model.training


@pytest.mark.parametrize("name", ["compare_grpo.yaml", "compare_grpo_tiny.yaml"])
def test_shipped_configs_parse_and_build_method_configs(name, tmp_path):
    from trl import GRPOConfig, TrlParser

    from eggroll_ft import EggrollConfig

    (a,) = TrlParser((compare_grpo.CompareArguments,)).parse_args_and_config(["--config", str(ROOT / "scripts" / "configs" / name)])
    assert set(a.methods) == {"grpo", "eggroll"} and a.template == "minimal"
    EggrollConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **a.eggroll)
    GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **a.grpo)


TUNING = sorted((ROOT / "scripts" / "configs" / "compare_grpo_tuning").glob("*.yaml")) + \
    sorted((ROOT / "scripts" / "configs" / "smollm2_tuning").glob("*.yaml"))


@pytest.mark.parametrize("path", TUNING, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_tuning_configs_parse_and_score_on_validation_problems(path, tmp_path):
    """The tuning runs quoted in docs/benchmarks.md: valid method configs, scored on the validation
    problems (Countdown: the sweep's seed; arithmetic: the validation split), never on the held-out
    ones the comparison reports."""
    from trl import GRPOConfig, TrlParser

    from eggroll_ft import EggrollConfig

    (a,) = TrlParser((compare_grpo.CompareArguments,)).parse_args_and_config(["--config", str(path)])
    if a.task == "countdown":
        assert a.eval_seed == a.sweep_eval_seed != compare_grpo.CompareArguments().eval_seed
    else:
        assert a.eval_split == "validation"
    assert f"{path.parent.name}/{path.name}" in path.read_text().splitlines()[1]  # its own command
    if "eggroll" in a.methods:
        EggrollConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **a.eggroll)
    if "grpo" in a.methods:
        GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **a.grpo)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="methods="):
        compare_grpo.CompareArguments(methods=["ppo"])
    with pytest.raises(ValueError, match="budget_seconds=0"):
        compare_grpo.CompareArguments(budget_seconds=0, budget_completions=0)
    with pytest.raises(ValueError, match="reward_weights="):
        compare_grpo.CompareArguments(reward_weights=[1.0])



def test_es_log_stats_reads_the_trainer_log(tmp_path):
    from scripts import es_log_stats

    log = tmp_path / "log.txt"
    log.write_text("{'reward': '0.3', 'frac_reward_zero_std': '0.875', 'es/update_norm': '1.2e+04'}\n"
                   "[budget] {'method': 'eggroll'}\n"
                   "{'reward': '0.3', 'frac_reward_zero_std': '1', 'es/update_norm': '0'}\n"
                   "{'reward': '0.4', 'frac_reward_zero_std': '0.75', 'es/update_norm': '8000'}\n")
    out = es_log_stats.main([str(log)])
    assert out["steps"] == 3 and out["frac_reward_zero_std_mean"] == pytest.approx(0.875)
    assert out["update_norm_median"] == 8000
    (tmp_path / "empty.txt").write_text("{'loss': '0'}\n")
    with pytest.raises(SystemExit, match="no frac_reward_zero_std"):
        es_log_stats.main([str(tmp_path / "empty.txt")])


def test_plot_runs_draws_several_runs_and_names_a_missing_one(tmp_path):
    """scripts/plot_runs.py: one curve per run (per method when a run holds two), a clear error otherwise."""
    from scripts import plot_runs

    for name, methods in (("a", ["eggroll"]), ("b", ["eggroll", "grpo"])):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=compare_grpo.COLUMNS)
            w.writeheader()
            for m in methods:
                w.writerow({"method": m, "step": 0, "wall_clock_s": 0.0, "completions": 0, "eval_accuracy": 0.1})
                w.writerow({"method": m, "step": 3, "wall_clock_s": 60.0, "completions": 96, "train_reward": 0.2,
                            "eval_accuracy": 0.3})
    rows = plot_runs.load_rows("b", str(tmp_path / "b"))
    assert {r["method"] for r in rows} == {"b/eggroll", "b/grpo"} and rows[1]["eval_accuracy"] == 0.3
    out = tmp_path / "runs.png"
    plot_runs.main([f"A={tmp_path / 'a'}", f"B={tmp_path / 'b'}", "--output", str(out)])
    assert out.stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="C=.*no results.csv"):
        plot_runs.load_rows("C", str(tmp_path / "missing"))


def test_plot_runs_pairs_each_run_against_a_reference(tmp_path, capsys):
    """``--against``: the exact McNemar test of each run's last per-problem answers against one run's."""
    from scripts import plot_runs

    answers = {"ref": [1, 1, 0, 0, 0, 0], "x": [1, 0, 1, 1, 1, 0], "short": [1, 0]}
    for name, final in answers.items():
        (tmp_path / name / "runs" / "eggroll").mkdir(parents=True)
        rows = [{"step": 0, "eval_per_problem": [0] * len(final)}, {"step": 5, "eval_per_problem": final}]
        (tmp_path / name / "runs" / "eggroll" / "rows.json").write_text(json.dumps({"rows": rows}))
    out = plot_runs.against("ref", {"ref": str(tmp_path / "ref"), "x": str(tmp_path / "x")})
    assert (out["x"]["gained"], out["x"]["lost"]) == (3, 1) and out["x"]["p_value"] == pytest.approx(0.625)
    plot_runs.main(["--against", "ref", f"ref={tmp_path / 'ref'}", f"x={tmp_path / 'x'}"])
    assert "| x | 3 | 1 | 0.62 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="short: 2 problems scored, ref: 6"):
        plot_runs.against("ref", {"ref": str(tmp_path / "ref"), "short": str(tmp_path / "short")})
    with pytest.raises(ValueError, match="--against nope: not among the runs"):
        plot_runs.against("nope", {"ref": str(tmp_path / "ref")})
