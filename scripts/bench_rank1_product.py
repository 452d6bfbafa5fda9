"""The rank-1 product ``x B`` of the population hooks, both ways, on the shapes a step runs.

    python scripts/bench_rank1_product.py            # SmolLM2-135M's widths, 2 threads

For ``U`` groups of ``G T`` rows sharing a noise index, ``x (U, G T, n)`` and ``B (U, n, 1)``:
the batched matmul (``torch.bmm``) against an elementwise product and a sum
(``torch.linalg.vecdot``). ``Population``'s torch path takes the second for groups of at most
``population.VECDOT_MAX_ROWS`` rows (decode steps) and the first otherwise (prefills); this is the
measurement behind that threshold. (On CPU in float32 at rank 1 the default path is now
``lowrank_cpu``'s fused operation, which does neither: ``scripts/bench_hook.py`` compares the two.) Microseconds per call, median of ``--reps`` timings of
``--calls`` calls each, the same tensors every call (in cache: the hooks' factors come from memory).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

# (U, G T, n): every row a different member (128 antithetic pairs, a decode step: G T = 2), training
# order (16 noise indices x 16 rows), a prefill (G T = 2 rows x 16 tokens); n = SmolLM2's widths
SHAPES = [(128, 2, 576), (128, 2, 1536), (16, 16, 576), (16, 16, 1536), (128, 32, 576), (128, 32, 1536)]


def per_call_us(fn, calls: int, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    rows = {}
    for U, GT, n in SHAPES:
        x, B = torch.randn(U, GT, n, generator=g), torch.randn(U, n, 1, generator=g)
        bmm = per_call_us(lambda: torch.bmm(x, B), a.calls, a.reps)
        vecdot = per_call_us(lambda: torch.linalg.vecdot(x, B.view(U, 1, n)), a.calls, a.reps)
        assert torch.allclose(torch.bmm(x, B)[..., 0], torch.linalg.vecdot(x, B.view(U, 1, n)), rtol=1e-4, atol=1e-3)
        rows[f"{U}x{GT}x{n}"] = {"bmm_us": round(bmm, 1), "vecdot_us": round(vecdot, 1),
                                 "bmm_over_vecdot": round(bmm / vecdot, 2)}
        print(f"| {U} x {GT} x {n} | {bmm:.1f} | {vecdot:.1f} | {bmm / vecdot:.2f} |", flush=True)
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
