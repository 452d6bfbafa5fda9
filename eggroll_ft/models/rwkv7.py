"""RWKV-7 "Goose" (x070) in plain PyTorch, with every weight matmul an ``nn.Linear``.

RWKV-7: Peng et al. 2025, "RWKV-7 'Goose' with Expressive Dynamic State Evolution",
arXiv 2503.14456; the computation follows BlinkDL's reference (``rwkv`` package,
``RWKV_x070``), which the tests check to 1e-4 of the logits' std. EGGROLL (arXiv 2511.16652)
fine-tunes RWKV-7 1.5B/7B: its recurrent state is a fixed ``(H, N, N)`` matrix per layer and row,
so thousands of sequences decode side by side at O(1) cost per token.

The model knows nothing of populations, rewards or decoding loops. Every matmul of the time mix
(receptance, key, value, output and the low-rank w/a/v/g matrices) and the channel mix (FFN key,
value) is an ``nn.Linear`` called on a ``(B, T, in)`` input, so ``eggroll_ft.population.Population``
hooks them and makes each batch row a different member with no code here. The embedding and the
head are reached through ``get_input_embeddings``/``get_output_embeddings`` and not perturbed by
default, as for HF models.

State, per layer and row: the time mix's last input (token shift), the WKV matrix ``(H, N, N)``
indexed ``[value, key]`` and kept in float32, and the channel mix's last input. ``forward``
updates the state it is given in place and returns it. Left padding (``attention_mask == 0``
before the first real token) leaves state and token shift untouched, so a left-padded row gives
what the row alone gives. Checkpoint formats live in ``rwkv7_checkpoint``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import rwkv7_checkpoint as ckpt

DECAY_SCALE = math.exp(-0.5)  # w = exp(-e^-0.5 * sigmoid(.)) keeps every decay in (0.545, 1)


@dataclass
class RWKV7Config:
    """Shape of an RWKV-7 model; ``from_pretrained`` reads every field off the checkpoint."""

    vocab_size: int = 65536
    """Vocabulary size (the World tokenizer's 65,536 for the official models)."""
    hidden_size: int = 768
    """Width ``C`` (official ``n_embd``)."""
    num_hidden_layers: int = 12
    """Number of blocks ``L``."""
    head_size: int = 64
    """Head size ``N``; ``H = C // N`` heads (64 in every official model)."""
    decay_low_rank_dim: int = 64
    """Rank of the decay LoRA ``w1 (C -> D_w)``, ``w2 (D_w -> C)``."""
    a_low_rank_dim: int = 64
    """Rank of the in-context learning-rate LoRA ``a1``, ``a2``."""
    v_low_rank_dim: int = 32
    """Rank of the value-residual LoRA ``v1``, ``v2`` (layers >= 1)."""
    gate_low_rank_dim: int = 128
    """Rank of the output-gate LoRA ``g1``, ``g2``."""
    intermediate_size: int = 3072
    """FFN width (4 C in official models)."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    group_norm_eps: float = 64e-5
    """Epsilon of the per-head GroupNorm ``ln_x`` (official value)."""

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", int) and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{f.name}={v!r} must be a positive integer")
        if self.hidden_size % self.head_size:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of head_size={self.head_size}")

    # RWKV ends text with token 0 and pads with it. Class attributes, not fields: transformers.Trainer
    # may align them with its tokenizer through ``get_text_config()``.
    eos_token_id = 0
    pad_token_id = 0
    bos_token_id = None

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_size

    def get_text_config(self, *_, **__) -> "RWKV7Config":
        """transformers' multimodal accessor (``Trainer`` calls it); this config is the text config."""
        return self

    @classmethod
    def from_size(cls, hidden_size: int, num_hidden_layers: int, vocab_size: int = 65536,
                  head_size: int = 64) -> "RWKV7Config":
        """A config with RWKV-LM's suggested low-rank dims for width ``C`` (``round(k sqrt(C) / 32) * 32``,
        at least 32; k = 2.5 decay, 2.5 ICLR, 1.7 value, 5 gate) and a 4 C FFN.

        >>> c = RWKV7Config.from_size(768, 12)  # the 0.1B g1 shape
        >>> (c.decay_low_rank_dim, c.a_low_rank_dim, c.v_low_rank_dim, c.gate_low_rank_dim, c.intermediate_size)
        (64, 64, 32, 128, 3072)
        """
        dim = lambda k: max(32, int(round(k * hidden_size ** 0.5 / 32)) * 32)  # noqa: E731
        return cls(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                   head_size=head_size, decay_low_rank_dim=dim(2.5), a_low_rank_dim=dim(2.5),
                   v_low_rank_dim=dim(1.7), gate_low_rank_dim=dim(5.0), intermediate_size=4 * hidden_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RWKV7Config":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class RWKV7State:
    """Recurrent state of a batch: layer-major tensors, row ``b`` of each is one sequence."""

    att_x_prev: torch.Tensor  # (L, B, C) time-mix token shift, model dtype
    wkv: torch.Tensor  # (L, B, H, N, N) float32, [value, key]
    ffn_x_prev: torch.Tensor  # (L, B, C) channel-mix token shift

    @property
    def batch_size(self) -> int:
        return self.wkv.shape[1]

    def select(self, rows) -> "RWKV7State":
        """A new state holding ``rows`` (indices or a boolean mask) of this one."""
        rows = torch.as_tensor(rows, device=self.wkv.device)
        return RWKV7State(self.att_x_prev[:, rows], self.wkv[:, rows], self.ffn_x_prev[:, rows])

    def assign(self, rows, other: "RWKV7State") -> "RWKV7State":
        """In place: rows ``rows`` of this state become ``other``'s rows (in order). Returns self."""
        rows = torch.as_tensor(rows, device=self.wkv.device)
        self.att_x_prev[:, rows] = other.att_x_prev.to(self.att_x_prev.dtype)
        self.wkv[:, rows] = other.wkv.to(self.wkv.dtype)
        self.ffn_x_prev[:, rows] = other.ffn_x_prev.to(self.ffn_x_prev.dtype)
        return self

    def reset(self, rows) -> "RWKV7State":
        """In place: rows ``rows`` start afresh (zero state, as before a first token). Returns self."""
        rows = torch.as_tensor(rows, device=self.wkv.device)
        for t in (self.att_x_prev, self.wkv, self.ffn_x_prev):
            t[:, rows] = 0
        return self

    def clone(self) -> "RWKV7State":
        return RWKV7State(self.att_x_prev.clone(), self.wkv.clone(), self.ffn_x_prev.clone())

    def to(self, device) -> "RWKV7State":
        return RWKV7State(self.att_x_prev.to(device), self.wkv.to(device), self.ffn_x_prev.to(device))

    @staticmethod
    def cat(states: list["RWKV7State"]) -> "RWKV7State":
        """Rows of several states stacked into one batch."""
        return RWKV7State(*(torch.cat([getattr(s, n) for s in states], dim=1) for n in ("att_x_prev", "wkv", "ffn_x_prev")))


@dataclass
class RWKV7Output:
    logits: torch.Tensor  # (B, T, V) float32 (or the last ``logits_to_keep`` positions)
    state: RWKV7State


def token_shift(x: torch.Tensor, x_prev: torch.Tensor, mask: torch.Tensor | None):
    """``(previous token's x (B, T, C), new x_prev (B, C))``; padded positions repeat ``x_prev``.

    With left padding only, replacing padded inputs by the carried ``x_prev`` makes the first real
    token see the carried value and leaves ``x_prev`` unchanged over an all-padding chunk.
    """
    if mask is not None:
        x = torch.where(mask[..., None], x, x_prev[:, None].to(x.dtype))
    return torch.cat([x_prev[:, None].to(x.dtype), x[:, :-1]], dim=1), x[:, -1]


def wkv7_scan(state, r, w, k, v, a, b, mask):
    """The RWKV-7 state update (arXiv 2503.14456), one step per token, in float32.

    ``S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T`` and ``o_t = S_t r_t``, with
    ``a = -kk``, ``b = kk * a_iclr``: the rank-1 ``S a b^T`` is applied as two matrix-vector
    products, O(N^2) per head. ``state (B, H, N, N)``, inputs ``(B, T, H, N)``; rows whose ``mask``
    is 0 at step t keep their state. Returns ``(o (B, T, H, N), state)``.
    """
    B, T, H, N = r.shape
    S = state.reshape(B * H, N, N)
    col = lambda u, t: u[:, t].reshape(B * H, N, 1)  # noqa: E731
    row = lambda u, t: u[:, t].reshape(B * H, 1, N)  # noqa: E731
    outs = []
    for t in range(T):
        new = S * row(w, t)  # decay along the key axis
        new.baddbmm_(torch.bmm(S, col(a, t)), row(b, t))  # + (S a) b^T
        new.baddbmm_(col(v, t), row(k, t))  # + v k^T
        S = new if mask is None else torch.where(mask[:, t].repeat_interleave(H)[:, None, None], new, S)
        outs.append(torch.bmm(S, col(r, t)).view(B, H, N))
    return torch.stack(outs, dim=1), S.view(B, H, N, N)


class TimeMix(nn.Module):
    """RWKV-7 time mixing (official ``RWKV_x070_TMix``): token shift, WKV state, gated output."""

    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        C, H, N = cfg.hidden_size, cfg.num_heads, cfg.head_size
        self.layer_id, self.H, self.N = layer_id, H, N
        self.group_norm_eps = cfg.group_norm_eps
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            setattr(self, name, nn.Parameter(torch.zeros(C)))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.w1, self.w2 = nn.Linear(C, cfg.decay_low_rank_dim, bias=False), nn.Linear(cfg.decay_low_rank_dim, C, bias=False)
        self.a1, self.a2 = nn.Linear(C, cfg.a_low_rank_dim, bias=False), nn.Linear(cfg.a_low_rank_dim, C, bias=False)
        if layer_id > 0:  # value residual to layer 0's value (v_first)
            self.v0 = nn.Parameter(torch.zeros(C))
            self.v1, self.v2 = nn.Linear(C, cfg.v_low_rank_dim, bias=False), nn.Linear(cfg.v_low_rank_dim, C, bias=False)
        self.g1, self.g2 = nn.Linear(C, cfg.gate_low_rank_dim, bias=False), nn.Linear(cfg.gate_low_rank_dim, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=cfg.group_norm_eps)

    def forward(self, x, x_prev, wkv, v_first, mask):
        B, T, C = x.shape
        H, N = self.H, self.N
        prev, x_last = token_shift(x, x_prev, mask)
        coeffs = torch.stack([self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g])[:, None, None]  # (6, 1, 1, C)
        xr, xw, xk, xv, xa, xg = torch.addcmul(x, prev - x, coeffs).unbind(0)  # six lerps in one op

        r = self.receptance(xr)  # (B, T, C)
        w = self.w0 + self.w2(torch.tanh(self.w1(xw)))
        k = self.key(xk)
        v = self.value(xv)
        a = torch.sigmoid(self.a0 + self.a2(self.a1(xa)))  # in-context learning rate
        g = self.g2(torch.sigmoid(self.g1(xg)))

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
        k = k * (1 + (a - 1) * self.k_a)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + self.v2(self.v1(xv)))
        w = torch.exp(-DECAY_SCALE * torch.sigmoid(w.float()))  # (B, T, C) in (0.545, 1)

        heads = lambda t: t.float().view(B, T, H, N)  # noqa: E731
        o, wkv = wkv7_scan(wkv, heads(r), heads(w), heads(k), heads(v), heads(-kk), heads(kk * a), mask)
        o = F.group_norm(o.to(x.dtype).reshape(B * T, C), H, self.ln_x.weight, self.ln_x.bias,
                         eps=self.group_norm_eps).view(B, T, C)
        bonus = (r * k * self.r_k.view(C)).view(B, T, H, N).sum(-1, keepdim=True) * v.view(B, T, H, N)
        o = o + bonus.view(B, T, C)
        return self.output(o * g), x_last, wkv, v_first


class ChannelMix(nn.Module):
    """RWKV-7 channel mixing: token shift, then ``value(relu(key(x))^2)``."""

    def __init__(self, cfg: RWKV7Config):
        super().__init__()
        self.x_k = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.key = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.value = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, x_prev, mask):
        prev, x_last = token_shift(x, x_prev, mask)
        k = torch.relu(self.key(x + (prev - x) * self.x_k)) ** 2  # (B, T, F)
        return self.value(k), x_last


class Block(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)  # applied to the embedding
        self.ln1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.ln2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg)


class RWKV7ForCausalLM(nn.Module):
    """RWKV-7 language model. ``forward(input_ids (B, T), state, attention_mask) -> RWKV7Output``.

    ``RWKV7ForCausalLM.from_pretrained(path)`` reads an official ``.pth``, an fla-hub directory,
    or a directory written by ``save_pretrained``.
    """

    def __init__(self, config: RWKV7Config):
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.num_hidden_layers)])
        self.ln_out = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    # ---- HF-style accessors used by Population and the trainer ---------------------------------
    is_recurrent = True  # the engine keeps an RWKV7State per row instead of a KV cache
    prefill_chunk_size = 512  # longer inputs run in chunks of this many tokens (activation memory)

    def default_tokenizer(self):
        """The RWKV World tokenizer (every official RWKV-7 model uses it)."""
        from .rwkv_tokenizer import RWKVWorldTokenizer
        return RWKVWorldTokenizer()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.emb

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random weights for tests and toy runs (seed with ``torch.manual_seed``).

        Follows the spirit of RWKV-LM's init (per-channel ramps for the mixing coefficients and
        decays) but keeps the output projections non-zero so an untrained model is not constant.
        """
        cfg = self.config
        C, L = cfg.hidden_size, cfg.num_hidden_layers
        ramp = torch.arange(C, dtype=torch.float32) / C  # 0 .. 1
        nn.init.normal_(self.emb.weight, std=1.0)
        nn.init.normal_(self.head.weight, std=C ** -0.5)
        for i, blk in enumerate(self.blocks):
            depth = 1.0 - i / L  # 1 .. ~0
            att = blk.att
            for name, p in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
                getattr(att, name).copy_(1.0 - ramp ** (p * depth))
            blk.ffn.x_k.copy_(1.0 - ramp ** (depth ** 4))
            att.w0.copy_(-6 + 6 * ramp ** (1 + (i / max(L - 1, 1)) ** 0.3) + 0.5)
            att.a0.copy_(-0.19 + 0.4 * (ramp - 0.5))
            att.k_k.copy_(0.71 - 0.1 * (ramp - 0.5))
            att.k_a.fill_(1.02)
            att.r_k.fill_(-0.04)
            att.ln_x.weight.fill_(((i + 1) / L) ** 0.7)
            att.ln_x.bias.zero_()
            for mod in att.modules():
                if isinstance(mod, nn.Linear):
                    nn.init.normal_(mod.weight, std=mod.in_features ** -0.5)
            for lora in ("w2", "a2", "v2", "g2"):
                if hasattr(att, lora):
                    getattr(att, lora).weight.mul_(0.3)
            if i > 0:
                att.v0.copy_(0.73 - 0.4 * (ramp - 0.5))
            att.output.weight.mul_(0.5)
            nn.init.normal_(blk.ffn.key.weight, std=C ** -0.5)
            nn.init.normal_(blk.ffn.value.weight, std=0.5 * cfg.intermediate_size ** -0.5)

    # ---- state -----------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=None) -> RWKV7State:
        """Zero state (before a sequence's first token) for ``batch_size`` rows."""
        cfg = self.config
        device = self.device if device is None else device
        dtype = self.dtype if dtype is None else dtype
        L, C, H, N = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_heads, cfg.head_size
        return RWKV7State(torch.zeros(L, batch_size, C, device=device, dtype=dtype),
                          torch.zeros(L, batch_size, H, N, N, device=device, dtype=torch.float32),
                          torch.zeros(L, batch_size, C, device=device, dtype=dtype))

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, state: RWKV7State | None = None,
                attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0,
                chunk_size: int | None = None) -> RWKV7Output:
        """Logits ``(B, T, V)`` float32 (the last ``logits_to_keep`` positions when > 0).

        ``state`` continues earlier calls and is updated in place; ``None`` starts from zero.
        ``attention_mask (B, T)``: 0 marks left padding, which leaves the state untouched (its
        logits are meaningless). Prompts longer than ``chunk_size`` (default
        ``self.prefill_chunk_size``) run chunk by chunk through the state, bounding activation
        memory; any chunking gives the result of one call.
        """
        B, T = input_ids.shape
        if state is None:
            state = self.init_state(B, input_ids.device)
        elif state.batch_size != B:
            raise ValueError(f"state has {state.batch_size} rows but input_ids has {B}")
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {(B, T)}")
            mask = attention_mask.to(input_ids.device).bool()
            if not torch.compiler.is_compiling():  # data-dependent checks would break a compiled graph
                if T > 1 and bool((mask[:, :-1] & ~mask[:, 1:]).any()):
                    raise ValueError("attention_mask must be left padding only (no 0 after a 1 in a row)")
                if bool(mask.all()):
                    mask = None
        chunk = chunk_size or self.prefill_chunk_size
        if chunk < 1:
            raise ValueError(f"chunk_size={chunk} must be >= 1")
        keep = T if logits_to_keep <= 0 else min(logits_to_keep, T)
        logits = []
        for start in range(0, T, chunk):
            end = min(start + chunk, T)
            x = self._hidden(input_ids[:, start:end], state, None if mask is None else mask[:, start:end])
            if end > T - keep:  # this chunk holds positions whose logits are kept
                x = x[:, max(T - keep - start, 0):]
                logits.append(self.head(self.ln_out(x)).float())  # (B, t, V)
        return RWKV7Output(logits[0] if len(logits) == 1 else torch.cat(logits, dim=1), state)

    def _hidden(self, input_ids, state: RWKV7State, mask) -> torch.Tensor:
        """Final hidden states ``(B, T, C)`` of one chunk; updates ``state`` in place."""
        x = self.blocks[0].ln0(self.emb(input_ids))  # (B, T, C)
        v_first = None  # layer 0's value, mixed into later layers (per token, not state)
        for i, blk in enumerate(self.blocks):
            dx, state.att_x_prev[i], state.wkv[i], v_first = blk.att(
                blk.ln1(x), state.att_x_prev[i], state.wkv[i], v_first, mask)
            x = x + dx
            dx, state.ffn_x_prev[i] = blk.ffn(blk.ln2(x), state.ffn_x_prev[i], mask)
            x = x + dx
        return x

    @torch.no_grad()
    def greedy(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask=None) -> torch.Tensor:
        """Greedy continuation ``(B, max_new_tokens)`` of a (left-padded) batch; for tests."""
        out = self(input_ids, attention_mask=attention_mask, logits_to_keep=1)
        tokens = []
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            tokens.append(nxt)
            out = self(nxt, out.state)
        return torch.cat(tokens, dim=1)

    # ---- checkpoints ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", **_) -> "RWKV7ForCausalLM":
        """Load an official BlinkDL ``.pth`` (rwkv7-g1 family), an fla-hub directory or ours.

        ``dtype=None`` keeps the checkpoint's dtype (bf16 for the official g1 models).
        """
        fields_, sd = ckpt.load_any(path)
        cfg = RWKV7Config.from_dict(fields_)
        with torch.device("meta"):
            model = cls(cfg)
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        sd = {k: v.to(device) for k, v in sd.items()}
        model.load_state_dict(sd, strict=True, assign=True)
        return model.eval()

    def save_pretrained(self, save_directory: str | os.PathLike, **_) -> None:
        """``config.json`` + ``model.safetensors`` with our own key names (exact round trip)."""
        from safetensors.torch import save_file
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        cfg = {"model_type": ckpt.NATIVE_MODEL_TYPE, "architectures": [type(self).__name__], **self.config.to_dict()}
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """Our weights under the official BlinkDL names/layouts (``torch.save`` it as a ``.pth``)."""
        return ckpt.native_to_official({k: v.detach() for k, v in self.state_dict().items()})

    def fla_state_dict(self) -> dict[str, torch.Tensor]:
        """Our weights under flash-linear-attention's RWKV7 names/layouts."""
        return ckpt.native_to_fla({k: v.detach() for k, v in self.state_dict().items()})
