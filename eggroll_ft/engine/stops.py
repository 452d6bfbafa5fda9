"""Stop strings: which rows' newest token may complete one, and the check of those rows only.

The engine ends a row on a stop string when the decoded tail of its completion (the last
``4 * len(longest stop string) + 4`` tokens: a character is at most 4 bytes and a token at least
one) contains one. Decoding every live row at every step costs tens of microseconds a row with a
transformers tokenizer, more than the model step at 1,024 rows. But a stop string that appears
for the first time after token ``t`` was appended ends inside the text ``t`` added: its last
character is there, and the characters of ``t`` before that one are the stop string's own (or ``t``
holds the whole stop string). ``StopStrings.may_end(V)`` is the per-vocabulary mask of the tokens
that can do so; the engine looks the newest tokens up in it on the device and decodes only the rows
it selects (``hits``), with the same tail and the same ``tokenizer.decode`` as a check of every row.

A token's text is taken two ways, its decode alone and the text it adds after an anchor token
(SentencePiece's ``"▁foo"`` is ``"foo"`` alone, ``" foo"`` after a word); it is in the mask when
either way can end a stop string. The mask is conservative wherever a token's text is not known to
be a plain append, and then holds the token:

* its decode alone or after the anchor contains U+FFFD or is empty (byte-level BPE: a partial
  UTF-8 sequence, whose character is formed only with the neighbouring tokens; byte-fallback
  ``<0xE2>`` tokens), or decoding it fails, or its id is beyond the tokenizer;
* its decode after the anchor does not start with the anchor's own text (a decoder that rewrites
  what came before).

A decoder that rewrites earlier text across the junction, transformers' ``clean_up_tokenization``
(``" ."`` -> ``"."``, ``"do n't"`` -> ``"don't"``), is detected by a round trip of ``"a ."``; then
every token holding the last character of a clean-up pattern is in the mask too (a rewrite is
triggered by the token that completes its pattern). A stop string that contains U+FFFD puts every
token in the mask (a tail that starts inside a character decodes to U+FFFD too). Decoders assumed:
a token's text does not depend on the tokens after it (byte-level BPE, SentencePiece, WordPiece,
character tokenizers; not the ``</w>``-suffix ``BPEDecoder``, whose word-final space appears only
once the next token comes). Masks and token texts are cached per tokenizer.
"""
from __future__ import annotations

import gc
import weakref
from contextlib import contextmanager

import torch

REPLACEMENT = "\ufffd"
# transformers' clean_up_tokenization drops the space in " .", " ?", " !", " ,", " ' ", " n't",
# " 'm", " 's", " 've", " 're": the last characters of those patterns
CLEANUP_LAST_CHARS = frozenset(".?!, tmse")
_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> {key: value}


class StopStrings:
    """The stop strings of an engine and the tokenizer that decodes completions."""

    def __init__(self, tokenizer, stop_strings):
        if isinstance(stop_strings, str):  # list("</answer>") would stop on every '<', '/', ...
            raise ValueError(f"stop_strings={stop_strings!r} must be a list of strings, not a string")
        self.strings = list(stop_strings or [])
        if self.strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode completions")
        if any(not isinstance(s, str) or not s for s in self.strings):
            raise ValueError(f"stop_strings={self.strings!r} must be non-empty strings")
        self.tokenizer = tokenizer
        # a new stop string ends inside the last few tokens: a token decodes to >= 1 byte, a char to <= 4 bytes
        self.window = 4 * max((len(s) for s in self.strings), default=0) + 4

    def __bool__(self) -> bool:
        return bool(self.strings)

    def hits(self, tails: list[list[int]]) -> list[bool]:
        """Per completion tail (its last ``window`` tokens): does its text contain a stop string?"""
        texts = [self.tokenizer.decode(t) for t in tails]
        return [any(s in text for s in self.strings) for text in texts]

    def may_end(self, vocab_size: int) -> torch.Tensor:
        """``(V,)`` bool, CPU: the tokens whose appending may complete a stop string."""
        if any(REPLACEMENT in s for s in self.strings):
            return torch.ones(vocab_size, dtype=torch.bool)
        strings, cleanup = tuple(sorted(set(self.strings))), _cleans_up(self.tokenizer)

        def make():
            return torch.tensor([texts is None or any(_may_end(t, strings) for t in texts)
                                 or cleanup and any(c in t for t in texts for c in CLEANUP_LAST_CHARS)
                                 for texts in token_texts(self.tokenizer, vocab_size)], dtype=torch.bool)
        return _cached(self.tokenizer, ("mask", strings, cleanup, vocab_size), make)


def _may_end(text: str, strings) -> bool:
    """Can a stop string's first occurrence end inside ``text`` appended to some completion? Where
    ``text[p]`` is the stop string's last character, the characters of ``text`` up to ``p`` must
    be the stop string's last ones (or contain all of it)."""
    for s in strings:
        p = text.find(s[-1])
        while p >= 0:
            k = min(p + 1, len(s))
            if text[p + 1 - k:p + 1] == s[len(s) - k:]:
                return True
            p = text.find(s[-1], p + 1)
    return False


def _cached(tokenizer, key, make):
    try:
        store = _cache.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no cache
        return make()
    if key not in store:
        store[key] = make()
    return store[key]


def _decode_batch(tokenizer, seqs: list[list[int]]) -> list[str | None]:
    """``tokenizer.decode`` of each sequence, ``None`` where it fails. A transformers tokenizer with
    a ``tokenizers`` backend decodes in one call there when that gives ``decode``'s text on a
    sample of the sequences (a few seconds saved on a 150k vocabulary)."""
    def one(s):
        try:
            return tokenizer.decode(s)
        except Exception:  # noqa: BLE001 - any tokenizer's error: the token is treated as 'may end'
            return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        try:
            fast = backend.decode_batch(seqs, skip_special_tokens=False)
        except Exception:  # noqa: BLE001 - e.g. an id beyond the backend's vocabulary: decode one by one
            fast = None
        sample = range(0, len(seqs), max(1, len(seqs) // 256))
        if fast is not None and all(fast[i] == one(seqs[i]) for i in sample):
            return fast
    return [one(s) for s in seqs]


@contextmanager
def _no_gc():
    """Tens of thousands of small lists would trigger full collections over a large heap (0.6 s
    for a 49k vocabulary): they hold no cycles, so the collector is paused while they are built."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def token_texts(tokenizer, vocab_size: int) -> list[tuple[str, str] | None]:
    """Per token id, the text it may add to a completion (its decode alone, and what it adds after
    an anchor token), or ``None`` when that is not a plain append (see the module docstring)."""
    def make():
        n = min(vocab_size, len(tokenizer)) if hasattr(tokenizer, "__len__") else vocab_size
        alone = _decode_batch(tokenizer, [[t] for t in range(n)])
        # the anchor: a token whose text is plain ASCII letters or digits
        anchor = next((t for t, x in enumerate(alone) if x and x.isascii() and x.isalnum()), None)
        if anchor is None:
            return [None] * vocab_size
        head = alone[anchor]
        after = _decode_batch(tokenizer, [[anchor, t] for t in range(n)])
        texts: list[tuple[str, str] | None] = []
        for a, b in zip(alone, after):
            if not a or b is None or not b.startswith(head) or len(b) == len(head) or REPLACEMENT in a + b:
                texts.append(None)
            else:
                texts.append((a, b[len(head):]))
        return texts + [None] * (vocab_size - n)
    def make_no_gc():
        with _no_gc():
            return make()
    return _cached(tokenizer, ("texts", vocab_size), make_no_gc)


def _cleans_up(tokenizer) -> bool:
    """Does ``tokenizer.decode`` rewrite text across token boundaries (transformers'
    ``clean_up_tokenization``)? Checked on a round trip of ``"a ."``; a tokenizer without
    ``encode`` is taken to decode by appending."""
    def probe():
        if not callable(getattr(tokenizer, "encode", None)):
            return False
        try:
            ids = tokenizer.encode("a .", add_special_tokens=False)
        except TypeError:
            ids = tokenizer.encode("a .")
        return tokenizer.decode(ids) != "a ."
    return _cached(tokenizer, ("cleans_up",), probe)
