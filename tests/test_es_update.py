import math

import pytest
import torch

from eggroll_ft import NoiseConfig, Population
from eggroll_ft.es_update import apply_es_update, es_directions
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
