"""RWKV-7 generation throughput in the population engine: population rows over plain rows.

    python scripts/bench_rwkv7_engine.py                       # tiny and mid-sized, CPU defaults
    python scripts/bench_rwkv7_engine.py --sizes mid --device cuda --dtype bfloat16 --population 1024 \\
        --new-tokens 128                                       # on a GPU

Models (random weights, ``RWKV7ForCausalLM.reset_parameters``; 65,536-row World vocabulary):
``tiny`` is ``scripts/make_tiny_rwkv.py``'s model (width 64, 2 layers, head size 32);
``mid`` is width 768, 12 layers, head size 64 (the 0.1B rwkv7-g1 shape).

Each job is a random prompt of ``--prompt-len`` tokens, greedy, no EOS token, so every job runs
``--new-tokens`` tokens and the token counts are equal. Figures, from one run, interleaved
repetitions, medians (the machine may be shared: only ratios from one run are meaningful):

1. ``population_over_plain``: tokens/s of ``PopulationEngine.generate`` with every row a
   different member (rank 1, ``members = 0..J-1``) over the same engine and jobs with
   ``members = -1`` (the unperturbed model, hooks attached but idle);
2. ``population_with_noise_over_plain``: the same, counting the noise the step's ES update
   regenerates (every perturbed matrix's factors for the whole population, once per ES step; the
   rows' own noise is generated inside the population's generation, as they enter the slots);
3. ``plain_over_no_hooks``: ``members = -1`` over an engine without a population (hook cost).
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from eggroll_ft import NoiseConfig, Population
from eggroll_ft.engine import PopulationEngine, SamplingParams
from eggroll_ft.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM

from bench_engine import timed  # noqa: E402  (scripts/ is on sys.path when run as a script)

SIZES = {"tiny": dict(width=64, layers=2, head_size=32), "mid": dict(width=768, layers=12, head_size=64)}


def bench(size: str, a) -> dict:
    torch.manual_seed(0)
    s = SIZES[size]
    model = RWKV7ForCausalLM(RWKV7Config.from_size(s["width"], s["layers"], vocab_size=a.vocab, head_size=s["head_size"]))
    model = model.to(device=a.device, dtype=getattr(torch, a.dtype)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    N, new = a.population, a.new_tokens
    pop = Population(model, NoiseConfig(seed=0, rank=1), N, sigma=1e-3)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 65530, (a.prompt_len,), generator=g).tolist() for _ in range(N)]
    greedy, members, slots = SamplingParams(greedy=True), torch.arange(N), a.slots or N
    ours = PopulationEngine(model, pop, eos_token_ids=[], pad_token_id=0, max_sequences_in_flight=slots)
    bare = PopulationEngine(model, None, eos_token_ids=[], pad_token_id=0, max_sequences_in_flight=slots)
    tokens = N * new
    step = iter(range(1, 10**6))

    def new_noise():  # a new ES step, and every perturbed matrix's factors for the whole population,
        pop.set_step(next(step))  # as the ES update regenerates them (generation makes the rows' own)
        for name in pop.params:
            pop.factors(name, torch.arange(pop.noise.num_noise(N)))

    def run(engine, m):
        def go():
            out = engine.generate(prompts, m, 0, new, greedy)
            assert sum(out.lengths) == tokens
        return go

    runs = {"noise": new_noise, "population": run(ours, members), "plain": run(ours, -1), "no_hooks": run(bare, -1)}
    ours.generate(prompts[:4], members[:4], 0, 2, greedy)  # warm-up (allocator, lazy init)
    bare.generate(prompts[:4], -1, 0, 2, greedy)
    times = {k: [] for k in runs}
    for rep in range(a.reps):
        for k, fn in runs.items():
            times[k].append(timed(fn, a.device))
        print(f"  {size} rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {"population": tokens / med["population"], "population_with_noise": tokens / (med["population"] + med["noise"]),
           "plain": tokens / med["plain"], "no_hooks": tokens / med["no_hooks"]}
    return {"size": size, "width": s["width"], "layers": s["layers"], "params": sum(p.numel() for p in model.parameters()),
            "perturbed_matrices": len(pop.params), "population": N, "slots": ours.last_num_slots,
            "prompt_len": a.prompt_len, "new_tokens": new, "device": a.device, "dtype": a.dtype, "threads": a.threads,
            "tokens_per_s": {k: round(v, 1) for k, v in tps.items()}, "noise_seconds_per_step": round(med["noise"], 4),
            "population_over_plain": round(tps["population"] / tps["plain"], 3),
            "population_over_plain_pairwise_median": round(statistics.median(
                p / o for o, p in zip(times["population"], times["plain"])), 3),
            "population_with_noise_over_plain": round(tps["population_with_noise"] / tps["plain"], 3),
            "plain_over_no_hooks": round(tps["plain"] / tps["no_hooks"], 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=sorted(SIZES))
    p.add_argument("--population", type=int, default=32, help="Jobs = members (one prompt each, every row a member).")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--slots", type=int, default=None, help="max_sequences_in_flight (default: all jobs at once).")
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    results = []
    for size in a.sizes:
        r = bench(size, a)
        print(json.dumps(r), flush=True)
        results.append(r)
    return results


if __name__ == "__main__":
    main()
