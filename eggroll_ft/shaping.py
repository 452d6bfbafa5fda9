"""Fitness shaping: raw rewards -> the fitness the ES update weights each member by.

Higher fitness is better, everywhere in eggroll_ft. These are small pure functions on tensors,
with the conventions of evosax/OpenES. NaN marks a missing reward (TRL's ``None``): NaN entries
are skipped in every mean and std, and an entry with no valid reward gets fitness 0.

Metrics are computed on raw rewards before shaping (see the trainer); these functions only shape.
"""
from __future__ import annotations

import torch

from .config import SHAPINGS


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    """Population std (ddof=0) over the non-NaN entries; 0 when none are valid."""
    valid = ~torch.isnan(x)
    if not valid.any():
        return x.new_zeros(())
    v = x[valid]
    return ((v - v.mean()) ** 2).mean().sqrt()


def zscore(rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Global z-score over all entries.

    >>> zscore(torch.tensor([1., 2., 3., float('nan')]))
    tensor([-1.2247,  0.0000,  1.2247,  0.0000])
    """
    mean = torch.nanmean(rewards) if (~torch.isnan(rewards)).any() else rewards.new_zeros(())
    out = (rewards - mean) / (_nanstd(rewards) + eps)
    return torch.nan_to_num(out, nan=0.0)


def group_norm(rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-prompt normalisation of a ``(num_prompts, population_size)`` reward table.

    Subtract the mean over the members that answered the same prompt (a row), then divide by
    the std of all the centred values (the EGGROLL reference's global std).

    >>> group_norm(torch.tensor([[1., 3.], [10., 10.]]))
    tensor([[-1.4142,  1.4142],
            [ 0.0000,  0.0000]])
    """
    if rewards.dim() != 2:
        raise ValueError(f"group_norm expects (num_prompts, population_size) rewards, got shape {tuple(rewards.shape)}")
    valid = ~torch.isnan(rewards)
    counts = valid.sum(dim=1, keepdim=True).clamp(min=1)
    means = torch.where(valid, rewards, 0.0).sum(dim=1, keepdim=True) / counts
    centred = rewards - means
    return torch.nan_to_num(centred / (_nanstd(centred) + eps), nan=0.0)


def centered_rank(rewards: torch.Tensor) -> torch.Tensor:
    """Ranks mapped linearly onto [-0.5, 0.5] (OpenES, Salimans et al. 2017); ties get the mean rank.

    >>> centered_rank(torch.tensor([3., 1., 2.]))
    tensor([ 0.5000, -0.5000,  0.0000])
    >>> centered_rank(torch.tensor([1., 1., 5., float('nan')]))
    tensor([-0.2500, -0.2500,  0.5000,  0.0000])
    """
    flat = rewards.flatten()
    out = torch.zeros_like(flat)
    valid = ~torch.isnan(flat)
    v = flat[valid]
    n = v.numel()
    if n < 2:
        return out.view_as(rewards)
    sorted_v, order = torch.sort(v, stable=True)
    ranks = torch.empty(n, dtype=flat.dtype, device=flat.device)
    ranks[order] = torch.arange(n, dtype=flat.dtype, device=flat.device)
    # average the ranks of tied values
    uniq, inverse = torch.unique(v, return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=flat.dtype, device=flat.device).index_add_(0, inverse, ranks)
    cnts = torch.zeros(uniq.numel(), dtype=flat.dtype, device=flat.device).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / cnts)[inverse]
    out[valid] = ranks / (n - 1) - 0.5
    return out.view_as(rewards)


def shape_fitness(rewards: torch.Tensor, method: str) -> torch.Tensor:
    """Shape a ``(num_prompts, population_size)`` reward table into per-member fitness ``(population_size,)``.

    ``group_norm`` normalises per prompt first; the others shape the per-member mean reward.
    A member whose rewards are all missing gets fitness 0.
    """
    if rewards.dim() == 1:
        rewards = rewards[None, :]
    if method == "group_norm":
        shaped = group_norm(rewards)
        return shaped.mean(dim=0)
    valid = ~torch.isnan(rewards)
    per_member = torch.where(valid, rewards, 0.0).sum(0) / valid.sum(0).clamp(min=1)
    per_member = torch.where(valid.any(0), per_member, torch.nan)
    if method == "zscore":
        return zscore(per_member)
    if method == "centered_rank":
        return centered_rank(per_member)
    if method == "none":
        return torch.nan_to_num(per_member, nan=0.0)
    raise ValueError(f"fitness_shaping={method!r} must be one of {SHAPINGS}")
