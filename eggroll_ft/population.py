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

Noise is made where it is used and held only while in flight: a block's rows read factors built
for the block, copied from the blocks still running where those hold them and generated
(``noise.py``, a pure function of its coordinates) otherwise. A step's noise memory is thus about
``rows in flight x r x (m + n)`` per weight, whatever the population size; the ES update
regenerates what it needs chunk by chunk (``Population.factors``, ``es_update.py``).
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from . import lowrank_cpu as _cpu
from . import noise_kernel as _kernel
from .noise import MAX_FLOATS_PER_CALL, NoiseConfig

try:  # GPT-2 style models use a transposed linear layer
    from transformers.pytorch_utils import Conv1D
except Exception:  # transformers is a core dependency; keep the layer importable without it
    Conv1D = ()

UNPERTURBED = -1  # member id of a row that runs the mean weights
# rank 1: up to this many rows per group (G T), ``x B`` is an elementwise product and a sum; above, a
# batched matmul. On CPU the batched matmul's per-matrix cost dominates tiny products: it is 2.3-2.5x
# slower at G T = 2 (a decode step, every row a different member), 1.6x at 16, 1.5x faster at 32
# (scripts/bench_rank1_product.py; docs/benchmarks.md, issue 17)
VECDOT_MAX_ROWS = 16


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


def _run_length(idx: torch.Tensor) -> int:
    """``G`` when the rows come in runs of ``G`` consecutive rows sharing a noise index (an
    antithetic pair; a member answering several prompts, as the trainer lays jobs out), else 1.

    >>> _run_length(torch.tensor([0, 0, 1, 1, 2, 2])), _run_length(torch.tensor([0, 0, 1]))
    (2, 1)
    """
    P = idx.numel()
    if P == 0:
        return 1
    other = (idx != idx[0]).nonzero()
    G = int(other[0]) if other.numel() else P  # length of the first run
    if P % G or not bool((idx.view(-1, G) == idx.view(-1, G)[:, :1]).all()):
        return 1
    return G


@dataclass(eq=False)
class _Block:
    """One ``members`` block: which member each row runs, and the noise its rows read.

    Rows come in ``U`` groups of ``G`` rows sharing a noise index (``G = 1`` unless they run in
    equal runs, see ``_run_length``). ``factors[(name, dtype)]`` holds one layer's noise for the
    groups in the hook's layout, built for every layer at the block's first forward: copied from
    the blocks that hold it (``sources``, found at entry; ``takeover``) and generated for the rest
    (``missing``).
    """

    ids: torch.Tensor  # (P,) validated member ids
    given: object  # what was passed to members(): the same tensor, unmodified, re-enters this block
    version: int | None  # its _version then (the engine refills its slot tensor in place)
    grouped: bool
    idle: bool  # every row runs the mean weights (evaluation): the hooks do nothing
    row_index: torch.Tensor | None = None  # (P,) noise index of each row (clamped: 0 for unperturbed rows)
    row_scale: torch.Tensor | None = None  # (P,) float32: sigma/sqrt(r) s_i, 0 on unperturbed rows
    group_index: torch.Tensor | None = None  # (U,) noise index of each group
    scale: torch.Tensor | None = None  # (U, G) float32: sigma/sqrt(r) s_i, 0 on unperturbed rows
    factors: dict = field(default_factory=dict)  # (name, dtype) -> (*noise in the hook's layout, scale)
    sources: list = field(default_factory=list)  # [(block, dst groups (k,), its groups (k,))]
    missing: torch.Tensor | None = None  # (k,) groups no block in flight holds (None: all): generated
    releases: list = field(default_factory=list)  # sources no longer in flight: each layer dropped once copied
    takeover: tuple | None = None  # (released block of the same layout, its groups already in place)

    def reentered_by(self, member_ids, grouped: bool) -> bool:
        return (member_ids is self.given and self.version is not None and member_ids._version == self.version
                and grouped == self.grouped)

    def changed_in_place(self) -> bool:
        """The tensor this block ran was modified since (the engine refilled slots): it runs next."""
        return self.version is not None and self.given._version != self.version


def _version(member_ids) -> int | None:
    """The in-place version counter of a member-id tensor; None for a list, or for a tensor made
    under ``torch.inference_mode`` (which keeps none: each ``members`` call with it is a new block)."""
    if not torch.is_tensor(member_ids) or member_ids.is_inference():
        return None
    return member_ids._version


class Population:
    """Hooks a model so that each batch row can run a different population member.

    >>> pop = Population(model, NoiseConfig(seed=0, rank=1), population_size=8, sigma=0.01)  # doctest: +SKIP
    >>> pop.set_step(3)                                                                         # doctest: +SKIP
    >>> with pop.members(torch.tensor([0, 1, 5, -1])):   # one member id per batch row     # doctest: +SKIP
    ...     logits = model(input_ids).logits            # (4, T, V)

    Noise in flight: each block's rows read their factors from tensors built for the block; a new
    block copies what the blocks still in flight hold (``_in_flight``: noise index -> the block
    and group holding it) and generates the rest, so a step holds the noise of the rows in flight,
    never the whole population's (at most the active block's groups and the rows about to run).
    """

    def __init__(self, model: nn.Module, noise: NoiseConfig, population_size: int, sigma: float,
                 perturb_modules=None, exclude_modules=None, noise_kernel: str = "auto"):
        """``noise_kernel``: how a forward adds the low-rank term. ``"torch"``: from the block's
        factors (generated once per block, see above) with torch operations; ``"cpu"``: from the
        same factors with one fused C++ operation per layer (``lowrank_cpu``: float32 CPU tensors at
        rank 1, built at first use; torch operations elsewhere); ``"triton"``:
        ``noise_kernel.lowrank_add_``, the noise made inside the kernel, nothing held (CUDA, or CPU
        under ``TRITON_INTERPRET=1``); ``"auto"``: Triton on CUDA when it is installed, the fused
        CPU operation where it applies and could be built, else torch. Full rank always uses torch."""
        if noise.antithetic and population_size % 2:
            raise ValueError(f"population_size={population_size} must be even when antithetic=True")
        if population_size < 1:
            raise ValueError(f"population_size={population_size} must be >= 1")
        if noise_kernel not in ("auto", "torch", "cpu", "triton"):
            raise ValueError(f"noise_kernel={noise_kernel!r} must be 'auto', 'torch', 'cpu' or 'triton'")
        if noise_kernel == "triton" and not _kernel.available():
            raise ValueError("noise_kernel='triton' needs triton: pip install 'eggroll-ft[triton]'")
        if noise_kernel == "cpu" and not _cpu.available():
            raise ValueError(f"noise_kernel='cpu': the fused CPU operation could not be built ({_cpu.build_error()}); "
                             "it needs a C++ compiler and ninja (pip install ninja), or use noise_kernel='torch'")
        self.noise_kernel = noise_kernel
        self._keys: dict[str, int] = {}  # this noise epoch's stream key of each weight (the kernel's seed)
        self.model = model
        self.noise = noise
        self.population_size = population_size
        self.sigma = float(sigma)
        self.step = 0
        self.params: dict[str, PerturbedParam] = {}
        self._active: _Block | None = None  # the block the hooks serve (None: hooks idle)
        self._last: _Block | None = None  # the last block entered (its tensor, unmodified, re-enters it)
        self._in_flight: dict[int, tuple[_Block, int]] = {}  # noise index -> (block, group) holding its noise
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
            self._in_flight.clear()
            self._keys.clear()
        self._last = None  # the next block recomputes its scales (sigma may change)
        self.step = int(step)
        if sigma is not None:
            if sigma <= 0:
                raise ValueError(f"sigma={sigma} must be > 0")
            self.sigma = float(sigma)

    @contextmanager
    def members(self, member_ids: torch.Tensor, grouped: bool = True):
        """Within the block, batch row ``b`` of every forward runs member ``member_ids[b]``.

        ``-1`` (``UNPERTURBED``) runs the mean weights. Nested blocks restore the outer one.
        The per-row factors are built once per block and layer, and kept while the same
        ``member_ids`` tensor is passed again unmodified (the engine re-enters a block with its slot
        tensor every decode step; an in-place change of that tensor makes a new block, which copies
        the factors of the rows that stayed and generates those of the new rows).
        ``grouped=False`` keeps one factor row per batch row even where consecutive rows share a
        member, so the shapes depend on the batch size only (a captured decode step needs that).
        """
        block = self._last
        if block is None or not block.reentered_by(member_ids, grouped):
            block = self._enter(member_ids, grouped)  # validates (a device sync on GPU) only then
        outer = self._active
        self._active, self._last = (None if block.idle else block), block
        try:
            yield self
        finally:
            self._active = outer
            if outer is not None:  # back in the outer block: its tensor re-enters it
                self._last = outer

    def remove(self) -> None:
        """Detach every hook: the model is back to a plain model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._in_flight.clear()
        self._active = self._last = None

    # ---- noise -------------------------------------------------------------------------------
    def _enter(self, member_ids, grouped: bool) -> _Block:
        """A new block: validate the ids, group the rows, and find where each group's noise is."""
        ids = torch.as_tensor(member_ids, dtype=torch.long).flatten()
        if ids.numel() and (int(ids.max()) >= self.population_size or int(ids.min()) < UNPERTURBED):
            raise ValueError(f"member ids must lie in [-1, {self.population_size}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        idle = ids.numel() > 0 and bool((ids == UNPERTURBED).all())
        block = _Block(ids, member_ids, _version(member_ids), grouped, idle)
        if block.idle:
            return block
        safe = ids.clamp(min=0)
        idx = self.noise.noise_index(safe)  # (P,)
        scale = self.noise.sign(safe) * (ids >= 0).to(torch.float32) * (self.sigma / math.sqrt(self.noise.rank))
        G = _run_length(idx) if grouped else 1
        block.row_index, block.row_scale = idx, scale
        block.group_index, block.scale = idx.view(-1, G)[:, 0], scale.view(-1, G)  # (U,), (U, G)
        self._plan(block)
        return block

    def _plan(self, block: _Block) -> None:
        """Point the block's groups at the blocks in flight that hold their noise (the rest is
        generated), then keep in flight only the noise of this block and of the rows about to run:
        those of the last block's tensor when it was changed in place since (the engine refills
        its slots in place, then prefills the new rows in a block of their own)."""
        groups = block.group_index.tolist()  # one host sync per new block
        keep = set(groups)
        last = self._last
        if last is not None and last.changed_in_place() and not last.idle:
            keep.update(self.noise.noise_index(last.given.clamp(min=0)).flatten().tolist())
        found, missing = self._held(groups)
        for j, k in enumerate(groups):
            self._in_flight[k] = (block, j)
        for k in [k for k in self._in_flight if k not in keep]:
            del self._in_flight[k]
        held = {id(b) for b, _ in self._in_flight.values()}
        block.releases = [b for b, _, _ in found if id(b) not in held]
        found = self._take_over(block, found)
        device = block.group_index.device
        block.sources = [(b, torch.tensor(dst, dtype=torch.long, device=device),
                          torch.tensor(src, dtype=torch.long, device=device)) for b, dst, src in found if dst]
        block.missing = torch.tensor(missing, dtype=torch.long, device=device)

    @staticmethod
    def _take_over(block: _Block, found: list) -> list:
        """The engine's decode block after a refill has the layout of the one before: take over the
        tensors of the released source whose groups most often sit at the same positions, so that
        only the other groups are written (``block.takeover``). Returns the sources left to copy,
        that block's first: its moved groups are read before anything else is written."""
        in_place = {id(b): [d for d, s_ in zip(dst, src) if d == s_] for b, dst, src in found
                    if b in block.releases and b.scale.shape == block.scale.shape}
        heir = max(in_place, key=lambda i: len(in_place[i]), default=None)
        if heir is None or not in_place[heir]:
            return found
        taken = set(in_place[heir])
        rest = []
        for b, dst, src in found:
            pairs = [(d, s_) for d, s_ in zip(dst, src) if id(b) != heir or d not in taken]
            rest.append((b, [d for d, _ in pairs], [s_ for _, s_ in pairs]))
        rest.sort(key=lambda e: id(e[0]) != heir)
        block.takeover = (rest[0][0], torch.tensor(sorted(taken), device=block.group_index.device))
        return rest

    def _held(self, indices: list[int]) -> tuple[list, list[int]]:
        """Where the blocks in flight hold the noise of ``indices``: ``[(block, positions, its
        groups)]``, and the positions none holds."""
        found: dict[int, tuple[_Block, list, list]] = {}
        missing = []
        for j, k in enumerate(indices):
            hit = self._in_flight.get(k)
            if hit is None:
                missing.append(j)
                continue
            entry = found.setdefault(id(hit[0]), (hit[0], [], []))
            entry[1].append(j)
            entry[2].append(hit[1])
        return list(found.values()), missing

    def _generate(self, layers: list[PerturbedParam], indices: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """This step's noise of ``indices`` for weights of one shape, in one generator call; per
        weight, float32, ``(A (k, m, r), B (k, n, r))`` or, full rank, ``(E (k, m, n),)``. Each
        index is generated once even when repeated."""
        p = layers[0]
        device = p.weight.device
        unique, inverse = torch.unique(indices, return_inverse=True)
        if unique.numel() == indices.numel():
            unique, inverse = indices, None
        out = self.noise.factors(self.step, [q.name for q in layers], p.shape, unique, device)
        if inverse is not None:
            out = tuple(t[:, inverse.to(device)] for t in out)
        return [tuple(t[i] for t in out) for i in range(len(layers))]

    def _row_factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The active block's noise of one weight in the hook's layout, with the groups' scales:
        ``(B_u (U, n, r), A_u (U, r, m), scale (U, G))``, or ``(E_u (U, m, n), scale (U, G))`` at
        full rank, in ``dtype``. Built with every other layer's on first use in the block."""
        block = self._active
        built = block.factors.get((name, dtype))
        if built is None:
            self._build(block, dtype)
            built = block.factors[(name, dtype)]
        return built

    def _build(self, block: _Block, dtype: torch.dtype) -> None:
        """Build the block's factors of every layer not built yet: copied from the blocks that hold
        them, the rest generated for several layers of one shape per call (a refill of a few rows
        would otherwise pay a generator call's fixed cost per layer), ``MAX_FLOATS_PER_CALL`` at a
        time. Each layer's copy in a block no longer in flight is dropped once copied, so a step
        holds about one copy of the noise in flight."""
        groups = torch.arange(block.group_index.numel()) if block.missing is None else block.missing
        by_shape: dict[tuple, list[PerturbedParam]] = {}
        for name, p in self.params.items():
            if (name, dtype) not in block.factors:
                by_shape.setdefault((p.shape, p.weight.device), []).append(p)
        for (shape, device), layers in by_shape.items():
            k = groups.numel()
            per_layer = k * (shape[0] * shape[1] if self.noise.full_rank else self.noise.rank * (shape[0] + shape[1]))
            batch = max(1, MAX_FLOATS_PER_CALL // max(per_layer, 1))
            for start in range(0, len(layers), batch):
                chunk = layers[start:start + batch]
                fresh = self._generate(chunk, block.group_index.to(device)[groups.to(device)]) if k else [None] * len(chunk)
                for p, noise in zip(chunk, fresh):
                    self._assemble(block, p, dtype, groups.to(device), noise)
        # every layer built: let the older blocks go (a layer dropped later is generated anew)
        block.sources, block.releases, block.missing, block.takeover = [], [], None, None

    def _assemble(self, block: _Block, p: PerturbedParam, dtype: torch.dtype, groups: torch.Tensor,
                  noise: tuple[torch.Tensor, ...] | None) -> None:
        """One layer's factors of the block: ``noise`` (generated for ``groups``) and the rest
        copied from the blocks holding it, in the hook's layout and ``dtype``."""
        key, device = (p.name, dtype), p.weight.device
        m, n = p.shape
        r = self.noise.rank
        U = block.group_index.numel()
        fill = [(groups, noise)] if noise is not None else []
        taken = block.takeover[0].factors.pop(key, None) if block.takeover is not None else None
        if taken is not None:
            out = list(taken[:-1])  # its groups block.takeover[1] already hold this block's noise
        else:
            out = [torch.empty((U, *s), dtype=dtype, device=device) for s in ([(m, n)] if self.noise.full_rank
                                                                               else [(n, r), (r, m)])]
            if block.takeover is not None:  # that layer was given up: generate those groups too
                dst = block.takeover[1].to(device)
                fill.append((dst, self._generate([p], block.group_index.to(device)[dst])[0]))
        for source, dst, src in block.sources:  # the block taken over first: its moved groups are read
            held = taken if taken is not None and source is block.takeover[0] else source.factors.get(key)
            if held is None:  # that block never ran this layer, or gave it up: generate
                fill.append((dst.to(device), self._generate([p], block.group_index.to(device)[dst.to(device)])[0]))
                continue
            for o, h in zip(out, held[:-1]):
                o[dst.to(device)] = h[src.to(device)]
        for dst, fresh in fill:
            if not self.noise.full_rank:
                fresh = (fresh[1], fresh[0].transpose(1, 2))  # (k, n, r), (k, r, m)
            for o, f in zip(out, fresh):
                o[dst] = f.to(dtype)
        for source in block.releases:
            source.factors.pop(key, None)
        block.factors[key] = (*out, block.scale.to(device, dtype))

    def factors(self, name: str, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This step's noise of noise ``indices (k,)`` for weight ``name``, generated, float32, in
        ``noise.py``'s layout: ``(A (k, m, r), B (k, n, r))``, or ``(E (k, m, n),)`` at full rank.
        The ES update reads it chunk by chunk. (Copying what the rows in flight hold instead did
        not measurably pay: docs/benchmarks.md, issue 17.)"""
        p = self.params[name]
        return self._generate([p], torch.as_tensor(indices, dtype=torch.long).to(p.weight.device))[0]

    def gather_rows(self, dtype: torch.dtype) -> None:
        """Build every layer's factors of the active members block now (see ``_row_factors``), so
        that forwards inside the block only read them: no host sync, no dictionary writes (what a
        compiled or captured forward needs). Does nothing outside a block or when all rows are
        unperturbed."""
        if self._active is not None:
            for name in self.params:
                self._row_factors(name, dtype)

    def _add_delta_(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out += (sigma/sqrt(r)) s_i (x B_i) A_i^T`` (full rank: ``sigma s_i x E_i^T``) row by
        row, in place when autograd is off (else on a copy); returns ``out``.

        ``x (P, ..., n)``, ``out (P, ..., m)``, ``T`` tokens per row. The rows of a group ``(G T)``
        share the factors. At rank 1 on CPU in float32 the fused operation of ``lowrank_cpu`` adds
        the term in one pass per row (see ``_path``). Otherwise ``x B`` is one batched matmul
        ``(U, G T, n) @ (U, n, r)`` (CPU and GPU libraries run it faster than an elementwise product
        and a sum, except for groups of at most ``VECDOT_MAX_ROWS`` rows at rank 1: a decode step),
        the scaled result is added through ``A`` by a broadcast multiply-add when ``r = 1`` (a
        batched matmul with an inner dimension of 1 is slower than that) and a batched matmul
        otherwise.
        """
        if torch.is_grad_enabled() or not out.is_contiguous():
            out = out.contiguous().clone()
        x = x.contiguous()
        path = self._path(x, out)
        if path == "triton":
            block = self._active
            if name not in self._keys:
                self._keys[name] = self.noise.key(self.step, name)
            return _kernel.lowrank_add_(out, x, block.row_index, block.row_scale, self._keys[name], self.noise.rank)
        m, n = self.params[name].shape
        *noise, scale = self._row_factors(name, x.dtype)
        U, G = scale.shape
        T = x.numel() // (x.shape[0] * n)
        og = out.view(U, G * T, m)
        if self.noise.full_rank:
            (Eu,) = noise  # (U, m, n)
            d = torch.bmm(x.view(U, G * T, n), Eu.transpose(1, 2))  # (U, G T, m)
            d.view(U, G, T, m).mul_(scale[:, :, None, None])
            og.add_(d)
            return out
        Bu, Au = noise  # (U, n, r), (U, r, m)
        r = Bu.shape[2]
        if path == "cpu":  # rank 1: (U, n, 1) and (U, 1, m) are (U, n) and (U, m) in memory
            _cpu.lowrank1_add_(og, x.view(U, G * T, n), Bu.view(U, n), Au.view(U, m), scale, T, check=False)
            return out
        if r == 1 and G * T <= VECDOT_MAX_ROWS:  # (U, n, 1) is (U, 1, n) in memory
            xb = torch.linalg.vecdot(x.view(U, G * T, n), Bu.view(U, 1, n)).unsqueeze(-1)  # (U, G T, 1)
        else:
            xb = torch.bmm(x.view(U, G * T, n), Bu)  # (U, G T, r)
        xb.view(U, G, T, r).mul_(scale[:, :, None, None])
        if r == 1:
            og.addcmul_(xb, Au)  # (U, G T, 1) * (U, 1, m)
        else:
            og.baddbmm_(xb, Au)
        return out

    def _path(self, x: torch.Tensor, out: torch.Tensor) -> str:
        """How this forward adds the low-rank term (see ``__init__``): ``"triton"`` (the kernel that
        makes its noise), ``"cpu"`` (``lowrank_cpu``'s fused operation: rank 1, float32 CPU tensors;
        with ``"auto"`` only where it could be built) or ``"torch"``. Torch at full rank, inside a
        compiled graph (it reads the block's factors, built before the step by ``gather_rows``) and
        where autograd must see the term."""
        if self.noise_kernel == "torch" or self.noise.full_rank or torch.compiler.is_compiling():
            return "torch"
        if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad):
            return "torch"
        if self.noise_kernel == "triton" or (self.noise_kernel == "auto" and x.is_cuda and _kernel.available()):
            return "triton"
        if self.noise.rank == 1 and x.device.type == "cpu" and x.dtype == torch.float32 and _cpu.available():
            return "cpu"
        return "torch"

    def _make_hook(self, p: PerturbedParam):
        def hook(module, args, output):
            block = self._active
            if block is None:
                return None
            x = args[0]
            if x.shape[0] != block.ids.numel():
                raise RuntimeError(f"{p.name}: batch has {x.shape[0]} rows but {block.ids.numel()} member ids "
                                   "were given; give one member id per batch row")
            return self._add_delta_(p.name, x, output)
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
