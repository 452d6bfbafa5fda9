"""How the engine talks to a model: a fixed number of slots, each holding one sequence's state.

The engine allocates the state of ``S`` slots once (``allocate``), prefills new prompts into
chosen slots (``prefill``), advances every slot by one token (``decode``), frees slots
(``release``) and, at the end of a run, shrinks the slot count (``compact``). Two adapters:

* ``HFCausalLMAdapter``: any transformers causal LM. Its state is a preallocated key/value cache
  ``(S, H_kv, L, D)`` per layer (``SlotKVCache``, a transformers ``Cache``): every slot has its
  own write position, so a refilled slot starts at 0 while its neighbours are mid-sequence. The
  engine builds the 4D attention mask itself (transformers uses a 4D mask as given), so left
  padding and stale entries of a reused slot are simply masked out.
* ``RecurrentAdapter``: models with ``model(input_ids, state=None, attention_mask=None) ->
  (logits, state)`` and ``init_state(batch)`` (RWKV-7, or any model whose state is a tensor or a
  tuple of tensors with the batch first). A slot's state is replaced through the state's
  ``assign(rows, other)``/``select(rows)`` when it has them (``RWKV7State``), else by indexing.

Adapters know nothing of members or sampling: the engine wraps their calls in the population's
``members`` block, so every row runs its own member.
"""
from __future__ import annotations

import inspect
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


def _forward_params(model) -> set[str]:
    fn = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward
    return set(inspect.signature(fn).parameters)


# ---- transformers models: per-slot key/value buffers ---------------------------------------------
class _SlotLayer(CacheLayerMixin):
    """One layer's ``(S, H_kv, L, D)`` key and value buffers, written where the owner says."""

    is_compileable = True

    def __init__(self, owner: "SlotKVCache", index: int):
        super().__init__()
        self.index = index  # this layer's place in the model (which prefix keys/values are its own)
        # a weak reference: cache -> layers -> cache would be a reference cycle, and a cycle's
        # buffers (the whole key/value cache) wait for a full garbage collection to be freed
        self._owner = weakref.ref(owner)
        self.keys = self.values = None

    @property
    def owner(self) -> "SlotKVCache":
        return self._owner()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        o = self.owner
        shape = (o.num_slots, key_states.shape[1], o.max_len)
        self.keys = key_states.new_zeros(*shape, key_states.shape[-1])
        self.values = value_states.new_zeros(*shape, value_states.shape[-1])
        if o.static:  # a captured decode step writes into these buffers in place (as transformers' StaticCache)
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if self.keys is None:
            self.lazy_initialization(key_states, value_states)
        o = self.owner
        if o.prefill_rows is not None:  # prompts of some slots, positions 0..T-1
            if o.prefill_prefix is not None:  # a shared prefix computed once per member: (R, H, Lp, D) first
                pk, pv = o.prefill_prefix.layer(self.index)
                key_states, value_states = torch.cat([pk, key_states], 2), torch.cat([pv, value_states], 2)
            T = key_states.shape[2]
            self.keys[o.prefill_rows, :, :T] = key_states
            self.values[o.prefill_rows, :, :T] = value_states
            return key_states, value_states  # a prompt attends to itself (and its prefix) only
        rows = o.arange
        self.keys[rows, :, o.write_pos] = key_states[:, :, 0]  # (S, H, D)
        self.values[rows, :, o.write_pos] = value_states[:, :, 0]
        return self.keys[:, :, : o.kv_len], self.values[:, :, : o.kv_len]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.kv_len, 0

    def get_seq_length(self) -> int:
        return self.owner.kv_len

    def get_max_length(self) -> int:
        return self.owner.max_len

    def select(self, keep: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys[keep].contiguous(), self.values[keep].contiguous()


class SharedPrefix:
    """Keys and values of a prompt prefix that several rows share, computed once per member.

    ``keys[l]``/``values[l]``: ``(U, H_kv, Lp, D)`` for the ``U`` members that ran the prefix;
    ``rows``: ``(R,)`` which of the ``U`` each prefilled row continues from.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], rows: torch.Tensor):
        self.keys, self.values, self.rows = keys, values, rows
        self.length = keys[0].shape[2] if keys else 0

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s prefix for every prefilled row: ``(R, H_kv, Lp, D)`` twice."""
        return self.keys[index][self.rows], self.values[index][self.rows]


class SlotKVCache(Cache):
    """A static key/value cache of ``num_slots`` sequences of up to ``max_len`` tokens each.

    Per slot: ``write_pos`` (where its next key goes), ``position`` (its next RoPE position, which
    skips left padding), ``valid (S, L)`` (which cache entries it may attend to) and ``live``.
    ``static=True``: every decode step attends over all ``max_len`` entries (masked) instead of the
    longest sequence so far, and the buffers keep their addresses, so every step has the same
    shapes and inputs (what ``torch.compile`` and CUDA graphs capture once and replay).
    """

    def __init__(self, num_layers: int, num_slots: int, max_len: int, device, static: bool = False):
        self.num_slots, self.max_len, self.static = num_slots, max_len, static
        self.prefill_rows: torch.Tensor | None = None
        self.prefill_prefix: SharedPrefix | None = None
        self.kv_len = 1
        self.arange = torch.arange(num_slots, device=device)
        self.write_pos = torch.zeros(num_slots, dtype=torch.long, device=device)  # (S,)
        self.position = torch.zeros(num_slots, dtype=torch.long, device=device)  # (S,)
        self.valid = torch.zeros(num_slots, max_len, dtype=torch.bool, device=device)  # (S, L)
        self.live = torch.zeros(num_slots, dtype=torch.bool, device=device)  # (S,)
        # host mirrors of write_pos and live (CPU tensors: one vectorised update a step), so kv_len
        # needs no device sync
        self.write_pos_host = torch.zeros(num_slots, dtype=torch.long)
        self.live_host = torch.zeros(num_slots, dtype=torch.long)
        if static:
            self.kv_len = max_len
            for t in (self.arange, self.write_pos, self.position, self.valid, self.live):
                torch._dynamo.mark_static_address(t)
        super().__init__(layers=[_SlotLayer(self, i) for i in range(num_layers)])

    def select(self, keep: list[int]) -> None:
        """Keep only slots ``keep`` (in that order): the slot count becomes ``len(keep)``."""
        if self.static:
            raise RuntimeError("a static SlotKVCache keeps its slots (captured shapes); it cannot be compacted")
        idx = torch.as_tensor(keep, dtype=torch.long, device=self.arange.device)
        for layer in self.layers:
            layer.select(idx)
        self.num_slots = len(keep)
        self.arange = torch.arange(self.num_slots, device=idx.device)
        self.write_pos, self.position = self.write_pos[idx], self.position[idx]
        self.valid, self.live = self.valid[idx], self.live[idx]
        self.write_pos_host, self.live_host = self.write_pos_host[keep], self.live_host[keep]


class HFCausalLMAdapter:
    def __init__(self, model):
        self.model = model
        self._cache_kw = "cache" if "cache" in _forward_params(model) else "past_key_values"
        cfg = model.config
        self.num_layers = cfg.get_text_config().num_hidden_layers if hasattr(cfg, "get_text_config") else cfg.num_hidden_layers

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def slot_bytes(self, max_len: int) -> int:
        """Bytes of one slot's key/value buffers for ``max_len`` tokens."""
        cfg = self.model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        return 2 * self.num_layers * kv_heads * head_dim * max_len * self.dtype.itemsize

    def allocate(self, num_slots: int, max_len: int, device, static: bool = False) -> SlotKVCache:
        return SlotKVCache(self.num_layers, num_slots, max_len, device, static=static)

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """bool ``(B, Tq, Tk)`` -> additive float ``(B, 1, Tq, Tk)`` in the model's dtype."""
        dtype = self.dtype
        m = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return m.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

    def run_prefix(self, prefix_ids: torch.Tensor, rows: torch.Tensor) -> SharedPrefix:
        """Run an unpadded prompt prefix ``(U, Lp)`` (one row per member, in the caller's members
        block) and keep its keys and values for the rows that continue from it (``rows (R,)``)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        self.model(input_ids=prefix_ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        return SharedPrefix([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers], rows)

    def prefill(self, cache: SlotKVCache, rows: list[int], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                prefix: SharedPrefix | None = None):
        """Left-padded prompts ``(R, T)`` into slots ``rows`` -> last-position logits ``(R, V)``.

        With ``prefix`` (``run_prefix``), ``input_ids`` are the prompts after that shared prefix:
        every row attends to its prefix (positions ``0..Lp-1``) and then to its own tokens."""
        R, T = input_ids.shape
        Lp = prefix.length if prefix is not None else 0
        if Lp + T > cache.max_len:
            raise ValueError(f"prompt length {Lp + T} exceeds the cache length {cache.max_len}")
        device = input_ids.device
        keys_ok = attention_mask.bool()  # (R, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        # a padding query sees itself, so no row of the mask is empty (no NaN in the cached pads)
        allowed = (causal & keys_ok[:, None, :]) | torch.eye(T, dtype=torch.bool, device=device)  # (R, T, T)
        if Lp:
            allowed = torch.cat([torch.ones(R, T, Lp, dtype=torch.bool, device=device), allowed], dim=2)
        position_ids = Lp + (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (R, T)
        idx = torch.as_tensor(rows, dtype=torch.long, device=device)
        cache.prefill_rows, cache.prefill_prefix = idx, prefix
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        # logits_to_keep slices the last position out of (R, T, C); on CPU a linear layer on that
        # non-contiguous (R, 1, C) slice runs as a broadcast bmm over R copies of the head weight
        # (~15x slower than the plain matmul), so the head gets a contiguous input
        handle = head.register_forward_pre_hook(lambda mod, args: (args[0].contiguous(), *args[1:])) \
            if head is not None else None
        try:
            out = self.model(input_ids=input_ids, attention_mask=self._mask(allowed), position_ids=position_ids,
                             use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        finally:
            cache.prefill_rows = cache.prefill_prefix = None
            if handle is not None:
                handle.remove()
        cache.valid[idx] = False
        cache.valid[idx, :Lp] = True
        cache.valid[idx, Lp:Lp + T] = keys_ok
        cache.write_pos[idx] = Lp + T
        cache.position[idx] = position_ids[:, -1] + 1
        cache.live[idx] = True
        cache.write_pos_host[rows], cache.live_host[rows] = Lp + T, 1
        return out.logits[:, -1]

    def decode(self, cache: SlotKVCache, tokens: torch.Tensor, step=None) -> torch.Tensor:
        """One token per slot ``(S,)`` -> next-token logits ``(S, V)``; free slots compute garbage.

        The host-side bookkeeping is here; the tensor work is ``decode_step`` (or ``step``, a
        compiled version of it)."""
        top = int(cache.write_pos_host.max())
        if top >= cache.max_len:
            raise RuntimeError(f"slot cache of length {cache.max_len} is full")
        if not cache.static:
            cache.kv_len = top + 1
        logits = (step or self.decode_step)(cache, tokens)
        cache.write_pos_host += cache.live_host
        return logits

    def decode_step(self, cache: SlotKVCache, tokens: torch.Tensor) -> torch.Tensor:
        """The decode step's tensor work, with no host sync and no Python-side state change: the
        part that ``torch.compile`` (and, on CUDA, CUDA graphs) captures."""
        cache.valid[cache.arange, cache.write_pos] = True
        mask = self._mask(cache.valid[:, None, : cache.kv_len])  # (S, 1, 1, kv_len)
        out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=cache.position[:, None],
                         use_cache=True, **{self._cache_kw: cache})
        cache.write_pos += cache.live
        cache.position += cache.live
        return out.logits[:, -1]

    def release(self, cache: SlotKVCache, rows: list[int]) -> None:
        """Free slots: they keep decoding (into position 0, attending to it alone) until refilled."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=cache.arange.device)
        cache.valid[idx] = False
        cache.write_pos[idx] = 0
        cache.position[idx] = 0
        cache.live[idx] = False
        cache.write_pos_host[rows], cache.live_host[rows] = 0, 0

    def compact(self, cache: SlotKVCache, keep: list[int]) -> SlotKVCache:
        cache.select(keep)
        return cache


# ---- recurrent models: fixed-size state per row ----------------------------------------------------
def _split(out):
    return (out.logits, out.state) if hasattr(out, "logits") else out


def _state_tensors(state) -> list[torch.Tensor]:
    """The tensors of a recurrent state: a tensor, a tuple/list of tensors, or a dataclass-like
    object of tensors (``RWKV7State``), in a fixed order."""
    if torch.is_tensor(state):
        return [state]
    if isinstance(state, (tuple, list)):
        return [t for s in state for t in _state_tensors(s)]
    return [v for v in vars(state).values() if torch.is_tensor(v)]


class RecurrentAdapter:
    def __init__(self, model):
        self.model = model
        self._keep_kw = "logits_to_keep" in _forward_params(model)

    def _init_state(self, n: int, device):
        try:
            return self.model.init_state(n, device=device)
        except TypeError:
            return self.model.init_state(n)

    def slot_bytes(self, max_len: int) -> int:
        return sum(t.numel() * t.element_size() for t in _state_tensors(self._init_state(1, "cpu")))

    def allocate(self, num_slots: int, max_len: int, device, static: bool = False):
        state = self._init_state(num_slots, device)
        if static:  # a captured decode step writes into these buffers in place
            for t in _state_tensors(state):
                torch._dynamo.mark_static_address(t)
        return {"state": state}

    def _forward(self, input_ids, state, attention_mask=None, keep_last=False):
        kw = {"logits_to_keep": 1} if keep_last and self._keep_kw else {}
        logits, state = _split(self.model(input_ids, state=state, attention_mask=attention_mask, **kw))
        return logits[:, -1], state

    def prefill(self, slots: dict, rows: list[int], input_ids: torch.Tensor, attention_mask: torch.Tensor):
        logits, new = self._forward(input_ids, None, attention_mask, keep_last=True)
        idx = torch.as_tensor(rows, dtype=torch.long, device=input_ids.device)
        state = slots["state"]
        if torch.is_tensor(state):
            state[idx] = new.to(state.dtype)
        elif hasattr(state, "assign"):
            state.assign(idx, new)
        else:
            for s, n in zip(state, new):
                s[idx] = n.to(s.dtype)
        return logits

    def decode(self, slots: dict, tokens: torch.Tensor, step=None) -> torch.Tensor:
        if step is not None:  # compiled decode_step: the state is updated in place
            return step(slots, tokens)
        logits, slots["state"] = self._forward(tokens[:, None], slots["state"])
        return logits

    def decode_step(self, slots: dict, tokens: torch.Tensor) -> torch.Tensor:
        """One token per slot, the new state copied into the slots' own buffers (fixed addresses,
        what ``torch.compile`` and CUDA graphs capture)."""
        logits, new = self._forward(tokens[:, None], slots["state"])
        for buf, value in zip(_state_tensors(slots["state"]), _state_tensors(new)):
            buf.copy_(value)
        return logits

    def release(self, slots: dict, rows: list[int]) -> None:
        pass  # a refilled slot's state is overwritten whole by the next prefill

    def compact(self, slots: dict, keep: list[int]) -> dict:
        state = slots["state"]
        idx = torch.as_tensor(keep, dtype=torch.long)
        if torch.is_tensor(state):
            state = state[idx.to(state.device)]
        elif hasattr(state, "select"):
            state = state.select(idx)
        else:
            state = type(state)(s[idx.to(s.device)] for s in state)
        return {"state": state}


def adapter_for(model):
    """Pick the adapter from the model's interface."""
    if getattr(model, "is_recurrent", False) or hasattr(model, "init_state"):
        return RecurrentAdapter(model)
    return HFCausalLMAdapter(model)
