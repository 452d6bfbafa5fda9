"""Population forward throughput (rank 1, every row a different member), as ratios from one run.

    python scripts/bench_population_forward.py            # ~11M-parameter random Llama, CPU

1. population / plain: tokens/s of one batched forward ``(B, T)`` with the population hooks
   (row b = member b; this step's noise generated inside the timing) over the same forward of
   the unperturbed model without hooks;
2. population / naive ES: over materialising ``W + sigma E_i`` in place and running member i's
   row alone, member by member (timed on ``--naive-members`` members; the rate is per member).

Repetitions are interleaved and medians reported: the machine is shared, so only the ratios from
one run mean anything.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--batch", type=int, default=64, help="rows = members")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--naive-members", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on an oversubscribed machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    from eggroll_ft import NoiseConfig, Population

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    pop = Population(model, NoiseConfig(seed=0, rank=1), args.batch, sigma=1e-3)
    B, T, k = args.batch, args.seq_len, args.naive_members
    ids = torch.randint(0, args.vocab, (B, T), generator=torch.Generator().manual_seed(0))
    members = torch.arange(B)
    step = iter(range(10**6))

    def ours():
        pop.set_step(next(step))  # fresh noise: generating it is part of a step
        with pop.members(members):
            model(ids, logits_to_keep=1)

    def plain():
        model(ids, logits_to_keep=1)

    def naive():
        pop.set_step(next(step))
        for m in range(k):
            with pop.materialized(m):
                model(ids[m:m + 1], logits_to_keep=1)

    times = {"ours": [], "plain": [], "naive": []}
    with torch.no_grad():
        plain(), ours()  # warm-up
        for rep in range(args.reps):
            for name, fn in (("ours", ours), ("plain", plain), ("naive", naive)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
            print(f"rep {rep}: " + ", ".join(f"{n} {v[-1]:.3f}s" for n, v in times.items()), flush=True)
    tps = {"ours": B * T / statistics.median(times["ours"]), "plain": B * T / statistics.median(times["plain"]),
           "naive": k * T / statistics.median(times["naive"])}
    print(json.dumps({"tokens_per_s": tps, "population_over_plain": tps["ours"] / tps["plain"],
                      "population_over_naive": tps["ours"] / tps["naive"],
                      "params": sum(p.numel() for p in model.parameters())}, indent=1))


if __name__ == "__main__":
    main()
