"""A byte-level minGRU language model, in float and in integer-only form (EGGROLL, int8 pretraining).

EGGROLL (Sarkar et al. 2025, arXiv 2511.16652) pretrains a minGRU language model whose weights
and activations are int8 and whose forward pass uses integer arithmetic only, which no gradient
method can train. minGRU (Feng et al. 2024, "Were RNNs All We Needed?") is

    z_t = sigmoid(W_z x_t),   c_t = W_c x_t,   h_t = (1 - z_t) * h_{t-1} + z_t * c_t

The architecture is written ONCE, in :func:`mingru_forward`, against a small set of operations
(``embed, linear, norm, gate, scan, act, add``). :class:`FloatOps` implements them in float32 (the
backprop baseline, :class:`FloatMinGRU`); :class:`IntOps` implements them with integers only
(:class:`IntMinGRU`):

* weights are int8; every matmul is int8 x int8 -> int32 (``torch._int_mm``), then a rounding
  right shift and saturation back to int8;
* the norm divides by the mean absolute value through a reciprocal lookup table;
* the minGRU gate is a 256-entry sigmoid lookup table in 1/128 units, the mix is a shift by 7;
* the MLP activation is ReLU (a clamp); residual adds saturate at +-127;
* logits are int8 in 1/16-bit units (base-2 logits), and :func:`int_log_softmax` turns them into
  log2-probabilities in 1/256-bit units with an exp2 table and an integer log2 (leading-bit
  count plus a mantissa table).

No float tensor is created inside the integer forward; ``tests/test_mingru.py`` checks every op's
output dtype with a ``TorchFunctionMode``. Low-rank population members (one member per batch row)
enter the integer forward as already-gathered int8 factors (``LowRank``); drawing them and the
update live in :mod:`eggroll_ft.integer_es`. This module knows nothing of data or of training.

Devices: every tensor of the integer forward lives on the weights' device (lookup tables are cached
per device by :func:`tables`). CUDA torch has no integer ``bmm`` and its ``torch._int_mm`` needs
more than 16 rows and inner/output sizes that are multiples of 8, so off the CPU the per-row
low-rank products (:func:`lowrank_mm`) are elementwise int32 multiply-and-sum loops over the rank,
and :func:`int_mm` zero-pads to legal shapes. Both give exactly the CPU results; the module
switches ``LOWRANK_IMPL`` and ``PAD_INT_MM`` force either path on any device (tests do so on the
CPU). The CUDA path has not been run on a GPU yet (docs/mingru.md, "Limits").

Block layout (pre-norm): ``x += out(minGRU(norm(x)))``, ``x += down(relu(up(norm(x))))``, then
``head(norm(x))``. Weight names (``weight_shapes``) are shared by both forms and are the noise
stream ids.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

LOGIT_UNITS = 16      # int logits: 16 units = 1 bit (base-2 logits)
LOGP_UNITS = 256      # int log-probabilities: 256 units = 1 bit
GATE_ONE = 128        # int gate: 128 = 1.0
NORM_TARGET = 32      # int norm output: mean |x| = 32
BIAS_INPUT = 32       # constant int input of each matrix's bias column
_RECIP_BITS = 12
_INT8_MAX = 127

# Kernel choice of the integer forward (None: by device; set them to force a path on any device).
LOWRANK_IMPL: str | None = None  # "bmm" (CPU default) | "elementwise" (default off the CPU)
PAD_INT_MM: bool | None = None  # zero-pad torch._int_mm operands to CUDA-legal shapes (default off the CPU)


@dataclass(frozen=True)
class MinGRUConfig:
    """Architecture of the byte-level minGRU LM (shared by the float and the integer model)."""

    d_model: int = 64
    n_layers: int = 2
    mlp_mult: int = 4
    vocab_size: int = 256
    init_std: int = 16  # std of the int8 weight initialisation (integer model only)

    def __post_init__(self):
        for name in ("d_model", "n_layers", "mlp_mult", "vocab_size", "init_std"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.vocab_size > 256:
            raise ValueError(f"vocab_size={self.vocab_size} must be <= 256 (bytes)")
        if self.init_std > 64:
            raise ValueError(f"init_std={self.init_std} must be <= 64 to leave int8 headroom")


def weight_shapes(cfg: MinGRUConfig) -> dict[str, tuple[int, int]]:
    """Name -> ``(out, in + 1)`` of every weight matrix (``embed`` is ``(vocab, d_model)``).

    The last column of each linear weight is its bias: the linear op feeds it a constant input
    (``BIAS_INPUT`` in the integer model, 1.0 in the float one), so perturbations and updates treat
    biases exactly like the other weights.
    """
    d, h, v = cfg.d_model, cfg.mlp_mult * cfg.d_model, cfg.vocab_size
    shapes = {"embed": (v, d)}
    for i in range(cfg.n_layers):
        shapes.update({f"l{i}_gate": (d, d + 1), f"l{i}_cand": (d, d + 1), f"l{i}_out": (d, d + 1),
                       f"l{i}_up": (h, d + 1), f"l{i}_down": (d, h + 1)})
    shapes["head"] = (v, d + 1)
    return shapes


def num_params(cfg: MinGRUConfig) -> int:
    return sum(m * n for m, n in weight_shapes(cfg).values())


def mingru_forward(ops, cfg: MinGRUConfig, tokens: torch.Tensor, state: torch.Tensor):
    """The architecture. ``tokens (P, T)`` long, ``state (L, P, D)`` -> logits ``(P, T, V)``, state."""
    x = ops.embed(tokens)  # (P, T, D)
    last = []
    for i in range(cfg.n_layers):
        u = ops.norm(x)
        z = ops.gate(ops.linear(f"l{i}_gate", u))  # (P, T, D)
        c = ops.linear(f"l{i}_cand", u)
        h, h_last = ops.scan(z, c, state[i])  # (P, T, D), (P, D)
        x = ops.add(x, ops.linear(f"l{i}_out", h))
        x = ops.add(x, ops.linear(f"l{i}_down", ops.act(ops.linear(f"l{i}_up", ops.norm(x)))))
        last.append(h_last)
    return ops.linear("head", ops.norm(x)), torch.stack(last)  # (P, T, V), (L, P, D)


# ----------------------------------------------------------------------------- float form
class FloatOps:
    """The operations in float32 (autograd-friendly)."""

    def __init__(self, weights):
        self.w = weights

    def embed(self, tokens):
        return self.w["embed"][tokens]

    def linear(self, name, x):
        w = self.w[name]
        return x @ w[:, :-1].T + w[:, -1]  # last column: bias

    def norm(self, x):
        return x / (x.abs().mean(-1, keepdim=True) + 1e-5)

    def gate(self, p):
        return torch.sigmoid(p)

    def scan(self, z, c, h):
        outs = []
        for t in range(z.shape[1]):
            h = (1 - z[:, t]) * h + z[:, t] * c[:, t]
            outs.append(h)
        return torch.stack(outs, 1), h

    def act(self, x):
        return torch.relu(x)

    def add(self, x, y):
        return x + y


class FloatMinGRU(nn.Module):
    """The float32 minGRU LM, trained by backprop in the baseline. Logits are in nats."""

    def __init__(self, cfg: MinGRUConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)
        self.weights = nn.ParameterDict()
        for name, (m, n) in weight_shapes(cfg).items():
            w = torch.randn(m, n, generator=g) * (1.0 if name == "embed" else (n - 1) ** -0.5)
            if name != "embed":
                w[:, -1] = 0.0  # biases start at zero
            self.weights[name] = nn.Parameter(w)

    def init_state(self, batch: int) -> torch.Tensor:
        """Zero state ``(L, batch, D)`` float32 on the weights' device."""
        return torch.zeros(self.cfg.n_layers, batch, self.cfg.d_model, device=self.weights["embed"].device)

    def forward(self, tokens, state):
        return mingru_forward(FloatOps(self.weights), self.cfg, tokens, state)


# ----------------------------------------------------------------------------- integer form
def _sat8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)


def round_shift(x: torch.Tensor, s: int) -> torch.Tensor:
    """``round(x / 2^s)`` on integer tensors (halves round up), by an add and an arithmetic shift."""
    return (x + (1 << (s - 1))) >> s if s > 0 else x


def _build_tables() -> dict[str, torch.Tensor]:
    """Integer lookup tables, built once in Python ints (no float tensor is ever made)."""
    recip = [0] + [round((NORM_TARGET << _RECIP_BITS) / s) for s in range(1, 128)]
    sigmoid = [round(GATE_ONE / (1 + math.exp(-(p - 128) / NORM_TARGET))) for p in range(256)]
    exp2 = [round(65536 * 2 ** (-d / LOGIT_UNITS)) for d in range(256)]  # 2^16 * 2^(-d/16)
    log2 = [round(LOGP_UNITS * math.log2(1 + i / 256)) for i in range(256)]  # mantissa table
    return {k: torch.tensor(v, dtype=torch.int32) for k, v in
            dict(recip=recip, sigmoid=sigmoid, exp2=exp2, log2=log2).items()}


TABLES = _build_tables()  # on the CPU; tables(device) for any device
_TABLES_ON = {torch.device("cpu"): TABLES}


def tables(device) -> dict[str, torch.Tensor]:
    """The lookup tables on ``device`` (copied from ``TABLES`` once per device, then cached)."""
    device = torch.device(device)
    if device not in _TABLES_ON:
        _TABLES_ON[device] = {k: v.to(device) for k, v in TABLES.items()}
    return _TABLES_ON[device]


def _round_up(v: int, multiple: int) -> int:
    return -(-v // multiple) * multiple


def int_mm(x: torch.Tensor, w: torch.Tensor, pad: bool | None = None) -> torch.Tensor:
    """``x (M, K) int8 @ w (N, K)^T int8 -> (M, N) int32`` through ``torch._int_mm``.

    CUDA's ``_int_mm`` (cuBLASLt) needs ``M > 16`` and ``K``, ``N`` multiples of 8. With ``pad``
    (default: ``PAD_INT_MM``, else on when ``x`` is off the CPU) the operands get zero rows and
    columns up to legal sizes and the result is sliced back: exact, zeros add nothing. Rows go up
    to a multiple of 8 and at least 32 (more than the check asks: cuBLASLt gave wrong int8 results
    at M = 17 in some CUDA releases, pytorch#107671). The layout is x row-major, ``w.T`` a
    transposed view of a contiguous ``w`` (the usual int8 GEMM layout).
    """
    pad = (PAD_INT_MM if PAD_INT_MM is not None else x.device.type != "cpu") if pad is None else pad
    (m, k), n = x.shape, w.shape[0]
    if not pad:
        return torch._int_mm(x, w.T)
    mp, kp, np_ = max(_round_up(m, 8), 32), _round_up(k, 8), _round_up(n, 8)
    if (mp, kp, np_) == (m, k, n):
        return torch._int_mm(x.contiguous(), w.contiguous().T)
    x = torch.nn.functional.pad(x, (0, kp - k, 0, mp - m))  # (Mp, Kp) int8
    w = torch.nn.functional.pad(w, (0, kp - k, 0, np_ - n))  # (Np, Kp) int8
    return torch._int_mm(x, w.T)[:m, :n].contiguous()


def int_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x (..., n) int8 @ w (m, n)^T int8 -> (..., m) int32`` with int32 accumulation."""
    flat = x.reshape(-1, x.shape[-1])
    return int_mm(flat, w).view(*x.shape[:-1], w.shape[0])


def lowrank_mm(u: torch.Tensor, v: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """Per-row products ``u[p] @ v[p]^T``: ``u (P, T, k)``, ``v (P, J, k)`` int32 -> ``(P, T, J)`` int32.

    One of ``k`` and ``J`` is the perturbation rank r (at most 4). ``impl`` (default:
    ``LOWRANK_IMPL``, else by device) is ``"bmm"`` (``torch.bmm``, CPU only: CUDA has no integer
    bmm) or ``"elementwise"``: int32 multiplies and ``sum(dtype=int32)``, looping over the smaller
    of ``k`` and ``J`` so no ``(P, T, n, r)`` tensor is made. Integer sums are exact (and wrap the
    same way in any order), so both give the same bits.
    """
    impl = impl or LOWRANK_IMPL or ("bmm" if u.device.type == "cpu" else "elementwise")
    if impl == "bmm":
        return torch.bmm(u, v.transpose(1, 2))
    if impl != "elementwise":
        raise ValueError(f"impl={impl!r} must be 'bmm' or 'elementwise'")
    if v.shape[1] <= u.shape[-1]:  # few outputs (x B: J = r): one product-sum over k per output
        return torch.stack([(u * v[:, None, j]).sum(-1, dtype=torch.int32) for j in range(v.shape[1])], -1)
    out = u[..., :1] * v[:, None, :, 0]  # few inputs (u A^T: k = r): add up k rank-one terms
    for c in range(1, u.shape[-1]):
        out = out + u[..., c:c + 1] * v[:, None, :, c]
    return out  # (P, T, J)


@dataclass
class LowRank:
    """Per-row low-rank int8 perturbations: row ``b`` adds ``sign[b] * A[b] B[b]^T / 2^sigma_shift``.

    ``factors[name] = (A (P, m, r) int8, B (P, n, r) int8)``; ``sign (P,)`` int32 in {-1, 0, +1}
    (0 = unperturbed row). The effective weight of row ``b`` is the rational matrix
    ``W + sign * A B^T / 2^sigma_shift``, and the forward rounds ``x (W 2^s + sign A B^T)^T / 2^s``.
    """

    factors: dict
    sign: torch.Tensor
    sigma_shift: int


class IntOps:
    """The operations with integer tensors only (int8 activations, int32 accumulators)."""

    def __init__(self, weights: dict, shifts: dict, lowrank: LowRank | None = None):
        self.w, self.shifts, self.lr = weights, shifts, lowrank

    def _delta(self, name, acc_rows_fn):
        """``sign * (x B) A^T`` for rows whose member perturbs ``name``, shifted by sigma_shift."""
        a, b = self.lr.factors[name]
        d = acc_rows_fn(a.to(torch.int32), b.to(torch.int32))  # (P, T, m) int32
        return round_shift(d * self.lr.sign.view(-1, 1, 1), self.lr.sigma_shift)

    def embed(self, tokens):
        e = self.w["embed"][tokens]  # (P, T, D) int8
        if self.lr is None or "embed" not in self.lr.factors:
            return e
        # row lookup of the perturbed table: A[tok] B^T
        d = self._delta("embed", lambda a, b: lowrank_mm(torch.gather(
            a, 1, tokens.unsqueeze(-1).expand(-1, -1, a.shape[-1])), b))
        return _sat8(e.to(torch.int32) + d)

    def linear(self, name, x):
        x = torch.cat([x, torch.full_like(x[..., :1], BIAS_INPUT)], -1)  # (P, T, n + 1): bias input
        acc = int_matmul(x, self.w[name])  # (P, T, m) int32
        if self.lr is not None and name in self.lr.factors:
            xi = x.to(torch.int32)
            acc = acc + self._delta(name, lambda a, b: lowrank_mm(lowrank_mm(xi, b.transpose(1, 2)), a))
        return _sat8(round_shift(acc, self.shifts[name]))

    def norm(self, x):
        xi = x.to(torch.int32)
        mean_abs = torch.div(xi.abs().sum(-1, keepdim=True, dtype=torch.int32), x.shape[-1], rounding_mode="floor")
        recip = tables(x.device)["recip"][mean_abs.clamp(1, _INT8_MAX)]  # 32 * 2^12 / mean|x|
        return _sat8(round_shift(xi * recip, _RECIP_BITS))

    def gate(self, p):
        return tables(p.device)["sigmoid"][p.to(torch.int64) + 128]  # (...) int32 in [0, 128]

    def scan(self, z, c, h):
        h = h.to(torch.int32)
        c = c.to(torch.int32)
        outs = []
        for t in range(z.shape[1]):
            h = round_shift((GATE_ONE - z[:, t]) * h + z[:, t] * c[:, t], 7)  # convex mix, stays int8
            outs.append(h)
        return torch.stack(outs, 1).to(torch.int8), h.to(torch.int8)

    def act(self, x):
        return x.clamp(min=0)

    def add(self, x, y):
        return _sat8(x.to(torch.int32) + y.to(torch.int32))


def default_shifts(cfg: MinGRUConfig) -> dict[str, int]:
    """Right shift of each matmul: brings an int32 sum of ``n`` products back to int8 scale.

    The input has std about 40 (norm target 32 in mean |x|), the weights std ``init_std``; the
    output aims at std 32 for hidden layers and 16 (one bit) for the logits.
    """
    shifts = {}
    for name, (m, n) in weight_shapes(cfg).items():
        if name == "embed":
            continue
        target = 16 if name == "head" else 32
        shifts[name] = max(0, round(math.log2(math.sqrt(n - 1) * 40 * cfg.init_std / target)))
    return shifts


class IntMinGRU:
    """The integer-only minGRU LM: int8 weights, int8 activations, integer forward.

    Not an ``nn.Module`` (nothing here is differentiable); ``weights`` maps the names of
    :func:`weight_shapes` to int8 ``(m, n)`` tensors, all on one device (the model's: tokens and
    state go there too), ``shifts`` to each matmul's right shift.
    """

    def __init__(self, cfg: MinGRUConfig, weights: dict, shifts: dict | None = None):
        self.cfg = cfg
        self.shifts = dict(default_shifts(cfg) if shifts is None else shifts)
        for name, shape in weight_shapes(cfg).items():
            w = weights[name]
            if w.dtype != torch.int8 or tuple(w.shape) != shape:
                raise ValueError(f"weight {name} has dtype={w.dtype} shape={tuple(w.shape)}, "
                                 f"expected int8 {shape}")
            if w.device != weights["embed"].device:
                raise ValueError(f"weight {name} is on {w.device}, embed on {weights['embed'].device}")
        self.weights = {k: weights[k].contiguous() for k in weight_shapes(cfg)}

    @classmethod
    def init(cls, cfg: MinGRUConfig, seed: int = 0, device=None) -> "IntMinGRU":
        """Weights ``round(N(0, init_std^2))`` clipped to int8, biases 0 (drawn outside any forward).

        Drawn on the CPU with a seeded generator, then moved to ``device``: every device starts
        from the same weights.
        """
        g = torch.Generator().manual_seed(seed)
        weights = {name: torch.randn(m, n, generator=g).mul(cfg.init_std).round()
                   .clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
                   for name, (m, n) in weight_shapes(cfg).items()}
        for name, w in weights.items():
            if name != "embed":
                w[:, -1] = 0
        model = cls(cfg, weights)
        return model if device is None else model.to(device)

    @property
    def device(self) -> torch.device:
        return self.weights["embed"].device

    def to(self, device) -> "IntMinGRU":
        """Move the weights to ``device`` (in place; returns ``self``)."""
        self.weights = {k: w.to(device) for k, w in self.weights.items()}
        return self

    def init_state(self, batch: int) -> torch.Tensor:
        """Zero state ``(L, batch, D)`` int8 on the model's device."""
        return torch.zeros(self.cfg.n_layers, batch, self.cfg.d_model, dtype=torch.int8, device=self.device)

    def forward(self, tokens, state, lowrank: LowRank | None = None):
        """``tokens (P, T)`` long, ``state (L, P, D)`` int8 -> int8 logits ``(P, T, V)``, int8 state."""
        return mingru_forward(IntOps(self.weights, self.shifts, lowrank), self.cfg, tokens, state)

    __call__ = forward

    def state_dict(self) -> dict:
        return {"weights": dict(self.weights), "shifts": dict(self.shifts)}


def int_log_softmax(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Integer log2-probability of ``targets`` under int8 base-2 logits, in 1/256-bit units.

    ``logits (..., V)`` int8 in 1/16-bit units, ``targets (...)`` long -> ``(...)`` int32 (<= 0).
    ``log2 p_t = (l_t - max) / 16 - log2(sum_j 2^((l_j - max) / 16))``; the sum uses the exp2
    table (2^16 scale, <= 2^24 for 256 classes), its log2 the leading-bit position plus a table of
    ``log2(1 + mantissa / 256)``.
    """
    li = logits.to(torch.int32)
    top = li.max(-1, keepdim=True).values
    table = tables(logits.device)
    total = table["exp2"][(top - li).to(torch.int64)].sum(-1, dtype=torch.int32)  # (...) int32 in [2^16, 2^24]
    exponent = torch.zeros_like(total)
    for k in range(1, 31):
        exponent = exponent + (total >= (1 << k)).to(torch.int32)  # floor(log2 total)
    mantissa = (total >> (exponent - 8)) - 256  # 8 bits after the leading one (exponent >= 16)
    log2_total = LOGP_UNITS * (exponent - 16) + table["log2"][mantissa.to(torch.int64)]
    picked = torch.gather(li - top, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked * (LOGP_UNITS // LOGIT_UNITS) - log2_total


def exact_bits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Exact ``-log2 p(target)`` of the integer model's distribution (float64; for metrics only)."""
    lp = torch.log_softmax(logits.to(torch.float64) * (math.log(2) / LOGIT_UNITS), -1)
    return -torch.gather(lp, -1, targets.unsqueeze(-1)).squeeze(-1) / math.log(2)
