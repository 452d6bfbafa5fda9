"""Population engine: exactness against HF generate and dense members, continuous batching,
seeded sampling, EOS / stop strings, recurrent models, memory budget, the captured decode step.

Models live on ``EGGROLL_TEST_DEVICE`` (default ``cpu``): with ``EGGROLL_TEST_DEVICE=cuda`` the same
tests check the CUDA path, and the CUDA-graph test runs (``scripts/gpu_engine_check.sh`` does this)."""
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from eggroll_ft import NoiseConfig, Population
from eggroll_ft.engine import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, PopulationEngine, SamplingParams
from eggroll_ft.testing import char_tokenizer, cuda_graph_counts, device_under_test, tiny_gpt2, tiny_llama

TEXTS = ["hello", "ab", "the cat sat", "x", "zz top", "q", "lorem ipsum", "12+3=", "ok", "a b c d e"]
GREEDY = SamplingParams(greedy=True)
SAMPLE = SamplingParams(temperature=1.3, top_k=20, top_p=0.95)
DEVICE = device_under_test()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _setup(tok, make=tiny_llama, rank=1, N=8):
    model = make(len(tok), init_std=0.25).to(DEVICE)
    pop = Population(model, NoiseConfig(seed=0, rank=rank), N, sigma=0.1)
    pop.set_step(3)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    members = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, -1, 2])
    return model, pop, prompts, members


def _engine(model, pop, tok=None, **kw):
    return PopulationEngine(model, pop, eos_token_ids=kw.pop("eos", []), pad_token_id=0, tokenizer=tok, **kw)


@pytest.mark.parametrize("make,rank", [(tiny_llama, 1), (tiny_gpt2, 2)], ids=["llama-r1", "gpt2-r2"])
def test_greedy_equals_hf_generate_row_by_row(tok, make, rank):
    model, pop, prompts, members = _setup(tok, make, rank)
    out = _engine(model, pop, max_sequences_in_flight=4).generate(prompts, members, max_new_tokens=10,
                                                                  sampling=GREEDY)
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt").to(DEVICE)
    with torch.no_grad(), pop.members(members):
        ref = model.generate(**batch, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    ref = ref[:, batch["input_ids"].shape[1]:].tolist()
    assert out.completion_ids == ref
    assert out.lengths == [10] * len(prompts) and set(out.finish_reasons) == {FINISH_LENGTH}
    assert len({tuple(c) for c in out.completion_ids}) > 5  # members really differ


def test_greedy_equals_dense_member_weights(tok):
    model, pop, prompts, members = _setup(tok)
    out = _engine(model, pop, max_sequences_in_flight=3).generate(prompts, members, max_new_tokens=8, sampling=GREEDY)
    plain = _engine(model, None)
    for j, m in enumerate(members.tolist()):
        with pop.materialized(m) if m >= 0 else nullcontext():  # W + sigma * E_m in place
            dense = plain.generate([prompts[j]], max_new_tokens=8, sampling=GREEDY)
        assert out.completion_ids[j] == dense.completion_ids[0], (j, m)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLE], ids=["greedy", "sampled"])
def test_continuous_batching_equals_one_batch(tok, sampling):
    model, pop, prompts, members = _setup(tok)
    J = 2 * len(prompts)  # 20 jobs, each prompt answered by two members
    jobs_prompts = prompts * 2
    jobs_members = torch.cat([members, members.roll(3)])
    seeds = torch.arange(J) * 7 + 1
    # EOS = a common character, so rows end at different steps and slots are refilled mid-flight
    eos = [tok.convert_tokens_to_ids("e"), tok.convert_tokens_to_ids("a")]
    ref_engine = _engine(model, pop, eos=eos)
    ref = ref_engine.generate(jobs_prompts, jobs_members, seeds, max_new_tokens=12, sampling=sampling)
    assert ref_engine.last_num_slots == J
    assert FINISH_EOS in ref.finish_reasons and FINISH_LENGTH in ref.finish_reasons
    for slots, kw in [(2, {}), (4, {}), (7, {"refill_fraction": 0.5}), (4, {"continuous_batching": False})]:
        eng = _engine(model, pop, eos=eos, max_sequences_in_flight=slots, **kw)
        out = eng.generate(jobs_prompts, jobs_members, seeds, max_new_tokens=12, sampling=sampling)
        assert eng.last_num_slots == slots
        assert out.completion_ids == ref.completion_ids, (slots, kw)
        assert out.finish_reasons == ref.finish_reasons


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLE], ids=["greedy", "sampled"])
def test_shared_prompt_prefix_equals_full_prefill(tok, sampling):
    """Prompts with a common prefix (a chat template's system prompt): each member's rows continue
    from one prefill of that prefix, with the same completions as prefilling every prompt whole."""
    model, pop, _, _ = _setup(tok)
    prefix = tok("System: answer briefly. ")["input_ids"]
    prompts = [prefix + tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:5]]
    members = torch.tensor([0, 1, 2, 3, -1, 5]).repeat_interleave(len(prompts))  # member-major, as the trainer
    jobs = prompts * 6
    seeds = torch.arange(len(jobs)) * 3 + 1
    eos = [tok.convert_tokens_to_ids("e")]  # rows end early, slots refill mid-flight with fewer rows
    full = _engine(model, pop, eos=eos, max_sequences_in_flight=8, share_prompt_prefix=False)
    shared = _engine(model, pop, eos=eos, max_sequences_in_flight=8)
    calls = []
    run_prefix = shared.adapter.run_prefix
    shared.adapter.run_prefix = lambda ids, rows: calls.append((ids.shape, len(rows))) or run_prefix(ids, rows)
    ref = full.generate(jobs, members, seeds, max_new_tokens=10, sampling=sampling)
    out = shared.generate(jobs, members, seeds, max_new_tokens=10, sampling=sampling)
    assert out.completion_ids == ref.completion_ids and out.finish_reasons == ref.finish_reasons
    assert FINISH_EOS in out.finish_reasons
    assert calls and all(shape[1] == len(prefix) and shape[0] < rows for shape, rows in calls)  # fewer prefix rows
    assert calls[0] == ((2, len(prefix)), 8)  # the first 8 slots hold members 0 (5 rows) and 1 (3 rows)
    # every row a different member: nothing to share, the prefix is not run separately
    calls.clear()
    shared.generate(prompts, torch.arange(5), max_new_tokens=4, sampling=GREEDY)
    assert calls == []


def test_seeded_sampling_reproduces_across_runs_and_slot_orders(tok):
    model, pop, prompts, members = _setup(tok)
    seeds = torch.arange(len(prompts)) + 100
    eng = _engine(model, pop, max_sequences_in_flight=3)
    a = eng.generate(prompts, members, seeds, max_new_tokens=10, sampling=SAMPLE)
    b = eng.generate(prompts, members, seeds, max_new_tokens=10, sampling=SAMPLE)
    assert a.completion_ids == b.completion_ids
    perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0)).tolist()
    c = _engine(model, pop, max_sequences_in_flight=4).generate(
        [prompts[i] for i in perm], members[perm], seeds[perm], max_new_tokens=10, sampling=SAMPLE)
    assert [c.completion_ids[perm.index(j)] for j in range(len(prompts))] == a.completion_ids
    d = eng.generate(prompts, members, seeds + 1, max_new_tokens=10, sampling=SAMPLE)
    assert sum(x != y for x, y in zip(a.completion_ids, d.completion_ids)) >= len(prompts) // 2
    g = eng.generate(prompts, members, seeds, max_new_tokens=10, sampling=GREEDY)
    assert g.completion_ids != a.completion_ids


def test_eos_and_stop_strings_end_rows(tok):
    model, pop, prompts, members = _setup(tok)
    full = _engine(model, pop).generate(prompts, members, max_new_tokens=16, sampling=GREEDY).completion_ids
    eos_id = full[0][4]  # a token job 0 produces at step 5
    out = _engine(model, pop, eos=[eos_id], max_sequences_in_flight=3).generate(
        prompts, members, max_new_tokens=16, sampling=GREEDY)
    for j, row in enumerate(full):
        end = row.index(eos_id) + 1 if eos_id in row else len(row)
        assert out.completion_ids[j] == row[:end]
        assert out.finish_reasons[j] == (FINISH_EOS if eos_id in row else FINISH_LENGTH)
    assert out.lengths[0] <= 5 and out.finish_reasons[0] == FINISH_EOS

    text = tok.decode(full[1])
    stop = text[6:8]  # two characters job 1 writes at steps 7-8
    out = _engine(model, pop, tok, stop_strings=[stop], max_sequences_in_flight=4).generate(
        prompts, members, max_new_tokens=16, sampling=GREEDY)
    for j, row in enumerate(full):
        cut = next((t for t in range(1, len(row) + 1) if stop in tok.decode(row[:t])), None)
        assert out.completion_ids[j] == row[: cut or len(row)]
        assert out.finish_reasons[j] == (FINISH_STOP if cut else FINISH_LENGTH)
    assert out.finish_reasons[1] == FINISH_STOP and out.lengths[1] <= 8
    assert tok.decode(out.completion_ids[1]).endswith(stop)


def test_memory_budget_sets_slot_count_and_errors(tok):
    model, pop, prompts, members = _setup(tok)
    max_len = max(map(len, prompts)) + 6
    per_slot = _engine(model, pop).slot_bytes(max_len)
    eng = _engine(model, pop, memory_budget_bytes=3 * per_slot + 1)
    out = eng.generate(prompts, members, max_new_tokens=6, sampling=GREEDY)
    assert eng.last_num_slots == 3
    assert out.completion_ids == _engine(model, pop).generate(prompts, members, max_new_tokens=6,
                                                               sampling=GREEDY).completion_ids
    with pytest.raises(ValueError, match="memory_budget_bytes=10 is below one slot"):
        _engine(model, pop, memory_budget_bytes=10).generate(prompts, members, max_new_tokens=6)
    with pytest.raises(ValueError, match="max_sequences_in_flight=0"):
        _engine(model, pop, max_sequences_in_flight=0)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        _engine(model, pop).generate(prompts, members, max_new_tokens=0)
    with pytest.raises(ValueError, match="10 prompts but 3 values of member"):
        _engine(model, pop).generate(prompts, torch.tensor([0, 1, 2]), max_new_tokens=2)
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        _engine(model, pop, stop_strings=["x"])


def test_population_row_cache_follows_in_place_member_changes():
    model = tiny_llama(40, init_std=0.25).to(DEVICE)
    pop = Population(model, NoiseConfig(seed=0, rank=2), 6, sigma=0.2)
    ids = torch.randint(4, 40, (3, 5), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    slots = torch.tensor([0, 1, 2], device=DEVICE)
    with torch.no_grad():
        with pop.members(slots):
            first = model(ids).logits
        slots[1] = 4  # the engine refills a slot in place
        with pop.members(slots):
            cached = model(ids).logits
        with pop.members(torch.tensor([0, 4, 2])):
            fresh = model(ids).logits
        pop.set_step(1)  # new noise
        with pop.members(slots):
            step1 = model(ids).logits
    assert torch.equal(cached, fresh)
    assert torch.equal(cached[0], first[0]) and not torch.allclose(cached[1], first[1])
    assert not torch.allclose(step1[0], first[0])


@pytest.mark.parametrize("members,group", [(torch.arange(8), 2), (torch.arange(4).repeat_interleave(3), 6),
                                           (torch.tensor([5, 4, 0, 1, 1, 0, -1, 2]), 1)],
                         ids=["pairs", "member-major", "mixed"])
def test_grouped_and_per_row_factors_equal_dense_members(members, group):
    """Rows sharing a noise index in runs (antithetic pairs, member-major jobs) read shared factors;
    prompt (T > 1) and decode (T = 1) paths both equal the dense W + sigma E_i of each row."""
    model = tiny_llama(40, init_std=0.25).to(DEVICE)
    pop = Population(model, NoiseConfig(seed=4, rank=2), 8, sigma=0.2)
    B = members.numel()
    for T in (5, 1):
        ids = torch.randint(4, 40, (B, T), generator=torch.Generator().manual_seed(T)).to(DEVICE)
        with torch.no_grad(), pop.members(members):
            batched = model(ids).logits
        for b, m in enumerate(members.tolist()):
            with torch.no_grad(), pop.materialized(m) if m >= 0 else nullcontext():
                dense = model(ids[b:b + 1]).logits[0]
            assert torch.allclose(batched[b], dense, atol=1e-5, rtol=1e-4), (T, b, m)
    with pop.members(members):
        assert pop._active.scale.shape == (B // group, group)


# ---- recurrent models ---------------------------------------------------------------------------
class TinyRecurrentLM(nn.Module):
    """An Elman-style LM with the recurrent interface: ``(logits, state)``, state ``(B, H)``;
    left padding (mask 0) leaves the state untouched."""

    def __init__(self, vocab: int, hidden: int = 24, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, hidden)
        self.inp = nn.Linear(hidden, hidden)
        self.rec = nn.Linear(hidden, hidden, bias=False)
        self.head = nn.Linear(hidden, vocab)
        nn.init.normal_(self.head.weight, std=0.5)

    def get_output_embeddings(self):
        return self.head

    def init_state(self, batch: int, device=None):
        return torch.zeros(batch, self.rec.weight.shape[0], device=device)

    def forward(self, input_ids, state=None, attention_mask=None):
        B, T = input_ids.shape
        h = self.init_state(B, input_ids.device) if state is None else state
        x = self.emb(input_ids)
        outs = []
        for t in range(T):
            new = torch.tanh(self.inp(x[:, t]) + self.rec(h))
            if attention_mask is not None:
                new = torch.where(attention_mask[:, t, None].bool(), new, h)
            h = new
            outs.append(h)
        return self.head(torch.stack(outs, 1)), h


def test_recurrent_model_matches_member_by_member_reference(tok):
    model = TinyRecurrentLM(len(tok)).to(DEVICE)
    pop = Population(model, NoiseConfig(seed=2, rank=1), 8, sigma=0.3)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    members = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, -1, 2])
    ref = _engine(model, pop).generate(prompts, members, max_new_tokens=8, sampling=GREEDY)
    out = _engine(model, pop, max_sequences_in_flight=3).generate(prompts, members, max_new_tokens=8, sampling=GREEDY)
    assert out.completion_ids == ref.completion_ids
    for j, m in enumerate(members.tolist()):  # a plain loop: dense W + sigma E_m, one row, no padding
        with torch.no_grad(), pop.materialized(m) if m >= 0 else nullcontext():
            logits, h = model(torch.tensor([prompts[j]], device=DEVICE))
            row = []
            for _ in range(8):
                row.append(int(logits[0, -1].argmax()))
                logits, h = model(torch.tensor([[row[-1]]], device=DEVICE), h)
        assert out.completion_ids[j] == row, j
    s1 = _engine(model, pop).generate(prompts, members, torch.arange(10), max_new_tokens=8, sampling=SAMPLE)
    s2 = _engine(model, pop, max_sequences_in_flight=4).generate(prompts, members, torch.arange(10),
                                                                  max_new_tokens=8, sampling=SAMPLE)
    assert s1.completion_ids == s2.completion_ids


def test_rwkv7_slots_match_one_batch_and_model_greedy():
    rwkv7 = pytest.importorskip("eggroll_ft.models.rwkv7")
    torch.manual_seed(0)
    model = rwkv7.RWKV7ForCausalLM(rwkv7.RWKV7Config.from_size(64, 2, vocab_size=97, head_size=16)).eval().to(DEVICE)
    pop = Population(model, NoiseConfig(seed=0, rank=1), 4, sigma=0.1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (3, 5, 2, 4, 6, 1)]
    members = torch.tensor([0, 1, 2, 3, -1, 1])
    ref = _engine(model, pop).generate(prompts, members, max_new_tokens=6, sampling=GREEDY)
    out = _engine(model, pop, max_sequences_in_flight=2).generate(prompts, members, max_new_tokens=6, sampling=GREEDY)
    assert out.completion_ids == ref.completion_ids
    plain = model.greedy(torch.tensor([prompts[4]], device=DEVICE), 6)[0].tolist()  # member -1 = the plain model
    assert out.completion_ids[4] == plain


def _model_case(tok, kind):
    """(model, population, prompts, members) of one model family (Llama, an Elman RNN, RWKV-7)."""
    if kind == "llama":
        return _setup(tok)
    if kind == "rwkv7":
        rwkv7 = pytest.importorskip("eggroll_ft.models.rwkv7")
        torch.manual_seed(0)
        model = rwkv7.RWKV7ForCausalLM(rwkv7.RWKV7Config.from_size(64, 2, vocab_size=len(tok), head_size=16)).eval()
    else:
        model = TinyRecurrentLM(len(tok))
    model = model.to(DEVICE)
    pop = Population(model, NoiseConfig(seed=0, rank=1), 8, sigma=0.1)
    return model, pop, [tok(t)["input_ids"] for t in TEXTS], torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, -1, 2])


def _cyclic_garbage_tensors(run) -> list[torch.Tensor]:
    """Tensors that ``run()`` left in reference cycles (freed only by a full garbage collection)."""
    import gc

    gc.collect()
    gc.disable()
    try:
        run()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found = [o for o in gc.garbage if torch.is_tensor(o)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    return found


@pytest.mark.parametrize("kind", ["llama", "recurrent", "rwkv7"])
def test_generation_leaves_no_tensors_in_reference_cycles(tok, kind):
    """The slot state is freed when ``generate`` returns, not at the next full collection: a
    cache <-> layer cycle once kept every step's key/value cache alive (the resident set of a
    comparison run grew by ~15 MiB a step until Python's rare full collections)."""
    model, pop, prompts, members = _model_case(tok, kind)
    engine = _engine(model, pop, max_sequences_in_flight=4)

    def run():
        out = engine.generate(prompts, members, max_new_tokens=6, sampling=GREEDY)
        assert len(out.completion_ids) == len(prompts)

    assert _cyclic_garbage_tensors(run) == []


def _check_compiled_equals_eager(tok, kind, compile_decode):
    """20 jobs through 4 slots, EOS tokens that end some rows early (slots refilled mid-flight):
    the engine with ``compile_decode`` gives the eager engine's completions and finish reasons in
    a greedy call, a sampled call and a sampled call at a new ES step (new noise), all reusing the
    one compiled step."""
    model, pop, prompts, members = _model_case(tok, kind)
    prompts, members = prompts * 2, members.repeat(2)
    seeds = torch.arange(len(prompts))
    full = _engine(model, pop).generate(prompts, members, max_new_tokens=10, sampling=GREEDY).completion_ids
    eos = [full[0][3], full[1][2]]
    eager = _engine(model, pop, eos=eos, max_sequences_in_flight=4)
    torch._dynamo.reset()
    compiled = _engine(model, pop, eos=eos, max_sequences_in_flight=4, compile_decode=compile_decode)
    reasons = set()
    for step, sampling in [(0, GREEDY), (0, SAMPLE), (1, SAMPLE)]:
        pop.set_step(step)
        ref = eager.generate(prompts, members, seeds, max_new_tokens=10, sampling=sampling)
        out = compiled.generate(prompts, members, seeds, max_new_tokens=10, sampling=sampling)
        assert out.completion_ids == ref.completion_ids, (step, sampling)
        assert out.finish_reasons == ref.finish_reasons
        reasons |= set(ref.finish_reasons)
    assert reasons == {FINISH_EOS, FINISH_LENGTH}
    assert compiled._compiled_step is not None


@pytest.mark.parametrize("kind", ["llama", "recurrent", "rwkv7"])
def test_compiled_decode_step_equals_eager(tok, kind):
    """``compile_decode``: the whole decode step traces as one graph (``fullgraph=True``: no graph
    break in the model, the population hooks, the slot cache or the in-place state update). The
    ``eager`` backend checks the capture itself quickly; inductor runs in the slow test."""
    _check_compiled_equals_eager(tok, kind, {"backend": "eager", "fullgraph": True})


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs: run with EGGROLL_TEST_DEVICE=cuda on a GPU")
@pytest.mark.parametrize("kind", ["llama", "recurrent", "rwkv7"])
def test_cuda_graph_decode_step_equals_eager(tok, kind):
    """``compile_decode=True`` on CUDA (inductor, ``mode="reduce-overhead"``): the decode step is
    recorded as a CUDA graph, none is skipped, and its replays give the eager completions."""
    from torch._dynamo.utils import counters

    counters.clear()
    _check_compiled_equals_eager(tok, kind, True)
    graphs = cuda_graph_counts(DEVICE)
    assert graphs["skipped"] == 0 and graphs["recorded"] >= 1, graphs


def test_compile_decode_arguments_are_checked(tok):
    model, pop, _, _ = _setup(tok)
    with pytest.raises(ValueError, match="compile_decode='yes' must be a bool or a dict"):
        _engine(model, pop, compile_decode="yes")
    with pytest.raises(ValueError, match="static_len_multiple=0"):
        _engine(model, pop, compile_decode=True, static_len_multiple=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind,option", [("llama", True), ("rwkv7", True), ("llama", {"mode": "reduce-overhead"})],
                         ids=["llama", "rwkv7", "llama-reduce-overhead"])
def test_inductor_compiled_decode_step_equals_eager(tok, kind, option):
    """The default CPU path of ``compile_decode=True``: inductor-generated C++ (30-50 s to compile
    here); and the CUDA-graph mode's call path (``cudagraph_mark_step_begin`` before each step), which
    on CPU compiles with inductor and records no graph."""
    model, pop, prompts, members = _model_case(tok, kind)
    ref = _engine(model, pop, max_sequences_in_flight=4).generate(prompts, members, max_new_tokens=10, sampling=GREEDY)
    torch._dynamo.reset()
    engine = _engine(model, pop, max_sequences_in_flight=4, compile_decode=option)
    for _ in range(2):
        assert engine.generate(prompts, members, max_new_tokens=10, sampling=GREEDY).completion_ids == ref.completion_ids
