"""RWKV-7: parity with the official ``rwkv`` package, population exactness, checkpoint formats."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from eggroll_ft import NoiseConfig, Population
from eggroll_ft.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM, RWKV7State

pytest.importorskip("rwkv")

C, H, N, L, V = 128, 2, 64, 2, 65536  # width, heads, head size, layers, World vocabulary
D_W, D_A, D_V, D_G, FFN = 32, 32, 16, 48, 4 * 128
SEQS = [[33155, 40213, 11, 261, 5, 65000, 100, 9, 3000, 42, 7, 12],
        [1, 2, 3, 261, 40000, 17],
        [65529, 300, 77, 12345, 2, 9, 8, 500, 600]]
SPLIT = 5  # the state carried across two calls, split after this many tokens


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def official_random_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random x070 state dict with the official BlinkDL key names and shapes, of sensible scale
    (unit-variance residual stream, decays spread over (0.55, 1), non-trivial gates and LoRAs)."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s, std=1.0, mean=0.0: (torch.randn(*s, generator=g) * std + mean)  # noqa: E731
    un = lambda *s, lo=0.0, hi=1.0: torch.rand(*s, generator=g) * (hi - lo) + lo  # noqa: E731
    sd = {"emb.weight": rn(V, C), "head.weight": rn(V, C, std=C ** -0.5),
          "ln_out.weight": rn(C, std=0.1, mean=1.0), "ln_out.bias": rn(C, std=0.1)}
    for i in range(L):
        b = f"blocks.{i}."
        for ln in (["ln0", "ln1", "ln2"] if i == 0 else ["ln1", "ln2"]):
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = rn(C, std=0.1, mean=1.0), rn(C, std=0.1)
        a = b + "att."
        for x in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            sd[a + x] = un(1, 1, C)
        sd[a + "w0"] = un(1, 1, C, lo=-6.0, hi=1.0)
        sd[a + "a0"], sd[a + "v0"] = rn(1, 1, C, std=0.5), rn(1, 1, C, std=0.5, mean=0.5)
        for lo, d in (("w", D_W), ("a", D_A), ("v", D_V), ("g", D_G)):  # layer 0 gets unused v's too
            sd[a + lo + "1"], sd[a + lo + "2"] = rn(C, d, std=C ** -0.5), rn(d, C, std=0.5 * d ** -0.5)
        sd[a + "k_k"], sd[a + "k_a"] = rn(1, 1, C, std=0.1, mean=0.8), rn(1, 1, C, std=0.1, mean=1.0)
        sd[a + "r_k"] = rn(H, N, std=0.3)
        for lin in ("receptance", "key", "value", "output"):
            sd[a + lin + ".weight"] = rn(C, C, std=C ** -0.5)
        sd[a + "ln_x.weight"], sd[a + "ln_x.bias"] = rn(C, std=0.1, mean=1.0), rn(C, std=0.1)
        sd[b + "ffn.x_k"] = un(1, 1, C)
        sd[b + "ffn.key.weight"], sd[b + "ffn.value.weight"] = rn(FFN, C, std=C ** -0.5), rn(C, FFN, std=FFN ** -0.5)
    return sd


REFERENCE = textwrap.dedent("""
    import os, sys, torch
    os.environ.update(RWKV_V7_ON="1", RWKV_JIT_ON="1", RWKV_CUDA_ON="0")
    from rwkv.model import RWKV
    path, out, split = sys.argv[1], sys.argv[2], int(sys.argv[3])
    seqs = [[int(t) for t in s.split(",")] for s in sys.argv[4:]]
    model = RWKV(model=path[:-len(".pth")], strategy="cpu fp32")
    res = []
    for ids in seqs:
        full, _ = model.forward(ids, None, full_output=True)                 # (T, V) one call
        state, steps = None, []
        for t in ids:                                                          # token by token
            logits, state = model.forward([t], state)
            steps.append(logits.clone())
        head, state = model.forward(ids[:split], None, full_output=True)     # two calls
        tail, state = model.forward(ids[split:], state, full_output=True)
        res.append(dict(full=full.clone(), steps=torch.stack(steps), split=torch.cat([head, tail.view(-1, head.shape[-1])])))
    torch.save(res, out)
""")


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(path to a random official .pth, its state dict, the reference package's logits)."""
    d = tmp_path_factory.mktemp("rwkv7")
    sd = official_random_checkpoint()
    path = d / "rwkv7-random.pth"
    torch.save(sd, path)
    script = d / "reference.py"
    script.write_text(REFERENCE)
    env = {**os.environ, "RWKV_V7_ON": "1", "RWKV_JIT_ON": "1", "RWKV_CUDA_ON": "0", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(path), str(d / "ref.pt"), str(SPLIT)]
                   + [",".join(map(str, s)) for s in SEQS], check=True, env=env, capture_output=True)
    return path, sd, torch.load(d / "ref.pt")


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.std())


def left_pad(seqs):
    T = max(map(len, seqs))
    ids = torch.tensor([[0] * (T - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


# ---- parity with the official implementation --------------------------------------------------
def test_reads_shapes_off_the_official_checkpoint(official):
    path, _, _ = official
    cfg = RWKV7ForCausalLM.from_pretrained(path).config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.head_size, cfg.num_heads) == (V, C, L, N, H)
    assert (cfg.decay_low_rank_dim, cfg.a_low_rank_dim, cfg.v_low_rank_dim, cfg.gate_low_rank_dim) == (D_W, D_A, D_V, D_G)
    assert cfg.intermediate_size == FFN


def test_parity_whole_sequence_token_by_token_and_carried_state(official):
    path, _, ref = official
    model = RWKV7ForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for ids, r in zip(SEQS, ref):
            assert r["full"].std() > 0.5  # the random checkpoint produces non-trivial logits
            x = torch.tensor([ids])
            full = model(x).logits[0]
            assert rel_err(full, r["full"]) < 1e-4
            state, steps = None, []
            for t in ids:
                out = model(torch.tensor([[t]]), state)
                state = out.state
                steps.append(out.logits[0, -1])
            assert rel_err(torch.stack(steps), r["steps"]) < 1e-4
            head = model(x[:, :SPLIT])
            tail = model(x[:, SPLIT:], head.state)
            assert rel_err(torch.cat([head.logits[0], tail.logits[0]]), r["split"]) < 1e-4
            assert torch.allclose(torch.cat([head.logits[0], tail.logits[0]]), full, atol=1e-4, rtol=0)
            chunked = model(x, chunk_size=5)  # internal chunking: same logits, same state
            assert rel_err(chunked.logits[0], r["full"]) < 1e-4
            last2 = model(x, chunk_size=5, logits_to_keep=len(ids) % 5 + 1).logits[0]  # spans two chunks
            assert torch.allclose(last2, chunked.logits[0, -(len(ids) % 5 + 1):], atol=1e-5, rtol=0)
            assert torch.allclose(chunked.state.wkv, tail.state.wkv, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_matches_reference_per_row(official):
    path, _, ref = official
    model = RWKV7ForCausalLM.from_pretrained(path)
    ids, mask = left_pad(SEQS)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        for b, (s, r) in enumerate(zip(SEQS, ref)):
            assert rel_err(out.logits[b, -len(s):], r["full"]) < 1e-4
        # decoding continues from the padded batch's state exactly as from each row alone
        nxt = torch.tensor([[5], [6], [7]])
        step = model(nxt, out.state).logits[:, -1]
        for b, s in enumerate(SEQS):
            alone = model(torch.tensor([s + [int(nxt[b])]])).logits[0, -1]
            assert rel_err(step[b], alone) < 1e-5


def test_state_helpers_and_all_padding_chunk_leave_state_unchanged():
    torch.manual_seed(0)
    model = tiny_model()
    ids = torch.randint(1, 300, (4, 6))
    with torch.no_grad():
        st = model(ids).state
        kept = st.clone()
        model(torch.zeros(4, 3, dtype=torch.long), st, attention_mask=torch.zeros(4, 3, dtype=torch.long))
        for n in ("att_x_prev", "wkv", "ffn_x_prev"):
            assert torch.equal(getattr(st, n), getattr(kept, n))
        sub = st.select([2, 0])
        assert sub.batch_size == 2 and torch.equal(sub.wkv[:, 0], st.wkv[:, 2])
        fresh = model.init_state(4)
        fresh.assign(torch.tensor([1, 3]), sub)
        assert torch.equal(fresh.wkv[:, 1], st.wkv[:, 2]) and torch.equal(fresh.wkv[:, 3], st.wkv[:, 0])
        assert fresh.wkv[:, 0].abs().sum() == 0
        st.reset([0])
        assert st.wkv[:, 0].abs().sum() == 0 and st.att_x_prev[:, 0].abs().sum() == 0
        assert RWKV7State.cat([sub, sub]).batch_size == 4
        with pytest.raises(ValueError, match="left padding"):
            model(ids, attention_mask=torch.tensor([[1, 0, 1, 1, 1, 1]] * 4))


def test_bf16_runs_and_tracks_fp32(official):
    path, _, ref = official
    model = RWKV7ForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(torch.tensor([SEQS[0]]))
    assert out.logits.dtype == torch.float32 and out.state.wkv.dtype == torch.float32
    assert rel_err(out.logits[0], ref[0]["full"]) < 0.15


# ---- population exactness ----------------------------------------------------------------------
def tiny_model(vocab: int = 300) -> RWKV7ForCausalLM:
    cfg = RWKV7Config(vocab_size=vocab, hidden_size=C, num_hidden_layers=L, head_size=N, decay_low_rank_dim=D_W,
                      a_low_rank_dim=D_A, v_low_rank_dim=D_V, gate_low_rank_dim=D_G, intermediate_size=FFN)
    return RWKV7ForCausalLM(cfg).eval()


def test_population_perturbs_every_matmul_but_embedding_and_head():
    model = tiny_model()
    pop = Population(model, NoiseConfig(seed=0, rank=2), population_size=6, sigma=0.05)
    names = set(pop.params)
    assert "head.weight" not in names and not any(n.startswith("emb") for n in names)
    for lin in ("receptance", "key", "value", "output", "w1", "w2", "a1", "a2", "g1", "g2"):
        assert f"blocks.1.att.{lin}.weight" in names
    assert {"blocks.1.att.v1.weight", "blocks.1.att.v2.weight", "blocks.0.ffn.key.weight",
            "blocks.0.ffn.value.weight"} <= names
    assert len(names) == L * 14 - 2  # 12 time-mix matmuls (10 in layer 0) + 2 FFN per layer


@pytest.mark.parametrize("padded", [False, True])
def test_population_rows_equal_materialized_members(padded):
    torch.manual_seed(1)
    model = tiny_model()
    pop = Population(model, NoiseConfig(seed=3, rank=2), population_size=6, sigma=0.05)
    pop.set_step(2)
    members = torch.tensor([0, 1, 2, 3, 4, 5, -1])
    seqs = [torch.randint(1, 300, (int(n),)).tolist() for n in torch.randint(3, 9, (7,))] if padded \
        else torch.randint(1, 300, (7, 8)).tolist()
    ids, mask = left_pad(seqs)
    nxt = torch.randint(1, 300, (7, 1))
    with torch.no_grad(), pop.members(members):
        out = model(ids, attention_mask=mask if padded else None)
        step = model(nxt, out.state).logits[:, -1]  # decoding keeps each row's member
    with torch.no_grad():
        base = model(ids[:1, -len(seqs[0]):]).logits[0]
        for b, m in enumerate(members.tolist()):
            s = torch.tensor([seqs[b]])
            ctx = pop.materialized(m) if m >= 0 else torch.no_grad()
            with ctx:
                alone = model(s).logits[0]
                alone_step = model(nxt[b:b + 1], model(s).state).logits[0, -1]
            assert rel_err(out.logits[b, -len(seqs[b]):], alone) < 1e-5
            assert rel_err(step[b], alone_step) < 1e-5
            if b == 0:  # the perturbation matters far beyond the tolerance
                assert rel_err(alone, base) > 1e-2


# ---- checkpoint formats -----------------------------------------------------------------------
def test_official_pth_round_trip_is_exact(official, tmp_path):
    path, sd, _ = official
    model = RWKV7ForCausalLM.from_pretrained(path)
    back = model.official_state_dict()
    unused = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}  # the reference ignores them too
    assert set(back) == set(sd) - unused
    for k, t in back.items():
        assert t.shape == sd[k].shape and torch.equal(t, sd[k]), k
    torch.save(back, tmp_path / "again.pth")
    again = RWKV7ForCausalLM.from_pretrained(tmp_path / "again.pth")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_save_pretrained_round_trip_is_exact(tmp_path):
    torch.manual_seed(2)
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "eggroll_rwkv7" and cfg["hidden_size"] == C
    again = RWKV7ForCausalLM.from_pretrained(tmp_path / "m")
    assert again.config == model.config
    sd1, sd2 = model.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    ids = torch.randint(1, 300, (2, 5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    (tmp_path / "m" / "config.json").unlink()  # as transformers.Trainer saves a non-PreTrainedModel
    assert RWKV7ForCausalLM.from_pretrained(tmp_path / "m").config == model.config
    half = RWKV7ForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def fla_from_official(sd):
    """fla-hub layout of an official state dict, written from fla's utils/convert_from_rwkv7.py
    rules (independently of our converter): renames, ``[wavg]1/2`` transposed into
    ``*_lora.lora.0/2.weight``, ``[wavg]0`` into ``lora.2.bias``, ``(1, 1, C)`` vectors squeezed
    except ``attn.x_*``, layer 0's ``v0/v1/v2`` dropped."""
    top = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
           "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
    proj = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "ln_x": "g_norm", "output": "o_proj"}
    out = {}
    for name, t in sd.items():
        if name in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"):
            continue
        if name in top:
            out[top[name]] = t
            continue
        _, i, part, *rest = name.split(".")
        part = {"att": "attn", "ffn": "ffn", "ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}[part]
        leaf = rest[0]
        if part == "attn" and len(leaf) == 2 and leaf[0] in "wvag" and leaf[1] in "012":
            rest = [f"{leaf[0]}_lora", "lora", {"0": "2", "1": "0", "2": "2"}[leaf[1]], "bias" if leaf[1] == "0" else "weight"]
            t = t.t() if leaf[1] != "0" else t
        elif part == "attn" and leaf in proj:
            rest = [proj[leaf]] + rest[1:]
        if list(t.shape) == [1, 1, C] and not (part == "attn" and rest[0].startswith("x_")):
            t = t.squeeze()
        out[".".join(["model.layers", i, part] + rest)] = t.contiguous()
    return out


def test_loads_fla_hub_safetensors_and_round_trips(official, tmp_path):
    from safetensors.torch import save_file
    path, sd, ref = official
    fla = fla_from_official(sd)
    d = tmp_path / "fla"
    d.mkdir()
    save_file(fla, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "rwkv7", "hidden_size": C, "norm_eps": 1e-5}))
    model = RWKV7ForCausalLM.from_pretrained(d)
    official_model = RWKV7ForCausalLM.from_pretrained(path)
    a, b = model.state_dict(), official_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert rel_err(model(torch.tensor([SEQS[1]])).logits[0], ref[1]["full"]) < 1e-4
    back = model.fla_state_dict()
    assert back.keys() == fla.keys() and all(torch.equal(back[k], fla[k]) for k in fla)


def test_config_and_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="hidden_size=100"):
        RWKV7Config(hidden_size=100, head_size=64)
    with pytest.raises(ValueError, match="num_hidden_layers=0"):
        RWKV7Config(num_hidden_layers=0)
    torch.save({"emb.weight": torch.zeros(4, 4)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="r_k"):
        RWKV7ForCausalLM.from_pretrained(tmp_path / "bad.pth")
    model = tiny_model()
    with pytest.raises(ValueError, match="state has 3 rows"):
        model(torch.zeros(2, 1, dtype=torch.long), model.init_state(3))


def test_greedy_helper_continues_like_repeated_forward():
    torch.manual_seed(4)
    model = tiny_model()
    ids = torch.randint(1, 300, (2, 4))
    got = model.greedy(ids, 5)
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq[:, 4:])


@pytest.mark.slow  # dynamo tracing takes ~10 s on a loaded 2-core machine
def test_decode_and_padded_prefill_trace_as_one_graph():
    """No graph breaks (torch.compile fullgraph, eager backend), with population hooks active."""
    torch.manual_seed(5)
    model = tiny_model()
    pop = Population(model, NoiseConfig(seed=0, rank=1), population_size=4, sigma=0.05)
    ids, mask = left_pad([[5, 6, 7], [8, 9, 10, 11]])
    step = torch.compile(lambda i, s, m: model(i, s, attention_mask=m).logits, backend="eager", fullgraph=True)
    with torch.no_grad(), pop.members(torch.tensor([0, 3])):
        want = model(ids, model.init_state(2), attention_mask=mask).logits
        got = step(ids, model.init_state(2), mask)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_config_works_with_transformers_trainer_token_alignment():
    """transformers.Trainer calls align_special_tokens(model, tokenizer) for HF tokenizers."""
    from transformers.trainer_utils import align_special_tokens

    from eggroll_ft.testing import char_tokenizer
    tok = char_tokenizer("abc ")
    model = tiny_model(vocab=len(tok))
    assert model.config.eos_token_id == 0 and model.config.get_text_config() is model.config
    align_special_tokens(model, tok)
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    assert "eos_token_id" not in model.config.to_dict()  # not a shape field: not saved
