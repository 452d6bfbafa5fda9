"""Float backprop baseline for the integer minGRU recipe: same architecture, data and budget, Adam.

    python recipes/pretrain_mingru_float.py --config recipes/configs/mingru/tiny_cpu.yaml \
        --data ../shared/data/text/austen.txt --output_dir runs/mingru_float

The model is ``eggroll_ft.models.mingru.FloatMinGRU``: the architecture written once in
``mingru_forward``, run with float32 operations (mean-abs norm, sigmoid gate, ReLU MLP), so the
parameter count equals the integer model's. Training is truncated backprop through time over the
same byte streams (``batch_streams`` cursors, ``seq_len`` bytes per step, state carried and
detached), with Adam. It reads the same YAML config as ``pretrain_mingru_int8.py`` (ES-only keys
are accepted and ignored; its ``float:`` section holds the keys below) and logs the same metrics
(``eval/bpb`` on the same held-out windows, ``time/train_s``) to ``metrics.jsonl``; checkpoints and
``--resume`` work the same way, and so does ``--device`` (plain float torch: model, windows and
state on the device; the checkpoint loads onto the run's device). Its helpers (config parsing,
logging, atomic saves, the device choice) are ``eggroll_ft.mingru_recipe``, shared with the int8 recipe.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from eggroll_ft.bytes_data import ByteStreams, eval_windows, load_byte_splits, unigram_entropy
from eggroll_ft.mingru_recipe import (ESArgs, MetricsLog, RunArgs, parse_config, resolve_device,
                                      save_atomic, truncate_metrics)
from eggroll_ft.models.mingru import FloatMinGRU, MinGRUConfig, num_params


@dataclass
class FloatArgs:
    """Backprop hyper-parameters."""

    lr: float = field(default=3e-3, metadata={"help": "Adam learning rate"})
    batch_streams: int = field(default=32, metadata={"help": "byte streams per step (batch size)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 = off)"})


def held_out_bpb(model: FloatMinGRU, windows: torch.Tensor) -> float:
    with torch.no_grad():
        logits, _ = model(windows[:, :-1], model.init_state(windows.shape[0]))
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return float(nll) / math.log(2)


def main(argv=None) -> dict:
    run, es_args, fl = parse_config((RunArgs, ESArgs, FloatArgs), argv, section="float")
    if run.threads > 0:
        torch.set_num_threads(run.threads)
    torch.manual_seed(run.seed)
    cfg = MinGRUConfig(d_model=run.d_model, n_layers=run.n_layers, mlp_mult=run.mlp_mult)
    device = resolve_device(run.device)
    train, held = load_byte_splits(run.data, run.eval_fraction, run.max_bytes)
    windows = eval_windows(held, run.eval_windows, run.eval_len).to(device)
    model = FloatMinGRU(cfg, run.seed).to(device)  # drawn on the CPU, then moved
    opt = torch.optim.Adam(model.parameters(), lr=fl.lr)
    streams = ByteStreams(train, fl.batch_streams, run.seq_len, run.seed)
    state = model.init_state(fl.batch_streams)  # (L, B, D), carried and detached
    step, elapsed = 0, 0.0
    ckpt_path = os.path.join(run.output_dir, "checkpoint.pt")
    if run.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location="cpu")  # the loads below move it to the model's device
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        streams.load_state_dict(ck["streams"])
        state, step, elapsed = ck["state"].to(device), ck["step"], ck["elapsed"]
        truncate_metrics(run.output_dir, step)
    log = MetricsLog(run.output_dir, run.report_to, {**asdict(run), **asdict(fl)}, resume=run.resume and step > 0)
    if step == 0:
        log.log(0, {"eval/bpb": held_out_bpb(model, windows), "time/train_s": 0.0,
                    "info/params": num_params(cfg), "info/unigram_bits": unigram_entropy(held)})

    def checkpoint():
        save_atomic({"model": {k: v.cpu() for k, v in model.state_dict().items()}, "optimizer": opt.state_dict(),
                     "streams": streams.state_dict(), "state": state.cpu(), "step": step, "elapsed": elapsed,
                     "config": asdict(cfg)}, ckpt_path)

    bar = tqdm(total=run.steps, initial=step, desc="float Adam", dynamic_ncols=True)
    stop = min(run.steps, run.stop_at_step or run.steps)
    while step < stop and not (run.max_minutes and elapsed >= 60 * run.max_minutes):
        t0 = time.perf_counter()
        chunk, reset = streams.next()  # (B, T+1), (B,) on the CPU
        chunk, reset = chunk.to(device), reset.to(device)
        state = torch.where(reset.view(1, -1, 1), 0.0, state)
        logits, state = model(chunk[:, :-1], state)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        if fl.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), fl.grad_clip)
        opt.step()
        state = state.detach()
        elapsed += time.perf_counter() - t0
        step += 1
        metrics = {"train/bpb": float(loss.detach()) / math.log(2), "time/train_s": elapsed}
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
