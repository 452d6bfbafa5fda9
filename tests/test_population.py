from contextlib import nullcontext
from dataclasses import dataclass

import pytest
import torch

from eggroll_ft import NoiseConfig, Population
from eggroll_ft.population import select_linear_modules
from eggroll_ft.testing import tiny_gpt2, tiny_llama

MEMBERS = torch.tensor([0, 1, 2, 3, 5, -1])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("noise", [NoiseConfig(seed=3, rank=2), NoiseConfig(seed=3, rank=1, antithetic=False),
                                   NoiseConfig(seed=3, full_rank=True)], ids=["rank2", "rank1-noanti", "full"])
def test_population_forward_equals_materialised_member(make, noise):
    model = make(50, init_std=0.2)
    pop = Population(model, noise, population_size=6, sigma=0.3)
    pop.set_step(2)
    ids = torch.randint(4, 50, (6, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), pop.members(MEMBERS):
        batched = model(ids).logits
    for b, m in enumerate(MEMBERS.tolist()):
        with torch.no_grad(), (pop.materialized(m) if m >= 0 else nullcontext()):
            dense = model(ids[b:b + 1]).logits[0]
        assert _rel(batched[b], dense) < 1e-5, (m, _rel(batched[b], dense))
    with torch.no_grad():  # outside a members block the model is the plain model
        plain = model(ids).logits
    assert _rel(plain[5], batched[5]) < 1e-6 and _rel(plain[0], batched[0]) > 1e-3


@pytest.mark.parametrize("path", ["bmm", "vecdot", "cpu"])
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "row-by-row"])
def test_each_rank1_path_equals_the_materialised_member(monkeypatch, path, grouped):
    """Rank 1 adds the term by a batched matmul or, for small groups, an elementwise product and a
    sum (``VECDOT_MAX_ROWS``), or by the fused CPU operation (``lowrank_cpu``): each gives each row
    its own member's output."""
    import eggroll_ft.population as population
    from eggroll_ft import lowrank_cpu

    if path == "cpu" and not lowrank_cpu.available():
        pytest.skip(f"the fused CPU operation could not be built here: {lowrank_cpu.build_error()}")
    monkeypatch.setattr(population, "VECDOT_MAX_ROWS", 10**6 if path == "vecdot" else 0)
    calls, real = [], lowrank_cpu.lowrank1_add_
    monkeypatch.setattr(lowrank_cpu, "lowrank1_add_", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_llama(50, init_std=0.2)
    pop = Population(model, NoiseConfig(seed=4, rank=1), population_size=6, sigma=0.3,
                     noise_kernel="cpu" if path == "cpu" else "torch")
    pop.set_step(1)
    members = torch.tensor([0, 0, 2, 2, 4, 4])  # noise indices 0 0 1 1 2 2: groups of G = 2 rows when grouped
    assert population._run_length(pop.noise.noise_index(members)) == 2
    ids = torch.randint(4, 50, (6, 9), generator=torch.Generator().manual_seed(2))  # G T = 18 or 9 rows
    with torch.no_grad(), pop.members(members, grouped=grouped):
        batched = model(ids).logits
    assert len(calls) == (len(pop.params) if path == "cpu" else 0)
    for b, m in enumerate(members.tolist()):
        with torch.no_grad(), pop.materialized(m):
            dense = model(ids[b:b + 1]).logits[0]
        assert _rel(batched[b], dense) < 1e-5, (m, _rel(batched[b], dense))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_generate_with_kv_cache_matches_dense_member(make):
    model = make(50, init_std=0.3)
    pop = Population(model, NoiseConfig(seed=1, rank=1), population_size=6, sigma=0.2)
    ids = torch.randint(4, 50, (6, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad(), pop.members(MEMBERS):
        batched = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    for b, m in enumerate(MEMBERS.tolist()):
        with torch.no_grad(), (pop.materialized(m) if m >= 0 else nullcontext()):
            dense = model.generate(ids[b:b + 1], attention_mask=torch.ones_like(ids[b:b + 1]), **kw)
        assert torch.equal(batched[b], dense[0])
    members_differ = len({tuple(r.tolist()) for r in batched}) > 1
    assert members_differ


def test_default_selection_skips_embedding_and_head_and_weights_are_not_copied():
    model = tiny_llama(30)
    chosen = select_linear_modules(model)
    assert "lm_head" not in chosen and all("embed" not in n for n in chosen)
    assert len(chosen) == 2 * 7  # q, k, v, o, gate, up, down per layer
    pop = Population(model, NoiseConfig(), 4, 0.1)
    assert pop.params["model.layers.0.self_attn.q_proj.weight"].weight is model.model.layers[0].self_attn.q_proj.weight
    assert list(model.state_dict()) == list(tiny_llama(30).state_dict())


def test_module_patterns_and_errors():
    model = tiny_llama(30)
    pop = Population(model, NoiseConfig(), 4, 0.1, perturb_modules=["q_proj", "v_proj"])
    assert sorted(pop.params) == sorted(f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj"))
    pop2 = Population(tiny_llama(30), NoiseConfig(), 4, 0.1, perturb_modules=r".*mlp\..*", exclude_modules=["down_proj"])
    assert len(pop2.params) == 4
    with pytest.raises(ValueError, match="matched no linear module"):
        Population(tiny_llama(30), NoiseConfig(), 4, 0.1, perturb_modules=["nope"])
    with pytest.raises(ValueError, match="population_size=5 must be even"):
        Population(tiny_llama(30), NoiseConfig(), 5, 0.1)
    with pytest.raises(ValueError, match="member ids"):
        with pop.members(torch.tensor([0, 4])):
            pass
    with pytest.raises(RuntimeError, match="one member id per batch row"):
        with torch.no_grad(), pop.members(torch.tensor([0, 1, 2])):
            model(torch.ones(2, 3, dtype=torch.long))


# ---- noise in flight: bounded by the rows running, not by the population -----------------------
GENERATED: list[int] = []  # noise indices per generation call, recorded by _RecordingNoise


@dataclass(frozen=True)
class _RecordingNoise(NoiseConfig):
    """The library's noise, recording how many noise indices each call generates."""

    def factors(self, step, param_ids, shape, indices, device=None):
        GENERATED.append(len(indices))
        return super().factors(step, param_ids, shape, indices, device)


def _training_step_noise(N: int, slots: int, chunk: int) -> tuple[int, int, int]:
    """One ES step (engine generation with EOS-driven refills, then the update): the most noise
    indices generated by one call during generation and during the update, and the noise indices
    still held in flight at the end."""
    from eggroll_ft import apply_es_update
    from eggroll_ft.engine import PopulationEngine, SamplingParams

    model = tiny_llama(40, init_std=0.25)
    pop = Population(model, _RecordingNoise(seed=0, rank=1), N, sigma=0.1)
    engine = PopulationEngine(model, pop, eos_token_ids=[5, 6, 7], max_sequences_in_flight=slots)
    prompts = [[3 + j % 30, 4, 9 + j % 5] for j in range(N)]
    GENERATED.clear()
    out = engine.generate(prompts, torch.arange(N), torch.arange(N), max_new_tokens=10,
                          sampling=SamplingParams(temperature=1.0))
    assert "eos" in out.finish_reasons and "length" in out.finish_reasons  # slots were refilled mid-flight
    in_generation = max(GENERATED)
    held = len(pop._in_flight)
    GENERATED.clear()
    apply_es_update(pop, torch.randn(N, generator=torch.Generator().manual_seed(0)), lr=0.1, chunk_size=chunk)
    return in_generation, max(GENERATED), held


def test_noise_of_a_step_does_not_grow_with_the_population():
    """The factors generated at once and held are those of the rows in flight (at most the slots'
    noise indices) and of one chunk of the update, whatever N; before, a step generated and kept
    all N/2 noise indices of every weight."""
    slots, chunk = 4, 3
    small, large = _training_step_noise(16, slots, chunk), _training_step_noise(128, slots, chunk)
    assert small[0] <= slots and large[0] <= slots
    assert small[1] == large[1] == chunk
    assert small[2] <= slots and large[2] <= slots


def test_factors_of_the_rows_in_flight_are_the_generated_noise():
    """A block copies the factors its rows share with the blocks in flight (the engine's refill:
    slot tensor changed in place, new rows prefilled in their own block) and generates the rest;
    every row reads exactly noise.py's values, and only the refilled slots' noise stays in flight."""
    model = tiny_llama(30)
    pop = Population(model, NoiseConfig(seed=2, rank=2), 16, 0.1)
    pop.set_step(1)
    name = "model.layers.1.mlp.up_proj.weight"
    m, n = pop.params[name].shape
    slots = torch.tensor([0, 1, 4, 5])

    def rows_read() -> tuple[torch.Tensor, torch.Tensor]:  # (P, m, r), (P, n, r) as the hook reads them
        Bu, Au, scale = pop._row_factors(name, torch.float32)
        G = scale.shape[1]
        return Au.transpose(1, 2).repeat_interleave(G, 0), Bu.repeat_interleave(G, 0)

    def generated(members):
        return pop.noise.low_rank_factors(1, name, (m, n), pop.noise.noise_index(members))

    with pop.members(slots):
        first = rows_read()
    slots[2:] = torch.tensor([9, 8])  # refill two slots in place, then prefill them in a block of their own
    with pop.members(torch.tensor([9, 8])):
        prefill = rows_read()
    with pop.members(slots):
        decode = rows_read()
    for got, members in ((first, [0, 1, 4, 5]), (prefill, [9, 8]), (decode, [0, 1, 9, 8])):
        want = generated(torch.tensor(members))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), members
    assert sorted(pop._in_flight) == [0, 4]  # the noise of slots' pairs 0 and 4; pair 2 left with its rows


def test_a_block_taking_over_its_predecessor_moves_and_refills_groups():
    """The decode block after a refill takes over the tensors of the block it replaces: groups
    that stayed in place are kept, groups that moved are copied, new ones come from the prefill
    block or are generated; every row still reads noise.py's values."""
    model = tiny_llama(30)
    pop = Population(model, NoiseConfig(seed=5, rank=1), 20, 0.1)
    name = "model.layers.0.self_attn.o_proj.weight"
    m, n = pop.params[name].shape
    slots = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])  # groups (pairs) 0, 1, 2, 3
    with pop.members(slots):
        pop.gather_rows(torch.float32)
    slots[:] = torch.tensor([6, 7, 2, 3, 12, 13, 0, 1])  # pairs 3, 1, 6, 0: 1 in place, 3 and 0 moved, 6 new
    with pop.members(torch.tensor([12, 13])):
        pop.gather_rows(torch.float32)
    with pop.members(slots):
        assert pop._active.takeover is not None and pop._active.takeover[1].tolist() == [1]
        Bu, Au, scale = pop._row_factors(name, torch.float32)
    A, B = pop.noise.low_rank_factors(0, name, (m, n), torch.tensor([3, 1, 6, 0]))
    assert torch.equal(Bu, B) and torch.equal(Au, A.transpose(1, 2))


def test_member_ids_made_under_inference_mode():
    """A member-id tensor made under ``torch.inference_mode`` keeps no version counter: each block
    it enters is a new one, with the same outputs as an ordinary tensor's."""
    model = tiny_llama(50, init_std=0.2)
    pop = Population(model, NoiseConfig(seed=4, rank=1), population_size=6, sigma=0.3)
    ids = torch.randint(4, 50, (6, 4), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        with pop.members(MEMBERS):
            want = model(ids).logits
        members = torch.tensor(MEMBERS.tolist())
        assert members.is_inference()
        for _ in range(2):  # entered twice with the same tensor
            with pop.members(members):
                assert torch.equal(model(ids).logits, want)
