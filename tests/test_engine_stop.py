"""Stop strings and EOS in the engine: completions and finish reasons equal an independent reference
(decode the whole completion after each token, end at the first EOS or stop string), on randomized
cases, with the character tokenizer and byte-level BPE tokenizers built in code; the per-vocabulary
mask of tokens that may complete a stop string is conservative; only the rows it selects are decoded.

Models live on ``EGGROLL_TEST_DEVICE`` (default ``cpu``)."""
import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from eggroll_ft import NoiseConfig, Population
from eggroll_ft.engine import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, PopulationEngine, SamplingParams
from eggroll_ft.engine.stops import StopStrings
from eggroll_ft.testing import char_tokenizer, device_under_test, tiny_llama

DEVICE = device_under_test()
SENTENCES = ["<think> 3 + 5 = 8, then 8 * 3 = 24 </think> <answer> (3 + 5) * 3 </answer>",
             "Le café crème est naïve, déjà vu à la carte.", "日本語のテキストと中文的句子。",
             "emoji 🙂 and 🚀 go → there", "the cat sat on the mat; don't stop, it's done.",
             "<answer> 42 </answer> and <answer>7</answer>"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _trained(pre_tokenizer, decoder, vocab_size, specials, **alphabet):
    tk = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in specials else None))
    tk.pre_tokenizer, tk.decoder = pre_tokenizer, decoder
    tk.train_from_iterator(SENTENCES * 3, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                              show_progress=False, **alphabet))
    return tk


def byte_bpe():
    """GPT-2-style byte-level BPE: every byte is a token, so a multi-byte character may be split
    across tokens (a token alone may decode to U+FFFD), and merges mix spaces with partial bytes."""
    tk = _trained(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), 420,
                  ["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


def metaspace_bpe():
    """SentencePiece-style: ``"▁the"`` decodes to ``"the"`` alone and ``" the"`` after a word."""
    tk = _trained(pre_tokenizers.Metaspace(), decoders.Metaspace(), 200, ["<unk>", "<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")


def wordpiece_cleanup():
    """WordPiece with transformers' clean-up: ``decode`` rewrites ``"do n't"`` to ``"don't"``."""
    words = ["[UNK]", "do", "n", "'", "t", "s", "don", ".", ",", "a", "b", "it", "?", "!", "m", "ve", "re", "e",
             "##n", "##'", "##t", "##s", "##e"]
    tk = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", clean_up_tokenization_spaces=True)


TOKENIZERS = {"char": char_tokenizer, "byte_bpe": byte_bpe, "metaspace_bpe": metaspace_bpe,
              "wordpiece_cleanup": wordpiece_cleanup}


@pytest.fixture(scope="module")
def tokenizers_():
    return {name: make() for name, make in TOKENIZERS.items()}


def reference_end(row: list[int], eos: set[int], stops: list[str], max_new: int, decode) -> tuple[list[int], str]:
    """The obviously-correct rule: after each token, EOS ends the row; else the first stop string
    anywhere in the decoded completion does; else the length does."""
    for t in range(1, len(row) + 1):
        if row[t - 1] in eos:
            return row[:t], FINISH_EOS
        if any(s in decode(row[:t]) for s in stops):
            return row[:t], FINISH_STOP
        if t == max_new:
            break
    return row[:max_new], FINISH_LENGTH


# ---- the mask ------------------------------------------------------------------------------------
def test_mask_selects_tokens_that_can_end_the_stop_string(tokenizers_):
    char = tokenizers_["char"]
    mask = StopStrings(char, ["</answer>"]).may_end(len(char))
    assert mask.nonzero().flatten().tolist() == [char.convert_tokens_to_ids(">")]  # not '<eos>' nor 'x>'
    bpe = tokenizers_["byte_bpe"]
    mask = StopStrings(bpe, ["</answer>"]).may_end(len(bpe))
    texts = [bpe.decode([t]) for t in range(len(bpe))]
    assert all(mask[t] for t, x in enumerate(texts) if "\ufffd" in x)  # partial UTF-8: may complete anything
    assert mask[bpe.convert_tokens_to_ids(">")] and not mask[bpe.convert_tokens_to_ids("answer")]
    assert 0.2 < mask.float().mean() < 0.6  # selective: the 128 lone high bytes, merges with them, '>'
    assert StopStrings(char, ["a\ufffd"]).may_end(len(char)).all()  # a stop string with U+FFFD: every token
    wp = tokenizers_["wordpiece_cleanup"]
    assert wp.decode(wp.convert_tokens_to_ids(["do", "n", "'", "t"])) == "don't"  # what the mask must allow for
    assert StopStrings(wp, ["don"]).may_end(len(wp))[wp.convert_tokens_to_ids("t")]


def test_stop_strings_are_checked(tokenizers_):
    char = tokenizers_["char"]
    with pytest.raises(ValueError, match="stop_strings='</answer>' must be a list of strings, not a string"):
        StopStrings(char, "</answer>")
    with pytest.raises(ValueError, match=r"stop_strings=\['a', ''\] must be non-empty strings"):
        StopStrings(char, ["a", ""])
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        StopStrings(None, ["a"])


def _pieces(tok, rng: random.Random, snippets: list[str]) -> list[int]:
    """A random token sequence that writes the snippets with varied token boundaries: some pieces
    encoded whole, some character by character, some byte by byte (byte-level tokenizers), and
    random tokens between them."""
    ids: list[int] = []
    byte_level = isinstance(tok.backend_tokenizer.decoder, decoders.ByteLevel)
    for _ in range(rng.randint(2, 6)):
        text = rng.choice(snippets)
        how = rng.random()
        if how < 0.4:
            ids += tok(text, add_special_tokens=False)["input_ids"]
        elif how < 0.7:
            for ch in text:
                ids += tok(ch, add_special_tokens=False)["input_ids"]
        elif how < 0.85 and byte_level:  # one token per byte: characters split across tokens
            ids += tok.convert_tokens_to_ids(_byte_tokens(text))
        else:
            ids += [rng.randrange(len(tok)) for _ in range(rng.randint(1, 3))]
    return ids


def _byte_tokens(text: str) -> list[str]:
    """The single-byte tokens of a byte-level vocabulary that spell ``text`` (GPT-2's byte-to-unicode
    table: printable bytes stand for themselves, the others for 256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    char = {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}
    return [char[b] for b in text.encode()]


STOP_SETS = {"char": [["</answer>"], ["ab", "c"], ["t s", " "], ["x"]],
             "byte_bpe": [["</answer>"], ["é", "日本"], ["naïve,", "🙂"], [" th", "e c"], ["swer"]],
             "metaspace_bpe": [["cat "], [" the", "sat"], ["</answer>", " 8"], ["e c"]],
             "wordpiece_cleanup": [["don"], ["n't", "a."], ["it'", "s"], ["do n", "?"]]}


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_mask_holds_every_token_that_completes_a_stop_string(tokenizers_, name):
    """For random token sequences, the token after which a stop string first appears in the whole
    decoded text is always in the mask (the property that lets the engine skip the other rows)."""
    tok = tokenizers_[name]
    rng = random.Random(0)
    events = 0
    for stops in STOP_SETS[name]:
        mask = StopStrings(tok, stops).may_end(len(tok))
        snippets = stops + SENTENCES + [s[:-1] for s in stops] + [s[1:] for s in stops]
        for _ in range(60):
            ids = _pieces(tok, rng, snippets)
            end, reason = reference_end(ids, set(), stops, len(ids), tok.decode)
            if reason == FINISH_STOP:
                events += 1
                assert mask[end[-1]], (stops, end, tok.convert_ids_to_tokens(end[-4:]))
    assert events >= 60  # the snippets do write the stop strings


# ---- the engine ------------------------------------------------------------------------------------
def _free_run(tok, J, max_new, sampling, seed):
    """A tiny random model and J jobs; the completions they write with no EOS and no stop strings
    (a job's tokens depend only on its prompt, member and seed, so the ends only cut them)."""
    model = tiny_llama(len(tok), layers=1, init_std=0.25, seed=seed).to(DEVICE)
    pop = Population(model, NoiseConfig(seed=seed, rank=1), 8, sigma=0.1)
    pop.set_step(1)
    rng = random.Random(seed)
    prompts = [tok(rng.choice(SENTENCES)[: rng.randint(2, 12)], add_special_tokens=False)["input_ids"] or [5]
               for _ in range(J)]
    members = torch.tensor([rng.randrange(-1, 8) for _ in range(J)])
    seeds = torch.arange(J) + 100 * seed
    free = PopulationEngine(model, pop, pad_token_id=0).generate(prompts, members, seeds, max_new_tokens=max_new,
                                                                 sampling=sampling)
    assert set(free.finish_reasons) == {FINISH_LENGTH}
    return model, pop, (prompts, members, seeds), free.completion_ids


def _random_ends(tok, rows: list[list[int]], rng: random.Random, max_new: int):
    """EOS ids and stop strings drawn from the completions: substrings over several tokens, a
    substring inside one token's text (its middle where it is long enough), a string that never
    occurs, and one stop string that a row completes with the token that is also its first EOS
    (EOS must win there)."""
    eos = {rng.choice(rng.choice(rows))}
    stops = ["\u2603 never"]
    for _ in range(2):
        r = tok.decode(rng.choice(rows))
        i = rng.randrange(max(1, len(r) - 4))
        stops.append(r[i:i + rng.randint(1, 4)])
    inside = [tok.decode([t]) for r in rows for t in r]
    inside = [x for x in inside if len(x) >= 3 and "\ufffd" not in x and x.strip()]
    if inside:
        x = rng.choice(inside)
        stops.append(x[1:-1] if len(x) >= 4 and x[1:-1].strip() else x[1:])
    stops = [s for s in stops if s and "\ufffd" not in s]
    spots = [(r, k) for r in rows for k in range(2, len(r))]
    rng.shuffle(spots)
    for r, k in spots:  # the first spot where EOS and the new stop string end the row together
        both = tok.decode(r[: k + 1])[-2:]
        end, reason = reference_end(r, eos | {r[k]}, stops + [both], max_new, tok.decode)
        if "\ufffd" not in both and reason == FINISH_EOS and len(end) == k + 1 and both in tok.decode(end):
            return sorted(eos | {r[k]}), stops + [both]
    raise AssertionError("no spot for EOS and a stop string on the same step")


@pytest.mark.parametrize("name", ["char", "byte_bpe"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ends_equal_the_reference_on_random_cases(tokenizers_, name, seed):
    """EOS + several stop strings (multi-token, inside one token, EOS on the same step), 16 jobs
    through 3, 4 or 7 slots (rows end at different steps, slots are refilled mid-flight) and all at
    once, greedy and sampled: the completions and finish reasons of the reference rule."""
    tok = tokenizers_[name]
    J, max_new = 16, 12
    rng = random.Random(seed)
    reasons_seen, same_step = set(), 0
    for sampling, slot_counts in ((SamplingParams(greedy=True), (3, 7)), (SamplingParams(temperature=1.2, top_k=40), (4, None))):
        model, pop, (prompts, members, seeds), rows = _free_run(tok, J, max_new, sampling, seed)
        eos, stops = _random_ends(tok, rows, rng, max_new)
        ref = [reference_end(r, set(eos), stops, max_new, tok.decode) for r in rows]
        reasons_seen |= {reason for _, reason in ref}
        same_step += sum(reason == FINISH_EOS and any(s in tok.decode(c) for s in stops) for c, reason in ref)
        for slots in slot_counts:
            eng = PopulationEngine(model, pop, eos_token_ids=eos, pad_token_id=0, tokenizer=tok, stop_strings=stops,
                                   max_sequences_in_flight=slots)
            out = eng.generate(prompts, members, seeds, max_new_tokens=max_new, sampling=sampling)
            assert out.completion_ids == [c for c, _ in ref], (slots, eos, stops)
            assert out.finish_reasons == [reason for _, reason in ref], (slots, eos, stops)
    assert reasons_seen == {FINISH_EOS, FINISH_STOP, FINISH_LENGTH}
    assert same_step >= 1  # a stop string completed by an EOS token: EOS is the reason


def test_only_rows_whose_token_may_end_a_stop_string_are_decoded(tokenizers_):
    """The engine decodes a row only at the steps where its newest token is in the mask (and not
    EOS): counted on the real tokenizer's ``decode`` during a run with refills."""
    tok = char_tokenizer()  # its own instance: the counter below wraps this one's decode
    sampling = SamplingParams(temperature=1.5)
    model, pop, (prompts, members, seeds), rows = _free_run(tok, 24, 16, sampling, seed=3)
    stops = ["</answer>", "ab", "?"]
    eos = [tok.convert_tokens_to_ids("e")]
    eng = PopulationEngine(model, pop, eos_token_ids=eos, pad_token_id=0, tokenizer=tok, stop_strings=stops,
                           max_sequences_in_flight=5)
    eng.generate(prompts, members, seeds, max_new_tokens=16, sampling=sampling)  # builds the mask
    calls = []
    decode = tok.decode
    tok.decode = lambda ids, *a, **kw: calls.append(list(ids)) or decode(ids, *a, **kw)
    out = eng.generate(prompts, members, seeds, max_new_tokens=16, sampling=sampling)
    mask = StopStrings(tok, stops).may_end(len(tok))
    expected = [c[:n][-eng._stops.window:] for c in out.completion_ids for n in range(1, len(c) + 1)
                if mask[c[n - 1]] and c[n - 1] not in eos]
    assert sorted(calls) == sorted(expected)
    assert 0 < len(calls) < sum(out.lengths) // 3  # far fewer than one decode per row and step
    assert FINISH_STOP in out.finish_reasons
