"""minGRU byte LM: integer-only forward (dtypes, exact reference), float form, recipes and configs."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from eggroll_ft.integer_es import IntegerESConfig, accumulate, int8_factors, member_lowrank, member_sign
from eggroll_ft.models import mingru
from eggroll_ft.models.mingru import (
    FloatMinGRU, IntMinGRU, LowRank, MinGRUConfig, exact_bits, int_log_softmax, int_matmul, int_mm, lowrank_mm,
    num_params, tables, weight_shapes)

ROOT = Path(__file__).resolve().parents[1]
SMALL = MinGRUConfig(d_model=8, n_layers=2, mlp_mult=2, vocab_size=16, init_std=16)


class DtypeRecorder(TorchFunctionMode):
    """Records the dtype and device of every tensor that any torch op returns while active, the
    integer matmuls CUDA torch lacks (``bmm``/``mm``/``matmul`` on integers) and the shapes of
    every ``torch._int_mm`` call."""

    def __init__(self):
        super().__init__()
        self.dtypes, self.devices, self.ops, self.int_matmuls, self.int_mm_shapes = [], set(), 0, [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        name = getattr(func, "__name__", "")
        if name == "_int_mm":
            self.int_mm_shapes.append((*args[0].shape, args[1].shape[1]))  # (M, K, N)
        elif name in ("bmm", "mm", "matmul", "__matmul__") and not out.dtype.is_floating_point:
            self.int_matmuls.append(name)
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.dtypes.append(t.dtype)
                self.devices.add(t.device.type)
        return out

    def assert_cuda_legal(self):
        """No integer bmm/mm, and every _int_mm has M > 16 rows and K, N multiples of 8."""
        assert self.int_matmuls == []
        assert self.int_mm_shapes and all(m > 16 and k % 8 == 0 and n % 8 == 0 for m, k, n in self.int_mm_shapes)


@pytest.fixture
def cuda_paths(monkeypatch):
    """Force the CUDA-style kernels (elementwise low-rank products, padded _int_mm) on the CPU."""
    monkeypatch.setattr(mingru, "LOWRANK_IMPL", "elementwise")
    monkeypatch.setattr(mingru, "PAD_INT_MM", True)


def _tiny_population(seed=0, step=3, members=(0, 1, 4, 5, -1)):
    model = IntMinGRU.init(SMALL, seed)
    gb = torch.Generator().manual_seed(seed + 2)
    for name, w in model.weights.items():  # non-zero biases, so the bias column is exercised
        if name != "embed":
            w[:, -1] = torch.randint(-40, 41, (w.shape[0],), generator=gb).to(torch.int8)
    es = IntegerESConfig(population_size=8, rank=2, sigma_shift=6, seed=seed)
    mem = torch.tensor(members)
    lowrank = member_lowrank(es, weight_shapes(SMALL), step, mem)
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, SMALL.vocab_size, (len(members), 7), generator=g)
    state = torch.randint(-127, 128, (SMALL.n_layers, len(members), SMALL.d_model), generator=g).to(torch.int8)
    return model, lowrank, tokens, state


@pytest.mark.parametrize("paths", ["default", "cuda"])
def test_integer_forward_creates_only_integer_tensors(paths, request):
    if paths == "cuda":
        request.getfixturevalue("cuda_paths")
    model, lowrank, tokens, state = _tiny_population()
    with DtypeRecorder() as rec:
        logits, new_state = model(tokens, state, lowrank)
        logp = int_log_softmax(logits, torch.roll(tokens, -1, 1))
    assert rec.ops > 200  # the recorder saw the whole forward, op by op
    floats = [d for d in rec.dtypes if d.is_floating_point or d.is_complex]
    assert floats == []
    assert logits.dtype == torch.int8 and new_state.dtype == torch.int8 and logp.dtype == torch.int32
    if paths == "cuda":
        rec.assert_cuda_legal()
    else:
        assert "bmm" in rec.int_matmuls  # the CPU default really is the other path


def test_elementwise_lowrank_path_is_bit_identical_to_bmm(cuda_paths, monkeypatch):
    model, lowrank, tokens, state = _tiny_population()
    targets = torch.roll(tokens, -1, 1)
    logits, new_state = model(tokens, state, lowrank)  # forced: elementwise, padded
    scores = int_log_softmax(logits, targets).sum(-1, dtype=torch.int32)
    monkeypatch.setattr(mingru, "LOWRANK_IMPL", None)
    monkeypatch.setattr(mingru, "PAD_INT_MM", None)
    ref_logits, ref_state = model(tokens, state, lowrank)  # the CPU default: bmm, unpadded
    assert torch.equal(logits, ref_logits) and torch.equal(new_state, ref_state)
    assert torch.equal(scores, int_log_softmax(ref_logits, targets).sum(-1, dtype=torch.int32))
    # each kernel alone, both branches of the elementwise loop (over J = r, over k = r), and k == J
    g = torch.Generator().manual_seed(5)
    for k, j in [(65, 1), (65, 3), (2, 33), (4, 9), (3, 3)]:
        u = torch.randint(-4000, 4001, (3, 5, k), generator=g, dtype=torch.int32)
        v = torch.randint(-127, 128, (3, j, k), generator=g, dtype=torch.int32)
        ref = torch.bmm(u, v.transpose(1, 2))
        assert torch.equal(lowrank_mm(u, v, "elementwise"), ref) and torch.equal(lowrank_mm(u, v, "bmm"), ref)
    with pytest.raises(ValueError, match="impl='dense'"):
        lowrank_mm(u, v, "dense")


def test_padded_int_mm_equals_unpadded_on_awkward_shapes(monkeypatch):
    g = torch.Generator().manual_seed(4)
    for m, k, n in [(5, 65, 33), (1, 9, 1), (17, 8, 8), (40, 64, 257), (24, 16, 32), (32, 64, 16)]:
        x = torch.randint(-127, 128, (m, k), generator=g).to(torch.int8)
        w = torch.randint(-127, 128, (n, k), generator=g).to(torch.int8)
        ref = x.to(torch.int64) @ w.to(torch.int64).T
        for pad in (False, True):
            out = int_mm(x, w, pad=pad)
            assert out.dtype == torch.int32 and out.shape == (m, n) and torch.equal(out.to(torch.int64), ref)
    # int_matmul (x @ W^T with leading batch dims) through the module switch: 2 x 3 rows, k = 65, n = 33
    x = torch.randint(-127, 128, (2, 3, 65), generator=g).to(torch.int8)
    w = torch.randint(-127, 128, (33, 65), generator=g).to(torch.int8)
    plain = int_matmul(x, w)
    monkeypatch.setattr(mingru, "PAD_INT_MM", True)
    with DtypeRecorder() as rec:
        padded = int_matmul(x, w)
    assert torch.equal(padded, plain) and plain.shape == (2, 3, 33)
    rec.assert_cuda_legal()


def test_integer_path_runs_on_the_model_device():
    """On the meta device (shapes only, no data) every tensor of the forward, the factors and the
    vote stays on the model's device, and a non-CPU device picks the CUDA-legal kernels by itself."""
    model = IntMinGRU.init(SMALL, 0, device="meta")
    assert model.device.type == "meta" and model.init_state(3).device.type == "meta"
    assert tables("meta") is tables(torch.device("meta")) and tables("meta")["exp2"].device.type == "meta"
    es = IntegerESConfig(population_size=8, rank=2, sigma_shift=6)
    members = torch.tensor([0, 1, 4, 5, -1]).to("meta")
    factors = {name: int8_factors(es.noise, 3, name, shape, members.clamp(min=0) // 2)
               for name, shape in weight_shapes(SMALL).items()}  # (P, m, r), (P, n, r) per row
    lowrank = LowRank(factors, member_sign(members), es.sigma_shift)
    tokens = torch.zeros(5, 7, dtype=torch.int64, device="meta")
    with DtypeRecorder() as rec:
        logits, state = model(tokens, model.init_state(5), lowrank)
        logp = int_log_softmax(logits, tokens)
        acc = accumulate(es.noise, 3, "l0_up", weight_shapes(SMALL)["l0_up"],
                         torch.ones(4, dtype=torch.int8, device="meta"))
    assert rec.devices == {"meta"}
    rec.assert_cuda_legal()
    assert logits.shape == (5, 7, SMALL.vocab_size) and state.shape == (2, 5, 8) and logp.shape == (5, 7)
    assert acc.shape == (16, 9) and acc.dtype == torch.int32
    # moving is a copy of the same weights; a model's weights must share one device
    cpu = IntMinGRU.init(SMALL, 0)
    assert all(torch.equal(w, cpu.to("cpu").weights[k]) for k, w in IntMinGRU.init(SMALL, 0).weights.items())
    mixed = dict(cpu.weights, head=cpu.weights["head"].to("meta"))
    with pytest.raises(ValueError, match="weight head is on meta"):
        IntMinGRU(SMALL, mixed)


def _rs(v: int, s: int) -> int:
    return (v + (1 << (s - 1))) >> s if s > 0 else v


def _sat(v: int) -> int:
    return max(-127, min(127, v))


def _reference_member(model, lowrank, row, tokens, state):
    """Plain-Python integer forward of one batch row with its materialised perturbed weights."""
    cfg, s = model.cfg, lowrank.sigma_shift
    sign = int(lowrank.sign[row])
    W = {}  # 2^s * W + sign * A B^T, exact integers
    for name in weight_shapes(cfg):
        a, b = (f[row].to(torch.int64) for f in lowrank.factors[name])
        W[name] = (model.weights[name].to(torch.int64) * (1 << s) + sign * (a @ b.T)).tolist()

    def linear(name, x):
        x = x + [32]  # the bias column's constant input
        return [_sat(_rs(_rs(sum(w * xi for w, xi in zip(wrow, x)), s), model.shifts[name])) for wrow in W[name]]

    def norm(x):
        mean_abs = max(1, min(127, sum(abs(v) for v in x) // len(x)))
        recip = round(32 * 4096 / mean_abs)
        return [_sat(_rs(v * recip, 12)) for v in x]

    def sigmoid(p):
        return round(128 / (1 + math.exp(-p / 32)))

    h = [[int(v) for v in state[i, row]] for i in range(cfg.n_layers)]
    logits = []
    for tok in tokens[row].tolist():
        x = [_sat(_rs(v, s)) for v in W["embed"][tok]]
        for i in range(cfg.n_layers):
            u = norm(x)
            z = [sigmoid(p) for p in linear(f"l{i}_gate", u)]
            c = linear(f"l{i}_cand", u)
            h[i] = [_rs((128 - zj) * hj + zj * cj, 7) for zj, hj, cj in zip(z, h[i], c)]
            x = [_sat(a + b) for a, b in zip(x, linear(f"l{i}_out", h[i]))]
            m = [max(0, v) for v in linear(f"l{i}_up", norm(x))]
            x = [_sat(a + b) for a, b in zip(x, linear(f"l{i}_down", m))]
        logits.append(linear("head", norm(x)))
    return logits, h


def test_integer_forward_equals_plain_python_reference():
    model, lowrank, tokens, state = _tiny_population()
    logits, new_state = model(tokens, state, lowrank)
    for row in range(tokens.shape[0]):
        ref_logits, ref_h = _reference_member(model, lowrank, row, tokens, state)
        assert logits[row].tolist() == ref_logits
        assert new_state[:, row].tolist() == ref_h
    # the rows really differ: members see different weights, -1 sees the mean weights
    assert not torch.equal(logits[0], logits[1])
    plain, _ = model(tokens[-1:], state[:, -1:])
    assert torch.equal(plain[0], logits[-1])


def test_int_log_softmax_matches_exact_bits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(-127, 128, (64, 256), generator=g).to(torch.int8)
    targets = torch.randint(0, 256, (64,), generator=g)
    approx = -int_log_softmax(logits, targets).to(torch.float64) / 256
    exact = exact_bits(logits, targets)
    assert (approx - exact).abs().max() < 0.02
    uniform = int_log_softmax(torch.zeros(3, 256, dtype=torch.int8), torch.tensor([0, 7, 255]))
    assert uniform.tolist() == [-8 * 256] * 3  # log2(1/256) = -8 bits exactly


def test_float_and_int_models_share_the_architecture():
    cfg = MinGRUConfig(d_model=16, n_layers=2)
    fm = FloatMinGRU(cfg, seed=0)
    im = IntMinGRU.init(cfg, seed=0)
    assert sum(p.numel() for p in fm.parameters()) == num_params(cfg) == sum(w.numel() for w in im.weights.values())
    assert set(fm.weights.keys()) == set(im.weights) == set(weight_shapes(cfg))
    tokens = torch.randint(0, 256, (3, 5))
    logits, state = fm(tokens, fm.init_state(3))
    assert logits.shape == (3, 5, 256) and state.shape == (2, 3, 16)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fm.parameters())
    il, ist = im(tokens, im.init_state(3))
    assert il.shape == (3, 5, 256) and ist.shape == (2, 3, 16)


def test_config_and_weight_validation():
    with pytest.raises(ValueError, match="d_model=0"):
        MinGRUConfig(d_model=0)
    with pytest.raises(ValueError, match="vocab_size=300"):
        MinGRUConfig(vocab_size=300)
    bad = {k: torch.zeros(s, dtype=torch.int8) for k, s in weight_shapes(SMALL).items()}
    bad["head"] = bad["head"].to(torch.int32)
    with pytest.raises(ValueError, match="weight head has dtype=torch.int32"):
        IntMinGRU(SMALL, bad)


# ------------------------------------------------------------------ recipes (in-process, tiny)
def _load_recipe(name):
    import sys
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.fixture
def text_file(tmp_path):
    words = "the cat sat on the mat and the dog ran to the sun while a bird sang ".split()
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(0, len(words), (3000,), generator=g).tolist())
    path = tmp_path / "text.txt"
    path.write_text(text)
    return str(path)


TINY_ARGS = ["--d_model", "8", "--n_layers", "1", "--seq_len", "8", "--eval_every", "2", "--save_every", "2",
             "--eval_windows", "2", "--eval_len", "32", "--threads", "1"]


@pytest.mark.parametrize("recipe,extra", [
    ("pretrain_mingru_int8", ["--population_size", "16", "--group_size", "4"]),
    ("pretrain_mingru_float", ["--batch_streams", "4"]),
])
def test_recipe_logs_and_resumes_to_the_same_result(recipe, extra, text_file, tmp_path):
    mod = _load_recipe(recipe)
    full = mod.main([*TINY_ARGS, *extra, "--data", text_file, "--output_dir", str(tmp_path / "a"), "--steps", "6"])
    mod.main([*TINY_ARGS, *extra, "--data", text_file, "--output_dir", str(tmp_path / "b"), "--steps", "6",
              "--stop_at_step", "3"])
    resumed = mod.main([*TINY_ARGS, *extra, "--data", text_file, "--output_dir", str(tmp_path / "b"),
                        "--steps", "6", "--resume", "true"])
    assert full["step"] == 6 and resumed["eval/bpb"] == full["eval/bpb"]
    lines = [json.loads(ln) for ln in open(tmp_path / "a" / "metrics.jsonl")]
    assert [ln["step"] for ln in lines] == list(range(7))
    assert [ln for ln in lines if "eval/bpb" in ln][-1]["eval/bpb"] == full["eval/bpb"]
    resumed_lines = [json.loads(ln) for ln in open(tmp_path / "b" / "metrics.jsonl")]
    assert [ln["step"] for ln in resumed_lines] == list(range(7))
    drop = ("time/train_s",)
    assert ([{k: v for k, v in ln.items() if k not in drop} for ln in resumed_lines]
            == [{k: v for k, v in ln.items() if k not in drop} for ln in lines])
    # checkpoints hold CPU tensors only, so they load onto any device
    ck = torch.load(tmp_path / "b" / "checkpoint.pt")
    tensors = [ck["state"], *ck.get("weights", ck.get("model", {})).values()]
    assert len(tensors) > 1 and all(t.device.type == "cpu" for t in tensors)


def test_recipe_device_choice(monkeypatch):
    mod = _load_recipe("pretrain_mingru_int8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mod.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert mod.resolve_device("auto") == torch.device("cuda")
    assert mod.resolve_device("cuda:1") == torch.device("cuda", 1)
    run, _ = mod.parse_config((mod.RunArgs, mod.ESArgs), ["--device", "cpu"])
    assert run.device == "cpu" and mod.RunArgs().device == "auto"
    with pytest.raises(RuntimeError):
        mod.RunArgs(device="gpu0")


@pytest.mark.parametrize("config", sorted((ROOT / "recipes" / "configs" / "mingru").glob("*.yaml")))
def test_shipped_configs_parse_and_validate(config):
    first = config.read_text().splitlines()[0]
    assert first.startswith("#") and "pretrain_mingru_int8.py" in first
    mod = _load_recipe("pretrain_mingru_int8")
    run, es_args = mod.parse_config((mod.RunArgs, mod.ESArgs), ["--config", str(config)])
    IntegerESConfig(population_size=es_args.population_size, group_size=es_args.group_size,
                    rank=es_args.rank, sigma_shift=es_args.sigma_shift, total_steps=run.steps)
    MinGRUConfig(d_model=run.d_model, n_layers=run.n_layers, init_std=es_args.init_std)
    fmod = _load_recipe("pretrain_mingru_float")
    fmod.parse_config((fmod.RunArgs, fmod.ESArgs, fmod.FloatArgs), ["--config", str(config)], section="float")
    # command-line flags win over the file
    run2, _ = mod.parse_config((mod.RunArgs, mod.ESArgs), ["--config", str(config), "--seq_len", "3"])
    assert run2.seq_len == 3


def test_unknown_config_key_is_named(tmp_path):
    mod = _load_recipe("pretrain_mingru_int8")
    bad = tmp_path / "bad.yaml"
    bad.write_text("d_model: 8\npopulation_sise: 4\n")
    with pytest.raises(ValueError, match="population_sise"):
        mod.parse_config((mod.RunArgs, mod.ESArgs), ["--config", str(bad)])
