"""The population's low-rank term inside a real decoder: plain forward against the population's, per path.

    python scripts/bench_hook.py --model DIR                       # decode shape: 256 rows x 1 token
    python scripts/bench_hook.py --model DIR --tokens 16 --reps 8  # a 16-token prefill

Runs the decoder body (``model.model``: no head, no cache, no sampling, so the term's share is not
diluted by the parts it does not touch) on ``rows`` rows of ``tokens`` random tokens, with no
hooks active (plain) and inside a ``members`` block for each ``noise_kernel`` path asked for
(``torch``: torch operations; ``cpu``: the fused operation of ``eggroll_ft/lowrank_cpu.py``),
repetitions interleaved, medians. Two layouts: every row a different member (``--prompts-per-member
1``, N = rows) and training order (``--prompts-per-member 8``: each member's rows consecutive, as
the trainer lays jobs out). Prints plain / population for each path; the engine-level ratios
(prefill, decode, sampling, the head) are ``scripts/bench_engine.py``'s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a local Hugging Face causal LM (e.g. SmolLM2-135M-Instruct)")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=1, help="tokens per row (1: a decode step's shape)")
    ap.add_argument("--prompts-per-member", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--paths", nargs="+", default=["torch", "cpu"], choices=["torch", "cpu"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from eggroll_ft import NoiseConfig, Population
    from eggroll_ft.models.loading import load_causal_lm

    model = load_causal_lm(a.model).eval()
    body = model.model
    ids = torch.randint(0, model.config.vocab_size, (a.rows, a.tokens), generator=torch.Generator().manual_seed(0))
    results = {}
    for q in a.prompts_per_member:
        if a.rows % q or (a.rows // q) % 2:
            raise SystemExit(f"--rows {a.rows} must split into an even number of members of {q} rows each")
        members = torch.arange(a.rows // q).repeat_interleave(q)  # member-major: each member's rows consecutive
        pops = {p: Population(model, NoiseConfig(seed=0, rank=1), a.rows // q, sigma=1e-3, noise_kernel=p)
                for p in a.paths}
        for pop in pops.values():  # only one population's hooks act at a time: the others' stay idle
            pop.set_step(1)

        def plain():
            with torch.inference_mode():
                body(ids)

        def population(pop):
            with torch.inference_mode(), pop.members(members):
                body(ids)

        runs = [("plain", plain)] + [(p, (lambda pop=pop: population(pop))) for p, pop in pops.items()]
        for _, fn in runs:  # warm-up: allocator, each block's factors, the fused operation's build
            fn()
        times = {name: [] for name, _ in runs}
        for rep in range(a.reps):
            for name, fn in runs if rep % 2 == 0 else runs[::-1]:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(v) for name, v in times.items()}
        results[f"prompts_per_member={q}"] = {
            "plain_ms": round(med["plain"] * 1e3, 3),
            **{f"{p}_ms": round(med[p] * 1e3, 3) for p in pops},
            **{f"plain_over_{p}": round(med["plain"] / med[p], 3) for p in pops}}
        print(json.dumps({f"prompts_per_member={q}": results[f"prompts_per_member={q}"]}), flush=True)
        for pop in pops.values():
            pop.remove()
    return results


if __name__ == "__main__":
    main()
