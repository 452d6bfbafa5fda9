"""Generation backends: one contract for turning jobs into completions, and the ``generate`` backend.

A backend knows nothing of rewards, fitness or the update. Every backend implements

    generate(prompt_ids, members, seeds, max_new_tokens, sampling) -> GenerationOutput

* ``prompt_ids``: ``J`` lists of prompt token ids (unpadded, at least one token each);
* ``members``: int64 ``(J,)``, the population member each job runs (``-1``: the unperturbed model);
* ``seeds``: int64 ``(J,)``, each job's sampling seed (``noise.job_seed``; unused when greedy);
* ``max_new_tokens``: the most tokens generated per job;
* ``sampling``: ``SamplingParams`` shared by the call's jobs (temperature, top-p, top-k, greedy);

and returns ``GenerationOutput`` in job order: ``completion_ids[j]`` (with the EOS token that ended
it, if any) and ``finish_reasons[j]`` in ``"eos" | "stop" | "length"``. The trainer calls it once
per chunk of jobs (``distributed.run_sharded``), on each process for its own chunks, so a backend
never sees other processes' jobs.

Backends: ``PopulationEngine`` (``engine.py``: continuous batching, per-row members, sampling
keyed by each job's seed; the default) and ``HFGenerateBackend`` (here: transformers'
``model.generate`` inside the population's ``members`` block, a fallback and a reference).
"""
from __future__ import annotations

from typing import Protocol

import torch

from .engine import FINISH_EOS, FINISH_LENGTH, GenerationOutput
from .sampling import SamplingParams


class GenerationBackend(Protocol):
    """What ``EggrollTrainer`` needs from a generation backend (see the module docstring)."""

    def generate(self, prompt_ids: list[list[int]], members: torch.Tensor, seeds: torch.Tensor,
                 max_new_tokens: int, sampling: SamplingParams) -> GenerationOutput: ...


class HFGenerateBackend:
    """Completions from transformers' ``model.generate``; each batch row runs its own member.

    Sampling uses torch's global generator, seeded per batch from the batch's first job seed (inside
    ``torch.random.fork_rng``, so the caller's random state is untouched): a job's completion depends
    on the batch it runs in, and batches are the trainer's chunks of jobs
    (``max_sequences_in_flight``), so a run is reproducible for any number of processes when that is
    set. Stop strings are not supported (``PopulationEngine`` has them).
    """

    def __init__(self, model, population, tokenizer, eos_token_ids, max_batch_size: int | None = None,
                 stop_strings=None):
        if stop_strings:
            raise ValueError(f"stop_strings={list(stop_strings)!r}: the 'hf' generation backend does not support "
                             "stop strings; use generation_backend='engine'")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        self.model, self.population, self.tokenizer = model, population, tokenizer
        self.eos_token_ids = [int(e) for e in eos_token_ids]
        self.max_batch_size = max_batch_size

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], members: torch.Tensor, seeds: torch.Tensor,
                 max_new_tokens: int, sampling: SamplingParams) -> GenerationOutput:
        tok, device = self.tokenizer, next(self.model.parameters()).device
        members = torch.as_tensor(members, dtype=torch.long).expand(len(prompt_ids))
        seeds = torch.as_tensor(seeds, dtype=torch.long).expand(len(prompt_ids))
        sample = dict(temperature=None, top_p=None, top_k=None) if sampling.greedy else dict(
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        batch_size = self.max_batch_size or max(len(prompt_ids), 1)
        ids_out, reasons = [], []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for s in range(0, len(prompt_ids), batch_size):
                torch.manual_seed(int(seeds[s]) & (2**63 - 1))
                batch = tok.pad({"input_ids": prompt_ids[s:s + batch_size]}, padding=True, return_tensors="pt")
                with self.population.members(members[s:s + batch_size]):
                    out = self.model.generate(
                        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                        max_new_tokens=max_new_tokens, do_sample=not sampling.greedy, eos_token_id=self.eos_token_ids,
                        pad_token_id=tok.pad_token_id, **sample)
                for row in out[:, batch["input_ids"].shape[1]:].tolist():
                    end = next((i + 1 for i, t in enumerate(row) if t in self.eos_token_ids), None)
                    ids_out.append(row[:end] if end else row)
                    reasons.append(FINISH_EOS if end else FINISH_LENGTH)
        return GenerationOutput(ids_out, reasons)
