"""The ES update: shaped fitness -> an ascent direction for every perturbed weight.

EGGROLL (Sarkar et al. 2025, arXiv 2511.16652, Sec. 3), the OpenES estimator with low-rank E_i:

    g = 1 / (N * sigma) * sum_i f_i E_i,        E_i = A_i B_i^T / sqrt(r)

With antithetic pairs (members 2k, 2k+1 share A_k, B_k with signs +1, -1) the sum collapses to
one term per pair weighted by ``f_2k - f_2k+1``, and per weight it is one matmul,
``(A^T diag(w) B)``, with ``A`` laid out ``(m, K r)`` and ``B`` ``(n, K r)``. No per-member
``E_i`` is ever materialised. Full-rank mode sums dense ``E_k`` (OpenES).

This module knows nothing of rewards or generation; it reads the noise from the ``Population``
(the same cached factors the forward used) and returns or applies the direction ``g``.
Ascent: parameters move *along* ``g``. Through a torch optimizer that means ``grad = -g``.
"""
from __future__ import annotations

import math

import torch

from .population import Population


def noise_weights(fitness: torch.Tensor, antithetic: bool) -> torch.Tensor:
    """Per-noise-draw weights: ``f_2k - f_2k+1`` for antithetic pairs, else ``f_i``.

    >>> noise_weights(torch.tensor([3., 1., 0., 2.]), antithetic=True)
    tensor([ 2., -2.])
    """
    fitness = fitness.to(torch.float32)
    return fitness[0::2] - fitness[1::2] if antithetic else fitness


def es_direction(pop: Population, name: str, weights: torch.Tensor) -> torch.Tensor:
    """``g`` for one weight, in the stored weight's layout, float32."""
    N, sigma = pop.population_size, pop.sigma
    factors = pop.factors(name)
    w = weights.to(factors[0].device)
    if pop.noise.full_rank:
        (E,) = factors  # (K, m, n)
        g = torch.einsum("k,kmn->mn", w, E)
    else:
        A, B = factors  # (K, m, r), (K, n, r)
        K, m, r = A.shape
        n = B.shape[1]
        a = (A * w[:, None, None]).permute(1, 0, 2).reshape(m, K * r)  # (m, K r)
        b = B.permute(1, 0, 2).reshape(n, K * r)  # (n, K r)
        g = (a @ b.T) / math.sqrt(r)  # (m, n): one matmul for the whole population
    return pop.params[name].as_param_layout(g / (N * sigma))


def es_directions(pop: Population, fitness: torch.Tensor) -> dict[str, torch.Tensor]:
    """``g`` for every perturbed weight, given per-member fitness ``(population_size,)``."""
    if fitness.numel() != pop.population_size:
        raise ValueError(f"fitness has {fitness.numel()} entries, population_size={pop.population_size}")
    w = noise_weights(fitness.flatten(), pop.noise.antithetic)
    return {name: es_direction(pop, name, w) for name in pop.params}


def is_plain_sgd(optimizer) -> bool:
    """True when ``optimizer.step()`` would be exactly ``p -= lr * grad`` (so it can be fused)."""
    if type(optimizer).__name__ == "AcceleratedOptimizer":
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.SGD):
        return False
    return all(g.get("momentum", 0) == 0 and g.get("weight_decay", 0) == 0 and not g.get("maximize", False)
               for g in optimizer.param_groups)


@torch.no_grad()
def apply_es_update(pop: Population, fitness: torch.Tensor, optimizer=None, lr: float | None = None) -> float:
    """Compute ``g`` weight by weight and hand it to the optimizer; returns ``||g||``.

    * plain SGD (the paper's update, the default): ``W += lr * g`` in place, one weight at a time,
      so no gradient buffer the size of the model is ever allocated;
    * any other optimizer (Adam, AdamW, SGD with momentum): ``W.grad = -g`` for the caller's
      ``optimizer.step()``.
    """
    if fitness.numel() != pop.population_size:
        raise ValueError(f"fitness has {fitness.numel()} entries, population_size={pop.population_size}")
    w = noise_weights(fitness.flatten(), pop.noise.antithetic)
    fused = optimizer is None or is_plain_sgd(optimizer)
    if fused and lr is None:
        lr = optimizer.param_groups[0]["lr"]
    sq = 0.0
    for name, p in pop.params.items():
        g = es_direction(pop, name, w)
        sq += float(g.double().pow(2).sum())
        if fused:
            p.weight.add_(g.to(p.weight.dtype), alpha=lr)
        else:
            p.weight.grad = (-g).to(p.weight.dtype)
    return math.sqrt(sq)
