"""Load the model a trainer is given: a model object, a hub id or a local path.

Hugging Face checkpoints go through ``AutoModelForCausalLM``; RWKV-7 checkpoints through
``eggroll_ft.models.rwkv7`` (``is_rwkv7_checkpoint`` says which): an official BlinkDL ``.pth``
file, an fla-hub directory (``model_type`` "rwkv7", "rwkv7_fla", ...), a directory saved by
``RWKV7ForCausalLM.save_pretrained`` (``"eggroll_rwkv7"``), or a directory without
``config.json`` whose safetensors hold our RWKV-7 key names (what ``transformers.Trainer``
writes for a model that is not a ``PreTrainedModel``, e.g. ``EggrollTrainer.save_model``).

Boundary: this module turns a name into a model or a tokenizer; it knows nothing of populations
or training.
"""
from __future__ import annotations

import glob
import json
import os

import torch

from .named import load_gguf, load_gguf_tokenizer, resolve_model_name

RWKV7_NATIVE_KEY = "blocks.0.att.r_k"  # present in every RWKV-7 state dict in our (and the official) names
# from_pretrained keyword arguments that have no meaning for our RWKV-7 loader and are dropped
_RWKV_IGNORED_KWARGS = ("revision", "attn_implementation", "trust_remote_code", "low_cpu_mem_usage", "use_cache",
                        "cache_dir", "local_files_only", "token")


def _safetensors_keys(directory: str) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for f in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        with safe_open(f, framework="pt") as st:  # reads the header only
            keys.update(st.keys())
    return keys


def is_rwkv7_checkpoint(path: str) -> bool:
    """True for a local RWKV-7 checkpoint (see the module docstring); False for anything else
    (hub ids, Hugging Face directories of other models, missing paths)."""
    path = os.fspath(path)
    if path.endswith(".pth"):
        return True
    if not os.path.isdir(path):
        return False
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            model_type = str(json.load(f).get("model_type", ""))
        return model_type.startswith("rwkv7") or model_type == "eggroll_rwkv7"
    if glob.glob(os.path.join(path, "*.safetensors")):  # e.g. a Trainer checkpoint (its rng_state.pth is no model)
        return RWKV7_NATIVE_KEY in _safetensors_keys(path)
    return len(glob.glob(os.path.join(path, "*.pth"))) == 1  # a directory holding one official file


def _as_dtype(dtype) -> torch.dtype | None:
    """``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; ``None`` / ``"auto"`` -> None (keep the checkpoint's)."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype (e.g. 'float32', 'bfloat16', 'auto')")
    return resolved


def _rwkv_device(device_map) -> str | torch.device:
    """The one device of ``device_map`` (``"cuda:0"``, ``0``, ``{"": 0}``); the model is not split."""
    if device_map is None:
        return "cpu"
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(f"device_map={device_map!r}: RWKV-7 loads onto one device only")
        device_map = devices.pop()
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    if device_map in ("auto", "balanced", "sequential"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device_map


def load_causal_lm(name_or_path: str, **kwargs):
    """A causal LM from a hub id, a local path (HF, RWKV-7 or a ``.gguf`` file) or a named model.

    Named models (``"smollm2-135m-instruct"``, ``named.NAMED_MODELS``) are built into the cache on
    first use. GGUF files (a ``.gguf`` path, or ``gguf_file`` in ``kwargs``) are dequantized into
    a float model that saves like any other (``named.load_gguf``).

    ``kwargs`` are ``from_pretrained`` keyword arguments (``EggrollConfig.model_init_kwargs``).
    For RWKV-7, ``dtype`` (or ``torch_dtype``; a dtype or its name, ``"auto"`` keeps the
    checkpoint's) and ``device_map`` (one device) are honoured; Hugging Face-only options
    (``revision``, ``attn_implementation`` ...) are ignored; anything else, e.g. a
    ``quantization_config``, raises ``ValueError``.
    """
    name_or_path = resolve_model_name(os.fspath(name_or_path))
    if name_or_path.endswith(".gguf") or "gguf_file" in kwargs:
        return load_gguf(name_or_path, **kwargs)
    if is_rwkv7_checkpoint(name_or_path):
        from .rwkv7 import RWKV7ForCausalLM

        kwargs = dict(kwargs)
        dtype = _as_dtype(kwargs.pop("dtype", kwargs.pop("torch_dtype", None)))
        device = _rwkv_device(kwargs.pop("device_map", None))
        unknown = sorted(k for k in kwargs if k not in _RWKV_IGNORED_KWARGS)
        if unknown:
            raise ValueError(f"model_init_kwargs {unknown} are not supported for the RWKV-7 checkpoint {name_or_path!r} "
                             "(supported: dtype, device_map)")
        return RWKV7ForCausalLM.from_pretrained(name_or_path, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM

    kwargs = dict(kwargs)
    if isinstance(kwargs.get("dtype"), str) and kwargs["dtype"] != "auto":
        kwargs["dtype"] = _as_dtype(kwargs["dtype"])
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)


def load_tokenizer(model, name_or_path: str | None = None):
    """The tokenizer that goes with ``model`` (left padding, a pad token).

    A recurrent model (RWKV-7) uses the tokenizer saved beside its checkpoint when there is one
    (``tokenizer_config.json``: the World tokenizer, or any Hugging Face tokenizer a run was
    trained with), else its ``default_tokenizer()``.
    """
    if getattr(model, "is_recurrent", False) and hasattr(model, "default_tokenizer"):
        directory = name_or_path if name_or_path and os.path.isdir(name_or_path) else None
        cfg = os.path.join(directory, "tokenizer_config.json") if directory else None
        if cfg is None or not os.path.isfile(cfg):
            return model.default_tokenizer()
        with open(cfg) as f:
            if json.load(f).get("tokenizer_class") == "RWKVWorldTokenizer":
                from .rwkv_tokenizer import RWKVWorldTokenizer

                return RWKVWorldTokenizer.from_pretrained(directory)
    from transformers import AutoTokenizer

    path = resolve_model_name(name_or_path) if name_or_path else None
    path = path or getattr(getattr(model, "config", None), "_name_or_path", None)
    if path and str(path).endswith(".gguf"):
        tok = load_gguf_tokenizer(path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    if not path:
        raise ValueError("processing_class is required when the model has no name or path to load a tokenizer from")
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
