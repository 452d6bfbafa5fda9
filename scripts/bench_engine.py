"""Population generation throughput and memory, each figure a ratio measured in one run.

    python scripts/bench_engine.py                      # CPU defaults: ~11M-parameter random Llama
    python scripts/bench_engine.py --device cuda --dtype bfloat16 --hidden 1536 --layers 28 \
        --intermediate 8960 --vocab 151936 --population 1024 --new-tokens 128   # ~1.5B, GPU
    python scripts/bench_engine.py --compile ...        # also with the decode step compiled / captured

Figures (every row a different member, rank 1, greedy, no EOS so every job runs to the same length):

1. population / plain: tokens/s of ``PopulationEngine`` with the population hooks (row b = member
   b) over the same engine on the unperturbed model without hooks, same batch and lengths;
   reported with this step's noise generation (all layers' factors, once per step) excluded and
   included (``noise_seconds_per_step``);
2. population / naive ES: over materialising ``W + sigma E_i`` and generating member by member
   (batch 1; timed on ``--naive-members`` members, the rate is per member so it extrapolates);
3. population / HF generate: over ``model.generate`` on the population model (hooks on, one batch);
4. memory: peak resident memory of a full ES step (population generation, rewards, fitness
   shaping, in-place SGD update) over plain inference (the same engine, same slots and jobs), each
   in a fresh subprocess; peak = the kernel's high-water mark (VmHWM, reset after the model is
   built through /proc/self/clear_refs) minus the resident memory at that point, with glibc told
   to serve large blocks by mmap so that freed memory leaves the resident set. On CUDA:
   ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the allocated bytes.

Repetitions of ours and the baselines are interleaved and medians reported, because the machine
is shared: only the ratios from one run are meaningful, not the absolute tokens/s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    from eggroll_ft import NoiseConfig, Population

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device(args.device):  # initialised where it runs, not on the CPU first
        model = LlamaForCausalLM(cfg)
    model = model.to(getattr(torch, args.dtype)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pop = Population(model, NoiseConfig(seed=0, rank=1), args.population, sigma=1e-3)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, args.vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.population)]
    return model, pop, prompts


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def throughput(args):
    from eggroll_ft.engine import PopulationEngine, SamplingParams

    model, pop, prompts = build(args)
    N, new = args.population, args.new_tokens
    greedy = SamplingParams(greedy=True)
    members = torch.arange(N)
    slots = args.slots or N
    ours = PopulationEngine(model, pop, max_sequences_in_flight=slots)
    plain = PopulationEngine(model, None, max_sequences_in_flight=slots)
    tokens = N * new

    step = iter(range(1, 10**6))

    def new_noise():  # a new ES step: every layer's factors for the whole population
        pop.set_step(next(step))
        for name in pop.params:
            pop.factors(name)

    def run_ours():
        out = ours.generate(prompts, members, max_new_tokens=new, sampling=greedy)
        assert sum(out.lengths) == tokens

    def run_plain():
        out = plain.generate(prompts, -1, max_new_tokens=new, sampling=greedy)
        assert sum(out.lengths) == tokens

    def run_hf():
        ids = torch.tensor(prompts, device=args.device)
        with pop.members(members):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert out.shape == (N, args.prompt_len + new)

    k = args.naive_members

    def run_naive():
        pop.set_step(next(step))
        for m in range(k):
            with pop.materialized(m):
                plain.generate([prompts[m]], -1, max_new_tokens=new, sampling=greedy)

    compiled = {}
    if args.compile:  # the same engines with the decode step captured (CUDA graphs on CUDA)
        ours_c = PopulationEngine(model, pop, max_sequences_in_flight=slots, compile_decode=True)
        plain_c = PopulationEngine(model, None, max_sequences_in_flight=slots, compile_decode=True)

        def run_ours_c():
            assert sum(ours_c.generate(prompts, members, max_new_tokens=new, sampling=greedy).lengths) == tokens

        def run_plain_c():
            assert sum(plain_c.generate(prompts, -1, max_new_tokens=new, sampling=greedy).lengths) == tokens

        for name, fn in (("ours_compiled", run_ours_c), ("plain_compiled", run_plain_c)):
            t0 = time.perf_counter()
            fn()  # compiles (same slot count and length as the timed runs)
            compiled[name] = fn
            print(f"{name}: first call (compilation) {time.perf_counter() - t0:.1f}s", flush=True)
        # same completions? (float32: expected all; bf16: near-tied logits may flip under other kernels)
        eager_ids = ours.generate(prompts, members, max_new_tokens=new, sampling=greedy).completion_ids
        compiled_ids = ours_c.generate(prompts, members, max_new_tokens=new, sampling=greedy).completion_ids
        agreement = {"jobs_equal": sum(a == b for a, b in zip(eager_ids, compiled_ids)) / N,
                     "first_token_equal": sum(a[0] == b[0] for a, b in zip(eager_ids, compiled_ids)) / N}
        print(f"compiled vs eager completions: {agreement}", flush=True)

    # warm-up (allocator, lazy init), then interleaved repetitions
    ours.generate(prompts[:4], members[:4], max_new_tokens=2, sampling=greedy)
    plain.generate(prompts[:4], -1, max_new_tokens=2, sampling=greedy)
    times = {"noise": [], "ours": [], "plain": [], "hf": [], "naive": [], **{n: [] for n in compiled}}
    for rep in range(args.reps):
        times["noise"].append(timed(new_noise, args.device))
        order = [("ours", run_ours), ("plain", run_plain), *compiled.items()]
        for name, fn in order if rep % 2 == 0 else order[::-1]:  # alternate who goes first
            times[name].append(timed(fn, args.device))
        if not args.skip_hf:
            times["hf"].append(timed(run_hf, args.device))
        if k and rep < args.naive_reps:
            times["naive"].append(timed(run_naive, args.device))
        print(f"rep {rep}: " + ", ".join(f"{n} {v[-1]:.2f}s" for n, v in times.items() if v), flush=True)
    med = {n: statistics.median(v) for n, v in times.items() if v}
    tps = {"ours": tokens / med["ours"], "ours_with_noise": tokens / (med["ours"] + med["noise"]),
           "plain": tokens / med["plain"]}
    if times["hf"]:
        tps["hf"] = tokens / statistics.median(times["hf"])
    if times["naive"]:
        tps["naive"] = k * new / statistics.median(times["naive"])
    pair = [p / o for o, p in zip(times["ours"], times["plain"])]
    compiled_ratios = {}
    if compiled:
        tps.update({n: tokens / med[n] for n in compiled})
        compiled_ratios = {"compiled_population_over_plain": tps["ours_compiled"] / tps["plain_compiled"],
                           "compiled_population_with_noise_over_plain": tokens / (med["ours_compiled"] + med["noise"])
                           / tps["plain_compiled"],
                           "compiled_over_eager_population": tps["ours_compiled"] / tps["ours"],
                           "compiled_over_eager_plain": tps["plain_compiled"] / tps["plain"],
                           "compiled_vs_eager_completions": agreement}
        if str(args.device).startswith("cuda"):
            from eggroll_ft.testing import cuda_graph_counts
            compiled_ratios["cuda_graphs"] = cuda_graph_counts(args.device)  # recorded, skipped
    return {**compiled_ratios, "tokens_per_s": tps, "noise_seconds_per_step": med["noise"],
            "population_over_plain": tps["ours"] / tps["plain"],
            "population_over_plain_pairwise_median": statistics.median(pair),
            "population_with_noise_over_plain": tps["ours_with_noise"] / tps["plain"],
            "population_over_naive": tps["ours_with_noise"] / tps["naive"] if "naive" in tps else None,
            "population_over_hf_generate": tps["ours"] / tps["hf"] if "hf" in tps else None,
            "slots": ours.last_num_slots, "params": sum(p.numel() for p in model.parameters())}


# ---- memory: one workload per fresh subprocess ---------------------------------------------------
def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def memory_child(args) -> None:
    from eggroll_ft import apply_es_update, shape_fitness
    from eggroll_ft.engine import PopulationEngine, SamplingParams

    model, pop, prompts = build(args)
    N, new, slots = args.population, args.new_tokens, args.slots or args.population
    sampling = SamplingParams(temperature=1.0)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _resident_kib("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current resident size
    if args.memory_child == "infer":
        PopulationEngine(model, None, max_sequences_in_flight=slots).generate(
            prompts, -1, torch.arange(N), max_new_tokens=new, sampling=sampling)
    else:  # one full ES step, as EggrollTrainer.training_step runs it
        pop.set_step(0)
        out = PopulationEngine(model, pop, max_sequences_in_flight=slots).generate(
            prompts, torch.arange(N), torch.arange(N), max_new_tokens=new, sampling=sampling)
        rewards = torch.tensor([sum(t < args.vocab // 2 for t in c) / len(c) for c in out.completion_ids])
        apply_es_update(pop, shape_fitness(rewards, "centered_rank"), lr=1e-3)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _resident_kib("VmHWM") * 1024
    print(json.dumps({"peak_over_base_bytes": peak - base}))


def memory(args) -> dict:
    res = {}
    for mode in ("infer", "train", "infer", "train"):
        cmd = [sys.executable, __file__, "--memory-child", mode] + sys.argv[1:]
        # large blocks through mmap, so freed memory leaves the resident set at once and the
        # high-water mark tracks live allocations rather than glibc's reuse of freed heap
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        line = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
        res.setdefault(mode, []).append(json.loads(line)["peak_over_base_bytes"])
    infer, train = statistics.median(res["infer"]), statistics.median(res["train"])
    return {"infer_peak_mib": infer / 2**20, "train_step_peak_mib": train / 2**20, "train_over_infer": train / infer}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--population", type=int, default=256, help="N jobs, one per member")
    ap.add_argument("--slots", type=int, default=None, help="sequences in flight (default: N)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--naive-members", type=int, default=8)
    ap.add_argument("--naive-reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: on an oversubscribed machine, OpenMP spinning makes 2 threads slower)")
    ap.add_argument("--compile", action="store_true",
                    help="also time both engines with compile_decode=True (inductor on CPU, CUDA graphs on CUDA)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--memory-child", choices=["infer", "train"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)
    result = {} if args.memory_only else throughput(args)
    if not args.skip_memory:
        result["memory"] = memory(args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
