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


# ---- host work per decode step (issue 21): stop strings, EOS / length ends, slot bookkeeping ---------
def host_overhead(args) -> dict:
    """ms per decode step at ``--host-slots`` slots on ``tiny_llama(hidden=32, layers=1)`` with the
    character tokenizer (the forward costs little, so the engine's own work shows), plain and
    population (row b = member b), without and with ``stop_strings=["</answer>"]``; and the share
    of a step that is host work: what the step spends outside the adapter's prefill and decode calls
    (the model forward with the adapter's own cache bookkeeping) and the sampling. A step is (time of ``max_new_tokens=T`` - time of
    ``max_new_tokens=1``) / (T - 1), in CPU time of this process (``time.process_time``: robust to
    other processes on the same core); medians over interleaved repetitions. Then the stop check's
    per-row cost with a real byte-level BPE tokenizer (``--host-tokenizer``)."""
    import eggroll_ft.engine.engine as engine_module
    from eggroll_ft import NoiseConfig, Population
    from eggroll_ft.engine import PopulationEngine, SamplingParams, sample_tokens
    from eggroll_ft.testing import char_tokenizer, tiny_llama

    tok = char_tokenizer()
    model = tiny_llama(len(tok), hidden=32, layers=1)
    for p in model.parameters():
        p.requires_grad_(False)
    S, T = args.host_slots, args.host_new_tokens
    pop = Population(model, NoiseConfig(seed=0, rank=1), S, sigma=1e-3)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, len(tok), (args.prompt_len,), generator=g).tolist() for _ in range(S)]
    greedy = SamplingParams(greedy=True)
    # in this order, so each kind's pair (without, with stop strings) runs back to back
    cases = {(kind, stops): PopulationEngine(model, pop if kind == "population" else None, tokenizer=tok,
                                             stop_strings=stops and ["</answer>"], max_sequences_in_flight=S)
             for kind in ("plain", "population") for stops in (False, True)}
    spent = {}  # seconds in the adapter's prefill and decode calls and in sampling, during one call

    def timed(fn):
        def wrapper(*a, **kw):
            t0 = time.process_time()
            out = fn(*a, **kw)
            spent[fn.__name__] += time.process_time() - t0
            return out
        return wrapper

    for eng in cases.values():
        eng.adapter.prefill, eng.adapter.decode = timed(eng.adapter.prefill), timed(eng.adapter.decode)
    engine_module.sample_tokens = timed(sample_tokens)  # the name the engine calls; restored below
    step_s, host_s = {case: [] for case in cases}, {case: [] for case in cases}
    try:
        for rep in range(args.reps + 1):  # rep 0 warms up (allocator, the stop mask)
            for case, eng in cases.items() if rep % 2 else reversed(cases.items()):
                members = torch.arange(S) if case[0] == "population" else -1
                total, outside = {}, {}  # per length: the call; the call outside model and sampling
                for n in (1, T):
                    spent.update(prefill=0.0, decode=0.0, sample_tokens=0.0)
                    t0 = time.process_time()
                    out = eng.generate(prompts, members, max_new_tokens=n, sampling=greedy)
                    total[n] = time.process_time() - t0
                    outside[n] = total[n] - sum(spent.values())
                    assert sum(out.lengths) == S * n, "a row stopped early: the table needs full-length rows"
                if rep:
                    step_s[case].append((total[T] - total[1]) / (T - 1))
                    host_s[case].append((outside[T] - outside[1]) / (T - 1))
    finally:
        engine_module.sample_tokens = sample_tokens
    table = {}
    for case in cases:
        step, host = statistics.median(step_s[case]) * 1e3, statistics.median(host_s[case]) * 1e3
        table[f"{case[0]}{' + stop' if case[1] else ''}"] = {"ms_per_step": step, "host_ms_per_step": host,
                                                            "host_share": host / step}
    for kind in ("plain", "population"):  # each repetition's pair, run back to back
        table[f"{kind}: stop / no stop"] = statistics.median(
            a / b for a, b in zip(step_s[kind, True], step_s[kind, False]))
        # the same ratio from the host work alone (the model and sampling do the same work in both):
        # steadier on a shared core, where whole steps vary more than the difference
        table[f"{kind}: stop / no stop, from host work"] = 1 + statistics.median(
            a - b for a, b in zip(host_s[kind, True], host_s[kind, False])) / statistics.median(step_s[kind, False])
    print(f"ms per decode step (host work, its share), {S} slots, {T} new tokens, CPU time, medians of {args.reps}:")
    print("| | without stop strings | with stop_strings=['</answer>'] | stop / no stop (from host work) |")
    print("| --- | --- | --- | --- |")
    for kind in ("plain", "population"):
        a, b = table[kind], table[kind + " + stop"]
        print(f"| {kind} | {a['ms_per_step']:.2f} (host {a['host_ms_per_step']:.2f}, {a['host_share']:.0%}) "
              f"| {b['ms_per_step']:.2f} (host {b['host_ms_per_step']:.2f}, {b['host_share']:.0%}) "
              f"| {table[kind + ': stop / no stop']:.2f} ({table[kind + ': stop / no stop, from host work']:.2f}) |",
              flush=True)
    return {"host_overhead": table,
            "stop_check_per_row": stop_check_cost(args.host_tokenizer, args.reps)}


def stop_check_cost(path: str | None, reps: int) -> dict | None:
    """Per-row cost of the stop check with a real tokenizer (``AutoTokenizer`` at ``path``): one
    ``tokenizer.decode`` of a 40-token tail (what a checked row costs; before, every live row paid
    it every step), a ``DecodeStream.step`` (what an incremental decoder costs per row and token),
    and the share of tokens of a Countdown-style completion that the stop mask selects. CPU time,
    best of ``reps``."""
    if not path:
        return None
    from transformers import AutoTokenizer

    from eggroll_ft.engine.stops import StopStrings

    tk = AutoTokenizer.from_pretrained(path)
    text = ("<think>\nWe need 24 from 3, 5, 7 and 9. Try (9 - 7) * (5 + 3) = 2 * 8 = 16, too small. "
            "Then 3 * 5 + 9 = 24, and 7 is left over... (7 - 5) * 9 + 3 = 21. Try 9 * 3 - 7 + 5 - 1.\n"
            "</think>\n<answer> (9 - 5) * (7 - 3) + 8 </answer>") * 4
    ids = tk(text, add_special_tokens=False)["input_ids"]
    stops = StopStrings(tk, ["</answer>"])
    t0 = time.process_time()
    mask = stops.may_end(len(tk))
    build_s = time.process_time() - t0
    tails = [ids[max(0, i - stops.window):i] for i in range(1, len(ids) + 1)]
    res = {"tokenizer": path, "mask_build_s": build_s, "mask_share_of_vocab": mask.float().mean().item(),
           "mask_share_of_completion_tokens": mask[ids].float().mean().item(), "tail_tokens": stops.window}
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        for t in tails:
            tk.decode(t)
        best = min(best, (time.process_time() - t0) / len(tails))
    res["decode_tail_us"] = best * 1e6
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:
        return res
    best = float("inf")
    for _ in range(reps):
        stream = DecodeStream(skip_special_tokens=False)
        t0 = time.process_time()
        for t in ids:
            stream.step(tk.backend_tokenizer, t)
        best = min(best, (time.process_time() - t0) / len(ids))
    res["decode_stream_step_us"] = best * 1e6
    share = res["mask_share_of_completion_tokens"]
    res["per_step_ms_at_1024_rows"] = {"every_row_decoded": 1024 * res["decode_tail_us"] / 1e3,
                                       "masked_rows_decoded": 1024 * share * res["decode_tail_us"] / 1e3,
                                       "decode_stream_every_row": 1024 * res["decode_stream_step_us"] / 1e3}
    return res


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
    ap.add_argument("--host-overhead", action="store_true",
                    help="only the host work per decode step (stop strings, ends, slots): see host_overhead")
    ap.add_argument("--host-slots", type=int, default=1024, help="--host-overhead: slots (= jobs)")
    ap.add_argument("--host-new-tokens", type=int, default=32, help="--host-overhead: new tokens per job")
    ap.add_argument("--host-tokenizer", default=None,
                    help="--host-overhead: a local Hugging Face tokenizer for the per-row stop-check cost")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)
    if args.host_overhead:
        return print(json.dumps(host_overhead(args), indent=1))
    result = {} if args.memory_only else throughput(args)
    if not args.skip_memory:
        result["memory"] = memory(args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
