import math

import torch

from eggroll_ft.shaping import centered_rank, group_norm, shape_fitness, zscore

nan = math.nan


def test_zscore_exact():
    out = zscore(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    s = math.sqrt(1.25)
    assert torch.allclose(out, torch.tensor([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s]), atol=1e-6)


def test_group_norm_exact():
    r = torch.tensor([[1.0, 3.0, 2.0, 2.0], [0.0, 0.0, 4.0, 0.0]])
    centred = torch.tensor([[-1.0, 1.0, 0.0, 0.0], [-1.0, -1.0, 3.0, -1.0]])
    std = math.sqrt(float((centred ** 2).mean()))
    assert torch.allclose(group_norm(r), centred / std, atol=1e-6)


def test_centered_rank_exact_with_ties_and_nan():
    assert torch.allclose(centered_rank(torch.tensor([10.0, -1.0, 3.0, 7.0, 0.0])),
                          torch.tensor([0.5, -0.5, 0.0, 0.25, -0.25]))
    assert torch.allclose(centered_rank(torch.tensor([2.0, 2.0, 1.0, nan])), torch.tensor([0.25, 0.25, -0.5, 0.0]))


def test_nan_rewards_skipped_and_all_nan_member_gets_zero():
    r = torch.tensor([[1.0, nan, 3.0, nan], [1.0, 5.0, 3.0, nan]])  # member 3 has no valid reward
    for method in ("group_norm", "zscore", "centered_rank", "none"):
        f = shape_fitness(r, method)
        assert f.shape == (4,) and not torch.isnan(f).any()
        assert f[3] == 0.0
    # zscore on per-member means [1, 5, 3, nan]
    m = torch.tensor([1.0, 5.0, 3.0])
    expected = (m - m.mean()) / m.std(unbiased=False)
    assert torch.allclose(shape_fitness(r, "zscore")[:3], expected, atol=1e-6)


def test_higher_reward_higher_fitness():
    r = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    for method in ("group_norm", "zscore", "centered_rank", "none"):
        f = shape_fitness(r, method)
        assert torch.all(f[1:] > f[:-1])
