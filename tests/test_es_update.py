import math

import pytest
import torch

from eggroll_ft import NoiseConfig, Population
from eggroll_ft.es_update import apply_es_update, es_direction, es_directions, is_plain_sgd, noise_weights
from eggroll_ft.testing import tiny_llama


@pytest.mark.parametrize("noise", [NoiseConfig(seed=0, rank=2), NoiseConfig(seed=0, rank=1, antithetic=False),
                                   NoiseConfig(seed=0, full_rank=True)])
def test_batched_update_equals_explicit_sum_over_members(noise):
    model = tiny_llama(20, hidden=16)
    N, sigma = 8, 0.05
    pop = Population(model, noise, N, sigma)
    pop.set_step(4)
    fitness = torch.randn(N, generator=torch.Generator().manual_seed(0))
    dirs = es_directions(pop, fitness)
    for name, p in pop.params.items():
        explicit = sum(fitness[i] * pop.perturbation(name, i) / sigma for i in range(N)) / (N * sigma)
        assert torch.allclose(dirs[name], explicit, rtol=1e-4, atol=1e-6), name


def test_sgd_update_in_place_and_optimizer_path_agree():
    fitness = torch.tensor([1.0, -1.0, 0.5, 0.2])
    results = []
    for use_opt in (False, True):
        model = tiny_llama(20, hidden=16)
        pop = Population(model, NoiseConfig(seed=1), 4, 0.1)
        before = {n: p.weight.detach().clone() for n, p in pop.params.items()}
        if use_opt:  # momentum > 0 forces the W.grad = -g path; first step equals plain SGD
            opt = torch.optim.SGD([p.weight for p in pop.params.values()], lr=0.01, momentum=0.9)
            norm = apply_es_update(pop, fitness, opt)
            opt.step()
        else:
            norm = apply_es_update(pop, fitness, None, lr=0.01)
        results.append({n: p.weight.detach() - before[n] for n, p in pop.params.items()})
        assert norm > 0
    for n in results[0]:
        assert torch.allclose(results[0][n], results[1][n], atol=1e-7)


def test_update_norm_matches_directions():
    model = tiny_llama(20, hidden=16)
    pop = Population(model, NoiseConfig(seed=1), 4, 0.1)
    f = torch.tensor([1.0, 0.0, 0.0, 1.0])
    expected = math.sqrt(sum(float((g ** 2).sum()) for g in es_directions(pop, f).values()))
    assert abs(apply_es_update(pop, f, None, lr=0.0) - expected) < 1e-3 * expected


@pytest.mark.parametrize("noise", [NoiseConfig(seed=0, rank=2), NoiseConfig(seed=0, rank=1, antithetic=False),
                                   NoiseConfig(seed=0, full_rank=True)], ids=["rank2", "rank1-noanti", "full"])
def test_chunked_update_equals_one_matmul_over_the_whole_population(noise):
    """g summed over chunks of noise indices, each chunk's factors regenerated, equals the one
    matmul over every index's factors at once (the step-long factor cache it replaced) to float32
    round-off, for any chunk size."""
    model = tiny_llama(20, hidden=16)
    N, sigma = 14, 0.05
    pop = Population(model, noise, N, sigma)
    pop.set_step(2)
    w = noise_weights(torch.randn(N, generator=torch.Generator().manual_seed(1)), noise.antithetic)
    idx = torch.arange(w.numel())
    for name, p in pop.params.items():
        if noise.full_rank:
            ref = torch.einsum("k,kmn->mn", w, noise.dense(2, name, p.shape, idx))
        else:
            A, B = noise.low_rank_factors(2, name, p.shape, idx)  # (K, m, r), (K, n, r)
            ref = torch.einsum("k,kmr,knr->mn", w, A, B) / math.sqrt(noise.rank)
        ref = p.as_param_layout(ref / (N * sigma))
        for chunk in (1, 3, None):
            assert torch.allclose(es_direction(pop, name, w, chunk), ref, rtol=1e-5, atol=1e-6), (name, chunk)


def test_optimizer_wrapped_by_accelerate_is_recognised_and_a_missing_lr_is_an_error():
    from accelerate import Accelerator

    model = tiny_llama(20, hidden=16)
    pop = Population(model, NoiseConfig(seed=1), 4, 0.1)
    params = [p.weight for p in pop.params.values()]
    wrap = Accelerator(cpu=True).prepare_optimizer  # what transformers.Trainer hands to _es_update
    assert type(wrap(torch.optim.SGD(params, lr=0.1))).__name__ == "AcceleratedOptimizer"
    assert is_plain_sgd(wrap(torch.optim.SGD(params, lr=0.1)))
    assert not is_plain_sgd(wrap(torch.optim.SGD(params, lr=0.1, momentum=0.9)))
    assert not is_plain_sgd(wrap(torch.optim.AdamW(params, lr=0.1)))
    with pytest.raises(ValueError, match="optimizer=None and lr=None"):
        apply_es_update(pop, torch.ones(4), optimizer=None, lr=None)
