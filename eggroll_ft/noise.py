"""Counter-based Gaussian noise for EGGROLL (Sarkar et al. 2025, arXiv 2511.16652, Sec. 3).

The noise module knows nothing of models, rewards or updates: it maps integer coordinates
``(seed, epoch, param_id, noise_index, element)`` to standard-normal values. Nothing is stored
between steps; every process (and every device) regenerates exactly the values it needs.

* ``epoch = step // noise_reuse`` makes consecutive steps share noise when ``noise_reuse > 1``.
* ``noise_index`` is the antithetic pair ``member // 2`` (members ``2k`` and ``2k + 1`` share
  noise with signs ``+1`` and ``-1``), or the member itself when ``antithetic=False``.
* Low rank: member ``i`` perturbs a weight ``W (m, n)`` by ``sigma * E_i`` with
  ``E_i = A_i B_i^T / sqrt(r)``, ``A_i (m, r)`` and ``B_i (n, r)`` standard normal.
* Full rank (classic OpenES): ``E_i (m, n)`` dense standard normal.

The generator is SplitMix64 (its ``counter``-th output for a seed that hashes the stream's
coordinates) evaluated with int64 tensor ops, followed by a float32 Box-Muller transform that
turns each 64-bit value into two normals. It is a pure function of the coordinates, so the values for pair 7 do
not depend on how many pairs were asked for, on which process asked, or on the batch they ran in.
Integer ops are bit-identical on every device; the final float transform (log, cos) may differ
in the last ulp between CPU and GPU math libraries.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1
MAX_FLOATS_PER_CALL = 1 << 22  # noise floats one generator call makes at most (16 MiB float32, int64 temporaries ~4x)


def _signed(x: int) -> int:
    """Python int in [0, 2^64) -> the int64 with the same bits."""
    x &= _MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 tensors (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (wrapping arithmetic): the one integer hash behind every
    random draw of the package (noise here, sampling seeds and Gumbel noise in ``engine.sampling``,
    int8 factors in ``integer_es``)."""
    x = x + _GOLDEN
    x = (x ^ srl(x, 30)) * _MIX1
    x = (x ^ srl(x, 27)) * _MIX2
    return x ^ srl(x, 31)


def stream_key(*coords: int | str) -> int:
    """A 63-bit key for one noise stream, from any tuple of ints and strings.

    >>> stream_key(0, 1, "model.layers.0.mlp.up_proj.weight") == stream_key(0, 1, "model.layers.0.mlp.up_proj.weight")
    True
    """
    text = "\x1f".join(str(c) for c in coords).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def job_seed(seed: int, step: int, noise_index: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
    """Sampling seed of each ``(noise index, prompt)`` job of a step: int64 ``(J,)``.

    A job's completion is sampled from this seed alone (``engine.sampling``), so it does not depend
    on the job's batch, slot or process. Jobs are keyed by the member's noise index rather than the
    member: antithetic partners share their seed (common random numbers), so a pair's completions
    differ only through the sign of its perturbation.

    >>> job_seed(0, 3, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0])).unique().numel()
    3
    """
    key = torch.tensor(stream_key(seed, "sampling", step))
    return splitmix64(key ^ (noise_index.to(torch.int64) * 1_000_003 + prompt_index.to(torch.int64)))


def noise_block(key: int | torch.Tensor, indices: torch.Tensor, size: int, device=None) -> torch.Tensor:
    """Rows of i.i.d. normals: row ``j`` is the ``size`` values of noise index ``indices[j]``.

    Row contents depend only on ``(key, indices[j], size)``. One hash per two values: with
    ``h = ceil(size / 2)``, value ``e < h`` of a row is the cosine branch of the Box-Muller pair of
    counter ``index * h + e`` and value ``h + e`` its sine branch. Returns float32
    ``(len(indices), size)``; for a tensor of ``L`` keys (several streams, one call),
    ``(L, len(indices), size)`` holding what ``L`` calls would return.
    """
    device = indices.device if device is None else device
    idx = indices.to(device=device, dtype=torch.int64)
    if torch.is_tensor(key):
        key = key.to(device=device, dtype=torch.int64).view(-1, 1, 1)  # (L, 1, 1)
    half = (size + 1) // 2
    counter = idx[:, None] * half + torch.arange(half, device=device, dtype=torch.int64)[None, :]
    h = splitmix64(counter * _GOLDEN + key)  # output `counter` of a SplitMix64 generator seeded with key
    u1 = (srl(h, 40).to(torch.float32) + 1.0) * (1.0 / (1 << 24))  # 24-bit uniforms, exact in float32: (0, 1]
    u2 = ((h >> 8) & 0xFFFFFF).to(torch.float32) * (1.0 / (1 << 24))  # [0, 1)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = (2.0 * math.pi) * u2
    out = torch.empty(*h.shape[:-1], 2, half, device=device, dtype=torch.float32)
    torch.mul(radius, torch.cos(angle), out=out[..., 0, :])
    torch.mul(radius, torch.sin(angle), out=out[..., 1, :])
    out = out.view(*h.shape[:-1], 2 * half)
    return out[..., :size] if 2 * half != size else out


@dataclass(frozen=True)
class NoiseConfig:
    """Everything that fixes the noise of a run. Hashable, so factor caches can key on it."""

    seed: int = 0
    rank: int = 1
    antithetic: bool = True
    noise_reuse: int = 1
    full_rank: bool = False

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank={self.rank} must be >= 1")
        if self.noise_reuse < 1:
            raise ValueError(f"noise_reuse={self.noise_reuse} must be >= 1")

    def epoch(self, step: int) -> int:
        """Steps ``k*noise_reuse ... (k+1)*noise_reuse - 1`` share noise epoch ``k``."""
        return step // self.noise_reuse

    def noise_index(self, members: torch.Tensor) -> torch.Tensor:
        """Which noise draw each member uses (its antithetic pair, or itself)."""
        return members // 2 if self.antithetic else members

    def sign(self, members: torch.Tensor) -> torch.Tensor:
        """+1 for even members, -1 for odd ones when antithetic; +1 everywhere otherwise."""
        if not self.antithetic:
            return torch.ones_like(members, dtype=torch.float32)
        return 1.0 - 2.0 * (members % 2).to(torch.float32)

    def num_noise(self, population_size: int) -> int:
        return population_size // 2 if self.antithetic else population_size

    def key(self, step: int, param_id: str) -> int:
        return stream_key(self.seed, self.epoch(step), param_id)

    def factors(self, step: int, param_ids: list[str], shape: tuple[int, int], indices: torch.Tensor,
                device=None) -> tuple[torch.Tensor, ...]:
        """The noise of ``indices`` for several weights of one shape, in one generator call (float32):
        low rank ``(A (L, k, m, r), B (L, k, n, r))``, full rank ``(E (L, k, m, n),)``. Weight ``l``'s
        values are those of ``low_rank_factors`` / ``dense`` for ``param_ids[l]``."""
        m, n = shape
        keys = torch.tensor([self.key(step, p) for p in param_ids], dtype=torch.int64)
        if self.full_rank:
            return (noise_block(keys, indices, m * n, device).view(len(param_ids), -1, m, n),)
        z = noise_block(keys, indices, (m + n) * self.rank, device).view(len(param_ids), -1, m + n, self.rank)
        return z[:, :, :m], z[:, :, m:]

    def low_rank_factors(self, step: int, param_id: str, shape: tuple[int, int],
                         indices: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``A (K, m, r)`` and ``B (K, n, r)`` for the noise indices asked for (float32)."""
        a, b = self.factors(step, [param_id], shape, indices, device)
        return a[0], b[0]

    def dense(self, step: int, param_id: str, shape: tuple[int, int], indices: torch.Tensor,
              device=None) -> torch.Tensor:
        """Full-rank ``E (K, m, n)`` for the noise indices asked for (float32)."""
        return self.factors(step, [param_id], shape, indices, device)[0][0]

    def perturbation(self, step: int, param_id: str, shape: tuple[int, int], member: int) -> torch.Tensor:
        """The materialised ``s_i * E_i (m, n)`` of one member: for tests and naive baselines."""
        members = torch.tensor([member])
        idx, sgn = self.noise_index(members), self.sign(members)
        if self.full_rank:
            e = self.dense(step, param_id, shape, idx)[0]
        else:
            a, b = self.low_rank_factors(step, param_id, shape, idx)
            e = a[0] @ b[0].T / math.sqrt(self.rank)
        return sgn[0] * e
