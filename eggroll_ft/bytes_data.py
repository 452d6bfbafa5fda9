"""Raw UTF-8 byte streams for byte-level language models (truncated ES / truncated BPTT).

The data module knows nothing of models or of training. It turns a text source into a uint8
tensor, splits off a held-out part, and serves windows of consecutive bytes:

* ``load_byte_splits(data)``: ``data`` is a local text file (its last ``eval_fraction`` is held
  out) or a Hugging Face dataset name, by default minipile (``JeanKaddour/minipile``, the paper's
  pretraining set; its ``validation`` split is held out). Documents are joined by a blank line.
* :class:`ByteStreams`: ``num_streams`` cursors over the training bytes; each ``next()`` returns
  ``(num_streams, seq_len + 1)`` windows (inputs plus next-byte targets) and advances every cursor
  by ``seq_len``, so a recurrent state carried across calls sees one continuous stream (truncated
  ES, as in EGGROLL's int8 pretraining). A cursor that runs off the end restarts and reports a reset.
* ``eval_windows``: fixed evenly spaced windows of the held-out bytes, read from a zero state.
"""
from __future__ import annotations

import math
import os

import torch

MINIPILE = "JeanKaddour/minipile"


def bytes_of(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a uint8 tensor."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def _dataset_bytes(name: str, split: str, max_bytes: int, text_field: str) -> torch.Tensor:
    from datasets import load_dataset  # imported lazily: local files need no datasets

    out, total = [], 0
    for row in load_dataset(name, split=split, streaming=True):
        b = (row[text_field] + "\n\n").encode("utf-8")
        out.append(b)
        total += len(b)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(out)[:max_bytes]), dtype=torch.uint8).clone()


def load_byte_splits(data: str = MINIPILE, eval_fraction: float = 0.05, max_bytes: int = 0,
                     eval_bytes: int = 1 << 20, text_field: str = "text"):
    """``(train, held_out)`` uint8 tensors from a local file or a ``datasets`` dataset name.

    ``max_bytes > 0`` caps the training bytes (the head of the file / the first documents).
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction} must be in (0, 1)")
    if os.path.exists(data):
        with open(data, "rb") as f:
            raw = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).clone()
        if raw.numel() < 1024:
            raise ValueError(f"data={data!r} has only {raw.numel()} bytes")
        cut = int(raw.numel() * (1 - eval_fraction))
        train, held = raw[:cut], raw[cut:]
        return (train[:max_bytes] if max_bytes > 0 else train), held
    if data.startswith((".", "/", "~")) or data.endswith((".txt", ".md", ".json", ".jsonl")):
        raise ValueError(f"data={data!r} is neither an existing file nor a dataset name")
    train = _dataset_bytes(data, "train", max_bytes if max_bytes > 0 else 1 << 28, text_field)
    held = _dataset_bytes(data, "validation", eval_bytes, text_field)
    return train, held


def unigram_entropy(data: torch.Tensor) -> float:
    """Entropy in bits of the byte frequencies of ``data`` (the bits per byte of a unigram model)."""
    p = torch.bincount(data.to(torch.int64), minlength=256).to(torch.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


class ByteStreams:
    """``num_streams`` cursors advancing ``seq_len`` bytes per call over ``data`` (uint8)."""

    def __init__(self, data: torch.Tensor, num_streams: int, seq_len: int, seed: int = 0):
        if num_streams < 1 or seq_len < 1:
            raise ValueError(f"num_streams={num_streams} and seq_len={seq_len} must be >= 1")
        if data.numel() < 2 * (seq_len + 1):
            raise ValueError(f"data has {data.numel()} bytes, fewer than 2 * (seq_len + 1)")
        self.data, self.num_streams, self.seq_len = data, num_streams, seq_len
        g = torch.Generator().manual_seed(seed)
        # evenly spaced starts with a random phase: streams read different parts of the data
        span = data.numel() - seq_len - 1
        phase = int(torch.randint(0, max(span // num_streams, 1), (1,), generator=g))
        self.pos = (torch.arange(num_streams, dtype=torch.int64) * (span // num_streams) + phase) % span

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(windows (S, T+1) long, reset (S,) bool)``; ``reset`` marks cursors that restarted."""
        span = self.data.numel() - self.seq_len - 1
        reset = self.pos >= span
        self.pos = torch.where(reset, self.pos - span, self.pos)
        idx = self.pos[:, None] + torch.arange(self.seq_len + 1)[None, :]
        self.pos = self.pos + self.seq_len
        return self.data[idx].to(torch.int64), reset

    def state_dict(self) -> dict:
        return {"pos": self.pos.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"].clone()


def eval_windows(held_out: torch.Tensor, num_windows: int, length: int) -> torch.Tensor:
    """``(num_windows, length + 1)`` long: evenly spaced fixed windows of the held-out bytes."""
    need = length + 1
    if held_out.numel() < need:
        raise ValueError(f"held-out split has {held_out.numel()} bytes < eval length {need}")
    # first window at the start, last one ending at the last byte
    starts = torch.arange(num_windows, dtype=torch.int64) * (held_out.numel() - need) // max(num_windows - 1, 1)
    return held_out[starts[:, None] + torch.arange(need)[None, :]].to(torch.int64)


def bits_per_byte(nats_or_bits_sum: float, count: int, in_nats: bool = False) -> float:
    """Mean bits per byte from a summed log-loss."""
    return nats_or_bits_sum / count / (math.log(2) if in_nats else 1.0)
