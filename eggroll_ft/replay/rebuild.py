"""Re-running a logged run: ``replay`` (the weights and optimizer after any step), ``ReplayResume``
(``EggrollTrainer`` resuming from a log) and the command line (``python -m eggroll_ft.replay``).

Boundary: this module re-runs ES updates from logged fitness through ``es_update``; it knows nothing
of generation or rewards, and of the trainer only what ``ReplayResume.replay`` is handed.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import torch
from transformers import TrainerState
from transformers.trainer_utils import set_seed

from ..es_update import apply_es_update
from ..models.loading import load_causal_lm, load_tokenizer
from ..models.named import build_dir_atomically
from ..noise import NoiseConfig
from ..population import Population
from .log import (ReplayHistory, build_optimizer, check_same_run, fitness_tensor, model_digest, noise_fingerprint,
                  params_spec, perturbed_digest, read_log, run_header)


# ---- replaying ----------------------------------------------------------------------------------
def _environment(header: dict) -> str:
    v = header.get("versions", {})
    return (f"the run trained on {header.get('device')} with torch {v.get('torch')} and eggroll_ft {v.get('eggroll_ft')}; "
            "a bit-identical replay needs the same kind of device and the same noise and update code "
            "(verify=False, or --no-verify, replays without checking)")


@torch.no_grad()
def replay_steps(pop: Population, optimizer, history: ReplayHistory, until: int, model: torch.nn.Module, *,
                 lr_scheduler=None, sigma_at=None, verify: bool = True) -> int:
    """Re-run the log's first ``until`` steps as training ran them; returns how many digests matched.

    Per step, as ``EggrollTrainer.training_step`` and ``transformers.Trainer``'s loop do: the
    population moves to the step's noise and sigma; ``apply_es_update`` applies ``lr * g`` in place
    (plain SGD) or sets ``grad = -g``; the gradients are clipped as the Trainer clips them
    (``clip_grad_norm_`` over ``model.parameters()``, with ``inf`` when ``max_grad_norm`` is 0) and
    ``optimizer.step()`` runs. With ``lr_scheduler`` (a resumed run) the scheduler sets the learning
    rate and it must equal the logged one, as ``sigma_at(step)`` must equal the logged sigma;
    without, the logged learning rate is set.
    """
    max_grad_norm = history.header["max_grad_norm"]
    checked = 0
    for rec in history.steps[:until]:
        k, lr, sigma = rec["step"], rec["lr"], rec["sigma"]
        if sigma_at is not None and sigma_at(k) != sigma:
            raise ValueError(f"{history.path}: step {k} ran with sigma={sigma!r}, this run's schedule gives "
                             f"{sigma_at(k)!r} (sigma, sigma_schedule ...)")
        if lr_scheduler is None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        elif optimizer.param_groups[0]["lr"] != lr:
            raise ValueError(f"{history.path}: step {k} ran with learning rate {lr!r}, this run's scheduler gives "
                             f"{optimizer.param_groups[0]['lr']!r} (learning_rate, lr_scheduler_type, warmup ...)")
        pop.set_step(k, sigma)
        apply_es_update(pop, fitness_tensor(rec["fitness"]), optimizer, lr=lr)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf)
        optimizer.step()  # finds no gradient after an in-place SGD update, as in training
        optimizer.zero_grad(set_to_none=True)
        if lr_scheduler is not None:
            lr_scheduler.step()
        if verify and "digest" in rec:
            got = perturbed_digest(pop)
            if got != rec["digest"]:
                raise ValueError(f"{history.path}: after step {k} the replayed weights' digest is {got}, the log's "
                                 f"{rec['digest']}: {_environment(history.header)}")
            checked += 1
    return checked


def load_base(base, header: dict, device=None) -> torch.nn.Module:
    """The model a log starts from: ``base`` (a path or model name, loaded in the log's dtype, or a
    model object), wrapped in the run's PEFT adapter when it trained one. The adapter is
    initialised from the run's seed, as ``EggrollTrainer`` does right before ``get_peft_model``."""
    model = load_causal_lm(os.fspath(base), dtype=header["dtype"]) if isinstance(base, (str, os.PathLike)) else base
    peft = header.get("peft_config")
    if peft is not None and not hasattr(model, "peft_config"):
        from peft import get_peft_config, get_peft_model

        set_seed(header["noise"]["seed"])
        model = get_peft_model(model, get_peft_config(dict(peft)))
    if device is not None:
        model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def check_base(digest: str, header: dict, where: str) -> None:
    """Raise unless ``digest`` (``model_digest`` of a model) is the log's base's."""
    if digest != header["base_digest"]:
        adapter = f", with its adapter initialised from seed {header['noise']['seed']}" if header.get("peft_config") else ""
        raise ValueError(f"{where}: the base's digest is {digest}, the log's base_digest is {header['base_digest']}: "
                         f"not the model the run started from ({header.get('base')!r} in {header.get('dtype')}"
                         f"{adapter})")


@dataclass
class Replayed:
    """The result of ``replay``: the model (hooks removed) and optimizer after ``step`` steps."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: int
    digests_checked: int


def replay(base, log, until_step: int | None = None, *, verify: bool = True, device=None) -> Replayed:
    """Rebuild a run's weights after ``until_step`` steps (default: every complete step of the log)
    from its base model and its replay log.

    ``base``: a path, a model name or a model object holding the base weights (the PEFT adapter
    of a PEFT run is added here). ``until_step=K`` gives the weights of the run's checkpoint-K.
    With ``verify`` the base's digest, the noise generator and every passed step's digest are
    checked against the log. ``device``: default the run's when available, else CPU.
    """
    history = log if isinstance(log, ReplayHistory) else read_log(log)
    header, n = history.header, len(history.steps)
    until = n if until_step is None else until_step
    if not isinstance(until, int) or not 0 <= until <= n:
        raise ValueError(f"until_step={until_step!r} must lie in [0, {n}]: {history.path} holds {n} complete steps")
    if device is None:
        device = header["device"] if header["device"] != "cuda" or torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    model = load_base(base, header, device)
    if verify:
        where = f"base={base if isinstance(base, (str, os.PathLike)) else type(base).__name__}"
        check_base(model_digest(model), header, where)
        if noise_fingerprint(header["noise"]["seed"], device) != header["noise_fingerprint"]:
            raise ValueError(f"{history.path}: this eggroll_ft on {device} generates other noise than the run's: "
                             + _environment(header))
    names = [name.removesuffix(".weight") for name, _, _ in header["params"]]
    pop = Population(model, NoiseConfig(**header["noise"]), header["population_size"], sigma=1.0, perturb_modules=names)
    try:
        check_same_run(header, {"params": params_spec(pop)}, history.path, ("params",))
        optimizer = build_optimizer(header["optimizer"], [p.weight for p in pop.params.values()])
        checked = replay_steps(pop, optimizer, history, until, model, verify=verify)
    finally:
        pop.remove()
    return Replayed(model, optimizer, until, checked)


class ReplayResume:
    """``EggrollTrainer.train(resume_from_checkpoint=LOG)``: resume a run from its log.

    ``transformers.Trainer`` resumes from a checkpoint directory. This one is a temporary directory
    holding only ``trainer_state.json`` at the log's last complete step, so the Trainer skips the
    prompts already used exactly as it does for a normal checkpoint. The trainer hands over its
    calls that would load weights, optimizer and scheduler from that directory to ``replay``, which
    re-runs the logged steps over its model (the base) through its own optimizer and scheduler.
    """

    def __init__(self, path, args):
        self.history = read_log(path)
        self.checkpoint_dir = tempfile.mkdtemp(prefix="es-replay-resume-")
        state = TrainerState(global_step=len(self.history.steps), train_batch_size=args.train_batch_size,
                             logging_steps=args.logging_steps, eval_steps=args.eval_steps, save_steps=args.save_steps)
        state.save_to_json(os.path.join(self.checkpoint_dir, "trainer_state.json"))

    def replay(self, population: Population, model, optimizer, lr_scheduler, args) -> None:
        """Checks that ``model`` is the log's base and this run the log's run, then replays."""
        where = f"resume_from_checkpoint={self.history.path!r}"
        ours = run_header(population, model, optimizer, args.max_grad_norm)
        check_base(ours["base_digest"], self.history.header, where)
        check_same_run(self.history.header, ours, where)
        replay_steps(population, optimizer, self.history, len(self.history.steps), model,
                     lr_scheduler=lr_scheduler, sigma_at=args.sigma_at)

    def close(self) -> None:
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)


# ---- command line -------------------------------------------------------------------------------
def save_checkpoint(model, output_dir: str, tokenizer=None) -> str:
    """``save_pretrained`` (a PEFT model writes its adapter) into ``output_dir``, atomically."""
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ValueError(f"output_dir={output_dir!r} exists and is not empty")

    def build(tmp: str) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return build_dir_atomically(output_dir, build)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eggroll_ft.replay", description=(
        "Rebuild a run's checkpoint from its base model and its es_replay.jsonl log."))
    parser.add_argument("base", help="the base model the run started from: a path or a model name")
    parser.add_argument("log", help="the run's es_replay.jsonl")
    parser.add_argument("--step", type=int, default=None, help="how many steps to replay (default: all complete steps)")
    parser.add_argument("--output_dir", required=True, help="where to write the checkpoint (new or empty)")
    parser.add_argument("--device", default=None, help="default: the run's device when available, else cpu")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="do not check digests")
    a = parser.parse_args(argv)
    out = replay(a.base, a.log, a.step, verify=a.verify, device=a.device)
    try:
        tokenizer = load_tokenizer(out.model, a.base)
    except (OSError, ValueError) as e:  # a base saved without its tokenizer
        print(f"no tokenizer saved: {e}", file=sys.stderr)
        tokenizer = None
    save_checkpoint(out.model, a.output_dir, tokenizer)
    print(f"replayed {out.step} steps of {a.log} over {a.base} ({out.digests_checked} digests checked) -> {a.output_dir}")

