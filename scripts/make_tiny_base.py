"""Pretrain a tiny character-level Countdown model: the CPU-sized base for ES-vs-GRPO comparisons.

A comparison of fine-tuning methods is meaningless from a random model that never earns a reward,
so this script makes a partly competent one in a few CPU minutes. It builds a character-level
tokenizer (`tokenizers` WordLevel over single characters, wrapped in `PreTrainedTokenizerFast`) and a
small `LlamaForCausalLM` from a config written in code, then trains it with ordinary supervised
learning (AdamW, loss on completion tokens only) on generated Countdown problems and their
solutions, and saves both as a Hugging Face checkpoint that loads offline with
`AutoModelForCausalLM.from_pretrained(path)` / `AutoTokenizer.from_pretrained(path)`.

Boundary: problems, prompts and the reward come from `rewards.countdown` (the "minimal" template:
prompt `"Use the numbers [3, 5, 7] to make 22.\\n"`, completion `"<answer>EXPR</answer>"` + eos);
this module only writes solutions, trains, measures greedy held-out accuracy with the real reward,
and saves. It knows nothing of ES or GRPO.

    python scripts/make_tiny_base.py --output_dir /tmp/tiny-base [--steps N --seed S]

From code (built once into the cache, then reused):

    from scripts.make_tiny_base import ensure_tiny_base, heldout_problems
    path = ensure_tiny_base()                    # $EGGROLL_CACHE/tiny-countdown-base
    problems = heldout_problems(64)              # the distribution the printed accuracy is on
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # rewards/ lives beside the package, not inside it
    sys.path.insert(0, str(ROOT))

from rewards.countdown import countdown_reward, format_prompt, generate_countdown_problems  # noqa: E402

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
# Printable ASCII and newline: digits, arithmetic, brackets, letters and tags, and anything else a
# sampled completion might hold (one token per character; other characters map to <unk>).
ALPHABET = "".join(chr(c) for c in range(32, 127)) + "\n"
TEMPLATE = "minimal"
MODEL_NAME = "tiny-countdown-base"


@dataclasses.dataclass
class TinyBaseConfig:
    """Everything that decides the tiny base model; saved in tiny_base_info.json."""

    steps: int = 800
    """Optimizer steps of supervised training."""
    seed: int = 0
    """Seeds problem generation, initialisation and batch order."""
    batch_size: int = 64
    """Sequences per optimizer step."""
    lr: float = 3e-3
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
    num_train: int = 20_000
    """Generated training problems (deduplicated, disjoint from the held-out set)."""
    max_value: int = 100
    """Numbers and targets lie in 1..max_value (rewards.countdown.generate_countdown_problems)."""
    four_number_fraction: float = 0.0
    """Fraction of training problems with four numbers (the rest, and all held-out ones, have three)."""
    num_eval: int = 256
    """Held-out problems for the final greedy accuracy."""
    eval_seed: int = 1_000_003
    """Seed of the held-out problems (fixed, so every build is scored on the same problems)."""
    max_new_tokens: int = 40
    """Generation budget for the accuracy check; a solution is at most ~30 characters."""
    threads: int = 1
    """torch intra-op threads during the build (restored after); 0 keeps torch's setting. One thread
    is fastest for a model this small, and far faster than two on a machine shared with others."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "hidden_size", "num_layers", "num_heads", "num_train", "num_eval",
                     "max_value", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if not 0.0 <= self.four_number_fraction <= 1.0:
            raise ValueError(f"four_number_fraction={self.four_number_fraction} must lie in [0, 1]")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")


# ---------------------------------------------------------------------------------------------
# Tokenizer and model
# ---------------------------------------------------------------------------------------------


def build_tokenizer():
    """Character-level fast tokenizer: one id per character of ALPHABET, plus pad/bos/eos/unk (100 ids).

    No bos is prepended, so a prompt encodes the same with or without `add_special_tokens`
    (TRL and our engine may differ there); left padding for batched generation.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *ALPHABET])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per char
    core.decoder = decoders.Fuse()  # join characters back without separators
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, padding_side="left"
    )
    tok.model_max_length = 256
    return tok


def build_model(tokenizer, cfg: TinyBaseConfig):
    """A small Llama (RoPE, SwiGLU, RMSNorm) with tied embeddings, initialised from cfg.seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size * 4,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id  # stop at eos
    gen.bos_token_id = tokenizer.bos_token_id  # never prepended to a prompt; kept equal to avoid a mismatch warning
    gen.do_sample, gen.max_new_tokens = False, cfg.max_new_tokens
    return model


# ---------------------------------------------------------------------------------------------
# Data: problems from rewards.countdown, solutions written by a small exhaustive solver
# ---------------------------------------------------------------------------------------------

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
        "/": lambda a, b: a / b if b != 0 else None}


def _kind(op: str) -> str:
    return "sum" if op in "+-" else "prod"


def _join(left: str, left_kind: str, op: str, right: str, right_kind: str) -> str:
    """Write `left op right` (kinds: atom | sum | prod) with the fewest parentheses that keep precedence."""
    if left_kind == "sum" and op in "*/":
        left = f"({left})"
    if (right_kind == "sum" and op in "-*/") or (right_kind == "prod" and op == "/"):
        right = f"({right})"
    return f"{left}{op}{right}"


def solve_countdown(nums, target) -> str | None:
    """A canonical solution using every number once, or None.

    Searches left-to-right chains `((a op b) op c) op d` over orderings of `nums` (in the order
    given, then operators + - * /), then for four numbers the balanced form `(a op b) op (c op d)`.
    One fixed search order gives one answer per problem, which a tiny model learns more easily.

    >>> solve_countdown([3, 5, 7], 22)
    '3*5+7'
    >>> solve_countdown([10, 10, 1, 1], 50)
    '10*10/(1+1)'
    >>> solve_countdown([2, 4], 7) is None
    True
    """
    target = Fraction(target)
    for perm in itertools.permutations(range(len(nums))):
        for ops in itertools.product("+-*/", repeat=len(nums) - 1):
            val, expr, kind = Fraction(nums[perm[0]]), str(nums[perm[0]]), "atom"
            for op, i in zip(ops, perm[1:]):
                val = _OPS[op](val, Fraction(nums[i]))
                if val is None:
                    break
                expr, kind = _join(expr, kind, op, str(nums[i]), "atom"), _kind(op)
            if val is not None and val == target:
                return expr
    if len(nums) == 4:
        for perm in itertools.permutations(range(4)):
            a, b, c, d = (Fraction(nums[i]) for i in perm)
            sa, sb, sc, sd = (str(nums[i]) for i in perm)
            for o1, o2, o3 in itertools.product("+-*/", repeat=3):
                left, right = _OPS[o1](a, b), _OPS[o3](c, d)
                val = None if left is None or right is None else _OPS[o2](left, right)
                if val is not None and val == target:
                    return _join(_join(sa, "atom", o1, sb, "atom"), _kind(o1), o2,
                                 _join(sc, "atom", o3, sd, "atom"), _kind(o3))
    return None


def _problems(n: int, num_count: int, max_value: int, seed: int) -> list[dict]:
    """n problems with `num_count` numbers in 1..max_value from rewards.countdown, canonical solutions."""
    out = []
    for p in generate_countdown_problems(n, seed=seed, min_numbers=num_count, max_numbers=num_count,
                                         max_value=max_value):
        solution = solve_countdown(p["nums"], p["target"]) or p["solution"]  # generator's as a fallback
        out.append({"nums": list(p["nums"]), "target": p["target"], "solution": solution})
    return out


def heldout_problems(n: int = 256, seed: int = TinyBaseConfig.eval_seed,
                     max_value: int = TinyBaseConfig.max_value) -> list[dict]:
    """The held-out distribution the reported accuracy is measured on: 3 numbers in 1..max_value."""
    return _problems(n, 3, max_value, seed)


def training_problems(cfg: TinyBaseConfig) -> list[dict]:
    """cfg.num_train problems (3 and 4 numbers), none of which is a held-out problem."""
    held = {(tuple(p["nums"]), p["target"]) for p in heldout_problems(cfg.num_eval, cfg.eval_seed, cfg.max_value)}
    n4 = round(cfg.num_train * cfg.four_number_fraction)
    pool = _problems(cfg.num_train - n4, 3, cfg.max_value, cfg.seed)
    pool += _problems(n4, 4, cfg.max_value, cfg.seed + 1) if n4 else []
    pool = [p for p in pool if (tuple(p["nums"]), p["target"]) not in held]
    random.Random(cfg.seed).shuffle(pool)
    return pool


def encode_examples(tokenizer, problems: list[dict]) -> tuple[list[list[int]], list[int]]:
    """Token ids of prompt + "<answer>solution</answer>" + eos, and each prompt's length."""
    prompts = [format_prompt(p["nums"], p["target"], template=TEMPLATE) for p in problems]
    completions = [f"<answer>{p['solution']}</answer>" for p in problems]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
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


# ---------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------


def train(model, tokenizer, problems: list[dict], cfg: TinyBaseConfig, progress: bool = True) -> list[float]:
    """AdamW on completion-token cross-entropy; returns the loss of every step."""
    seqs, prompt_lens = encode_examples(tokenizer, problems)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)

    def lr_at(step):  # linear warmup, cosine decay to 10% of the peak
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

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


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int = 40, batch_size: int = 128):
    """Greedy completions (text after the prompt, special tokens dropped), batched with left padding."""
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def greedy_accuracy(model, tokenizer, problems: list[dict], max_new_tokens: int = 40) -> float:
    """Fraction of problems whose greedy completion gets the full Countdown reward (>= 1)."""
    prompts = [format_prompt(p["nums"], p["target"], template=TEMPLATE) for p in problems]
    completions = greedy_completions(model, tokenizer, prompts, max_new_tokens)
    rewards = countdown_reward(completions, nums=[p["nums"] for p in problems], target=[p["target"] for p in problems])
    return sum(r >= 1.0 for r in rewards) / len(problems)


# ---------------------------------------------------------------------------------------------
# Build, cache, CLI
# ---------------------------------------------------------------------------------------------


def build_tiny_base(output_dir: str, cfg: TinyBaseConfig | None = None, progress: bool = True) -> dict:
    """Train and save model + tokenizer + tiny_base_info.json into output_dir; returns the info."""
    cfg = cfg or TinyBaseConfig()
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _build(output_dir, cfg, progress)
    finally:
        torch.set_num_threads(threads_before)


def _build(output_dir: str, cfg: TinyBaseConfig, progress: bool) -> dict:
    build_start = time.perf_counter()
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, cfg)
    problems = training_problems(cfg)
    start, cpu_start = time.perf_counter(), time.process_time()
    losses = train(model, tokenizer, problems, cfg, progress=progress)
    train_seconds, train_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    heldout = heldout_problems(cfg.num_eval, cfg.eval_seed, cfg.max_value)
    start = time.perf_counter()
    accuracy = greedy_accuracy(model, tokenizer, heldout, cfg.max_new_tokens)
    eval_seconds = time.perf_counter() - start
    prompts = [format_prompt(p["nums"], p["target"], template=TEMPLATE) for p in heldout[:64]]
    start = time.perf_counter()
    greedy_completions(model, tokenizer, prompts, cfg.max_new_tokens, batch_size=64)  # sizing for ES/GRPO runs
    greedy_64_seconds = time.perf_counter() - start
    head = max(1, min(50, len(losses) // 10))
    info = {
        "model": MODEL_NAME,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": cfg.steps,
        "seed": cfg.seed,
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu, 1),
        "torch_threads": torch.get_num_threads(),
        "heldout_accuracy": accuracy,
        "heldout_problems": len(heldout),
        "heldout_eval_seconds": round(eval_seconds, 1),
        "greedy_64_seconds": round(greedy_64_seconds, 2),  # one batch of 64 greedy completions
        "first_loss": sum(losses[:head]) / head,
        "final_loss": sum(losses[-head:]) / head,
        "train_problems": len(problems),
        "template": TEMPLATE,
        "config": dataclasses.asdict(cfg),
    }
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    info["build_seconds"] = round(time.perf_counter() - build_start, 1)  # data + training + eval + save
    with open(os.path.join(output_dir, "tiny_base_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info


def default_path() -> str:
    """$EGGROLL_CACHE/tiny-countdown-base, else ~/.cache/eggroll_ft/tiny-countdown-base."""
    root = os.environ.get("EGGROLL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "eggroll_ft")
    return os.path.join(root, MODEL_NAME)


def build_atomically(path: str, cfg: TinyBaseConfig | None = None, progress: bool = True) -> dict:
    """build_tiny_base into a temporary sibling of `path`, then rename it into place.

    An interrupted build never leaves a half-written model at `path`; an existing model there
    is replaced only once the new one is complete.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.building-", dir=parent)
    try:
        info = build_tiny_base(tmp, cfg, progress=progress)
        if os.path.exists(path):  # move the old one aside first: rename cannot replace a full directory
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.replace(path, os.path.join(old, "model"))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the build succeeded
    return info


def ensure_tiny_base(path: str | None = None, cfg: TinyBaseConfig | None = None, progress: bool = True) -> str:
    """Return a directory holding the tiny base checkpoint, building it there on first use.

    `path` defaults to default_path(). A complete checkpoint (one with tiny_base_info.json) is
    reused as it is, whatever `cfg` says; otherwise it is built with `cfg` (default:
    TinyBaseConfig()) by build_atomically, so an interrupted build leaves nothing behind.
    """
    path = os.path.abspath(path or default_path())
    if not os.path.isfile(os.path.join(path, "tiny_base_info.json")):
        try:
            build_atomically(path, cfg, progress)
        except OSError:
            if not os.path.isfile(os.path.join(path, "tiny_base_info.json")):  # not a concurrent build's win
                raise
    return path


def main(argv=None) -> dict:
    defaults = TinyBaseConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=None, help=f"where to save (default: {default_path()})")
    for field in dataclasses.fields(TinyBaseConfig):
        parser.add_argument(f"--{field.name}", type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name))
    args = vars(parser.parse_args(argv))
    output_dir = args.pop("output_dir") or default_path()
    cfg = TinyBaseConfig(**args)
    info = build_atomically(output_dir, cfg)
    print(f"saved {output_dir}: {info['params']:,} params, {info['steps']} steps in {info['train_seconds']}s, "
          f"loss {info['first_loss']:.3f} -> {info['final_loss']:.3f}, "
          f"held-out greedy accuracy {info['heldout_accuracy']:.1%} on {info['heldout_problems']} problems; "
          f"64 greedy completions in {info['greedy_64_seconds']}s; built in {info['build_seconds']}s")
    return info


if __name__ == "__main__":
    main()
