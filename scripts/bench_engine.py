"""Population generation throughput and memory, each figure a ratio measured in one run.

    python scripts/bench_engine.py                      # CPU defaults: ~11M-parameter random Llama
    python scripts/bench_engine.py --device cuda --dtype bfloat16 --hidden 1536 --layers 28 \
        --intermediate 8960 --vocab 151936 --population 1024 --new-tokens 128   # ~1.5B, GPU
    python scripts/bench_engine.py --compile ...        # also with the decode step compiled / captured
    python scripts/bench_engine.py --model DIR ...      # any local Hugging Face checkpoint (e.g. SmolLM2-135M)
    python scripts/bench_engine.py --prompts-per-step 8 ...   # training order (below)
    python scripts/bench_engine.py --memory-populations 256 8192 --slots 256 ...   # a step's memory at each N

Jobs (rank 1, greedy, no EOS so every job runs to the same length): ``--prompts-per-step Q``
(default 1) gives ``N * Q`` jobs in EggrollTrainer's training order, member-major: job ``j`` is
member ``j // Q`` answering prompt ``j % Q``, the same ``Q`` prompts for every member, so ``2 Q``
consecutive rows share a noise index (an antithetic pair). ``Q = 1`` is every row a different
member, each with its own prompt. ``--model DIR`` loads that checkpoint (random prompt ids over its
vocabulary) instead of building a random Llama from the size options.

Figures:

1. population / plain: tokens/s of ``PopulationEngine`` with the population hooks over the same
   engine on the unperturbed model without hooks, same jobs, slots and lengths. Each population
   run is a new ES step, so its noise (the factors of the rows in flight, generated as they enter)
   is inside its time (``noise_seconds_in_generation``, CPU); ``population_with_update_over_plain``
   adds the step's ES update (``update_seconds``: it regenerates, chunk by chunk, the noise no
   longer in flight);
2. population / naive ES: over materialising ``W + sigma E_i`` and generating member by member
   (batch 1; timed on ``--naive-members`` members, the rate is per member so it extrapolates);
3. population / HF generate: over ``model.generate`` on the population model (hooks on, one batch);
4. memory: peak resident memory of a full ES step (population generation, rewards, fitness
   shaping, in-place SGD update) over plain inference (the same engine, same slots and jobs), each
   in a fresh subprocess; peak = the kernel's high-water mark (VmHWM, reset after the model is
   built through /proc/self/clear_refs) minus the resident memory at that point, with glibc told
   to serve large blocks by mmap so that freed memory leaves the resident set. On CUDA:
   ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the allocated bytes;
5. ``--memory-populations N1 N2 ...``: the training step of 4 at each population size (same slots,
   prompts and lengths), each in a fresh subprocess: its peak memory over the first size's, and (in
   a second subprocess, with glibc's default allocator settings) its time split into generation,
   rewards and update, and noise generation (inside both), with the noise's share.

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
from dataclasses import dataclass

import torch

from eggroll_ft import NoiseConfig

NOISE_SECONDS = [0.0]  # time spent generating noise (TimedNoise), read around the timed sections
CLOCK = [time.perf_counter]  # --clock process: this process's CPU time (one thread, a shared core)


@dataclass(frozen=True)
class TimedNoise(NoiseConfig):
    """The library's noise, adding the wall time of every generation call to ``NOISE_SECONDS``
    (``sync``: wait for the device first, so that on CUDA the time is the kernels')."""

    sync: bool = False

    def _timed(self, fn, *args):
        device = args[-1]
        if self.sync:
            sync(device)
        t0 = CLOCK[0]()
        out = fn(*args)
        if self.sync:
            sync(device)
        NOISE_SECONDS[0] += CLOCK[0]() - t0
        return out

    def factors(self, step, param_ids, shape, indices, device=None):
        return self._timed(super().factors, step, param_ids, shape, indices, device)


def build_model(args):
    """The model: ``--model DIR`` loaded, else a random Llama of the size options (untied head)."""
    if args.model:
        from eggroll_ft.models.loading import load_causal_lm

        model = load_causal_lm(args.model, dtype=getattr(torch, args.dtype)).to(args.device)
        args.vocab = model.get_output_embeddings().weight.shape[0]
        return model.eval()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device(args.device):  # initialised where it runs, not on the CPU first
        model = LlamaForCausalLM(cfg)
    return model.to(getattr(torch, args.dtype)).eval()


def build(args):
    """Model, population and the jobs: ``(model, pop, prompts (J lists), members (J,))``, J = N Q."""
    from eggroll_ft import Population

    torch.manual_seed(0)
    model = build_model(args)
    for p in model.parameters():
        p.requires_grad_(False)
    noise = TimedNoise(seed=0, rank=1, sync=args.memory_child == "train")
    pop = Population(model, noise, args.population, sigma=1e-3, noise_kernel=args.noise_kernel)
    N, Q = args.population, args.prompts_per_step
    g = torch.Generator().manual_seed(1)
    texts = [torch.randint(3, args.vocab, (args.prompt_len,), generator=g).tolist() for _ in range(N if Q == 1 else Q)]
    if Q == 1:  # every row a different member, each with its own prompt
        return model, pop, texts, torch.arange(N)
    return model, pop, texts * N, torch.arange(N).repeat_interleave(Q)  # member-major, as EggrollTrainer


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t0 = CLOCK[0]()
    fn()
    sync(device)
    return CLOCK[0]() - t0


def throughput(args):
    from eggroll_ft import apply_es_update
    from eggroll_ft.engine import PopulationEngine, SamplingParams

    model, pop, prompts, members = build(args)
    J, new = len(prompts), args.new_tokens
    greedy = SamplingParams(greedy=True)
    slots = args.slots or J
    ours = PopulationEngine(model, pop, max_sequences_in_flight=slots)
    plain = PopulationEngine(model, None, max_sequences_in_flight=slots)
    tokens = J * new
    fitness = torch.randn(args.population, generator=torch.Generator().manual_seed(2))

    step = iter(range(1, 10**6))
    times = {"ours": [], "update": [], "noise": [], "plain": [], "hf": [], "naive": []}

    def run_ours():  # a new ES step: each row's noise is generated as it enters a slot
        pop.set_step(next(step))
        NOISE_SECONDS[0] = 0.0
        out = ours.generate(prompts, members, max_new_tokens=new, sampling=greedy)
        assert sum(out.lengths) == tokens
        times["noise"].append(NOISE_SECONDS[0])

    def run_update():  # the step's ES update (lr 0: the weights stay), right after its generation
        apply_es_update(pop, fitness, lr=0.0)

    def run_plain():
        out = plain.generate(prompts, -1, max_new_tokens=new, sampling=greedy)
        assert sum(out.lengths) == tokens

    def run_hf():
        pop.set_step(next(step))
        ids = torch.tensor(prompts, device=args.device)
        with pop.members(members):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert out.shape == (J, args.prompt_len + new)

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
            pop.set_step(next(step))
            assert sum(ours_c.generate(prompts, members, max_new_tokens=new, sampling=greedy).lengths) == tokens

        def run_plain_c():
            assert sum(plain_c.generate(prompts, -1, max_new_tokens=new, sampling=greedy).lengths) == tokens

        for name, fn in (("ours_compiled", run_ours_c), ("plain_compiled", run_plain_c)):
            t0 = time.perf_counter()
            fn()  # compiles (same slot count and length as the timed runs)
            compiled[name] = fn
            times[name] = []
            print(f"{name}: first call (compilation) {time.perf_counter() - t0:.1f}s", flush=True)
        # same completions? (float32: expected all; bf16: near-tied logits may flip under other kernels)
        eager_ids = ours.generate(prompts, members, max_new_tokens=new, sampling=greedy).completion_ids
        compiled_ids = ours_c.generate(prompts, members, max_new_tokens=new, sampling=greedy).completion_ids
        agreement = {"jobs_equal": sum(a == b for a, b in zip(eager_ids, compiled_ids)) / J,
                     "first_token_equal": sum(a[0] == b[0] for a, b in zip(eager_ids, compiled_ids)) / J}
        print(f"compiled vs eager completions: {agreement}", flush=True)

    # warm-up (allocator, lazy init), then interleaved repetitions
    ours.generate(prompts[:4], members[:4], max_new_tokens=2, sampling=greedy)
    plain.generate(prompts[:4], -1, max_new_tokens=2, sampling=greedy)
    for rep in range(args.reps):
        order = [("ours", run_ours), ("plain", run_plain), *compiled.items()]
        for name, fn in order if rep % 2 == 0 else order[::-1]:  # alternate who goes first
            times[name].append(timed(fn, args.device))
            if name == "ours":
                times["update"].append(timed(run_update, args.device))
        if not args.skip_hf:
            times["hf"].append(timed(run_hf, args.device))
        if k and rep < args.naive_reps:
            times["naive"].append(timed(run_naive, args.device))
        print(f"rep {rep}: " + ", ".join(f"{n} {v[-1]:.2f}s" for n, v in times.items() if v), flush=True)
    med = {n: statistics.median(v) for n, v in times.items() if v}
    tps = {"ours": tokens / med["ours"], "ours_with_update": tokens / (med["ours"] + med["update"]),
           "plain": tokens / med["plain"]}
    if times["hf"]:
        tps["hf"] = tokens / med["hf"]
    if times["naive"]:
        tps["naive"] = k * new / med["naive"]
    pair = [p / o for o, p in zip(times["ours"], times["plain"])]
    compiled_ratios = {}
    if compiled:
        tps.update({n: tokens / med[n] for n in compiled})
        compiled_ratios = {"compiled_population_over_plain": tps["ours_compiled"] / tps["plain_compiled"],
                           "compiled_over_eager_population": tps["ours_compiled"] / tps["ours"],
                           "compiled_over_eager_plain": tps["plain_compiled"] / tps["plain"],
                           "compiled_vs_eager_completions": agreement}
        if str(args.device).startswith("cuda"):
            from eggroll_ft.testing import cuda_graph_counts
            compiled_ratios["cuda_graphs"] = cuda_graph_counts(args.device)  # recorded, skipped
    cpu = not str(args.device).startswith("cuda")  # on CUDA noise calls are not synchronised here
    return {**compiled_ratios, "tokens_per_s": tps,
            "population_over_plain": tps["ours"] / tps["plain"],
            "population_over_plain_pairwise_median": statistics.median(pair),
            "population_with_update_over_plain": tps["ours_with_update"] / tps["plain"],
            "noise_seconds_in_generation": med["noise"] if cpu else None,
            "noise_share_of_generation": med["noise"] / med["ours"] if cpu else None,
            "update_seconds": med["update"],
            "population_over_naive": tps["ours"] / tps["naive"] if "naive" in tps else None,
            "population_over_hf_generate": tps["ours"] / tps["hf"] if "hf" in tps else None,
            "jobs": J, "prompts_per_step": args.prompts_per_step, "slots": ours.last_num_slots,
            "params": sum(p.numel() for p in model.parameters())}


# ---- memory: one workload per fresh subprocess ---------------------------------------------------
def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def memory_child(args) -> None:
    from eggroll_ft import apply_es_update, shape_fitness
    from eggroll_ft.engine import PopulationEngine, SamplingParams

    model, pop, prompts, members = build(args)
    J, new = len(prompts), args.new_tokens
    slots = args.slots or J
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
    seconds = {}
    if args.memory_child == "infer":
        PopulationEngine(model, None, max_sequences_in_flight=slots).generate(
            prompts, -1, torch.arange(J), max_new_tokens=new, sampling=sampling)
    else:  # one full ES step, as EggrollTrainer.training_step runs it
        pop.set_step(0)
        t0 = CLOCK[0]()
        out = PopulationEngine(model, pop, max_sequences_in_flight=slots).generate(
            prompts, members, torch.arange(J), max_new_tokens=new, sampling=sampling)
        sync(args.device)
        t1, noise_in_generation = CLOCK[0](), NOISE_SECONDS[0]
        rewards = torch.tensor([sum(t < args.vocab // 2 for t in c) / len(c) for c in out.completion_ids])
        table = rewards.view(args.population, args.prompts_per_step).T  # (Q, N), as the trainer's
        apply_es_update(pop, shape_fitness(table, "centered_rank"), lr=1e-3)
        sync(args.device)
        seconds = {"generation": t1 - t0, "rewards_and_update": CLOCK[0]() - t1,
                   "noise_in_generation": noise_in_generation, "noise_in_update": NOISE_SECONDS[0] - noise_in_generation}
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _resident_kib("VmHWM") * 1024
    print(json.dumps({"peak_over_base_bytes": peak - base, "seconds": seconds}))


def _child(mode: str, *extra: str, for_memory: bool = True) -> dict:
    """Run one workload in a fresh subprocess (this script's arguments, then ``extra``)."""
    cmd = [sys.executable, __file__, "--memory-child", mode, *sys.argv[1:], *extra]
    env = dict(os.environ)
    if for_memory:  # large blocks through mmap, so freed memory leaves the resident set at once and the
        # high-water mark tracks live allocations rather than glibc's reuse of freed heap (this makes
        # allocation-heavy code slower: time a step in a child without it)
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1])


def memory(args) -> dict:
    res = {}
    for mode in ("infer", "train", "infer", "train"):
        res.setdefault(mode, []).append(_child(mode)["peak_over_base_bytes"])
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


def memory_populations(args) -> dict:
    """A training step at each of ``--memory-populations`` (same slots): peak memory over the first
    population size's, and where the step's time went (noise generation included in both parts)."""
    rows, first = {}, None
    for N in args.memory_populations:
        r = _child("train", "--population", str(N))
        sec = _child("train", "--population", str(N), for_memory=False)["seconds"]  # timed with glibc's defaults
        step = sec["generation"] + sec["rewards_and_update"]
        noise = sec["noise_in_generation"] + sec["noise_in_update"]
        first = first or r["peak_over_base_bytes"]
        rows[N] = {"peak_mib": r["peak_over_base_bytes"] / 2**20, "peak_over_first": r["peak_over_base_bytes"] / first,
                   "step_seconds": step, **{f"{k}_seconds": v for k, v in sec.items()},
                   "noise_seconds": noise, "noise_share_of_step": noise / step}
        print(f"N={N}: {json.dumps(rows[N])}", flush=True)
    return rows


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
    ap.add_argument("--model", default=None, help="a local Hugging Face checkpoint (default: a random Llama "
                    "of the size options)")
    ap.add_argument("--population", type=int, default=256, help="N members")
    ap.add_argument("--prompts-per-step", type=int, default=1,
                    help="Q prompts answered by every member: N Q jobs in training order (1: every row a different member)")
    ap.add_argument("--slots", type=int, default=None, help="sequences in flight (default: all jobs)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--naive-members", type=int, default=8)
    ap.add_argument("--naive-reps", type=int, default=2)
    ap.add_argument("--noise-kernel", choices=["auto", "torch", "triton"], default="auto",
                    help="Population(noise_kernel=...): 'auto' is the Triton kernel on CUDA, torch elsewhere")
    ap.add_argument("--clock", choices=["wall", "process"], default="wall",
                    help="time with the wall clock, or this process's CPU time (one thread on a core other "
                         "processes share: what the code costs, less the time it waited)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: on an oversubscribed machine, OpenMP spinning makes 2 threads slower)")
    ap.add_argument("--compile", action="store_true",
                    help="also time both engines with compile_decode=True (inductor on CPU, CUDA graphs on CUDA)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--memory-populations", type=int, nargs="+", default=None,
                    help="only figure 5: a training step's peak memory and time at each of these population sizes")
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
    if args.clock == "process":
        if args.device != "cpu" or args.threads != 1:
            ap.error(f"--clock process needs --device cpu and --threads 1 (got {args.device}, {args.threads})")
        CLOCK[0] = time.process_time
    if args.memory_child:
        return memory_child(args)
    if args.host_overhead:
        return print(json.dumps(host_overhead(args), indent=1))
    if args.memory_populations:
        return print(json.dumps({"memory_populations": memory_populations(args)}, indent=1))
    result = {} if args.memory_only else throughput(args)
    if not args.skip_memory:
        result["memory"] = memory(args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
