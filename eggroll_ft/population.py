"""Population layers: every row of a batch runs its own member's low-rank perturbed weights.

EGGROLL (Sarkar et al. 2025, arXiv 2511.16652, Sec. 3): for a perturbed linear layer with
weight ``W (m, n)`` and a batch whose row ``b`` belongs to member ``i(b)``,

    y_b = x_b W^T + bias + (sigma / sqrt(r)) * s_i * (x_b B_i) A_i^T

computed for all rows in one batched call (no loop over members, no ``W + E_i`` materialised).
Full-rank mode (OpenES) adds ``sigma * s_i * x_b E_i^T`` instead.

This module knows nothing of rewards, generation or the update. It attaches forward hooks to the
``nn.Linear`` (and GPT-2 ``Conv1D``) modules chosen by name, so an unmodified model keeps its
weights, its ``state_dict`` keys and its ``generate``; the hooks add the per-row delta while a
``Population.members(...)`` block is active and do nothing outside it. Native models (RWKV-7, the
RL policy) use plain ``nn.Linear`` modules and go through exactly the same path.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .noise import NoiseConfig

try:  # GPT-2 style models use a transposed linear layer
    from transformers.pytorch_utils import Conv1D
except Exception:  # transformers is a core dependency; keep the layer importable without it
    Conv1D = ()

UNPERTURBED = -1  # member id of a row that runs the mean weights


@dataclass
class PerturbedParam:
    """One perturbed weight matrix. ``shape`` is ``(m, n) = (out, in)`` whatever the storage."""

    name: str  # parameter name in the model, also the noise stream id
    module: nn.Module
    shape: tuple[int, int]
    transposed: bool  # True for Conv1D, whose weight is stored (in, out)

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    def as_param_layout(self, mat: torch.Tensor) -> torch.Tensor:
        """An ``(m, n)`` matrix in the layout of the stored weight."""
        return mat.T if self.transposed else mat


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (Conv1D != () and isinstance(module, Conv1D))


def _matches(name: str, patterns) -> bool:
    """PEFT's convention: a string is a full-match regex; a list matches names or name suffixes."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def select_linear_modules(model: nn.Module, perturb_modules=None, exclude_modules=None) -> dict[str, nn.Module]:
    """The linear modules to perturb, by name.

    Default (``perturb_modules=None``): every ``nn.Linear``/``Conv1D`` except the model's input
    embedding and output head (``get_output_embeddings()``), as in the EGGROLL reference code.
    """
    skip = set()
    for getter in ("get_output_embeddings", "get_input_embeddings"):
        fn = getattr(model, getter, None)
        mod = fn() if callable(fn) else None
        if mod is not None:
            skip.add(id(mod))
    chosen = {}
    for name, module in model.named_modules():
        if not _is_linear(module) or getattr(module, "weight", None) is None:
            continue
        if perturb_modules is None:
            if id(module) in skip:
                continue
        elif not _matches(name, perturb_modules):
            continue
        if _matches(name, exclude_modules):
            continue
        chosen[name] = module
    return chosen


class Population:
    """Hooks a model so that each batch row can run a different population member.

    >>> pop = Population(model, NoiseConfig(seed=0, rank=1), population_size=8, sigma=0.01)  # doctest: +SKIP
    >>> pop.set_step(3)                                                                         # doctest: +SKIP
    >>> with pop.members(torch.tensor([0, 1, 5, -1])):   # one member id per batch row     # doctest: +SKIP
    ...     logits = model(input_ids).logits            # (4, T, V)
    """

    def __init__(self, model: nn.Module, noise: NoiseConfig, population_size: int, sigma: float,
                 perturb_modules=None, exclude_modules=None):
        if noise.antithetic and population_size % 2:
            raise ValueError(f"population_size={population_size} must be even when antithetic=True")
        if population_size < 1:
            raise ValueError(f"population_size={population_size} must be >= 1")
        self.model = model
        self.noise = noise
        self.population_size = population_size
        self.sigma = float(sigma)
        self.step = 0
        self.params: dict[str, PerturbedParam] = {}
        self._row_members: torch.Tensor | None = None
        self._cache: dict[str, tuple[torch.Tensor, ...]] = {}
        # factors of the current members block, gathered once per block and layer (low rank):
        # (name, dtype) -> (B_u (U, r, n), A_u (U, r, m), scale (U, G)); see _row_factors
        self._rows: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._rows_key: tuple | None = None
        self._rows_members: torch.Tensor | None = None  # the validated ids of the block keyed by _rows_key
        self._grouped = True  # the active block's grouping of rows that share a member (members(grouped=))
        self._handles = []
        modules = select_linear_modules(model, perturb_modules, exclude_modules)
        if not modules:
            raise ValueError(f"perturb_modules={perturb_modules!r} matched no linear module of {type(model).__name__}")
        for mod_name, module in modules.items():
            transposed = not isinstance(module, nn.Linear)
            w = module.weight
            shape = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
            pname = f"{mod_name}.weight" if mod_name else "weight"
            p = PerturbedParam(pname, module, shape, transposed)
            self.params[pname] = p
            self._handles.append(module.register_forward_hook(self._make_hook(p)))

    # ---- state -------------------------------------------------------------------------------
    def set_step(self, step: int, sigma: float | None = None) -> None:
        """Move to ES step ``step`` (new noise unless ``noise_reuse`` shares it) and ``sigma``."""
        if self.noise.epoch(step) != self.noise.epoch(self.step):
            self._cache.clear()
        self._rows.clear()
        self._rows_key = None
        self.step = int(step)
        if sigma is not None:
            if sigma <= 0:
                raise ValueError(f"sigma={sigma} must be > 0")
            self.sigma = float(sigma)

    @contextmanager
    def members(self, member_ids: torch.Tensor, grouped: bool = True):
        """Within the block, batch row ``b`` of every forward runs member ``member_ids[b]``.

        ``-1`` (``UNPERTURBED``) runs the mean weights. Nested blocks restore the outer one.
        The per-row factors are gathered once per block and layer, and kept while the same
        ``member_ids`` tensor is passed again unmodified (the engine re-enters a block with its slot
        tensor every decode step; an in-place change of that tensor regathers).
        ``grouped=False`` gathers factors row by row even where consecutive rows share a member,
        so their shapes depend on the batch size only (a captured decode step needs that).
        """
        key = (member_ids, member_ids._version, grouped) if torch.is_tensor(member_ids) else None
        rows_key = self._rows_key
        if key is not None and rows_key is not None and rows_key[0] is key[0] and rows_key[1:] == key[1:]:
            active = self._rows_members  # the same tensor again (every decode step): checked already
        else:  # validate (a device sync on GPU) only when the member tensor changes
            self._rows.clear()
            ids = torch.as_tensor(member_ids, dtype=torch.long).flatten()
            if ids.numel() and (int(ids.max()) >= self.population_size or int(ids.min()) < UNPERTURBED):
                raise ValueError(f"member ids must lie in [-1, {self.population_size}), got "
                                 f"[{int(ids.min())}, {int(ids.max())}]")
            # a block where every row is unperturbed (evaluation) leaves the hooks idle
            active = None if ids.numel() and bool((ids == UNPERTURBED).all()) else ids
        previous = (self._row_members, self._rows_key, self._rows_members, self._grouped)
        self._row_members, self._rows_key, self._rows_members, self._grouped = active, key, active, grouped
        try:
            yield self
        finally:
            self._row_members, self._grouped = previous[0], previous[3]
            if previous[0] is not None:  # back in an outer block: its rows are regathered lazily
                self._rows.clear()
                self._rows_key, self._rows_members = previous[1], previous[2]

    def remove(self) -> None:
        """Detach every hook: the model is back to a plain model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._cache.clear()
        self._rows.clear()

    # ---- noise -------------------------------------------------------------------------------
    def factors(self, name: str) -> tuple[torch.Tensor, ...]:
        """This step's noise of every noise index for one weight, generated once and cached.

        Low rank: ``(A (K, m, r), B (K, n, r))``; full rank: ``(E (K, m, n),)``; float32, on the
        weight's device. ``K`` is ``population_size // 2`` with antithetic pairs.
        """
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        p = self.params[name]
        device = p.weight.device
        idx = torch.arange(self.noise.num_noise(self.population_size), device=device)
        if self.noise.full_rank:
            out = (self.noise.dense(self.step, name, p.shape, idx, device),)
        else:
            out = self.noise.low_rank_factors(self.step, name, p.shape, idx, device)
        self._cache[name] = out
        return out

    def _row_factors(self, name: str, members: torch.Tensor, dtype: torch.dtype):
        """This block's factors: ``(B_u (U, n, r), A_u (U, r, m), scale (U, G))`` in ``dtype``.

        Rows come in ``U`` groups of ``G`` consecutive rows sharing one noise index (an
        antithetic pair, or a member answering several prompts: the trainer's member-major job
        order), so each group's factors are read once per token; ``G = 1`` when rows are not so
        ordered. ``scale = sigma / sqrt(r) * s_i`` (0 for unperturbed rows). Cached per block.
        """
        cached = self._rows.get((name, dtype))
        if cached is not None:
            return cached
        A, Bf = self.factors(name)  # (K, m, r), (K, n, r)
        members = members.to(A.device)
        safe = members.clamp(min=0)
        idx = self.noise.noise_index(safe)  # (P,)
        scale = self.noise.sign(safe).to(A.device) * (members >= 0).to(torch.float32)
        scale = scale * (self.sigma / math.sqrt(self.noise.rank))  # (P,)
        P = idx.numel()
        G = int((idx == idx[0]).int().argmin()) or P if P and self._grouped else 1  # length of the first run
        if G > 1 and (P % G or not bool((idx.view(-1, G) == idx.view(-1, G)[:, :1]).all())):
            G = 1
        u = idx.view(-1, G)[:, 0]  # (U,)
        rows = (Bf[u].to(dtype).contiguous(),  # (U, n, r)
                A[u].transpose(1, 2).to(dtype).contiguous(),  # (U, r, m)
                scale.view(-1, G).to(dtype))  # (U, G)
        self._rows[(name, dtype)] = rows
        return rows

    def gather_rows(self, dtype: torch.dtype) -> None:
        """Gather every layer's factors of the active members block now (see ``_row_factors``),
        so that forwards inside the block only read them: no host sync, no dictionary writes (what
        a compiled or captured forward needs). Does nothing outside a block or when all rows are
        unperturbed."""
        if self._row_members is not None:
            for name in self.params:
                self._row_factors(name, self._row_members, dtype)

    def _add_lowrank_(self, name: str, x: torch.Tensor, out: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """``out += (sigma/sqrt(r)) s_i (x B_i) A_i^T`` row by row, in place; returns ``out``.

        ``x (P, ..., n)``, ``out (P, ..., m)`` contiguous, ``T`` tokens per row. The rows of a group
        ``(G T)`` share the factors: ``x B`` is one batched matmul ``(U, G T, n) @ (U, n, r)``
        (CPU and GPU libraries run it faster than an elementwise product and a sum), the scaled
        result is added through ``A`` by a broadcast multiply-add when ``r = 1`` (a batched matmul
        with an inner dimension of 1 is slower than that) and a batched matmul otherwise.
        """
        m, n = self.params[name].shape
        Bu, Au, scale = self._row_factors(name, members, x.dtype)
        U, G = scale.shape
        r = Bu.shape[2]
        T = x.numel() // (x.shape[0] * n)
        xb = torch.bmm(x.view(U, G * T, n), Bu)  # (U, G T, r)
        xb.view(U, G, T, r).mul_(scale[:, :, None, None])
        og = out.view(U, G * T, m)
        if r == 1:
            og.addcmul_(xb, Au)  # (U, G T, 1) * (U, 1, m)
        else:
            og.baddbmm_(xb, Au)
        return out

    def delta(self, name: str, x: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """Per-row perturbation term of weight ``name`` for input ``x (B, ..., n)`` -> ``(B, ..., m)``."""
        p = self.params[name]
        m, n = p.shape
        B = x.shape[0]
        if not self.noise.full_rank:
            return self._add_lowrank_(name, x, x.new_zeros(*x.shape[:-1], m), members)
        x3 = x.reshape(B, -1, n)  # (B, T, n)
        members = members.to(x.device)
        safe = members.clamp(min=0)
        scale = self.noise.sign(safe).to(x.device) * (members >= 0).to(torch.float32) * self.sigma  # (B,)
        (E,) = self.factors(name)
        d = torch.bmm(x3, E[self.noise.noise_index(safe)].to(x.dtype).transpose(1, 2))  # (B, T, m)
        d = d * scale.to(x.dtype)[:, None, None]
        return d.reshape(*x.shape[:-1], m)

    def _add_delta_(self, name: str, x: torch.Tensor, out: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """``out + delta``: in place when autograd is off, else on a copy."""
        if self.noise.full_rank:
            return out + self.delta(name, x, members)
        if torch.is_grad_enabled() or not out.is_contiguous():
            out = out.contiguous().clone()
        return self._add_lowrank_(name, x.contiguous(), out, members)

    def _make_hook(self, p: PerturbedParam):
        def hook(module, args, output):
            members = self._row_members
            if members is None:
                return None
            x = args[0]
            if x.shape[0] != members.numel():
                raise RuntimeError(f"{p.name}: batch has {x.shape[0]} rows but {members.numel()} member ids "
                                   "were given; give one member id per batch row")
            return self._add_delta_(p.name, x, output, members)
        return hook

    # ---- helpers for tests and naive baselines ------------------------------------------------
    def perturbation(self, name: str, member: int) -> torch.Tensor:
        """``sigma * s_i * E_i`` of one member in the stored weight's layout (materialised)."""
        p = self.params[name]
        e = self.noise.perturbation(self.step, name, p.shape, member)
        return p.as_param_layout(self.sigma * e).to(p.weight.device, p.weight.dtype)

    @contextmanager
    def materialized(self, member: int):
        """Temporarily set every perturbed weight to ``W + sigma * E_member`` (naive ES)."""
        saved = {n: p.weight.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.weight.add_(self.perturbation(n, member))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.weight.copy_(saved[n])

    def num_perturbed_parameters(self) -> int:
        return sum(p.shape[0] * p.shape[1] for p in self.params.values())
