import json
import subprocess
import sys

import torch

from eggroll_ft.noise import NoiseConfig, noise_block, stream_key


def test_same_seed_same_noise_in_fresh_process():
    cfg = NoiseConfig(seed=7, rank=2)
    a, b = cfg.low_rank_factors(3, "layers.0.q.weight", (16, 8), torch.arange(4))
    code = ("import torch; from eggroll_ft.noise import NoiseConfig; "
            "a, b = NoiseConfig(seed=7, rank=2).low_rank_factors(3, 'layers.0.q.weight', (16, 8), torch.arange(4)); "
            "import json; print(json.dumps([a.flatten().tolist(), b.flatten().tolist()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    fresh_a, fresh_b = json.loads(out)
    assert fresh_a == a.flatten().tolist() and fresh_b == b.flatten().tolist()


def test_antithetic_members_are_exact_negatives():
    cfg = NoiseConfig(seed=1, rank=3)
    for k in range(4):
        e_plus = cfg.perturbation(5, "w", (12, 10), 2 * k)
        e_minus = cfg.perturbation(5, "w", (12, 10), 2 * k + 1)
        assert torch.equal(e_plus, -e_minus)


def test_noise_differs_across_members_layers_steps_and_seeds():
    cfg = NoiseConfig(seed=1, rank=1)
    base = cfg.perturbation(0, "a.weight", (8, 8), 0)
    assert not torch.allclose(base, cfg.perturbation(0, "a.weight", (8, 8), 2))  # another pair
    assert not torch.allclose(base, cfg.perturbation(0, "b.weight", (8, 8), 0))  # another layer
    assert not torch.allclose(base, cfg.perturbation(1, "a.weight", (8, 8), 0))  # another step
    assert not torch.allclose(base, NoiseConfig(seed=2).perturbation(0, "a.weight", (8, 8), 0))


def test_noise_reuse_shares_noise_within_an_epoch():
    cfg = NoiseConfig(seed=0, noise_reuse=3)
    p = [cfg.perturbation(s, "w", (4, 4), 0) for s in range(4)]
    assert torch.equal(p[0], p[1]) and torch.equal(p[1], p[2]) and not torch.allclose(p[2], p[3])


def test_rows_depend_only_on_their_index_and_are_standard_normal():
    key = stream_key(0, 0, "w")
    all_rows = noise_block(key, torch.arange(64), 500)
    some = noise_block(key, torch.tensor([5, 63]), 500)
    assert torch.equal(some[0], all_rows[5]) and torch.equal(some[1], all_rows[63])
    z = all_rows.flatten()
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    assert abs(float((z ** 4).mean()) - 3) < 0.15  # Gaussian kurtosis
    # odd row length: the last sine value is dropped, rows still depend only on their index
    odd = noise_block(key, torch.arange(64), 499)
    assert odd.shape == (64, 499) and torch.equal(noise_block(key, torch.tensor([63]), 499)[0], odd[63])
    assert abs(float(odd.std()) - 1) < 0.02


def test_full_rank_mode_is_dense():
    e = NoiseConfig(seed=0, full_rank=True).perturbation(0, "w", (6, 5), 0)
    assert torch.linalg.matrix_rank(e) == 5
    e1 = NoiseConfig(seed=0, rank=1).perturbation(0, "w", (6, 5), 0)
    assert torch.linalg.matrix_rank(e1) == 1


def test_several_streams_in_one_call_equal_one_call_each():
    """NoiseConfig.factors makes several weights' noise in one generator call (a refill of a few
    rows then costs a few calls, not one per layer): exactly each stream's own values."""
    cfg = NoiseConfig(seed=3, rank=2)
    names = ["layers.0.q.weight", "layers.1.q.weight", "layers.2.q.weight"]
    idx = torch.tensor([5, 0, 9, 5])
    A, B = cfg.factors(4, names, (7, 5), idx)
    assert A.shape == (3, 4, 7, 2) and B.shape == (3, 4, 5, 2)
    for i, name in enumerate(names):
        z = noise_block(cfg.key(4, name), idx, (7 + 5) * 2).view(4, 12, 2)
        assert torch.equal(A[i], z[:, :7]) and torch.equal(B[i], z[:, 7:])
    (E,) = NoiseConfig(seed=3, full_rank=True).factors(4, names[:2], (3, 5), idx)
    assert torch.equal(E[1], noise_block(NoiseConfig(seed=3).key(4, names[1]), idx, 15).view(4, 3, 5))
