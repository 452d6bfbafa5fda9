"""The Triton low-rank term (noise made inside the kernel) equals the torch path to float32 round-off.

On CPU the checks run in a subprocess under ``TRITON_INTERPRET=1`` (Triton's interpreter; the
variable must be set before the kernels are defined); with ``EGGROLL_TEST_DEVICE=cuda`` they run
compiled, on the GPU, in this process.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from eggroll_ft import NoiseConfig, Population  # noqa: E402
from eggroll_ft.testing import device_under_test, tiny_llama  # noqa: E402

ROOT = Path(__file__).parents[1]


def check(device: str) -> None:
    """Every assertion, on ``device`` (on CPU, TRITON_INTERPRET=1 must be set before the import)."""
    from eggroll_ft.noise_kernel import lowrank_add_

    g = torch.Generator().manual_seed(0)
    # the term: ranks 1-3 (padded to 1, 2, 4 in the kernel), sizes that are not tile multiples,
    # tokens over several blocks, repeated noise indices, an unperturbed row (scale 0)
    for rank, (P, T, m, n) in ((1, (5, 3, 37, 20)), (2, (4, 17, 70, 33)), (3, (3, 1, 9, 130))):
        cfg = NoiseConfig(seed=3, rank=rank)
        x = torch.randn(P, T, n, generator=g).to(device)
        out = torch.randn(P, T, m, generator=g).to(device)
        idx = torch.tensor([4, 0, 4, 9, 1][:P])
        scale = torch.randn(P, generator=g)
        scale[1] = 0.0
        A, B = cfg.low_rank_factors(2, "w", (m, n), idx, device)  # noise.py's values
        want = out + scale.to(device)[:, None, None] * torch.einsum("ptn,pnr,pmr->ptm", x, B, A)
        got = lowrank_add_(out.clone(), x, idx, scale, cfg.key(2, "w"), rank)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (rank, float((got - want).abs().max()))
        assert torch.equal(got[1], out[1])
    if device == "cuda":  # bfloat16 activations: the kernel sums in float32 and rounds once
        got = lowrank_add_(out.bfloat16(), x.bfloat16(), idx, scale, cfg.key(2, "w"), 3)
        assert torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2)
    # a model: the Triton population's logits are the torch population's
    model = tiny_llama(40, init_std=0.25).to(device)
    members = torch.tensor([0, 1, 5, -1, 2, 2])
    ids = torch.randint(4, 40, (6, 7), generator=g).to(device)
    logits = {}
    for kind in ("torch", "triton"):
        pop = Population(model, NoiseConfig(seed=1, rank=2), 8, 0.2, noise_kernel=kind)
        pop.set_step(3)
        with torch.no_grad(), pop.members(members):
            logits[kind] = model(ids).logits
        pop.remove()
    assert torch.allclose(logits["triton"], logits["torch"], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        plain = model(ids).logits
    assert (logits["triton"][0] - plain[0]).abs().max() > 1e-2 and torch.allclose(logits["triton"][3], plain[3])


def test_noise_kernel_equals_torch_path():
    device = device_under_test()
    if device.type == "cuda":
        check("cuda")
        return
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    code = "import sys; sys.path.insert(0, 'tests'); from test_noise_kernel import check; check('cpu')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_auto_picks_the_kernel_on_cuda_only():
    device = device_under_test()
    model = tiny_llama(40).to(device)
    pop = Population(model, NoiseConfig(seed=1), 4, 0.1)
    x = torch.zeros(2, 3, 32, device=device)
    assert pop.noise_kernel == "auto" and (pop._path(x, x) == "triton") == (device.type == "cuda")
    assert Population(model, NoiseConfig(seed=1, full_rank=True), 4, 0.1)._path(x, x) == "torch"
    assert Population(model, NoiseConfig(seed=1), 4, 0.1, noise_kernel="torch")._path(x, x) == "torch"
    with pytest.raises(ValueError, match="noise_kernel='cuda' must be"):
        Population(model, NoiseConfig(seed=1), 4, 0.1, noise_kernel="cuda")
