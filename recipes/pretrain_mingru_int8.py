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
a run can move between devices. The float backprop baseline (``pretrain_mingru_float.py``) reuses
the helpers here.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import yaml
from tqdm import tqdm
from transformers import HfArgumentParser

from eggroll_ft.bytes_data import MINIPILE, ByteStreams, eval_windows, load_byte_splits, unigram_entropy
from eggroll_ft.integer_es import IntegerEggroll, IntegerESConfig
from eggroll_ft.models.mingru import LOGP_UNITS, IntMinGRU, MinGRUConfig, exact_bits, num_params


@dataclass
class RunArgs:
    """Data, budget, evaluation and bookkeeping (shared with the float baseline)."""

    config: str = field(default=None, metadata={"help": "YAML file of defaults; command-line flags win"})
    data: str = field(default=MINIPILE, metadata={"help": "local text file, or a datasets name"})
    output_dir: str = field(default="runs/mingru", metadata={"help": "metrics.jsonl + checkpoint.pt"})
    max_bytes: int = field(default=0, metadata={"help": "cap on training bytes (0 = all)"})
    eval_fraction: float = field(default=0.05, metadata={"help": "tail of a local file held out"})
    d_model: int = field(default=64, metadata={"help": "width D"})
    n_layers: int = field(default=2, metadata={"help": "number of minGRU blocks L"})
    mlp_mult: int = field(default=4, metadata={"help": "MLP hidden = mlp_mult * D"})
    seq_len: int = field(default=16, metadata={"help": "bytes per window (truncation length)"})
    steps: int = field(default=1000, metadata={"help": "update steps (schedule length)"})
    max_minutes: float = field(default=0.0, metadata={"help": "stop after this training wall-clock (0 = off)"})
    stop_at_step: int = field(default=0, metadata={"help": "stop (checkpointed) here, schedule unchanged (0 = off)"})
    eval_every: int = field(default=50, metadata={"help": "steps between held-out evaluations"})
    eval_windows: int = field(default=16, metadata={"help": "held-out windows, read from a zero state"})
    eval_len: int = field(default=256, metadata={"help": "bytes scored per held-out window"})
    save_every: int = field(default=100, metadata={"help": "steps between checkpoints"})
    seed: int = field(default=0, metadata={"help": "seed of the init, the noise and the streams"})
    resume: bool = field(default=False, metadata={"help": "continue from <output_dir>/checkpoint.pt"})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard | wandb"})
    threads: int = field(default=0, metadata={"help": "torch threads (0 = torch default)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available, else cpu) | cpu | cuda | cuda:N"})

    def __post_init__(self):
        if self.report_to not in ("none", "tensorboard", "wandb"):
            raise ValueError(f"report_to={self.report_to!r} must be none, tensorboard or wandb")
        if self.device != "auto":
            torch.device(self.device)  # raises on a malformed device name
        for name in ("seq_len", "steps", "eval_every", "eval_windows", "eval_len", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


@dataclass
class ESArgs:
    """Integer EGGROLL hyper-parameters (see ``eggroll_ft.integer_es.IntegerESConfig``)."""

    population_size: int = field(default=512, metadata={"help": "members per step (even)"})
    group_size: int = field(default=2, metadata={"help": "members sharing one byte stream"})
    rank: int = field(default=1, metadata={"help": "rank of each int8 perturbation"})
    sigma_shift: int = field(default=8, metadata={"help": "perturbation = A B^T >> sigma_shift"})
    noise_reuse: int = field(default=1, metadata={"help": "steps sharing one noise draw"})
    update_fraction: float = field(default=0.05, metadata={"help": "fraction moved by +-1 at step 0"})
    update_fraction_final: float = field(default=0.005, metadata={"help": "... at the last step"})
    init_std: int = field(default=16, metadata={"help": "std of the int8 weight init"})
    member_chunk: int = field(default=0, metadata={"help": "members per forward call (0 = all)"})


def parse_config(dataclass_types, argv=None, section: str | None = None):
    """HfArgumentParser over ``dataclass_types``: ``--config`` YAML sets defaults, flags override.

    Mapping-valued keys of the YAML are sections for sibling recipes (``float:`` holds the
    baseline's keys); ``section`` names the one merged here. Unknown keys raise.
    """
    parser = HfArgumentParser(dataclass_types)
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--config" in argv:
        with open(argv[argv.index("--config") + 1]) as f:
            raw = yaml.safe_load(f) or {}
        defaults = {k: v for k, v in raw.items() if not isinstance(v, dict)}
        defaults.update(raw.get(section) or {} if section else {})
        known = {f.dest for f in parser._actions}
        unknown = sorted(set(defaults) - known)
        if unknown:
            raise ValueError(f"config {argv[argv.index('--config') + 1]} has unknown keys {unknown}")
        parser.set_defaults(**defaults)
    return parser.parse_args_into_dataclasses(args=argv)


class MetricsLog:
    """``metrics.jsonl`` always (appended, so a resumed run continues it), tensorboard/wandb on demand."""

    def __init__(self, output_dir: str, report_to: str, config: dict, resume: bool):
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "metrics.jsonl")
        self.file = open(path, "a" if resume else "w")
        self.tb = self.wandb = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(output_dir, "tb"))
        elif report_to == "wandb":
            import wandb
            self.wandb = wandb.init(config=config, dir=output_dir, resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        for k, v in metrics.items():
            if self.tb is not None:
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; any other name as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def save_atomic(obj, path: str) -> None:
    """``torch.save`` to a temporary file then ``os.replace``: a crash never leaves half a checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def truncate_metrics(output_dir: str, step: int) -> None:
    """On resume, drop metric lines written after the checkpoint (they will be produced again)
    and the extra evaluation logged when the previous run stopped early."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            keep = [ln for ln in f if json.loads(ln)["step"] <= step and "stopped" not in json.loads(ln)]
        with open(path, "w") as f:
            f.writelines(keep)


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
