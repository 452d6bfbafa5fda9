"""The low-rank term with its noise made inside the kernel (Triton): no factor is read from memory.

For every batch row ``p`` with noise index ``i_p`` and scale ``s_p`` (``sigma / sqrt(r)`` times the
member's sign, 0 for an unperturbed row), in place:

    out[p] += s_p * (x[p] B_i) A_i^T        x (P, T, n), out (P, T, m)

``A_i (m, r)`` and ``B_i (n, r)`` are generated in the kernel from the same counter-based generator
as ``noise.noise_block`` (SplitMix64 of ``counter * golden + key``, then a float32 Box-Muller pair
per 64-bit value), so their values equal ``NoiseConfig.low_rank_factors`` to float32 round-off
(the integer hash is bit-exact; ``log``, ``cos`` and ``sin`` may differ in the last ulps between
libraries), and the ES update, which regenerates the noise with ``noise.py``, follows the noise the
forward used. This is the paper's noise generated on the fly (EGGROLL, arXiv 2511.16652, App. E).

Two kernels per layer: ``x B`` for a block of tokens of one row (``B`` generated tile by tile
over ``n``), then ``out += (s x B) A^T`` for a tile of outputs (``A`` generated for that tile).

This module knows nothing of models or members: the population passes rows' noise indices, scales
and the layer's stream key. Triton is optional (``pip install 'eggroll-ft[triton]'``); ``available()``
says whether it is importable. Under ``TRITON_INTERPRET=1`` (set before this module is imported)
the kernels run on CPU tensors through Triton's interpreter, which is how the tests check them here.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional dependency
    triton = None


def available() -> bool:
    """Whether Triton is importable (the kernels also need a CUDA device, or TRITON_INTERPRET=1)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _normal(index, e, half, key):
        """Value ``e`` of noise row ``index`` (``noise.noise_block`` with ``h = half``), float32.

        The generator's constants are ``noise.py``'s (``_GOLDEN``, ``_MIX1``, ``_MIX2``), here as
        unsigned 64-bit literals: integer arithmetic wraps modulo 2^64 and ``>>`` is logical."""
        second = e >= half  # the sine branch of the pair
        counter = index * half + tl.where(second, e - half, e).to(tl.uint64)
        x = counter * 0x9E3779B97F4A7C15 + key
        x = x + 0x9E3779B97F4A7C15  # SplitMix64's finaliser
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB
        h = x ^ (x >> 31)
        u1 = ((h >> 40).to(tl.float32) + 1.0) * (1.0 / 16777216.0)  # 24-bit uniforms: (0, 1]
        u2 = ((h >> 8) & 0xFFFFFF).to(tl.float32) * (1.0 / 16777216.0)  # [0, 1)
        radius = tl.sqrt(-2.0 * tl.log(u1))
        angle = 6.283185307179586 * u2
        return radius * tl.where(second, tl.sin(angle), tl.cos(angle))

    @triton.jit
    def _xb_kernel(x_ptr, xb_ptr, index_ptr, scale_ptr, key, T, n, m, half,
                   R: tl.constexpr, R_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        """``xb[p, t] = s_p * x[p, t] B_i`` for one row and a block of its tokens: ``(BLOCK_T, R_PAD)``."""
        p = tl.program_id(0)
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        c = tl.arange(0, R_PAD)
        index = tl.load(index_ptr + p).to(tl.uint64)
        key = key.to(tl.uint64)
        acc = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
        for j0 in range(0, n, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            b = _normal(index, (m + j[:, None]) * R + c[None, :], half, key)  # B_i[j, c]: (BLOCK_N, R_PAD)
            b = tl.where((j[:, None] < n) & (c[None, :] < R), b, 0.0)
            xv = tl.load(x_ptr + (p * T + t[:, None]).to(tl.int64) * n + j[None, :],
                         mask=(t[:, None] < T) & (j[None, :] < n), other=0.0).to(tl.float32)  # (BLOCK_T, BLOCK_N)
            acc += tl.sum(xv[:, :, None] * b[None, :, :], axis=1)
        s = tl.load(scale_ptr + p)
        tl.store(xb_ptr + (p * T + t[:, None]).to(tl.int64) * R_PAD + c[None, :], acc * s, mask=t[:, None] < T)

    @triton.jit
    def _add_a_kernel(out_ptr, xb_ptr, index_ptr, key, T, m, half,
                      R: tl.constexpr, R_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr):
        """``out[p, t, i] += xb[p, t] A_i[i]^T`` for one row, a block of tokens and of outputs."""
        p = tl.program_id(0)
        i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
        c = tl.arange(0, R_PAD)
        index = tl.load(index_ptr + p).to(tl.uint64)
        a = _normal(index, i[:, None] * R + c[None, :], half, key.to(tl.uint64))  # A_i[i, c]: (BLOCK_M, R_PAD)
        a = tl.where((i[:, None] < m) & (c[None, :] < R), a, 0.0)
        xb = tl.load(xb_ptr + (p * T + t[:, None]).to(tl.int64) * R_PAD + c[None, :], mask=t[:, None] < T, other=0.0)
        delta = tl.sum(xb[:, None, :] * a[None, :, :], axis=2)  # (BLOCK_T, BLOCK_M)
        ptr = out_ptr + (p * T + t[:, None]).to(tl.int64) * m + i[None, :]
        mask = (t[:, None] < T) & (i[None, :] < m)
        o = tl.load(ptr, mask=mask, other=0.0)
        tl.store(ptr, (o.to(tl.float32) + delta).to(o.dtype), mask=mask)


def lowrank_add_(out: torch.Tensor, x: torch.Tensor, index: torch.Tensor, scale: torch.Tensor, key: int,
                 rank: int) -> torch.Tensor:
    """``out[p] += scale[p] * (x[p] B_i) A_i^T`` with ``i = index[p]``, in place; returns ``out``.

    ``x (P, ..., n)`` and ``out (P, ..., m)`` contiguous (any float dtype; sums in float32),
    ``index (P,)`` int64 noise indices, ``scale (P,)`` float32, ``key`` the layer's stream key
    (``NoiseConfig.key``), ``rank`` r. The noise is that of ``NoiseConfig.low_rank_factors``."""
    if triton is None:
        raise RuntimeError("the noise kernel needs triton: pip install 'eggroll-ft[triton]'")
    P, n, m = x.shape[0], x.shape[-1], out.shape[-1]
    if P == 0:
        return out
    T = x.numel() // (P * n)
    half = ((m + n) * rank + 1) // 2
    r_pad = triton.next_power_of_2(rank)
    block_t = min(16, triton.next_power_of_2(T))
    xb = torch.empty(P, T, r_pad, device=x.device, dtype=torch.float32)
    index = index.to(x.device, torch.int64).contiguous()
    scale = scale.to(x.device, torch.float32).contiguous()
    _xb_kernel[(P, triton.cdiv(T, block_t))](x, xb, index, scale, key, T, n, m, half, R=rank, R_PAD=r_pad,
                                              BLOCK_T=block_t, BLOCK_N=64)
    block_m = 64
    _add_a_kernel[(P, triton.cdiv(m, block_m), triton.cdiv(T, block_t))](out, xb, index, key, T, m, half, R=rank,
                                                                          R_PAD=r_pad, BLOCK_T=block_t, BLOCK_M=block_m)
    return out
