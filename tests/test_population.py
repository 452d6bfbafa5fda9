from contextlib import nullcontext

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
