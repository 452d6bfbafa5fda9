"""RWKV-7 throughput on this machine: population rows vs plain rows, and ours vs the rwkv package.

Builds a random RWKV-7 (default: width 768, 12 layers, 65,536 vocabulary, like the 0.1B g1 model)
and times, side by side in one run:

1. prefill + decode of a batch with every row a different population member (EGGROLL low-rank
   hooks, ``Population.members``) over the same batch run plainly: the population overhead;
2. single-sequence decode, ours (batch of 1) over the official ``rwkv`` package (``cpu fp32``,
   TorchScript): the cost of the plain-PyTorch batched implementation at batch 1.

    python scripts/bench_rwkv7.py [--width 768 --layers 12 --batch 16 --prompt 32 --decode 16]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import torch

from eggroll_ft import NoiseConfig, Population
from eggroll_ft.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM

REF = textwrap.dedent("""
    import os, sys, time, torch
    os.environ.update(RWKV_V7_ON="1", RWKV_JIT_ON="1", RWKV_CUDA_ON="0")
    from rwkv.model import RWKV
    torch.set_num_threads(int(sys.argv[3]))
    m = RWKV(model=sys.argv[1][:-4], strategy="cpu fp32")
    n = int(sys.argv[2])
    _, st = m.forward([1, 2, 3, 4], None)
    for _ in range(2): m.forward([5], st)
    t = time.perf_counter()
    for i in range(n): _, st = m.forward([i + 10], st)
    print(n / (time.perf_counter() - t))
""")


def decode_rate(model, batch, prompt, decode, ctx_fn):
    """(prefill tokens/s, decode tokens/s) for ``batch`` rows inside ``ctx_fn()``."""
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt))
    with torch.no_grad(), ctx_fn():
        model(ids[:, :4], logits_to_keep=1)  # warm-up
        t = time.perf_counter()
        out = model(ids, logits_to_keep=1)
        t_prefill = time.perf_counter() - t
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(decode):
            out = model(tok, out.state)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        t_decode = time.perf_counter() - t
    return batch * prompt / t_prefill, batch * decode / t_decode


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    C = args.width
    cfg = RWKV7Config.from_size(C, args.layers)
    model = RWKV7ForCausalLM(cfg).eval()
    pop = Population(model, NoiseConfig(seed=0, rank=args.rank), population_size=args.batch + args.batch % 2, sigma=1e-3)
    members = torch.arange(args.batch)
    plain = decode_rate(model, args.batch, args.prompt, args.decode, lambda: torch.no_grad())
    popr = decode_rate(model, args.batch, args.prompt, args.decode, lambda: pop.members(members))
    print(f"RWKV-7 width {C}, {args.layers} layers, batch {args.batch}, rank {args.rank}, {args.threads} threads")
    print(f"prefill tok/s  plain {plain[0]:9.1f}  population {popr[0]:9.1f}  population/plain {popr[0] / plain[0]:.2f}")
    print(f"decode  tok/s  plain {plain[1]:9.1f}  population {popr[1]:9.1f}  population/plain {popr[1] / plain[1]:.2f}")
    pop.remove()
    ours1 = decode_rate(model, 1, 4, args.decode, lambda: torch.no_grad())[1]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench.pth")
        torch.save(model.official_state_dict(), path)
        env = {**os.environ, "RWKV_V7_ON": "1"}
        ref1 = float(subprocess.run([sys.executable, "-c", REF, path, str(args.decode), str(args.threads)], env=env,
                                    check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    print(f"decode batch 1 tok/s  ours {ours1:.1f}  rwkv package {ref1:.1f}  ours/rwkv {ours1 / ref1:.2f}")


if __name__ == "__main__":
    main()
