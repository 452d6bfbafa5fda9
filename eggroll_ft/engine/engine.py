"""Population generation engine.

The engine knows nothing of rewards or of the update: it turns prompt token ids and member ids
into completion ids. Each job is ``(prompt ids, member id, seed, sampling parameters)``; rows of a
batch run different members through the population hooks (``Population.members``), so a whole
population decodes as one batched inference.

Jobs are processed in chunks of at most ``max_sequences_in_flight`` rows. Sampling is keyed by
each job's seed (``sampling.sample_tokens``), so a job's completion does not depend on the chunk
or slot it ran in. A row finishes on an EOS token, on a stop string, or at ``max_new_tokens``.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .adapters import adapter_for
from .sampling import SamplingParams, sample_tokens

FINISH_EOS, FINISH_STOP, FINISH_LENGTH = "eos", "stop", "length"


@dataclass
class GenerationOutput:
    """Completions in job order. ``completion_ids[j]`` includes the EOS token when one ended it."""

    completion_ids: list[list[int]]
    finish_reasons: list[str]
    lengths: list[int] = field(init=False)

    def __post_init__(self):
        self.lengths = [len(c) for c in self.completion_ids]


def _per_job(value, n: int, dtype) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype)
    return t.expand(n).clone() if t.dim() == 0 else t


class PopulationEngine:
    """Batched generation where every row may be a different population member.

    >>> engine = PopulationEngine(model, population=pop, eos_token_ids=[tok.eos_token_id],  # doctest: +SKIP
    ...                           pad_token_id=tok.pad_token_id)
    >>> out = engine.generate(prompt_ids, members=torch.arange(8), seeds=torch.arange(8),     # doctest: +SKIP
    ...                       max_new_tokens=32, sampling=SamplingParams(greedy=True))
    """

    def __init__(self, model, population=None, eos_token_ids=(), pad_token_id: int = 0,
                 max_sequences_in_flight: int | None = None, tokenizer=None, stop_strings=None):
        self.model = model
        self.population = population
        self.adapter = adapter_for(model)
        self.eos_token_ids = sorted({int(e) for e in eos_token_ids if e is not None})
        self.pad_token_id = int(pad_token_id)
        self.max_sequences_in_flight = max_sequences_in_flight
        self.stop_strings = list(stop_strings or [])
        if self.stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode completions")
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], members=None, seeds=None, max_new_tokens: int = 64,
                 sampling: SamplingParams | None = None, temperature=None, top_p=None, top_k=None,
                 greedy=None) -> GenerationOutput:
        """Generate one completion per job.

        ``members``, ``seeds`` and the per-job sampling overrides (``temperature`` ...) are scalars
        or ``(J,)`` sequences; members default to -1 (the unperturbed model).
        """
        J = len(prompt_ids)
        if J == 0:
            return GenerationOutput([], [])
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt must have at least one token")
        sp = sampling or SamplingParams()
        members = _per_job(-1 if members is None else members, J, torch.long)
        seeds = _per_job(0 if seeds is None else seeds, J, torch.long)
        temp = _per_job(sp.temperature if temperature is None else temperature, J, torch.float32)
        tp = _per_job(sp.top_p if top_p is None else top_p, J, torch.float32)
        tk = _per_job(sp.top_k if top_k is None else top_k, J, torch.long)
        gr = _per_job(sp.greedy if greedy is None else greedy, J, torch.bool)
        if members.numel() != J or seeds.numel() != J:
            raise ValueError(f"{J} prompts but {members.numel()} member ids and {seeds.numel()} seeds")
        chunk = self.max_sequences_in_flight or J
        ids: list[list[int]] = []
        reasons: list[str] = []
        for start in range(0, J, chunk):
            sl = slice(start, min(start + chunk, J))
            c_ids, c_reasons = self._generate_chunk(prompt_ids[sl], members[sl], seeds[sl], max_new_tokens,
                                                    temp[sl], tk[sl], tp[sl], gr[sl])
            ids += c_ids
            reasons += c_reasons
        return GenerationOutput(ids, reasons)

    def _generate_chunk(self, prompts, members, seeds, max_new_tokens, temp, top_k, top_p, greedy):
        device = self.device
        B = len(prompts)
        T = max(len(p) for p in prompts)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding
            input_ids[b, T - len(p):] = torch.as_tensor(p, dtype=torch.long)
            mask[b, T - len(p):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        seeds, temp, top_k, top_p, greedy = (x.to(device) for x in (seeds, temp, top_k, top_p, greedy))
        eos = torch.as_tensor(self.eos_token_ids, dtype=torch.long, device=device)
        ctx = self.population.members(members) if self.population is not None else nullcontext()
        out = torch.full((B, max_new_tokens), self.pad_token_id, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        reason = [FINISH_LENGTH] * B
        lengths = [max_new_tokens] * B
        with ctx:
            logits, cache = self.adapter.prefill(input_ids, mask)  # (B, V)
            for t in range(max_new_tokens):
                pos = torch.full((B,), t, dtype=torch.long, device=device)
                tok = sample_tokens(logits, seeds, pos, temp, top_k, top_p, greedy)  # (B,)
                tok = torch.where(done, torch.full_like(tok, self.pad_token_id), tok)
                out[:, t] = tok
                newly = ~done & torch.isin(tok, eos) if eos.numel() else torch.zeros_like(done)
                for b in newly.nonzero().flatten().tolist():
                    reason[b], lengths[b] = FINISH_EOS, t + 1
                done |= newly
                if self.stop_strings:
                    for b in (~done).nonzero().flatten().tolist():
                        text = self.tokenizer.decode(out[b, : t + 1].tolist())
                        if any(s in text for s in self.stop_strings):
                            done[b] = True
                            reason[b], lengths[b] = FINISH_STOP, t + 1
                if bool(done.all()) or t == max_new_tokens - 1:
                    break
                logits, cache = self.adapter.decode(tok, cache)
        out_list = out.tolist()
        return [out_list[b][: lengths[b]] for b in range(B)], reason
