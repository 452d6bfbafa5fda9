"""Tiny models and tokenizers built in code, for tests, examples and offline smoke runs.

Nothing here reaches a hub: a character-level tokenizer (``tokenizers`` WordLevel over single
characters, wrapped in ``PreTrainedTokenizerFast``) and small random Llama / GPT-2 models; and
``free_port`` for multi-process launches; ``device_under_test`` for tests that also run on a GPU.
"""
from __future__ import annotations

import os
import string

import torch


def free_port() -> int:
    """A free local TCP port for a launch's rendezvous: torchrun's default 29500, or any fixed port,
    may still be held by the previous launch's socket (seen as a failed launch in a full test run)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_under_test() -> torch.device:
    """The device that device-aware tests build their models on: ``EGGROLL_TEST_DEVICE`` (default
    ``cpu``), so the same tests check the CUDA path where a GPU is lent
    (``EGGROLL_TEST_DEVICE=cuda python -m pytest tests/test_engine.py``)."""
    device = torch.device(os.environ.get("EGGROLL_TEST_DEVICE", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"EGGROLL_TEST_DEVICE={device} but torch.cuda.is_available() is False")
    return device


def cuda_graph_counts(device) -> dict[str, int]:
    """CUDA graphs that ``torch.compile(mode="reduce-overhead")`` recorded on ``device`` since the
    last ``torch._dynamo.reset()`` (root graphs of inductor's CUDA-graph trees), and the graphs it
    skipped (ran without capture: a dynamic shape, an input mutation it cannot replay, a CPU op).
    Reads inductor internals; for tests and benchmarks only."""
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    manager = cudagraph_trees.get_manager(index, create_if_none_exists=False)
    recorded = 0 if manager is None else sum(len(nodes) for nodes in manager.roots.values())
    return {"recorded": recorded, "skipped": int(counters["inductor"]["cudagraph_skips"])}


CHARS = string.ascii_letters + string.digits + " .,:;!?+-*/=()[]<>#$%'\"\n"


def char_tokenizer(chars: str = CHARS):
    """A character tokenizer: ids 0..3 are <pad>, <bos>, <eos>, <unk>, then one id per character of
    ``chars`` in order (others map to <unk>); left padding."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for c in dict.fromkeys(chars):
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per char, "\n" too
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def tiny_llama(vocab_size: int, hidden: int = 32, layers: int = 2, init_std: float = 0.02, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, initializer_range=init_std,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(vocab_size: int, hidden: int = 32, layers: int = 2, init_std: float = 0.02, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=512,
                     initializer_range=init_std, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def char_fraction_reward(target: str = "a"):
    """A toy reward: the fraction of completion characters equal to ``target``."""
    def char_fraction(completions, **kwargs):
        out = []
        for c in completions:
            text = c if isinstance(c, str) else c[-1]["content"]
            out.append(text.count(target) / len(text) if text else 0.0)
        return out
    return char_fraction
