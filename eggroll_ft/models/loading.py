"""Load the model a trainer is given: a model object, a hub id or a local path.

Hugging Face checkpoints go through ``AutoModelForCausalLM``; RWKV-7 checkpoints (an official
``.pth`` file, or a directory saved by ``RWKV7ForCausalLM``) through ``eggroll_ft.models.rwkv7``.
"""
from __future__ import annotations

import json
import os

import torch


def is_rwkv7_checkpoint(path: str) -> bool:
    if path.endswith(".pth"):
        return True
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            model_type = json.load(f).get("model_type", "")
        return model_type in ("rwkv7", "eggroll_rwkv7")
    return False


def load_causal_lm(name_or_path: str, **kwargs):
    """A causal LM from a hub id or a local path (HF or RWKV-7)."""
    if is_rwkv7_checkpoint(name_or_path):
        from .rwkv7 import RWKV7ForCausalLM

        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        model = RWKV7ForCausalLM.from_pretrained(name_or_path)
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        return model.to(dtype) if isinstance(dtype, torch.dtype) else model
    from transformers import AutoModelForCausalLM

    kwargs = dict(kwargs)
    if isinstance(kwargs.get("dtype"), str) and kwargs["dtype"] != "auto":
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)


def load_tokenizer(model, name_or_path: str | None = None):
    """The tokenizer that goes with ``model`` (left padding, a pad token)."""
    if getattr(model, "is_recurrent", False) and hasattr(model, "default_tokenizer"):
        return model.default_tokenizer()
    from transformers import AutoTokenizer

    path = name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        raise ValueError("processing_class is required when the model has no name or path to load a tokenizer from")
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
