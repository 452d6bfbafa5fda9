"""generation_backend='vllm' against vLLM without adapters and against eggroll_ft's engine, in one run.

    # CPU (the vLLM environment of scripts/setup_vllm_env.sh), SmolLM2-135M-Instruct, float32:
    taskset -c 0 ~/.cache/eggroll_ft/venv-vllm/bin/python scripts/bench_vllm.py
    # GPU: a random ~0.5B Llama built in code (bench_engine.py's shapes), bf16
    python scripts/bench_vllm.py --device cuda --dtype bfloat16 --hidden 896 --layers 24 --intermediate 4864 \
        --heads 14 --kv-heads 2 --vocab 151936 --population 1024 --new-tokens 128 --max-loras 256

Every job a different member (rank 1), greedy, no EOS (every job runs ``--new-tokens`` tokens), all
jobs submitted at once. Timed per repetition (interleaved, medians):

* ``vllm_population``: ``VLLMPopulationBackend.generate`` for members ``0..N-1`` (vLLM multi-LoRA;
  includes vLLM reading the step's adapters from disk); ``vllm_plain``: the same jobs without
  adapters (``members=-1``);
* ``engine_population`` / ``engine_plain``: ``PopulationEngine`` on the same model, jobs, lengths;
* ``adapter_write``: writing the step's N adapter files (``write_adapters``, which generates their
  noise; the engine makes its rows' noise inside ``generate``), ``noise``: moving the population to a
  new step (nothing is generated ahead), ``weight_push``: ``sync()`` of the perturbed weights.

Figures: vllm population / vllm plain, vllm population / engine population (with and without the
adapter writing), and the per-step seconds. On CPU every time is this process's CPU time, not
wall-clock (see ``timed``); only ratios from one run mean anything on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

QUESTIONS = ["What is {a} plus {b}?", "Name {a} animals that live in the sea.", "Write a sentence with the number {b}.",
             "Is {a} larger than {b}? Answer briefly.", "Count from {a} to {b}."]


def build(args):
    """The model, tokenizer (or None) and N prompt id lists."""
    from eggroll_ft.models.loading import load_causal_lm, load_tokenizer

    dtype = getattr(torch, args.dtype)
    if args.model:
        model = load_causal_lm(args.model, dtype=dtype).to(args.device).eval()
        tok = load_tokenizer(model, args.model)
        texts = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)].format(a=i, b=2 * i + 3)}],
                                         add_generation_prompt=True, tokenize=False) for i in range(args.population)]
        prompts = [list(p) for p in tok(texts, add_special_tokens=False)["input_ids"]]
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
                          tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg)
        model, tok = model.to(dtype).eval(), None
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, args.vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.population)]
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok, prompts


def timed(fn, device) -> float:
    """Seconds of ``fn()``: wall-clock on CUDA; on CPU the CPU time of this process (all its threads:
    vLLM's engine core runs in-process), which a machine shared with other jobs does not inflate."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def run(args) -> dict:
    from eggroll_ft import NoiseConfig, Population
    from eggroll_ft.engine import PopulationEngine, SamplingParams
    from eggroll_ft.engine.vllm_backend import VLLMPopulationBackend

    model, tok, prompts = build(args)
    N, new = args.population, args.new_tokens
    pop = Population(model, NoiseConfig(seed=0, rank=1), N, sigma=1e-3)
    members, greedy, tokens = torch.arange(N), SamplingParams(greedy=True), N * new
    engine = PopulationEngine(model, pop, max_sequences_in_flight=N)
    plain_engine = PopulationEngine(model, None, max_sequences_in_flight=N)
    max_len = max(len(p) for p in prompts) + new
    backend = VLLMPopulationBackend(model, pop, tokenizer=tok, max_loras=args.max_loras, max_num_seqs=N,
                                    max_model_len=max_len, kv_cache_memory_bytes=int(args.kv_cache_gb * 2**30),
                                    gpu_memory_utilization=args.gpu_memory_utilization)
    step = iter(range(1, 10**6))

    def check(out):
        assert sum(out.lengths) == tokens, (sum(out.lengths), tokens)

    def new_noise():  # a new ES step (the engine makes its rows' noise inside generate, vLLM when writing adapters)
        pop.set_step(next(step))

    runs = {
        "vllm_population": lambda: check(backend.generate(prompts, members, 0, max_new_tokens=new, sampling=greedy)),
        "vllm_plain": lambda: check(backend.generate(prompts, -1, 0, max_new_tokens=new, sampling=greedy)),
        "engine_population": lambda: check(engine.generate(prompts, members, 0, max_new_tokens=new, sampling=greedy)),
        "engine_plain": lambda: check(plain_engine.generate(prompts, -1, 0, max_new_tokens=new, sampling=greedy)),
    }
    # warm-up: a short call of each (lazy initialisation, first adapter loads)
    backend.generate(prompts[:4], members[:4], 0, max_new_tokens=2, sampling=greedy)
    backend.generate(prompts[:4], -1, 0, max_new_tokens=2, sampling=greedy)
    engine.generate(prompts[:4], members[:4], 0, max_new_tokens=2, sampling=greedy)
    times = {name: [] for name in ("noise", "adapter_write", "weight_push", *runs)}
    for rep in range(args.reps):
        times["noise"].append(timed(new_noise, args.device))
        times["adapter_write"].append(timed(lambda: backend.write_adapters(range(N)), args.device))
        order = list(runs.items())
        for name, fn in order if rep % 2 == 0 else order[::-1]:  # alternate who goes first
            times[name].append(timed(fn, args.device))
        times["weight_push"].append(timed(backend.sync, args.device))
        print(f"rep {rep}: " + ", ".join(f"{n} {v[-1]:.2f}s" for n, v in times.items()), flush=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    tps = {n: tokens / med[n] for n in runs}
    result = {
        "vllm_population_over_vllm_plain": tps["vllm_population"] / tps["vllm_plain"],
        "vllm_population_over_engine_population": tps["vllm_population"] / tps["engine_population"],
        "vllm_population_with_adapter_write_over_engine_population":
            tokens / (med["vllm_population"] + med["adapter_write"]) / tps["engine_population"],
        "engine_population_over_engine_plain": tps["engine_population"] / tps["engine_plain"],
        "vllm_plain_over_engine_plain": tps["vllm_plain"] / tps["engine_plain"],
        "tokens_per_s": tps, "adapter_write_seconds_per_step": med["adapter_write"],
        "adapter_write_ms_per_member": 1000 * med["adapter_write"] / N,
        "noise_seconds_per_step": med["noise"], "weight_push_seconds_per_step": med["weight_push"],
        "population": N, "new_tokens": new, "max_loras": backend.max_loras,
        "params": sum(p.numel() for p in model.parameters()), "perturbed_weights": len(pop.params),
    }
    backend.close()
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="a model name or path; '' builds a random Llama from the shape arguments below")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--prompt-len", type=int, default=16, help="random-model prompts")
    ap.add_argument("--population", type=int, default=128, help="N jobs, one per member")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--max-loras", type=int, default=128, help="adapters vLLM runs in one batch")
    ap.add_argument("--kv-cache-gb", type=float, default=1.0)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
