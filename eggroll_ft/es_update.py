"""The ES update: shaped fitness -> an ascent direction for every perturbed weight.

EGGROLL (Sarkar et al. 2025, arXiv 2511.16652, Sec. 3), the OpenES estimator with low-rank E_i:

    g = 1 / (N * sigma) * sum_i f_i E_i,        E_i = A_i B_i^T / sqrt(r)

With antithetic pairs (members 2k, 2k+1 share A_k, B_k with signs +1, -1) the sum collapses to
one term per pair weighted by ``w_k = f_2k - f_2k+1``, and per weight it is a matmul,
``A^T diag(w) B`` with ``A`` laid out ``(m, K r)`` and ``B`` ``(n, K r)``. It is accumulated over
chunks of noise indices, ``g = sum_c A_c^T diag(w_c) B_c``, each chunk's factors regenerated
(``Population.factors``), so the update holds ``chunk x r (m + n)`` noise floats at a time, not
``K r (m + n)``. The chunks depend only on the
weight's shape, so every process computes the same sums in the same order. No per-member ``E_i``
is ever materialised. Full-rank mode sums dense ``E_k`` (OpenES), chunk by chunk as well.

This module knows nothing of rewards or generation; it returns or applies the direction ``g``.
Ascent: parameters move *along* ``g``. Through a torch optimizer that means ``grad = -g``.
"""
from __future__ import annotations

import math

import torch
from accelerate.optimizer import AcceleratedOptimizer

from .noise import MAX_FLOATS_PER_CALL
from .population import Population


def noise_weights(fitness: torch.Tensor, antithetic: bool) -> torch.Tensor:
    """Per-noise-draw weights: ``f_2k - f_2k+1`` for antithetic pairs, else ``f_i``.

    >>> noise_weights(torch.tensor([3., 1., 0., 2.]), antithetic=True)
    tensor([ 2., -2.])
    """
    fitness = fitness.to(torch.float32)
    return fitness[0::2] - fitness[1::2] if antithetic else fitness


def update_chunk_size(pop: Population, name: str) -> int:
    """Noise indices per chunk of the update of weight ``name``: ``MAX_FLOATS_PER_CALL`` noise floats.

    A function of the weight's shape and the rank only, so the sums (and their rounding) are the
    same on every process and for every population size."""
    m, n = pop.params[name].shape
    per_index = m * n if pop.noise.full_rank else pop.noise.rank * (m + n)
    return max(1, MAX_FLOATS_PER_CALL // per_index)


def es_direction(pop: Population, name: str, weights: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """``g`` for one weight, in the stored weight's layout, float32; ``weights (K,)`` per noise index.

    ``chunk_size`` noise indices per chunk (default ``update_chunk_size``)."""
    N, sigma = pop.population_size, pop.sigma
    p = pop.params[name]
    m, n = p.shape
    chunk = chunk_size or update_chunk_size(pop, name)
    w_all = weights.to(p.weight.device, torch.float32)
    K = w_all.numel()
    g = torch.zeros(m, n, device=p.weight.device)
    for start in range(0, K, chunk):
        idx = torch.arange(start, min(K, start + chunk), device=p.weight.device)
        w = w_all[start:start + idx.numel()]  # (c,)
        if pop.noise.full_rank:
            (E,) = pop.factors(name, idx)  # (c, m, n)
            g.view(-1).addmv_(E.view(idx.numel(), m * n).T, w)
        else:
            A, B = pop.factors(name, idx)  # (c, m, r), (c, n, r)
            a = (A * w[:, None, None]).permute(1, 0, 2).reshape(m, -1)  # (m, c r)
            b = B.permute(1, 0, 2).reshape(n, -1)  # (n, c r)
            g.addmm_(a, b.T)  # one matmul per chunk
    if not pop.noise.full_rank:
        g /= math.sqrt(pop.noise.rank)
    return p.as_param_layout(g / (N * sigma))


def es_directions(pop: Population, fitness: torch.Tensor, chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """``g`` for every perturbed weight, given per-member fitness ``(population_size,)``."""
    if fitness.numel() != pop.population_size:
        raise ValueError(f"fitness has {fitness.numel()} entries, population_size={pop.population_size}")
    w = noise_weights(fitness.flatten(), pop.noise.antithetic)
    return {name: es_direction(pop, name, w, chunk_size) for name in pop.params}


def is_plain_sgd(optimizer) -> bool:
    """True when ``optimizer.step()`` would be exactly ``p -= lr * grad`` (so it can be fused)."""
    if isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.SGD):
        return False
    return all(g.get("momentum", 0) == 0 and g.get("weight_decay", 0) == 0 and not g.get("maximize", False)
               for g in optimizer.param_groups)


@torch.no_grad()
def apply_es_update(pop: Population, fitness: torch.Tensor, optimizer=None, lr: float | None = None,
                    chunk_size: int | None = None) -> float:
    """Compute ``g`` weight by weight and hand it to the optimizer; returns ``||g||``.

    * plain SGD (the paper's update, the default): ``W += lr * g`` in place, one weight at a time,
      so no gradient buffer the size of the model is ever allocated; ``lr`` defaults to the
      optimizer's, and is required when there is no optimizer;
    * any other optimizer (Adam, AdamW, SGD with momentum): ``W.grad = -g`` for the caller's
      ``optimizer.step()``.
    """
    if fitness.numel() != pop.population_size:
        raise ValueError(f"fitness has {fitness.numel()} entries, population_size={pop.population_size}")
    if optimizer is None and lr is None:
        raise ValueError("apply_es_update needs a learning rate: pass lr=..., or an optimizer to take it from "
                         "(got optimizer=None and lr=None)")
    w = noise_weights(fitness.flatten(), pop.noise.antithetic)
    fused = optimizer is None or is_plain_sgd(optimizer)
    if fused and lr is None:
        lr = optimizer.param_groups[0]["lr"]
    sq = 0.0
    for name, p in pop.params.items():
        g = es_direction(pop, name, w, chunk_size)
        sq += float(g.double().pow(2).sum())
        if fused:
            p.weight.add_(g.to(p.weight.dtype), alpha=lr)
        else:
            p.weight.grad = (-g).to(p.weight.dtype)
    return math.sqrt(sq)
