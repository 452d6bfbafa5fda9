"""Integer-only pretraining of a byte-level minGRU LM with EGGROLL (arXiv 2511.16652).

    python recipes/pretrain_mingru_int8.py --config recipes/configs/mingru/tiny_cpu.yaml \
        --data ../shared/data/text/austen.txt --output_dir runs/mingru_int8

Each step, compared with backprop pretraining:
1. No gradients: weights and activations are int8 and the forward is integer-only
   (``eggroll_ft.models.mingru.IntMinGRU``); there is nothing to differentiate.
2. ``population_size`` members (antithetic pairs of int8 low-rank perturbations, sigma = a power
   of two) read byte windows: a group of ``group_size`` members shares one stream, so a pair is
   compared on the same bytes.
3. Truncated ES: every member's recurrent state carries over to the next window of its stream.
4. A pair's fitness is the sign of the difference of the two log-likelihoods (integer
   log-softmax through lookup tables); the update moves a scheduled fraction of the weights by
   exactly +-1 (``eggroll_ft.integer_es``).

Logs train and held-out bits per byte to ``<output_dir>/metrics.jsonl`` (always) and to
tensorboard/wandb with ``--report_to``; checkpoints atomically; ``--resume`` continues the run
bit for bit. ``--device`` (default ``auto``: CUDA when available) holds the model, the byte
windows and the carried state; checkpoints are saved on the CPU and load onto the run's device, so
a run can move between devices. The run arguments, config parsing, metrics log and atomic
checkpoints are ``eggroll_ft.mingru_recipe``, shared with the float backprop baseline
(``pretrain_mingru_float.py``).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from eggroll_ft.bytes_data import ByteStreams, eval_windows, load_byte_splits, unigram_entropy
from eggroll_ft.integer_es import IntegerEggroll, IntegerESConfig
from eggroll_ft.mingru_recipe import (ESArgs, MetricsLog, RunArgs, parse_config, resolve_device,
                                      save_atomic, truncate_metrics)
from eggroll_ft.models.mingru import LOGP_UNITS, IntMinGRU, MinGRUConfig, exact_bits, num_params


def held_out_bpb(model: IntMinGRU, windows: torch.Tensor) -> float:
    """Exact bits per byte of the (unperturbed) integer model on the held-out windows (on its device)."""
    logits, _ = model(windows[:, :-1], model.init_state(windows.shape[0]))
    return float(exact_bits(logits, windows[:, 1:]).mean())


def main(argv=None) -> dict:
    run, es_args = parse_config((RunArgs, ESArgs), argv)
    if run.threads > 0:
        torch.set_num_threads(run.threads)
    cfg = MinGRUConfig(d_model=run.d_model, n_layers=run.n_layers, mlp_mult=run.mlp_mult,
                       init_std=es_args.init_std)
    es_cfg = IntegerESConfig(population_size=es_args.population_size, rank=es_args.rank,
                             sigma_shift=es_args.sigma_shift, seed=run.seed,
                             noise_reuse=es_args.noise_reuse, group_size=es_args.group_size,
                             update_fraction=es_args.update_fraction,
                             update_fraction_final=es_args.update_fraction_final, total_steps=run.steps,
                             member_chunk=es_args.member_chunk)
    device = resolve_device(run.device)
    train, held = load_byte_splits(run.data, run.eval_fraction, run.max_bytes)
    windows = eval_windows(held, run.eval_windows, run.eval_len).to(device)
    model = IntMinGRU.init(cfg, run.seed, device=device)  # drawn on the CPU, then moved
    es = IntegerEggroll(model, es_cfg)
    streams = ByteStreams(train, es_cfg.num_streams, run.seq_len, run.seed)  # cursors stay on the CPU
    state = model.init_state(es_cfg.population_size)  # (L, N, D) int8, carried across steps
    step, elapsed = 0, 0.0
    ckpt_path = os.path.join(run.output_dir, "checkpoint.pt")
    if run.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location="cpu")
        model.weights.update({k: w.to(device) for k, w in ck["weights"].items()})
        streams.load_state_dict(ck["streams"])
        state, step, elapsed = ck["state"].to(device), ck["step"], ck["elapsed"]
        truncate_metrics(run.output_dir, step)
    log = MetricsLog(run.output_dir, run.report_to, {**asdict(run), **asdict(es_args)},
                     resume=run.resume and step > 0)
    if step == 0:
        log.log(0, {"eval/bpb": held_out_bpb(model, windows), "time/train_s": 0.0,
                    "info/params": num_params(cfg), "info/unigram_bits": unigram_entropy(held)})
    def checkpoint():
        save_atomic({"weights": {k: w.cpu() for k, w in model.weights.items()}, "shifts": model.shifts,
                     "streams": streams.state_dict(), "state": state.cpu(), "step": step, "elapsed": elapsed,
                     "config": asdict(cfg)}, ckpt_path)

    bar = tqdm(total=run.steps, initial=step, desc="int8 EGGROLL", dynamic_ncols=True)
    stop = min(run.steps, run.stop_at_step or run.steps)
    while step < stop and not (run.max_minutes and elapsed >= 60 * run.max_minutes):
        t0 = time.perf_counter()
        chunk, reset = streams.next()  # (S, T+1), (S,) on the CPU
        chunk, reset = chunk.to(device), reset.to(device)
        state[:, reset[es.members // es_cfg.group_size]] = 0  # a restarted stream starts fresh
        scores, state = es.scores(step, es.rows_from_streams(chunk), state)  # (N,) int32
        info = es.update(step, scores)
        elapsed += time.perf_counter() - t0
        step += 1
        metrics = {"train/bpb": -float(scores.double().mean()) / LOGP_UNITS / run.seq_len,
                   "time/train_s": elapsed, "es/moved_fraction": info["moved_fraction"],
                   "es/tied_pairs": info["tied_pairs"]}
        if step % run.eval_every == 0 or step == run.steps:
            metrics["eval/bpb"] = held_out_bpb(model, windows)
        log.log(step, metrics)
        bar.update(1)
        bar.set_postfix(train=f"{metrics['train/bpb']:.3f}", eval=metrics.get("eval/bpb", ""))
        if step % run.save_every == 0 or step == stop:
            checkpoint()
    bar.close()
    final = {"step": step, "eval/bpb": held_out_bpb(model, windows), "time/train_s": elapsed}
    if step % run.eval_every and step != run.steps:  # stopped by the wall-clock budget
        log.log(step, {"eval/bpb": final["eval/bpb"], "time/train_s": elapsed, "stopped": True})
        checkpoint()
    log.close()
    return final


if __name__ == "__main__":
    print(json.dumps(main()))
