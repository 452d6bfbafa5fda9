"""Write a small random RWKV-7 checkpoint directory (for CPU smoke runs of the RWKV recipes).

    python scripts/make_tiny_rwkv.py                                  # $EGGROLL_CACHE/tiny-random-rwkv7
    python scripts/make_tiny_rwkv.py --output_dir runs/tiny-random-rwkv7 --hidden_size 64 --num_layers 2

The directory is what ``RWKV7ForCausalLM.save_pretrained`` writes (``config.json`` with
``"model_type": "eggroll_rwkv7"`` + ``model.safetensors``) plus the RWKV World tokenizer
(``RWKVWorldTokenizer.save_pretrained``), so ``EggrollTrainer(model=<dir>)`` and the recipes load
it like any official model. The weights are random (``RWKV7ForCausalLM.reset_parameters`` under
``torch.manual_seed(seed)``) and the vocabulary is the full 65,536 rows: it earns ~0 reward on any
task, it only exercises the pipeline. Built into a temporary sibling and renamed into place, so a
concurrent or interrupted build never leaves half a checkpoint; an existing build is reused.

    from scripts.make_tiny_rwkv import ensure_tiny_rwkv
    path = ensure_tiny_rwkv()                     # built on first use, then reused
"""
from __future__ import annotations

import argparse
import os

import torch

from eggroll_ft.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
from eggroll_ft.recipe_utils import build_dir_atomically, cache_dir
from eggroll_ft.models.rwkv_tokenizer import RWKVWorldTokenizer

NAME = "tiny-random-rwkv7"


def default_path() -> str:
    """$EGGROLL_CACHE/tiny-random-rwkv7, else ~/.cache/eggroll_ft/tiny-random-rwkv7."""
    return os.path.join(cache_dir(), NAME)


def build_tiny_rwkv(output_dir: str, hidden_size: int = 64, num_layers: int = 2, head_size: int = 32,
                    vocab_size: int = 65536, seed: int = 0) -> str:
    """Write a random RWKV-7 and the World tokenizer to ``output_dir`` (overwriting); returns the path."""
    torch.manual_seed(seed)
    cfg = RWKV7Config.from_size(hidden_size, num_layers, vocab_size=vocab_size, head_size=head_size)
    model = RWKV7ForCausalLM(cfg)
    model.save_pretrained(output_dir)
    RWKVWorldTokenizer().save_pretrained(output_dir)
    return output_dir


def ensure_tiny_rwkv(path: str | None = None, **kwargs) -> str:
    """``path`` (default ``default_path()``) holding a tiny random RWKV-7, built on first use."""
    return build_dir_atomically(path or default_path(), lambda tmp: build_tiny_rwkv(tmp, **kwargs))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=None, help="Where to write it (default: $EGGROLL_CACHE/tiny-random-rwkv7).")
    parser.add_argument("--hidden_size", type=int, default=64, help="Width C.")
    parser.add_argument("--num_layers", type=int, default=2, help="Number of blocks.")
    parser.add_argument("--head_size", type=int, default=32, help="Head size N (C // N heads).")
    parser.add_argument("--vocab_size", type=int, default=65536, help="Embedding rows (65,536 for the World tokenizer).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    a = parser.parse_args(argv)
    path = ensure_tiny_rwkv(a.output_dir, hidden_size=a.hidden_size, num_layers=a.num_layers, head_size=a.head_size,
                            vocab_size=a.vocab_size, seed=a.seed)
    print(path)
    return path


if __name__ == "__main__":
    main()
