"""A shared prompt prefix run once per member, against prefilling every prompt whole, in one run.

    python scripts/bench_prefix.py                          # SmolLM2-135M-Instruct, 32 members x 8 prompts
    python scripts/bench_prefix.py --population 64 --prompts-per-step 4 --threads 2

The jobs of one ES step of the arithmetic task (member-major, as ``EggrollTrainer`` lays them out:
every member answers the same chat-templated prompts, which share SmolLM2's system prompt), greedy,
through ``PopulationEngine`` with ``share_prompt_prefix`` off and on, repetitions interleaved.
Prints the seconds of each, the ratio (shared over whole), the length of the shared prefix and
whether the completions are identical.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--population", type=int, default=32)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--slots", type=int, default=128)
    ap.add_argument("--sigma", type=float, default=3e-3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from eggroll_ft import NoiseConfig, Population
    from eggroll_ft.engine import PopulationEngine, SamplingParams
    from eggroll_ft.models.loading import load_causal_lm, load_tokenizer
    from eggroll_ft.models.named import resolve_model_name
    from rewards.arithmetic import make_arithmetic_splits

    path = resolve_model_name(a.model)
    model, Q, N = load_causal_lm(path).eval(), a.prompts_per_step, a.population
    tok = load_tokenizer(model, path)
    prompts = make_arithmetic_splits("add2", num_train=Q, num_validation=4, num_test=4)["train"]["prompt"]
    ids = [tok(tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
           ["input_ids"] for p in prompts]
    pop = Population(model, NoiseConfig(seed=0), N, a.sigma)
    pop.set_step(0)
    jobs, members = ids * N, torch.arange(N).repeat_interleave(Q)
    engines = {share: PopulationEngine(model, pop, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                                       max_sequences_in_flight=a.slots, share_prompt_prefix=share)
               for share in (False, True)}
    seconds, outs = {False: [], True: []}, {}
    for _ in range(a.reps):
        for share, engine in engines.items():
            start = time.perf_counter()
            outs[share] = engine.generate(jobs, members, max_new_tokens=a.new_tokens, sampling=SamplingParams(greedy=True))
            seconds[share].append(time.perf_counter() - start)
            print(f"share_prompt_prefix={share}: {seconds[share][-1]:.1f} s", flush=True)
    whole, shared = statistics.median(seconds[False]), statistics.median(seconds[True])
    prefix = engines[True]._shared_prefix(jobs, "cpu")
    result = {"jobs": len(jobs), "prompt_tokens_mean": sum(map(len, ids)) / Q,
              "shared_prefix_tokens": 0 if prefix is None else prefix.shape[1],
              "whole_prefill_s": round(whole, 2), "shared_prefix_s": round(shared, 2),
              "shared_over_whole": round(shared / whole, 3),
              "identical_completions": outs[False].completion_ids == outs[True].completion_ids}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
