"""RWKV World tokenizer: the reference ids, exact round trips, HF-style batch padding."""
import pytest
import torch

pytest.importorskip("rwkv")
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER  # noqa: E402

from eggroll_ft.models.rwkv_tokenizer import RWKVWorldTokenizer, default_vocab_file  # noqa: E402

TEXT = ("Hello, world! The quick brown fox. Ünïcödé ümlauts — “quotes” … 你好，世界。こんにちは、元気ですか？ "
        "안녕하세요 Привет, мир! مرحبا بالعالم שלום עולם नमस्ते 🦆🚀 👩‍👩‍👧‍👦 🏳️‍🌈 ✔️\n\n"
        "def f(x):\n\treturn x ** 2  # comment\r\n" + " " * 200 + "#" * 90 + "\x00\x01 end")


@pytest.fixture(scope="module")
def tok():
    return RWKVWorldTokenizer()


@pytest.fixture(scope="module")
def ref():
    return TRIE_TOKENIZER(default_vocab_file())


def test_ids_match_the_rwkv_package(tok, ref):
    ids = tok.encode(TEXT)
    assert ids == ref.encode(TEXT)
    assert len(ids) < len(TEXT.encode("utf-8")) / 2  # multi-byte tokens were used
    for piece in TEXT.split(" "):
        assert tok.encode(piece) == ref.encode(piece)


def test_decode_encode_round_trip(tok, ref):
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.decode(tok.encode(TEXT)) == ref.decode(ref.encode(TEXT))
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_special_tokens_and_vocab(tok):
    assert tok.eos_token_id == 0 and tok.pad_token_id == 0
    assert len(tok) == 65530  # ids 0..65529; the models' embedding has 65,536 rows
    ids = tok.encode("Hi there")
    assert tok.decode(ids + [0, 0], skip_special_tokens=True) == "Hi there"
    assert tok.decode(ids + [0]) == "Hi there<|endoftext|>"
    assert 0 not in tok.encode(TEXT)  # text never encodes to end-of-text
    assert tok.decode(ids + [65535, 65530]) == "Hi there"  # the models' 6 spare ids decode to nothing


def test_batch_call_pads_left_by_default(tok):
    texts = ["a", "Hello world, again", "你好"]
    enc = tok(texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    lens = [len(tok.encode(t)) for t in texts]
    assert ids.shape == (3, max(lens)) and ids.dtype == torch.long
    assert mask.sum(1).tolist() == lens
    for b, t in enumerate(texts):
        assert ids[b, -lens[b]:].tolist() == tok.encode(t)
        assert (ids[b, : ids.shape[1] - lens[b]] == 0).all() and (mask[b, : ids.shape[1] - lens[b]] == 0).all()
    right = tok(texts, padding=True, padding_side="right", return_tensors="pt")
    assert right["input_ids"][0, 0].item() == tok.encode("a")[0] and right["attention_mask"][0, -1] == 0
    assert tok.batch_decode(ids, skip_special_tokens=True) == texts
    single = tok("Hello world")
    assert single["input_ids"] == tok.encode("Hello world") and single["attention_mask"] == [1, 1]
    cut = tok(["one two three four five"], truncation=True, max_length=2)
    assert cut["input_ids"][0] == tok.encode("one two three four five")[-2:]  # keeps the prompt's end
    padded = tok.pad({"input_ids": [tok.encode(t) for t in texts]}, return_tensors="pt")
    assert torch.equal(padded["input_ids"], ids) and torch.equal(padded["attention_mask"], mask)
    with pytest.raises(ValueError, match="padding_side='middle'"):
        tok(texts, padding=True, padding_side="middle")
    with pytest.raises(ValueError, match="different lengths"):
        tok(texts, return_tensors="pt")


def test_chat_template_and_save_load(tok, tmp_path):
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?\n\nThink."}])
    assert text == "User: What is 2+2?\nThink.\n\nAssistant:"
    tok.save_pretrained(tmp_path)
    again = RWKVWorldTokenizer.from_pretrained(tmp_path)
    assert again.encode(TEXT) == tok.encode(TEXT) and again.padding_side == "left"
