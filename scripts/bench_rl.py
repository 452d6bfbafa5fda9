"""Wall-clock per ES generation: EGGROLL (low rank) over full-rank OpenES, same policy, same envs.

    nice -n 10 python scripts/bench_rl.py --population_size 4096 --horizon 32 --repeats 3

One generation = generate this step's noise, roll out the whole population on the native
vectorised CartPole-v1 (one batched forward of the 3 x 256 relu(layernorm) policy per env step,
row b = member b), shape the returns and apply the update. Every method starts from the same
weights and the same episodes (generation 0, same seed), and the methods are timed interleaved
(r1, r4, openes, r1, r4, openes, ...) so that load on a shared machine hits them alike.
``--horizon`` caps the episode length so the full-rank runs fit a CPU budget; the per-step time is
printed too, to extrapolate to longer episodes. The ratio is EGGROLL's time over OpenES's, in
wall-clock and in process CPU time (the latter does not depend on other processes' load).
"""
from __future__ import annotations

import argparse
import statistics
import time

import gymnasium as gym
import torch

from eggroll_ft.rl import ESLearner, PopulationPolicy, RLConfig


def one_generation(config: RLConfig, init_state: dict, horizon: int) -> dict:
    envs = gym.make_vec("CartPole-v1", num_envs=config.population_size, vectorization_mode="vector_entry_point",
                        max_episode_steps=horizon)
    policy = PopulationPolicy.for_env(envs, config.hidden_size, config.num_layers)
    policy.load_state_dict(init_state)
    learner = ESLearner(policy, config)
    t0, c0 = time.perf_counter(), time.process_time()
    rec = learner.step(envs)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    learner.pop.remove()
    envs.close()
    return {"seconds": seconds, "cpu": cpu, "batch_steps": rec["batch_steps"], "env_steps": rec["env_steps"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--population_size", type=int, default=4096)
    ap.add_argument("--hidden_size", type=int, default=256)
    ap.add_argument("--num_layers", type=int, default=3)
    ap.add_argument("--horizon", type=int, default=32, help="max episode length (CartPole's own cap is 500)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    common = dict(env_id="CartPole-v1", population_size=args.population_size, hidden_size=args.hidden_size,
                  num_layers=args.num_layers, sigma=0.1, learning_rate=0.01, optimizer="sgd", seed=0)
    methods = {f"eggroll_r{r}": RLConfig(method="eggroll", rank=r, **common) for r in args.ranks}
    methods["openes"] = RLConfig(method="openes", **common)
    torch.manual_seed(0)
    init_state = PopulationPolicy(4, 2, True, args.hidden_size, args.num_layers).state_dict()

    results = {name: [] for name in methods}
    for rep in range(args.repeats):
        for name, cfg in methods.items():
            r = one_generation(cfg, init_state, args.horizon)
            results[name].append(r)
            print(f"repeat {rep} {name:>11}: {r['seconds']:8.2f} s/generation ({r['cpu']:.2f} CPU s), "
                  f"{r['batch_steps']} batch steps", flush=True)

    base = statistics.median(r["seconds"] for r in results["openes"])
    base_cpu = statistics.median(r["cpu"] for r in results["openes"])
    print(f"\nN={args.population_size}, policy {args.num_layers} x {args.hidden_size}, horizon {args.horizon}, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print("| method | s / generation | CPU s / generation | s / batch step | time over OpenES | CPU over OpenES | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, rs in results.items():
        sec = statistics.median(r["seconds"] for r in rs)
        cpu = statistics.median(r["cpu"] for r in rs)
        per_step = statistics.median(r["seconds"] / r["batch_steps"] for r in rs)
        print(f"| {name} | {sec:.2f} | {cpu:.2f} | {per_step:.3f} | {sec / base:.3f} | {cpu / base_cpu:.3f} | {base / sec:.1f}x |")


if __name__ == "__main__":
    main()
