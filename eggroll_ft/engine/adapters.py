"""How the engine talks to a model: prefill a left-padded batch, then decode one token at a time.

* ``HFCausalLMAdapter``: any transformers causal LM (KV cache through ``past_key_values``,
  left padding handled with ``attention_mask`` and explicit ``position_ids``).
* ``RecurrentAdapter``: models with a fixed-size recurrent state and the interface
  ``model(input_ids, state=None, attention_mask=None) -> (logits, state)`` (RWKV-7, minGRU).

Adapters know nothing of members or sampling: the engine wraps their calls in the population's
``members`` block, so every row runs its own member.
"""
from __future__ import annotations

import inspect

import torch


class HFCausalLMAdapter:
    def __init__(self, model):
        self.model = model
        # transformers >= 5.2x renamed `past_key_values` to `cache`; support both
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def _cache_of(self, out):
        return out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """-> (last-position logits (B, V), cache)."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1)
        cache = {"kv": self._cache_of(out), "mask": attention_mask, "pos": position_ids[:, -1]}
        return out.logits[:, -1], cache

    def decode(self, tokens: torch.Tensor, cache):
        """tokens (B,) -> (logits (B, V), cache)."""
        mask = torch.cat([cache["mask"], cache["mask"].new_ones(tokens.shape[0], 1)], dim=1)
        pos = cache["pos"] + 1
        out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=pos[:, None],
                         use_cache=True, **{self._cache_kw: cache["kv"]})
        return out.logits[:, -1], {"kv": self._cache_of(out), "mask": mask, "pos": pos}


class RecurrentAdapter:
    def __init__(self, model):
        self.model = model

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.model(input_ids, state=None, attention_mask=attention_mask)
        logits, state = (out.logits, out.state) if hasattr(out, "logits") else out
        return logits[:, -1], state

    def decode(self, tokens: torch.Tensor, state):
        out = self.model(tokens[:, None], state=state)
        logits, state = (out.logits, out.state) if hasattr(out, "logits") else out
        return logits[:, -1], state


def adapter_for(model):
    """Pick the adapter from the model's interface."""
    if getattr(model, "is_recurrent", False) or hasattr(model, "init_state"):
        return RecurrentAdapter(model)
    return HFCausalLMAdapter(model)
