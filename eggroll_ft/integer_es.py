"""Integer EGGROLL: int8 low-rank perturbations, sign fitness and a +-1 update (arXiv 2511.16652).

The integer pretraining recipe of EGGROLL (Sarkar et al. 2025) never leaves the integers:

1. **Perturbations.** Pair ``k`` draws int8 factors ``A_k (m, r)``, ``B_k (n, r)`` for every weight
   from the counter-based SplitMix64 hash of :mod:`eggroll_ft.noise` (each value is the difference
   of two 6-bit uniforms: symmetric on [-63, 63]). Member ``2k`` runs ``W + A_k B_k^T / 2^s``,
   member ``2k + 1`` runs ``W - A_k B_k^T / 2^s``: ``s = sigma_shift`` sets sigma as a power of
   two. The model applies them per batch row (:class:`eggroll_ft.models.mingru.LowRank`).
2. **Fitness.** Each member's score is its summed integer log2-likelihood of the bytes it read;
   the antithetic pair is scored by the sign of the difference, ``F_k in {-1, 0, +1}`` (higher
   fitness is better).
3. **Update.** ``acc = sum_k F_k A_k B_k^T`` accumulates in int32 (one int8 matmul per weight);
   every weight whose ``|acc|`` is among the largest ``fraction`` of its matrix moves by
   ``sign(acc)``, i.e. by exactly +-1, clipped to [-127, 127]. ``fraction`` follows a schedule
   (linear from ``update_fraction`` to ``update_fraction_final``).
4. **Truncated ES.** Members of a group of ``group_size`` (whole antithetic pairs) read the same
   byte stream; the recurrent state of every member is carried from step to step.

Every tensor is made on the model's device: the factors are hashed where the pair ids live, the
members, signs and fitness sit with the weights, and the int32 vote goes through
:func:`eggroll_ft.models.mingru.int_mm` (zero-padded to CUDA-legal shapes off the CPU).

This module knows the model only through ``IntMinGRU`` and ``weight_shapes``; it knows nothing of
files, logging or checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .models.mingru import IntMinGRU, LowRank, int_log_softmax, int_mm, weight_shapes
from .noise import NoiseConfig, splitmix64, srl

FACTOR_MAX = 63  # int8 factors lie in [-63, 63]


@dataclass(frozen=True)
class IntegerESConfig:
    """Everything that fixes an integer EGGROLL run (besides the model and the data)."""

    population_size: int = 512  # members per step (antithetic pairs: population_size / 2)
    rank: int = 1  # rank r of each perturbation A B^T
    sigma_shift: int = 8  # perturbation = A B^T >> sigma_shift (sigma a power of two)
    seed: int = 0
    noise_reuse: int = 1  # consecutive steps sharing one noise draw
    group_size: int = 2  # members reading the same byte stream (whole pairs)
    update_fraction: float = 0.02  # fraction of each matrix moved by +-1 at step 0
    update_fraction_final: float = 0.002  # ... and at total_steps (linear schedule)
    total_steps: int = 1000
    member_chunk: int = 0  # members scored per forward call (0 = all); bounds memory, not results

    def __post_init__(self):
        if self.population_size < 2 or self.population_size % 2:
            raise ValueError(f"population_size={self.population_size} must be even and >= 2 "
                             "(antithetic pairs)")
        if self.group_size < 2 or self.group_size % 2 or self.population_size % self.group_size:
            raise ValueError(f"group_size={self.group_size} must be even and divide "
                             f"population_size={self.population_size}")
        if not 0 <= self.sigma_shift <= 24:
            raise ValueError(f"sigma_shift={self.sigma_shift} must be in [0, 24]")
        if self.rank < 1 or self.rank > 4:
            raise ValueError(f"rank={self.rank} must be in [1, 4] (int32 headroom)")
        for name in ("update_fraction", "update_fraction_final"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if self.total_steps < 1:
            raise ValueError(f"total_steps={self.total_steps} must be >= 1")
        if self.member_chunk < 0 or self.member_chunk % 2:
            raise ValueError(f"member_chunk={self.member_chunk} must be 0 or a positive even number")

    @property
    def noise(self) -> NoiseConfig:
        return NoiseConfig(seed=self.seed, rank=self.rank, antithetic=True,
                           noise_reuse=self.noise_reuse)

    @property
    def num_streams(self) -> int:
        return self.population_size // self.group_size

    def fraction(self, step: int) -> float:
        """Scheduled fraction of each weight matrix that moves at ``step``."""
        t = min(step / self.total_steps, 1.0)
        return self.update_fraction + t * (self.update_fraction_final - self.update_fraction)


def int8_factors(noise: NoiseConfig, step: int, name: str, shape: tuple[int, int],
                 pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A (K, m, r)``, ``B (K, n, r)`` int8 for the antithetic pairs asked for, on ``pairs``' device.

    Pure function of ``(seed, step // noise_reuse, name, pair, element)``: the same hash counter
    layout as :func:`eggroll_ft.noise.noise_block`, but the 64-bit hash is read as two 6-bit
    uniforms ``u1 - u2`` (triangular, symmetric on [-63, 63]) instead of a Gaussian. The hash is
    wrapping int64 arithmetic, so every device draws the same bits.
    """
    m, n = shape
    r = noise.rank
    size = (m + n) * r
    idx = pairs.to(torch.int64)
    counter = idx[:, None] * size + torch.arange(size, dtype=torch.int64, device=idx.device)[None, :]
    h = splitmix64(splitmix64(counter ^ noise.key(step, name)))
    v = ((h & 63) - srl(h, 58)).to(torch.int8).view(-1, m + n, r)  # (K, m + n, r)
    return v[:, :m], v[:, m:]


def member_sign(members: torch.Tensor) -> torch.Tensor:
    """+1 for even members, -1 for odd ones, 0 for unperturbed rows (member -1). int32."""
    return torch.where(members < 0, 0, 1 - 2 * (members % 2)).to(torch.int32)


def member_lowrank(cfg: IntegerESConfig, shapes: dict, step: int, members: torch.Tensor) -> LowRank:
    """Per-row int8 factors for batch rows run by ``members (P,)`` (-1 = unperturbed)."""
    pairs, inverse = torch.unique(members.clamp(min=0) // 2, return_inverse=True)
    factors = {}
    for name, shape in shapes.items():
        a, b = int8_factors(cfg.noise, step, name, shape, pairs)
        factors[name] = (a[inverse], b[inverse])  # (P, m, r), (P, n, r)
    return LowRank(factors, member_sign(members), cfg.sigma_shift)


def pair_fitness(scores: torch.Tensor) -> torch.Tensor:
    """Sign of the difference within each antithetic pair: ``(N,)`` -> ``(N/2,)`` int8 in {-1,0,1}."""
    return torch.sign(scores[0::2] - scores[1::2]).to(torch.int8)


def accumulate(noise: NoiseConfig, step: int, name: str, shape: tuple[int, int],
               fitness: torch.Tensor) -> torch.Tensor:
    """``sum_k F_k A_k B_k^T`` as one int8 x int8 -> int32 matmul. ``fitness (K,)`` -> ``(m, n)``.

    Runs on ``fitness``' device; :func:`int_mm` pads ``(m, K r) x (K r, n)`` to CUDA-legal sizes there.
    """
    k = fitness.shape[0]
    a, b = int8_factors(noise, step, name, shape, torch.arange(k, device=fitness.device))  # (K, m, r), (K, n, r)
    af = (a * fitness.view(k, 1, 1)).permute(1, 0, 2).reshape(shape[0], -1)  # (m, K r) int8
    bf = b.permute(1, 0, 2).reshape(shape[1], -1)  # (n, K r) int8
    return int_mm(af, bf)  # (m, n) int32


def threshold_update(weight: torch.Tensor, acc: torch.Tensor, fraction: float) -> tuple[torch.Tensor, int]:
    """Move by ``sign(acc)`` the weights whose ``|acc|`` is among the top ``fraction``; clip to int8.

    The threshold is the k-th largest ``|acc|`` with ``k = round(fraction * numel)`` (ties at the
    threshold all move; zeros never do). Returns the new int8 weight and how many weights moved.
    """
    k = int(round(fraction * acc.numel()))
    if k == 0:
        return weight, 0
    mag = acc.abs()
    tau = torch.kthvalue(mag.flatten(), acc.numel() - k + 1).values.clamp(min=1)
    move = torch.sign(acc) * (mag >= tau)  # int32 in {-1, 0, 1}
    new = (weight.to(torch.int32) + move).clamp(-127, 127).to(torch.int8)
    return new, int((new != weight).sum())


class IntegerEggroll:
    """Integer ES on an :class:`IntMinGRU`: score the population, then update it in place."""

    def __init__(self, model: IntMinGRU, cfg: IntegerESConfig):
        """Member ids live on the model's device: move the model (``IntMinGRU.to``) before this."""
        self.model, self.cfg = model, cfg
        self.shapes = weight_shapes(model.cfg)
        self.members = torch.arange(cfg.population_size, device=model.device)

    def rows_from_streams(self, chunk: torch.Tensor) -> torch.Tensor:
        """``(num_streams, T+1)`` byte windows -> ``(population_size, T+1)``: a group shares one."""
        return chunk[self.members // self.cfg.group_size]

    def scores(self, step: int, rows: torch.Tensor, state: torch.Tensor):
        """Summed int log2-likelihood (1/256 bit) of each member on its row. ``rows (N, T+1)``.

        ``rows`` and ``state`` on the model's device. Returns ``scores (N,)`` int32 and the carried
        state ``(L, N, D)`` int8.
        """
        chunk = self.cfg.member_chunk or self.cfg.population_size
        scores, states = [], []
        for lo in range(0, self.cfg.population_size, chunk):  # chunks of rows, never single members
            part = slice(lo, lo + chunk)
            lowrank = member_lowrank(self.cfg, self.shapes, step, self.members[part])
            logits, st = self.model(rows[part, :-1], state[:, part], lowrank)  # (n, T, V) int8
            scores.append(int_log_softmax(logits, rows[part, 1:]).sum(-1, dtype=torch.int32))
            states.append(st)
        return torch.cat(scores), torch.cat(states, 1)

    def update(self, step: int, scores: torch.Tensor) -> dict:
        """Apply the +-1 update from the members' scores; returns diagnostics."""
        fitness = pair_fitness(scores)
        frac = self.cfg.fraction(step)
        moved = 0
        for name, shape in self.shapes.items():
            acc = accumulate(self.cfg.noise, step, name, shape, fitness)
            self.model.weights[name], n = threshold_update(self.model.weights[name], acc, frac)
            moved += n
        total = sum(m * n for m, n in self.shapes.values())
        return {"moved_fraction": moved / total, "update_fraction": frac,
                "tied_pairs": int((fitness == 0).sum())}
