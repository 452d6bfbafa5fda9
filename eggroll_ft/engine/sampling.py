"""Seeded, batch-independent token sampling.

Each row samples with the Gumbel-max trick, ``argmax(logits / T + G)``, where the Gumbel noise
``G`` is a counter-based hash of ``(row seed, position, token id)`` (the same SplitMix64 hash as
``eggroll_ft.noise``). So a job's completion depends only on its own seed and logits: not on the
slot, the batch, the process or the order it ran in. Top-k and top-p mask the logits first, with
per-row values, in one vectorised pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..noise import splitmix64, srl


@dataclass
class SamplingParams:
    """Per-job sampling parameters (one value for all jobs, or broadcast by the engine)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (use greedy=True)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniforms in (0, 1), shape ``(B, V)``, a pure function of (seed, position, token id)."""
    device = seeds.device
    row = splitmix64(splitmix64(seeds.to(torch.int64)) ^ positions.to(device, torch.int64))  # (B,)
    tok = torch.arange(vocab_size, device=device, dtype=torch.int64)
    h = splitmix64(row[:, None] + tok[None, :] * 0x2545F4914F6CDD1D)
    return (srl(h, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sampling_filters(top_k: torch.Tensor, top_p: torch.Tensor) -> bool:
    """Does any row mask its logits with top-k or top-p?"""
    return bool((top_k > 0).any()) or bool((top_p < 1).any())


def sample_tokens(logits: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                  temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  greedy: torch.Tensor, all_greedy: bool | None = None, any_filter: bool | None = None) -> torch.Tensor:
    """Next token per row. logits ``(B, V)``; every other argument ``(B,)``. Returns ``(B,)`` long.

    ``all_greedy`` (``greedy.all()``) and ``any_filter`` (any row with top-k or top-p) may be given
    by a caller that knows them, such as the engine, whose rows change parameters only on refills:
    computed here, each is a host sync."""
    logits = logits.float()
    best = logits.argmax(dim=-1)
    if bool(greedy.all()) if all_greedy is None else all_greedy:
        return best
    B, V = logits.shape
    scaled = logits / temperature.to(logits)[:, None]
    if sampling_filters(top_k, top_p) if any_filter is None else any_filter:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        rank = torch.arange(V, device=logits.device)[None, :]
        k = torch.where(top_k > 0, top_k, V).to(logits.device)[:, None]
        drop = rank >= k
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        cum_before = probs.cumsum(dim=-1) - probs
        drop |= cum_before > top_p.to(logits)[:, None]  # keeps at least the top token
        scaled = torch.full_like(scaled, float("-inf")).scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    u = uniform_noise(seeds, positions, V)
    gumbel = -torch.log(-torch.log(u))
    sampled = (scaled + gumbel).argmax(dim=-1)
    return torch.where(greedy.to(logits.device), best, sampled)
