"""RWKV-7 checkpoint formats: the official BlinkDL ``.pth``, fla-hub safetensors, and our own.

This module only renames, reshapes and transposes tensors; it knows nothing of the forward pass.
Every function maps one state dict onto another, so each direction can be tested for exact
round trips. Three formats are understood:

* **official** (BlinkDL/RWKV-LM ``.pth``, the rwkv7-g1 family): ``emb.weight``,
  ``blocks.{i}.att.{receptance,key,value,output}.weight``, low-rank matrices stored as used,
  ``x @ w1`` with ``w1 (C, D)`` and ``w2 (D, C)``, per-channel vectors stored ``(1, 1, C)``.
  Layer 0 may carry ``att.v0/v1/v2``, which the reference never uses (it has no ``v_first`` to
  mix with); they are dropped on load and not written back.
* **fla** (flash-linear-attention's ``RWKV7ForCausalLM``, the fla-hub Hugging Face repos):
  ``model.layers.{i}.attn.{r,k,v,o}_proj.weight``, ``attn.{w,a,v,g}_lora.lora.{0,2}.weight``
  stored as ``nn.Linear`` weights, ``lora.2.bias`` = the official ``w0/a0/v0``.
* **native** (ours, ``RWKV7ForCausalLM.state_dict()``): the official names, with every matmul an
  ``nn.Linear`` (``att.w1.weight (D, C)`` = official ``w1.T``) and every vector of shape ``(C,)``.

The layer count, width, head size, low-rank dims and FFN width are read off the tensors.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

NATIVE_MODEL_TYPE = "eggroll_rwkv7"
LORA_NAMES = ("w", "a", "v", "g")  # decay, in-context learning rate, value residual, gate
ATT_VECTORS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a")
ATT_LINEARS = ("receptance", "key", "value", "output")
_FLA_PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj"}
_FLA_NORM = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}


def _num_layers(keys, pattern: str) -> int:
    ids = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if not ids:
        raise ValueError(f"checkpoint has no layers matching {pattern!r}: not an RWKV-7 (x070) checkpoint")
    if ids != set(range(len(ids))):
        raise ValueError(f"checkpoint layer ids {sorted(ids)} are not contiguous from 0")
    return len(ids)


# ---- official BlinkDL .pth ------------------------------------------------------------------
def config_from_official(sd: dict[str, torch.Tensor]) -> dict:
    """``RWKV7Config`` fields read off an official state dict."""
    if "blocks.0.att.r_k" not in sd:
        raise ValueError("checkpoint has no 'blocks.0.att.r_k': not an RWKV-7 (x070) checkpoint")
    vocab_size, hidden_size = sd["emb.weight"].shape
    num_heads, head_size = sd["blocks.0.att.r_k"].shape
    layers = _num_layers(sd, r"blocks\.(\d+)\.")
    v_key = "blocks.1.att.v1" if layers > 1 else "blocks.0.att.v1"
    return dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers, head_size=head_size,
        decay_low_rank_dim=sd["blocks.0.att.w1"].shape[1], a_low_rank_dim=sd["blocks.0.att.a1"].shape[1],
        v_low_rank_dim=sd[v_key].shape[1] if v_key in sd else 32, gate_low_rank_dim=sd["blocks.0.att.g1"].shape[1],
        intermediate_size=sd["blocks.0.ffn.key.weight"].shape[0],
    )


def official_to_native(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official key names and layouts -> ours (transposed low-rank matrices, ``(C,)`` vectors)."""
    out = {}
    for k, t in sd.items():
        if re.fullmatch(r"blocks\.0\.att\.v[012]", k):
            continue  # unused by layer 0 (no v_first to mix with), as in the reference
        name = k.split(".")[-1]
        if ".att." in k and re.fullmatch(r"[wavg][12]", name):
            out[k + ".weight"] = t.t().contiguous()
        elif (".att." in k and name in ATT_VECTORS) or k.endswith(".ffn.x_k"):
            out[k] = t.reshape(-1)
        elif re.search(r"\.ffn\.s(_emb|_emb_x|0|1|2)\b", k):
            raise ValueError(f"key {k!r}: DeepEmbed (RWKV_DE_VERSION) checkpoints are not supported")
        else:
            out[k] = t
    return out


def native_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``official_to_native`` (layer 0's unused ``v0/v1/v2`` are not written)."""
    out = {}
    for k, t in sd.items():
        parts = k.split(".")
        if ".att." in k and len(parts) == 5 and re.fullmatch(r"[wavg][12]", parts[3]) and parts[4] == "weight":
            out[k[: -len(".weight")]] = t.t().contiguous()
        elif (".att." in k and parts[-1] in ATT_VECTORS) or k.endswith(".ffn.x_k"):
            out[k] = t.reshape(1, 1, -1)
        else:
            out[k] = t
    return out


# ---- flash-linear-attention (fla-hub) ---------------------------------------------------------
def _fla_name(native: str) -> str:
    if native in ("emb.weight", "head.weight") or native.startswith("ln_out."):
        return {"emb.weight": "model.embeddings.weight", "head.weight": "lm_head.weight"}.get(
            native, native.replace("ln_out.", "model.norm."))
    _, i, part, rest = native.split(".", 3)
    prefix = f"model.layers.{i}."
    if part in _FLA_NORM:
        return prefix + f"{_FLA_NORM[part]}.{rest}"
    if part == "ffn":
        return prefix + "ffn." + rest
    name = rest.split(".")[0]
    if name in ATT_LINEARS:
        return prefix + f"attn.{_FLA_PROJ[name]}.weight"
    if name == "ln_x":
        return prefix + "attn.g_norm." + rest.split(".")[1]
    if re.fullmatch(r"[wavg][012]", name):
        lora, idx = name
        return prefix + f"attn.{lora}_lora.lora." + {"0": "2.bias", "1": "0.weight", "2": "2.weight"}[idx]
    return prefix + "attn." + name  # x_r ... k_k, k_a, r_k


def native_to_fla(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in fla's names and layouts (``attn.x_*`` stored ``(1, 1, C)``)."""
    out = {}
    for k, t in sd.items():
        name = _fla_name(k)
        out[name] = t.reshape(1, 1, -1) if re.search(r"\.attn\.x_[rwkvag]$", name) else t
    return out


def fla_to_native(sd: dict[str, torch.Tensor], num_layers: int, tie_word_embeddings: bool = False) -> dict[str, torch.Tensor]:
    """fla's names and layouts -> ours. Unknown keys raise, naming the key."""
    names = ["emb.weight", "head.weight", "ln_out.weight", "ln_out.bias"]
    for i in range(num_layers):
        b = f"blocks.{i}."
        names += [b + f"{ln}.{p}" for ln in (("ln0", "ln1", "ln2") if i == 0 else ("ln1", "ln2")) for p in ("weight", "bias")]
        names += [b + f"att.{v}" for v in ATT_VECTORS if not (i == 0 and v == "v0")] + [b + "att.r_k"]
        names += [b + f"att.{lin}.weight" for lin in ATT_LINEARS] + [b + "att.ln_x.weight", b + "att.ln_x.bias"]
        names += [b + f"att.{lo}{j}.weight" for lo in LORA_NAMES for j in (1, 2) if not (i == 0 and lo == "v")]
        names += [b + "ffn.x_k", b + "ffn.key.weight", b + "ffn.value.weight"]
    if tie_word_embeddings and "lm_head.weight" not in sd:
        sd = {**sd, "lm_head.weight": sd["model.embeddings.weight"]}
    table = {_fla_name(n): n for n in names}
    if "model.layers.0.pre_norm.weight" not in sd:
        raise ValueError("fla checkpoint has no model.layers.0.pre_norm (norm_first=False): not supported")
    unknown = sorted(set(sd) - set(table))
    if unknown:
        raise ValueError(f"fla checkpoint has keys this RWKV-7 does not know: {unknown[:5]}")
    missing = sorted(set(table) - set(sd))
    if missing:
        raise ValueError(f"fla checkpoint lacks keys: {missing[:5]}")
    return {n: sd[f].reshape(-1) if f.split(".")[-1].startswith("x_") else sd[f] for f, n in table.items()}


# ---- files ------------------------------------------------------------------------------------
def _load_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {str(path)!r}")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def load_any(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config fields, native state dict)`` from an official ``.pth``, an fla-hub directory or ours."""
    p = Path(path)
    if p.is_file():
        sd = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
        return config_from_official(sd), official_to_native(sd)
    if not p.is_dir():
        raise FileNotFoundError(f"RWKV-7 checkpoint {str(path)!r} is neither a .pth file nor a directory")
    cfg_file = p / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    if cfg.get("model_type") == NATIVE_MODEL_TYPE:
        return cfg, _load_safetensors_dir(p)
    pths = sorted(p.glob("*.pth"))
    if not cfg and len(pths) == 1 and not any(p.glob("*.safetensors")):  # (a Trainer checkpoint's rng_state.pth is no model)
        return load_any(pths[0])
    sd = _load_safetensors_dir(p)
    if "blocks.0.att.r_k" in sd:  # our names without our config.json (a transformers.Trainer checkpoint)
        return config_from_official(native_to_official(sd)), sd
    if not any(k.startswith("model.layers.") for k in sd):
        raise ValueError(f"{str(path)!r}: safetensors keys are neither ours nor fla's RWKV-7 (e.g. {next(iter(sd))!r})")
    layers = _num_layers(sd, r"model\.layers\.(\d+)\.")
    native = fla_to_native(sd, layers, bool(cfg.get("tie_word_embeddings", False)))
    fields = config_from_official(native_to_official(native))
    if "norm_eps" in cfg:
        fields["norm_eps"] = float(cfg["norm_eps"])
    return fields, native
