"""The RWKV World tokenizer (``rwkv_vocab_v20230424``), usable as a trainer's ``processing_class``.

RWKV's World vocabulary maps 65,529 byte strings to ids 1..65529; text is encoded as UTF-8 and cut
greedily into the longest token at each position (a byte trie), exactly as the reference
``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``. Id 0 is not a vocabulary entry: RWKV uses it as the
end-of-text token, so it is both ``eos_token_id`` and ``pad_token_id`` here.

This module knows nothing of models. It offers the slice of the Hugging Face tokenizer API the
trainer and engine use: ``__call__`` with batch padding (left by default), ``encode``, ``decode``,
``batch_decode``, ``save_pretrained``/``from_pretrained`` and a minimal ``apply_chat_template``
(RWKV's plain ``User: ...\\n\\nAssistant:`` format). The vocabulary file ships inside the ``rwkv``
package on PyPI; it is parsed with ``ast.literal_eval`` (never ``eval``).
"""
from __future__ import annotations

import ast
import functools
import json
import os
import shutil
from pathlib import Path

import torch

VOCAB_NAME = "rwkv_vocab_v20230424.txt"
_LEAF = -1  # trie key under which a node stores its token id


def default_vocab_file() -> str:
    """The vocabulary file shipped in the installed ``rwkv`` package."""
    try:
        import rwkv
    except ImportError as e:  # pragma: no cover - rwkv is a test dependency
        raise ImportError("the RWKV World vocabulary ships with the `rwkv` package: pip install rwkv "
                          "(or pass vocab_file=...)") from e
    return os.path.join(os.path.dirname(rwkv.__file__), VOCAB_NAME)


@functools.lru_cache(maxsize=4)
def _load_vocab(path: str) -> tuple[dict[int, bytes], dict]:
    """``(id -> bytes, byte trie)`` from a vocabulary file of lines ``<id> <python literal> <len>``."""
    id_to_bytes: dict[int, bytes] = {}
    trie: dict = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            idx = int(line[: line.index(" ")])
            tok = ast.literal_eval(line[line.index(" "): line.rindex(" ")].strip())
            tok = tok.encode("utf-8") if isinstance(tok, str) else tok
            if not isinstance(tok, bytes) or len(tok) != int(line[line.rindex(" "):]):
                raise ValueError(f"{path}:{line_no}: malformed vocabulary entry {line.strip()!r}")
            id_to_bytes[idx] = tok
            node = trie
            for byte in tok:
                node = node.setdefault(byte, {})
            node[_LEAF] = idx
    return id_to_bytes, trie


class RWKVWorldTokenizer:
    """Greedy longest-match byte tokenizer with the RWKV World vocabulary.

    >>> tok = RWKVWorldTokenizer()
    >>> tok.encode("Hello world")
    [33155, 40213]
    >>> tok.decode(tok.encode("Hello world"))
    'Hello world'
    """

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str | os.PathLike | None = None, padding_side: str = "left",
                 truncation_side: str = "left", model_max_length: int = 1 << 30):
        self.vocab_file = str(vocab_file) if vocab_file is not None else default_vocab_file()
        self._id_to_bytes, self._trie = _load_vocab(self.vocab_file)
        self._check_side("padding_side", padding_side)
        self._check_side("truncation_side", truncation_side)
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = model_max_length
        self.eos_token_id = 0
        self.pad_token_id = 0
        self.bos_token_id = None
        self.eos_token = "<|endoftext|>"  # how decode shows id 0 when special tokens are kept
        self.pad_token = self.eos_token
        self.all_special_ids = [0]
        self.vocab_size = max(self._id_to_bytes) + 1  # 65530; the models' embedding has 65536 rows

    @staticmethod
    def _check_side(field: str, value: str) -> None:
        if value not in ("left", "right"):
            raise ValueError(f"{field}={value!r} must be 'left' or 'right'")

    def __len__(self) -> int:
        return self.vocab_size

    # ---- encoding ----------------------------------------------------------------------------------
    def encode_bytes(self, src: bytes) -> list[int]:
        """Greedy longest match; every single byte is a token, so this never fails."""
        ids, i, n, root = [], 0, len(src), self._trie
        while i < n:
            node, j, best, best_end = root, i, None, i + 1
            while j < n:
                node = node.get(src[j])
                if node is None:
                    break
                j += 1
                tid = node.get(_LEAF)
                if tid is not None:
                    best, best_end = tid, j
            ids.append(best)
            i = best_end
        return ids

    def encode(self, text: str, add_special_tokens: bool = False, **_) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS is added: RWKV has no BOS)."""
        return self.encode_bytes(text.encode("utf-8"))

    def __call__(self, text: str | list[str], padding: bool | str = False, truncation: bool = False,
                 max_length: int | None = None, return_tensors: str | None = None,
                 padding_side: str | None = None, return_attention_mask: bool = True,
                 add_special_tokens: bool = False, **_):
        """HF-style batch encoding: ``{"input_ids", "attention_mask"}`` (1 = real token).

        ``padding=True``/``"longest"`` pads to the longest row, ``"max_length"`` to ``max_length``,
        on ``padding_side`` (default: this tokenizer's, ``"left"``) with ``pad_token_id`` = 0.
        ``return_tensors="pt"`` gives LongTensors (requires padding when lengths differ).
        """
        from transformers import BatchEncoding
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        side = padding_side or self.padding_side
        self._check_side("padding_side", side)
        ids = [self.encode(t) for t in texts]
        if truncation and max_length is not None:
            ids = [x[-max_length:] if self.truncation_side == "left" else x[:max_length] for x in ids]
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding={padding!r} must be a bool, 'longest', 'max_length' or 'do_not_pad'")
        masks = [[1] * len(x) for x in ids]
        if padding and padding != "do_not_pad":
            width = max_length if padding == "max_length" and max_length else max((len(x) for x in ids), default=0)
            pads = [[self.pad_token_id] * (width - len(x)) for x in ids]
            zeros = [[0] * len(p) for p in pads]
            if side == "left":
                ids, masks = [p + x for p, x in zip(pads, ids)], [z + m for z, m in zip(zeros, masks)]
            else:
                ids, masks = [x + p for p, x in zip(pads, ids)], [m + z for z, m in zip(zeros, masks)]
        if return_tensors == "pt":
            if len({len(x) for x in ids}) > 1:
                raise ValueError("rows have different lengths: pass padding=True with return_tensors='pt'")
            ids_t = torch.tensor(ids, dtype=torch.long).reshape(len(ids), -1)
            data = {"input_ids": ids_t, "attention_mask": torch.tensor(masks, dtype=torch.long).reshape(ids_t.shape)}
        elif return_tensors is None:
            data = {"input_ids": ids[0] if single else ids, "attention_mask": masks[0] if single else masks}
        else:
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' or None are supported")
        if not return_attention_mask:
            data.pop("attention_mask")
        return BatchEncoding(data)

    def pad(self, encoded_inputs, padding: bool | str = True, max_length: int | None = None,
            return_tensors: str | None = None, padding_side: str | None = None, **_):
        """Pad already-encoded rows (``{"input_ids": [[...], ...]}`` or a list of such dicts)."""
        from transformers import BatchEncoding
        if isinstance(encoded_inputs, (list, tuple)):
            rows = [list(e["input_ids"]) for e in encoded_inputs]
        else:
            rows = [list(r) for r in encoded_inputs["input_ids"]]
        side = padding_side or self.padding_side
        self._check_side("padding_side", side)
        width = max_length if padding == "max_length" and max_length else max((len(r) for r in rows), default=0)
        ids, masks = [], []
        for r in rows:
            pad = [self.pad_token_id] * (width - len(r))
            ids.append(pad + r if side == "left" else r + pad)
            masks.append([0] * len(pad) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * len(pad))
        if return_tensors == "pt":
            return BatchEncoding({"input_ids": torch.tensor(ids, dtype=torch.long).reshape(len(ids), -1),
                                  "attention_mask": torch.tensor(masks, dtype=torch.long).reshape(len(ids), -1)})
        return BatchEncoding({"input_ids": ids, "attention_mask": masks})

    # ---- decoding ----------------------------------------------------------------------------------
    def decode(self, token_ids, skip_special_tokens: bool = False, **_) -> str:
        """Text of ``token_ids``. Id 0 is dropped with ``skip_special_tokens``, else shown as
        ``eos_token``. Ids outside the vocabulary (65530..65535 exist in the models' embedding, and
        a perturbed model may sample them) decode to nothing, as in HF tokenizers. A sequence cut
        inside a multi-byte character decodes with U+FFFD."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        out, buf = [], []
        for i in token_ids:
            if i in (self.eos_token_id, self.pad_token_id):
                if not skip_special_tokens:
                    out.append(b"".join(buf).decode("utf-8", errors="replace"))
                    out.append(self.eos_token)
                    buf = []
                continue
            buf.append(self._id_to_bytes.get(int(i), b""))  # ids 65530..65535 (embedding padding) decode to ""
        out.append(b"".join(buf).decode("utf-8", errors="replace"))
        return "".join(out)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kw) -> list[str]:
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kw) for s in sequences]

    def convert_ids_to_tokens(self, ids):
        """Raw byte strings of ids (bytes, since a token may be a partial UTF-8 character)."""
        single = isinstance(ids, int)
        toks = [self._id_to_bytes.get(int(i), b"") for i in ([ids] if single else ids)]
        return toks[0] if single else toks

    # ---- chat -------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = True, **_):
        """RWKV's plain chat format: ``"User: ...\\n\\nAssistant: ...\\n\\n"`` (roles capitalised).

        ``\\n\\n`` ends a turn, so blank lines inside a message are collapsed to ``\\n``, as
        BlinkDL recommends for the World/g1 models. With ``add_generation_prompt`` the text ends in
        ``"Assistant:"``.
        """
        turns = []
        for m in messages:
            content = "\n".join(line for line in str(m["content"]).strip().split("\n") if line.strip())
            turns.append(f"{m['role'].capitalize()}: {content}")
        text = "\n\n".join(turns) + ("\n\nAssistant:" if add_generation_prompt else "\n\n")
        return self.encode(text) if tokenize else text

    # ---- files ------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, **_) -> tuple[str, ...]:
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.vocab_file, out / VOCAB_NAME)
        cfg = {"tokenizer_class": type(self).__name__, "vocab_file": VOCAB_NAME, "padding_side": self.padding_side,
               "truncation_side": self.truncation_side, "eos_token_id": 0, "pad_token_id": 0}
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        return (str(out / "tokenizer_config.json"), str(out / VOCAB_NAME))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, **kw) -> "RWKVWorldTokenizer":
        """From a directory written by ``save_pretrained``, a vocabulary file, or (None) the rwkv package's."""
        if path is None:
            return cls(**kw)
        p = Path(path)
        if p.is_dir():
            cfg = json.loads((p / "tokenizer_config.json").read_text())
            for k in ("padding_side", "truncation_side"):
                kw.setdefault(k, cfg.get(k, "left"))
            return cls(p / cfg.get("vocab_file", VOCAB_NAME), **kw)
        return cls(p, **kw)
