"""The fused CPU operation for the rank-1 term (``eggroll_ft.lowrank_cpu``): its values, its
independence of the thread count, its argument checks, and when the population uses it."""
import pytest
import torch

from eggroll_ft import NoiseConfig, Population, lowrank_cpu
from eggroll_ft.testing import tiny_llama

if not lowrank_cpu.available():
    pytest.skip(f"the fused CPU operation could not be built here: {lowrank_cpu.build_error()}",
                allow_module_level=True)


def _want(out, x, b, a, s, tokens):
    U, R, _ = x.shape
    scale = s.repeat_interleave(tokens, dim=1)  # (U, R)
    return out + (scale * torch.einsum("urn,un->ur", x.double(), b.double()).float())[..., None] * a[:, None, :]


@pytest.mark.parametrize("U,G,T,n,m", [(1, 1, 1, 1, 1), (3, 2, 1, 37, 5), (5, 2, 7, 64, 130), (2, 4, 3, 300, 17),
                                       (16, 16, 1, 96, 384)])
def test_the_operation_is_the_rank1_term(U, G, T, n, m):
    g = torch.Generator().manual_seed(U * 1000 + n)
    x, out = torch.randn(U, G * T, n, generator=g), torch.randn(U, G * T, m, generator=g)
    b, a, s = torch.randn(U, n, generator=g), torch.randn(U, m, generator=g), torch.randn(U, G, generator=g)
    s[0, 0] = 0.0  # an unperturbed member: its rows are left as they were
    want = _want(out, x, b, a, s, T)
    got = lowrank_cpu.lowrank1_add_(out.clone(), x, b, a, s, T)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), float((got - want).abs().max())
    assert torch.equal(got[0, :T], out[0, :T])


def test_the_result_does_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(64, 4, 576, generator=g), torch.randn(64, 4, 1536, generator=g)
    b, a, s = torch.randn(64, 576, generator=g), torch.randn(64, 1536, generator=g), torch.randn(64, 2, generator=g)
    threads = torch.get_num_threads()
    try:
        results = []
        for k in (1, 2, 3):
            torch.set_num_threads(k)
            results.append(lowrank_cpu.lowrank1_add_(out.clone(), x, b, a, s, 2))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_bad_arguments_are_named():
    x, out = torch.randn(2, 2, 8), torch.randn(2, 2, 4)
    b, a, s = torch.randn(2, 8), torch.randn(2, 4), torch.randn(2, 1)
    with pytest.raises(ValueError, match="x must be a contiguous float32 CPU tensor"):
        lowrank_cpu.lowrank1_add_(out, x.double(), b, a, s, 2)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        lowrank_cpu.lowrank1_add_(torch.randn(2, 4, 2).transpose(1, 2), x, b, a, s, 2)
    with pytest.raises(ValueError, match=r"b must be .* of shape \(2, 8\)"):
        lowrank_cpu.lowrank1_add_(out, x, torch.randn(2, 7), a, s, 2)
    with pytest.raises(ValueError, match="tokens=3 times the 1 scales per group must equal R=2"):
        lowrank_cpu.lowrank1_add_(out, x, b, a, s, 3)


def test_auto_uses_it_where_it_applies_and_torch_elsewhere(monkeypatch):
    calls, real = [], lowrank_cpu.lowrank1_add_
    monkeypatch.setattr(lowrank_cpu, "lowrank1_add_", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_llama(40, init_std=0.25)
    ids = torch.randint(4, 40, (4, 5), generator=torch.Generator().manual_seed(1))
    members = torch.tensor([0, 1, 3, -1])
    logits = {}
    for kind in ("auto", "cpu", "torch"):
        pop = Population(model, NoiseConfig(seed=1), 4, 0.2, noise_kernel=kind)
        with torch.no_grad(), pop.members(members):
            logits[kind] = model(ids).logits
        pop.remove()
    assert len(calls) == 2 * 14  # auto and cpu: every layer of the forward; torch: none
    assert torch.allclose(logits["auto"], logits["torch"], rtol=1e-4, atol=1e-5)
    assert torch.equal(logits["auto"], logits["cpu"])
    calls.clear()
    for noise, dtype, grad in ((NoiseConfig(seed=1, rank=2), torch.float32, False),
                               (NoiseConfig(seed=1), torch.bfloat16, False), (NoiseConfig(seed=1), torch.float32, True)):
        m = tiny_llama(40, init_std=0.25).to(dtype)
        pop = Population(m, noise, 4, 0.2)
        with torch.set_grad_enabled(grad), pop.members(members):
            m(ids)
        pop.remove()
    assert not calls  # rank 2, bfloat16, autograd: torch operations


def test_without_the_operation_auto_falls_back_and_cpu_says_why(monkeypatch):
    monkeypatch.setattr(lowrank_cpu, "_state", {"error": "RuntimeError: no compiler"})
    model = tiny_llama(40, init_std=0.25)
    pop = Population(model, NoiseConfig(seed=1), 4, 0.2)
    with torch.no_grad(), pop.members(torch.tensor([0, 1, 2, 3])):
        model(torch.randint(4, 40, (4, 5)))
    with pytest.raises(ValueError, match=r"noise_kernel='cpu': the fused CPU operation could not be built "
                                         r"\(RuntimeError: no compiler\)"):
        Population(model, NoiseConfig(seed=1), 4, 0.2, noise_kernel="cpu")


def test_bench_hook_script_runs_on_a_saved_model(tmp_path):
    """``scripts/bench_hook.py`` end to end on a tiny checkpoint: both layouts, both paths."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    import bench_hook

    tiny_llama(40).save_pretrained(tmp_path)
    res = bench_hook.main(["--model", str(tmp_path), "--rows", "8", "--prompts-per-member", "1", "2",
                           "--reps", "2", "--threads", "1"])
    assert set(res) == {"prompts_per_member=1", "prompts_per_member=2"}
    for r in res.values():  # each ratio is the plain time over that path's, as printed
        for path in ("torch", "cpu"):
            assert r[f"{path}_ms"] > 0
            assert r[f"plain_over_{path}"] == pytest.approx(r["plain_ms"] / r[f"{path}_ms"], rel=5e-3)
    with pytest.raises(SystemExit, match="even number of members"):
        bench_hook.main(["--model", str(tmp_path), "--rows", "6", "--prompts-per-member", "2"])
