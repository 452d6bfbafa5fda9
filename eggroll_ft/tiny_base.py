"""Tiny base models: a small character-level Llama pretrained on a task's worked examples.

A comparison of fine-tuning methods is meaningless from a random model that never earns a reward,
so this module makes a partly competent one in a few CPU minutes. It builds a character tokenizer
(``testing.char_tokenizer`` over printable ASCII and newline: one id per character) and a small
``LlamaForCausalLM`` from a config written in code, then trains it with ordinary supervised
learning (AdamW, loss on completion tokens only) on ``(prompt, completion)`` pairs. The result
saves as a Hugging Face checkpoint that loads offline with ``from_pretrained``.

Boundary: a task supplies the pairs and judges the result (the Countdown base,
``tiny-countdown-base``, is ``rewards/countdown_base.py``); this module knows nothing of tasks,
rewards, ES or GRPO.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import torch
from tqdm.auto import tqdm

from .testing import char_tokenizer

# Printable ASCII and newline: digits, arithmetic, brackets, letters and tags, and anything else a
# sampled completion might hold (one token per character; other characters map to <unk>).
ALPHABET = "".join(chr(c) for c in range(32, 127)) + "\n"


@dataclasses.dataclass
class TinyBaseConfig:
    """The model and its supervised training; recorded in the checkpoint's build info."""

    steps: int = 800
    """Optimizer steps of supervised training."""
    seed: int = 0
    """Seeds initialisation and batch order (and, by convention, the task's training data)."""
    batch_size: int = 64
    """Sequences per optimizer step."""
    learning_rate: float = 3e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to 10%)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    hidden_size: int = 64
    """Model width."""
    num_layers: int = 3
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads."""
    max_new_tokens: int = 40
    """Generation budget saved in the generation config (and used to judge the model)."""
    threads: int = 1
    """torch intra-op threads during the build (restored after); 0 keeps torch's setting. One thread
    is fastest for a model this small, and far faster than two on a machine shared with others."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "hidden_size", "num_layers", "num_heads", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")


def build_tokenizer():
    """Character-level fast tokenizer: pad/bos/eos/unk, then one id per character of ALPHABET (100 ids).

    No bos is prepended, so a prompt encodes the same with or without ``add_special_tokens``
    (TRL and our engine may differ there); left padding for batched generation.
    """
    tok = char_tokenizer(ALPHABET)
    tok.model_max_length = 256
    return tok


def build_model(tokenizer, cfg: TinyBaseConfig):
    """A small Llama (RoPE, SwiGLU, RMSNorm) with tied embeddings, initialised from cfg.seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 4,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id  # stop at eos
    gen.bos_token_id = tokenizer.bos_token_id  # never prepended to a prompt; kept equal to avoid a mismatch warning
    gen.do_sample, gen.max_new_tokens = False, cfg.max_new_tokens
    return model


def encode_examples(tokenizer, pairs: list[tuple[str, str]]) -> tuple[list[list[int]], list[int]]:
    """Token ids of prompt + completion + eos for each ``(prompt, completion)``, and each prompt's length."""
    p_ids = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    c_ids = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    return [a + b + [tokenizer.eos_token_id] for a, b in zip(p_ids, c_ids)], [len(a) for a in p_ids]


def collate(seqs: list[list[int]], prompt_lens: list[int], pad_id: int):
    """Right-padded batch; labels are -100 on prompt and padding (loss on completion tokens only)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for row, (s, n) in enumerate(zip(seqs, prompt_lens)):
        ids[row, : len(s)] = torch.tensor(s)
        labels[row, n : len(s)] = torch.tensor(s[n:])
        mask[row, : len(s)] = 1
    return ids, mask, labels


def train(model, tokenizer, pairs: list[tuple[str, str]], cfg: TinyBaseConfig, progress: bool = True) -> list[float]:
    """AdamW on completion-token cross-entropy; returns the loss of every step."""
    seqs, prompt_lens = encode_examples(tokenizer, pairs)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)

    def lr_at(step):  # linear warmup, cosine decay to 10% of the peak
        if step < cfg.warmup_steps:
            return cfg.learning_rate * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(seqs), generator=gen).tolist()
    cursor, losses = 0, []
    model.train()
    bar = tqdm(range(cfg.steps), desc="pretrain", disable=not progress, mininterval=2.0)
    for step in bar:
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(seqs), generator=gen).tolist(), 0
        rows = order[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        ids, mask, labels = collate([seqs[r] for r in rows], [prompt_lens[r] for r in rows], tokenizer.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside the block (0: unchanged), restored after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pretrain(pairs: list[tuple[str, str]], cfg: TinyBaseConfig | None = None, progress: bool = True):
    """Build the tokenizer and model and train them on ``pairs``: ``(model, tokenizer, info)``.

    ``info`` records the parameter count, the training time and the mean loss of the first and last
    few steps.
    """
    cfg = cfg or TinyBaseConfig()
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, cfg)
    start, cpu_start = time.perf_counter(), time.process_time()
    losses = train(model, tokenizer, pairs, cfg, progress=progress)
    head = max(1, min(50, len(losses) // 10))
    info = {"params": sum(p.numel() for p in model.parameters()), "steps": cfg.steps, "seed": cfg.seed,
            "train_seconds": round(time.perf_counter() - start, 1),
            "train_cpu_seconds": round(time.process_time() - cpu_start, 1), "torch_threads": torch.get_num_threads(),
            "first_loss": sum(losses[:head]) / head, "final_loss": sum(losses[-head:]) / head,
            "train_examples": len(pairs)}
    return model, tokenizer, info
