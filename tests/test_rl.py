"""RL with EGGROLL: population policy exactness, rollout bookkeeping, the ES loop, PPO, the recipe."""
import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")

from eggroll_ft import NoiseConfig, Population  # noqa: E402
from eggroll_ft.rl import (ESLearner, PopulationPolicy, RLConfig, make_env, make_vector_env,  # noqa: E402
                           population_rollout, rollout, train_es, train_ppo)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes" / "configs" / "rl").glob("*.yaml"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_policy(obs_dim=5, action_dim=3, discrete=True, seed=0, **kw):
    torch.manual_seed(seed)
    policy = PopulationPolicy(obs_dim, action_dim, discrete, hidden_size=16, num_layers=3, **kw)
    with torch.no_grad():  # non-zero biases and LayerNorm affine, so they are exercised too
        for p in policy.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return policy


@pytest.mark.parametrize("noise", [NoiseConfig(seed=3, rank=1), NoiseConfig(seed=3, rank=4),
                                   NoiseConfig(seed=3, full_rank=True)], ids=["rank1", "rank4", "full_rank"])
def test_population_policy_rows_equal_dense_members(noise):
    policy = tiny_policy()
    pop = Population(policy, noise, population_size=8, sigma=0.3)
    pop.set_step(2)
    assert set(pop.params) == {"layers.0.weight", "layers.1.weight", "layers.2.weight", "head.weight"}
    obs = torch.randn(10, 5)
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, -1, 5])
    with torch.no_grad(), pop.members(ids):
        batched = policy(obs)  # (10, 3)
    with torch.no_grad():
        plain = policy(obs)
    for row, member in enumerate(ids.tolist()):
        if member < 0:
            torch.testing.assert_close(batched[row], plain[row], atol=1e-5, rtol=1e-5)
            continue
        with torch.no_grad(), pop.materialized(member):
            dense = policy(obs[row:row + 1])[0]
        torch.testing.assert_close(batched[row], dense, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(dense, plain[row], atol=1e-3)  # the member really is perturbed
    # antithetic partners perturb every weight in exactly opposite directions
    for name in pop.params:
        torch.testing.assert_close(pop.perturbation(name, 1), -pop.perturbation(name, 0), atol=0, rtol=0)


def test_continuous_actions_lie_in_the_box():
    policy = tiny_policy(3, 2, discrete=False, action_low=np.array([-2.0, 0.0]), action_high=np.array([2.0, 1.0]))
    with torch.no_grad():
        policy.head.weight.mul_(100.0)  # saturate the tanh
    act = policy.act(np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32))
    assert act.shape == (64, 2)
    assert act[:, 0].min() >= -2.0 and act[:, 0].max() <= 2.0 and act[:, 1].min() >= 0.0 and act[:, 1].max() <= 1.0
    assert act[:, 0].max() > 1.9 and act[:, 0].min() < -1.9  # the whole range is reachable


def single_env_return(env_id, policy, pop, member, seed, episodes):
    """Reference: one plain env, the member's dense weights, the vector env's seed for that row."""
    env = make_env(env_id)
    total = 0.0
    with pop.materialized(member):
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + member) if ep == 0 else env.reset()
            done = False
            while not done:
                obs, r, term, trunc, _ = env.step(policy.act(obs[None])[0])
                total += float(r)
                done = term or trunc
    env.close()
    return total / episodes


@pytest.mark.parametrize("env_id,members,episodes", [("CartPole-v1", 6, 3), ("Pendulum-v1", 4, 2),
                                                     ("MiniGrid-DoorKey-5x5-v0", 2, 1)])
def test_member_return_equals_single_env_rollout(env_id, members, episodes):
    envs = make_vector_env(env_id, members, native=False)
    policy = PopulationPolicy.for_env(envs, hidden_size=16, num_layers=3)
    pop = Population(policy, NoiseConfig(seed=1, rank=2), population_size=members, sigma=0.5)
    pop.set_step(1)
    res = population_rollout(policy, pop, envs, seed=100, episodes=episodes)
    envs.close()
    assert res.returns.shape == (members,) and res.env_steps == int(res.lengths.sum())
    for i in range(members):
        ref = single_env_return(env_id, policy, pop, i, seed=100, episodes=episodes)
        # batched low-rank forward vs dense W + sigma E differ in the last float bits only
        assert res.returns[i] == pytest.approx(ref, rel=1e-4, abs=1e-4), (env_id, i)
    if env_id == "CartPole-v1":  # reward 1 per step: the return is the mean episode length
        np.testing.assert_allclose(res.returns * episodes, res.lengths)
        assert len(set(res.returns.tolist())) > 1  # members differ


def test_native_cartpole_vector_env_counts_whole_episodes():
    envs = make_vector_env("CartPole-v1", 32)
    assert type(envs).__name__ == "CartPoleVectorEnv"
    rng = np.random.default_rng(0)
    res = rollout(lambda obs: rng.integers(0, 2, size=len(obs)), envs, seed=5, episodes=4)
    envs.close()
    # random play: every episode lasts 8..500 steps, all 4 episodes of each row are counted, and
    # the reset steps of NEXT_STEP autoreset are not (the return is the length, reward 1 per step)
    np.testing.assert_allclose(res.returns * 4, res.lengths)
    assert res.lengths.min() >= 4 * 8 and res.lengths.max() <= 4 * 500
    assert res.batch_steps >= res.lengths.max() + 3  # 3 reset steps between 4 episodes


def es_config(**kw):
    base = dict(env_id="CartPole-v1", method="eggroll", total_env_steps=400, population_size=8, hidden_size=32,
                num_layers=3, sigma=0.1, learning_rate=0.05, sigma_decay=0.9, learning_rate_decay=0.8, eval_episodes=2, eval_every_steps=1)
    return RLConfig(**{**base, **kw})


@pytest.mark.parametrize("method,optimizer", [("eggroll", "adam"), ("openes", "sgd")])
def test_train_es_is_deterministic_and_follows_the_schedules(method, optimizer):
    runs = []
    for _ in range(2):
        recs = []
        train_es(es_config(method=method, optimizer=optimizer, total_env_steps=1500), recs.append)
        runs.append(recs)
    strip = [[{k: v for k, v in r.items() if k not in ("wall_s", "cpu_s")} for r in recs] for recs in runs]
    assert strip[0] == strip[1]  # same seed, same run (timings aside)
    recs = runs[0]
    assert len(recs) >= 2 and recs[-1]["env_steps"] >= 1500
    for r in recs:
        assert r["sigma"] == pytest.approx(0.1 * 0.9 ** r["generation"])
        assert r["learning_rate"] == pytest.approx(0.05 * 0.8 ** r["generation"])
        assert r["update_norm"] > 0 and r["eval_return"] >= 8
    assert [r["env_steps"] for r in recs] == sorted(r["env_steps"] for r in recs)


def test_sgd_generation_moves_weights_by_learning_rate_times_direction():
    from eggroll_ft.es_update import es_directions
    from eggroll_ft.shaping import shape_fitness

    cfg = es_config(optimizer="sgd", population_size=8)
    envs = make_vector_env("CartPole-v1", 8)
    torch.manual_seed(0)
    policy = PopulationPolicy.for_env(envs, 32, 3)
    learner = ESLearner(policy, cfg)
    before = {n: p.weight.detach().clone() for n, p in learner.pop.params.items()}
    rec = learner.step(envs)
    # replay generation 0's rollout with the mean weights restored: the same returns, the same g
    after = {n: p.weight.detach().clone() for n, p in learner.pop.params.items()}
    with torch.no_grad():
        for n, p in learner.pop.params.items():
            p.weight.copy_(before[n])
    res = population_rollout(policy, learner.pop, envs, seed=cfg.seed + cfg.population_size)
    assert float(res.returns.mean()) == pytest.approx(rec["train_return"])
    g = es_directions(learner.pop, shape_fitness(torch.as_tensor(res.returns, dtype=torch.float32), "centered_rank"))
    for n in before:
        torch.testing.assert_close(after[n] - before[n], 0.05 * g[n], atol=1e-6, rtol=1e-4)
    envs.close()


def test_ppo_baseline_logs_the_same_records():
    pytest.importorskip("stable_baselines3")
    recs = []
    cfg = RLConfig(env_id="CartPole-v1", method="ppo", total_env_steps=512, hidden_size=16, eval_episodes=4,
                   eval_every_steps=256, ppo={"n_envs": 2, "n_steps": 128, "batch_size": 64, "n_epochs": 1})
    train_ppo(cfg, recs.append)
    assert [r["env_steps"] for r in recs] == [256, 512, 512]
    assert all(r["method"] == "ppo" and r["eval_return"] >= 8 and r["wall_s"] > 0 for r in recs)


@pytest.mark.parametrize("bad,field", [({"method": "dqn"}, "method"), ({"population_size": 7}, "population_size"),
                                       ({"sigma_decay": 1.5}, "sigma_decay"), ({"optimizer": "rmsprop"}, "optimizer"),
                                       ({"fitness_shaping": "rank"}, "fitness_shaping"), ({"sigma": 0}, "sigma"),
                                       ({"max_train_cpu_seconds": 0}, "max_train_cpu_seconds")])
def test_config_errors_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        RLConfig(**bad)
    with pytest.raises(ValueError, match="popsize"):
        RLConfig.from_dict({"popsize": 4})
    # configs written with the old names are refused with the new ones (EggrollConfig.learning_rate)
    with pytest.raises(ValueError, match="lr -> learning_rate, lr_decay -> learning_rate_decay"):
        RLConfig.from_dict({"lr": 0.05, "lr_decay": 0.9})


def test_cpu_time_cap_stops_after_the_generation_that_crosses_it():
    recs = []
    train_es(es_config(total_env_steps=10**9, max_train_cpu_seconds=1e-9), recs.append)
    assert len(recs) == 1 and "eval_return" in recs[0] and recs[0]["cpu_s"] > 0


def test_summary_of_a_run():
    from recipes.rl import markdown_table, summarize

    recs = [{"env_steps": 100, "wall_s": 1.0, "eval_return": 10.0}, {"env_steps": 200, "wall_s": 2.0},
            {"env_steps": 300, "wall_s": 3.5, "eval_return": 480.0, "cpu_s": 3.0},
            {"env_steps": 400, "wall_s": 5.0, "eval_return": 470.0, "cpu_s": 4.0}]
    s = summarize(recs, threshold=475)
    assert s == {"final_return": 470.0, "best_return": 480.0, "env_steps": 400, "wall_s": 5.0, "cpu_s": 4.0,
                 "steps_to_threshold": 300, "wall_to_threshold": 3.5, "cpu_to_threshold": 3.0}
    row = markdown_table({"r": recs}, "CartPole-v1", 475).splitlines()[-1]
    assert row == "| r | 470.0 | 480.0 | 400 | 5.0 | 4.0 | 300 | 3.5 | 3.0 |"
    assert summarize(recs, threshold=500)["steps_to_threshold"] is None


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load_and_say_how_to_launch(path):
    from recipes.rl import load_runs

    text = path.read_text()
    assert text.startswith("# Launch: ") and f"--config recipes/configs/rl/{path.name}" in text.splitlines()[0]
    assert "# Hardware:" in text.splitlines()[1]
    runs = load_runs(path)
    methods = {c.method for c in runs.values()}
    assert methods == {"eggroll", "openes", "ppo"}
    assert len({c.env_id for c in runs.values()}) == 1 and len({c.total_env_steps for c in runs.values()}) == 1
    assert {c.rank for c in runs.values() if c.method == "eggroll"} >= {1, 4}


def test_recipe_end_to_end(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("env_id: CartPole-v1\ntotal_env_steps: 200\nthreshold: 30\nhidden_size: 16\neval_episodes: 2\n"
                   "eval_every_steps: 1\nruns:\n  eggroll_r1: {method: eggroll, population_size: 8}\n"
                   "  openes: {method: openes, population_size: 8}\n")
    from recipes.rl import main

    out = tmp_path / "out"
    main(["--config", str(cfg), "--output_dir", str(out)])  # in-process: the subprocess would re-import torch
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["run"] for r in recs} == {"eggroll_r1", "openes"}
    assert all(r["env_steps"] > 0 and not math.isnan(r["train_return"]) for r in recs)
    table = (out / "results.md").read_text()
    assert "| eggroll_r1 |" in table and "| openes |" in table
    assert (out / "returns.png").stat().st_size > 10_000


def _imports(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_layering():
    lib = {n for n in _imports(ROOT / "eggroll_ft" / "rl.py") if n.startswith(".") or n.startswith("eggroll_ft")}
    assert lib <= {".es_update", ".noise", ".population", ".shaping"}
    recipe = {n for n in _imports(ROOT / "recipes" / "rl.py") if n.startswith("eggroll_ft")}
    assert recipe == {"eggroll_ft.rl"}


@pytest.mark.slow
def test_eggroll_solves_cartpole():
    """EGGROLL rank 1 reaches the solved threshold (average return >= 475) on CartPole-v1.

    About 250k environment steps, 1-2 minutes on one CPU core.
    """
    torch.set_num_threads(1)
    recs = []
    cfg = RLConfig(env_id="CartPole-v1", method="eggroll", rank=1, population_size=128, sigma=0.1, learning_rate=0.05,
                   optimizer="adam", total_env_steps=400_000, eval_episodes=16, eval_every_steps=1)
    train_es(cfg, recs.append)
    assert recs[-1]["eval_return"] >= 475, [round(r["eval_return"]) for r in recs]
    assert recs[-1]["train_return"] >= 300  # the population itself, not only the mean policy
