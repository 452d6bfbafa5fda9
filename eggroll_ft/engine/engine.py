"""Population generation engine: continuous batching over a fixed number of slots.

The engine knows nothing of rewards or of the update: it turns prompt token ids and member ids
into completion ids. Each job is ``(prompt ids, member id, seed, sampling parameters)``; rows of a
batch run different members through the population hooks (``Population.members``), so a whole
population decodes as one batched inference (EGGROLL, arXiv 2511.16652, Sec. 3: the per-row
low-rank term rides along the shared ``x W^T``).

Like vLLM's scheduler, the engine keeps ``S`` slots in flight: the state of all slots (a static
key/value cache, or the recurrent state) is allocated once, and when a row finishes its slot is
refilled with the next job, so a population larger than ``S`` streams through the same memory.
``S`` is ``max_sequences_in_flight``, or what ``memory_budget_bytes`` allows, or the job count.
Sampling is keyed by each job's seed and token position (``sampling.sample_tokens``), so a job's
completion does not depend on the slot or batch it ran in. A row finishes on an EOS token
(``"eos"``), on a stop string (``"stop"``), or after ``max_new_tokens`` (``"length"``).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .adapters import adapter_for
from .sampling import SamplingParams, sample_tokens

FINISH_EOS, FINISH_STOP, FINISH_LENGTH = "eos", "stop", "length"


@dataclass
class GenerationOutput:
    """Completions in job order. ``completion_ids[j]`` includes the EOS token when one ended it."""

    completion_ids: list[list[int]]
    finish_reasons: list[str]
    lengths: list[int] = field(init=False)

    def __post_init__(self):
        self.lengths = [len(c) for c in self.completion_ids]


def _per_job(value, n: int, dtype) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype)
    return t.expand(n).clone() if t.dim() == 0 else t.flatten()


class PopulationEngine:
    """Batched generation where every row may be a different population member.

    >>> engine = PopulationEngine(model, population=pop, eos_token_ids=[tok.eos_token_id],  # doctest: +SKIP
    ...                           pad_token_id=tok.pad_token_id, max_sequences_in_flight=256)
    >>> out = engine.generate(prompt_ids, members=torch.arange(8), seeds=torch.arange(8),     # doctest: +SKIP
    ...                       max_new_tokens=32, sampling=SamplingParams(greedy=True))
    """

    def __init__(self, model, population=None, eos_token_ids=(), pad_token_id: int = 0,
                 max_sequences_in_flight: int | None = None, tokenizer=None, stop_strings=None,
                 memory_budget_bytes: int | None = None, continuous_batching: bool = True,
                 refill_fraction: float = 0.0, compile_decode=False, static_len_multiple: int = 64):
        """``max_sequences_in_flight``: slot count ``S`` (default: from ``memory_budget_bytes``,
        else all jobs at once). ``memory_budget_bytes``: bytes the slots' state and per-slot working
        memory may use (see ``slot_bytes``). ``continuous_batching=False`` refills only when every
        slot is free (static batching, for comparison). ``refill_fraction``: refill once at least
        this fraction of the slots is free (0: as soon as one is), trading idle slots for fewer,
        larger prefill calls.

        ``compile_decode``: run the decode step through ``torch.compile`` (``True``: CUDA graphs
        on CUDA, ``mode="reduce-overhead"``; the default inductor mode elsewhere; a dict: keyword
        arguments of ``torch.compile``). The slots then keep static shapes: the key/value cache
        has ``static_len_multiple``-rounded length, every step attends over all of it (masked), no
        compaction at the tail, and the population gathers factors row by row, so one compiled
        step serves every decode step of every call with the same slot count and length
        (recurrent models: the step writes the new state into the slots' buffers in place).
        Prefill and sampling stay eager."""
        if max_sequences_in_flight is not None and max_sequences_in_flight < 1:
            raise ValueError(f"max_sequences_in_flight={max_sequences_in_flight} must be >= 1")
        if memory_budget_bytes is not None and memory_budget_bytes <= 0:
            raise ValueError(f"memory_budget_bytes={memory_budget_bytes} must be > 0")
        if not 0 <= refill_fraction <= 1:
            raise ValueError(f"refill_fraction={refill_fraction} must lie in [0, 1]")
        self.model = model
        self.population = population
        self.adapter = adapter_for(model)
        self.eos_token_ids = sorted({int(e) for e in eos_token_ids if e is not None})
        self.pad_token_id = int(pad_token_id)
        self.max_sequences_in_flight = max_sequences_in_flight
        self.memory_budget_bytes = memory_budget_bytes
        self.continuous_batching = continuous_batching
        self.refill_fraction = refill_fraction
        self.stop_strings = list(stop_strings or [])
        if self.stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode completions")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop_strings={self.stop_strings!r} must be non-empty strings")
        self.tokenizer = tokenizer
        # a new stop string ends inside the last few tokens: a token decodes to >= 1 byte, a char to <= 4 bytes
        self._stop_window = 4 * max((len(s) for s in self.stop_strings), default=0) + 4
        self.last_num_slots = 0  # slot count of the last generate call (for logs and benchmarks)
        if not isinstance(compile_decode, (bool, dict)):
            raise ValueError(f"compile_decode={compile_decode!r} must be a bool or a dict of torch.compile arguments")
        if static_len_multiple < 1:
            raise ValueError(f"static_len_multiple={static_len_multiple} must be >= 1")
        self.compile_decode = compile_decode
        self.static_len_multiple = static_len_multiple
        self._compiled_step = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def slot_bytes(self, max_len: int) -> int:
        """Estimated bytes per slot: its state for ``max_len`` tokens, sampling buffers over the
        vocabulary (about eight float32/int64 ``(V,)`` rows) and its per-row low-rank factors."""
        vocab = self.model.get_output_embeddings().weight.shape[0] if hasattr(self.model, "get_output_embeddings") \
            and self.model.get_output_embeddings() is not None else 0
        factors = 0
        if self.population is not None:
            rank = self.population.noise.rank
            itemsize = next(self.model.parameters()).element_size()
            factors = 2 * rank * itemsize * sum(m + n for m, n in (p.shape for p in self.population.params.values()))
        return self.adapter.slot_bytes(max_len) + 8 * 8 * vocab + factors

    def num_slots(self, num_jobs: int, max_len: int) -> int:
        """Slots for a run: ``max_sequences_in_flight``, else what the memory budget fits, else all jobs."""
        if self.max_sequences_in_flight is not None:
            return max(1, min(num_jobs, self.max_sequences_in_flight))
        if self.memory_budget_bytes is not None:
            fit = self.memory_budget_bytes // max(self.slot_bytes(max_len), 1)
            if fit < 1:
                raise ValueError(f"memory_budget_bytes={self.memory_budget_bytes} is below one slot "
                                 f"({self.slot_bytes(max_len)} bytes for {max_len} tokens)")
            return int(min(num_jobs, fit))
        return num_jobs

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], members=None, seeds=None, max_new_tokens: int = 64,
                 sampling: SamplingParams | None = None) -> GenerationOutput:
        """Generate one completion per job (the backend contract of ``backend.py``).

        ``members`` and ``seeds`` are scalars or ``(J,)`` sequences; members default to -1 (the
        unperturbed model), seeds to 0.
        """
        J = len(prompt_ids)
        if J == 0:
            return GenerationOutput([], [])
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt must have at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        sp = sampling or SamplingParams()
        jobs = {
            "member": _per_job(-1 if members is None else members, J, torch.long),
            "seed": _per_job(0 if seeds is None else seeds, J, torch.long),
            "temperature": _per_job(sp.temperature, J, torch.float32),
            "top_k": _per_job(sp.top_k, J, torch.long),
            "top_p": _per_job(sp.top_p, J, torch.float32),
            "greedy": _per_job(sp.greedy, J, torch.bool),
        }
        for name, t in jobs.items():
            if t.numel() != J:
                raise ValueError(f"{J} prompts but {t.numel()} values of {name}")
        if self.population is None and bool((jobs["member"] >= 0).any()):
            raise ValueError("member ids >= 0 need a population")
        max_len = max(len(p) for p in prompt_ids) + max_new_tokens
        if self.compile_decode:  # a few lengths (and so compiled graphs) serve all calls
            max_len = -(-max_len // self.static_len_multiple) * self.static_len_multiple
        return self._run(prompt_ids, jobs, max_new_tokens, self.num_slots(J, max_len), max_len)

    # ---- the scheduler ---------------------------------------------------------------------------
    def _members_ctx(self, member_ids: torch.Tensor):
        if self.population is None:
            return nullcontext()
        return self.population.members(member_ids, grouped=not self.compile_decode)

    def _step_fn(self):
        """The compiled decode step (built once per engine; ``None`` when not compiling)."""
        if not self.compile_decode:
            return None
        if self._compiled_step is None:
            opts = dict(self.compile_decode) if isinstance(self.compile_decode, dict) else \
                {"mode": "reduce-overhead"} if self.device.type == "cuda" else {}
            opts.setdefault("dynamic", False)
            compiled = torch.compile(self.adapter.decode_step, **opts)
            if opts.get("mode") in ("reduce-overhead", "max-autotune"):  # CUDA graphs
                def compiled_step(*args, _compiled=compiled):
                    # each decode step is a new iteration: the previous step's outputs (logits) are
                    # consumed by then and may be overwritten by this replay
                    torch.compiler.cudagraph_mark_step_begin()
                    return _compiled(*args)
                self._compiled_step = compiled_step
            else:
                self._compiled_step = compiled
        return self._compiled_step

    def _run(self, prompts, jobs, max_new_tokens, S, max_len) -> GenerationOutput:
        device, J = self.device, len(prompts)
        jobs = {k: v.to(device) for k, v in jobs.items()}
        self.last_num_slots = S
        adapter = self.adapter
        static = bool(self.compile_decode)
        state = adapter.allocate(S, max_len, device, static=static)
        step = self._step_fn()
        factor_dtype = next(self.model.parameters()).dtype  # the hooks' activations (static: gathered before each step)
        slot_job = [-1] * S  # job of each slot, -1 when free
        slot = {k: v[:1].expand(S).clone() for k, v in jobs.items()}  # per-slot copies of the job fields
        slot["member"].fill_(-1)
        slot_pos = torch.zeros(S, dtype=torch.long, device=device)  # sampling position of each slot
        out: list[list[int]] = [[] for _ in range(J)]
        reasons = [FINISH_LENGTH] * J
        eos = set(self.eos_token_ids)
        next_job = 0
        logits = None

        def refill(free: list[int]):
            nonlocal next_job, logits
            take = free[: J - next_job]
            job_idx = list(range(next_job, next_job + len(take)))
            next_job += len(take)
            rows = torch.tensor(take, device=device)
            jidx = torch.tensor(job_idx, device=device)
            for k in slot:  # in place: the members tensor's version tells the population to regather
                slot[k][rows] = jobs[k][jidx]
            slot_pos[rows] = 0
            for s, j in zip(take, job_idx):
                slot_job[s] = j
            T = max(len(prompts[j]) for j in job_idx)
            ids = torch.full((len(take), T), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(take), T), dtype=torch.long)
            for b, j in enumerate(job_idx):  # left padding
                ids[b, T - len(prompts[j]):] = torch.as_tensor(prompts[j], dtype=torch.long)
                mask[b, T - len(prompts[j]):] = 1
            with self._members_ctx(jobs["member"][jidx]):
                new = adapter.prefill(state, take, ids.to(device), mask.to(device))  # (R, V)
            if logits is None:
                logits = new.new_zeros(S, new.shape[-1])
            logits[rows] = new.to(logits.dtype)

        refill(list(range(S)))
        while True:
            tok = sample_tokens(logits, slot["seed"], slot_pos, slot["temperature"], slot["top_k"],
                                slot["top_p"], slot["greedy"])  # (S,)
            slot_pos += 1
            finished = []
            for s, t in enumerate(tok.tolist()):
                j = slot_job[s]
                if j < 0:
                    continue
                out[j].append(t)
                if t in eos:
                    reasons[j] = FINISH_EOS
                elif self.stop_strings and self._hits_stop(out[j]):
                    reasons[j] = FINISH_STOP
                elif len(out[j]) < max_new_tokens:
                    continue
                finished.append(s)
            for s in finished:
                slot_job[s] = -1
            live = [s for s in range(len(slot_job)) if slot_job[s] >= 0]
            if not live and next_job >= J:
                break
            if live:
                with self._members_ctx(slot["member"]):
                    if static and self.population is not None:
                        self.population.gather_rows(factor_dtype)  # the captured hooks only read them
                    logits = adapter.decode(state, tok, step=step)  # (S, V)
            if finished:
                adapter.release(state, finished)
            free = [s for s in range(len(slot_job)) if slot_job[s] < 0]
            if next_job < J and free:
                enough = len(free) >= max(1, int(self.refill_fraction * len(slot_job)))
                if not live or (self.continuous_batching and enough):
                    refill(free)
            elif not static and next_job >= J and len(live) <= len(slot_job) // 2:
                # the queue is empty: shrink to the live slots so the tail decodes a smaller batch
                state = adapter.compact(state, live)
                keep = torch.tensor(live, device=device)
                slot = {k: v[keep] for k, v in slot.items()}
                slot_pos, logits = slot_pos[keep], logits[keep]
                slot_job = [slot_job[s] for s in live]
        return GenerationOutput(out, reasons)

    def _hits_stop(self, completion: list[int]) -> bool:
        text = self.tokenizer.decode(completion[-self._stop_window:])
        return any(s in text for s in self.stop_strings)
