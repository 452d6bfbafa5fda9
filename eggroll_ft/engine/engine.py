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

Per decode step the host does little beyond the model call: every slot's end is one tensor
expression (``END_*`` codes: the newest token's EOS / may-complete-a-stop-string code, looked up
in a per-vocabulary table, plus the length), the step's tokens, positions and codes come to the
host in one copy, and only the slots with a nonzero code are looked at in Python; of those, only
the rows whose token may complete a stop string are decoded (``stops.StopStrings``).
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .adapters import adapter_for
from .sampling import SamplingParams, sample_tokens, sampling_filters
from .stops import StopStrings

FINISH_EOS, FINISH_STOP, FINISH_LENGTH = "eos", "stop", "length"
# what a slot's newest token means this step, as bits of one small integer per slot
END_EOS, END_LENGTH, END_MAY_STOP = 1, 2, 4


@dataclass
class GenerationOutput:
    """Completions in job order. ``completion_ids[j]`` includes the EOS token when one ended it."""

    completion_ids: list[list[int]]
    finish_reasons: list[str]
    lengths: list[int] = field(init=False)

    def __post_init__(self):
        self.lengths = [len(c) for c in self.completion_ids]


def check_jobs(prompt_ids: list[list[int]], max_new_tokens: int) -> int:
    """The number of jobs of a ``generate`` call, after the checks every backend makes."""
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt must have at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    return len(prompt_ids)


def per_job(value, n: int, dtype) -> torch.Tensor:
    """A scalar (the same for every job) or ``(n,)`` values of a job field -> a ``(n,)`` tensor."""
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
                 refill_fraction: float = 0.0, compile_decode=False, static_len_multiple: int = 64,
                 share_prompt_prefix: bool = True):
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
        Prefill and sampling stay eager.

        ``share_prompt_prefix``: when the prompts of a call start with the same tokens (a chat
        template's system prompt, an instruction), each prefill computes that prefix once per
        member and lets the member's rows continue from it (adapters with ``run_prefix``: the
        transformers adapter). Rows that share a member share its perturbed weights, so the
        prefix's keys and values are the same for all of them."""
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
        self._stops = StopStrings(tokenizer, stop_strings)
        self.stop_strings = self._stops.strings
        self.tokenizer = tokenizer
        self._ends_on = None  # (vocab size, device, (V,) end codes of each token), built on first use
        self.last_num_slots = 0  # slot count of the last generate call (for logs and benchmarks)
        if not isinstance(compile_decode, (bool, dict)):
            raise ValueError(f"compile_decode={compile_decode!r} must be a bool or a dict of torch.compile arguments")
        if static_len_multiple < 1:
            raise ValueError(f"static_len_multiple={static_len_multiple} must be >= 1")
        self.compile_decode = compile_decode
        self.static_len_multiple = static_len_multiple
        self.share_prompt_prefix = share_prompt_prefix
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
        J = check_jobs(prompt_ids, max_new_tokens)
        if J == 0:
            return GenerationOutput([], [])
        sp = sampling or SamplingParams()
        jobs = {
            "member": per_job(-1 if members is None else members, J, torch.long),
            "seed": per_job(0 if seeds is None else seeds, J, torch.long),
            "temperature": per_job(sp.temperature, J, torch.float32),
            "top_k": per_job(sp.top_k, J, torch.long),
            "top_p": per_job(sp.top_p, J, torch.float32),
            "greedy": per_job(sp.greedy, J, torch.bool),
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

    def _end_codes(self, vocab_size: int, device) -> torch.Tensor:
        """``(V,)`` long: ``END_EOS`` for EOS tokens, ``END_MAY_STOP`` for tokens that may complete a
        stop string (``StopStrings.may_end``), 0 otherwise."""
        if self._ends_on is None or self._ends_on[:2] != (vocab_size, device):
            codes = torch.zeros(vocab_size, dtype=torch.long)
            if self._stops:
                codes[self._stops.may_end(vocab_size)] = END_MAY_STOP
            codes[[e for e in self.eos_token_ids if 0 <= e < vocab_size]] = END_EOS  # EOS ends first
            self._ends_on = (vocab_size, device, codes.to(device))
        return self._ends_on[2]

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
        free = list(range(S))  # the free slots
        slot = {k: v[:1].expand(S).clone() for k, v in jobs.items()}  # per-slot copies of the job fields
        slot["member"].fill_(-1)
        slot_pos = torch.zeros(S, dtype=torch.long, device=device)  # sampling position = tokens so far
        live = torch.zeros(S, dtype=torch.bool, device=device)
        hist = torch.zeros(S, max_new_tokens, dtype=torch.long)  # host copy of each slot's tokens so far
        out: list[list[int]] = [[] for _ in range(J)]
        reasons = [FINISH_LENGTH] * J
        n_live, next_job = 0, 0
        logits = None
        prefix_ids = self._shared_prefix(prompts, device)  # (1, Lp) or None
        # sample_tokens' all_greedy / any_filter: one sampling setting per call, so decided once
        flags = dict(all_greedy=bool(jobs["greedy"].all()), any_filter=sampling_filters(jobs["top_k"], jobs["top_p"]))

        def refill():
            nonlocal next_job, logits, n_live
            free.sort()  # lowest slots first, as the slots were first filled
            take = free[: J - next_job]
            del free[: len(take)]
            job_idx = list(range(next_job, next_job + len(take)))
            next_job += len(take)
            n_live += len(take)
            rows = torch.tensor(take, device=device)
            jidx = torch.tensor(job_idx, device=device)
            for k in slot:  # in place: the members tensor's version tells the population to regather
                slot[k][rows] = jobs[k][jidx]
            slot_pos[rows] = 0
            live[rows] = True
            for s, j in zip(take, job_idx):
                slot_job[s] = j
            members, prefix, skip = jobs["member"][jidx], None, 0
            if prefix_ids is not None:
                unique, inverse = torch.unique(members, return_inverse=True)
                if len(unique) < len(take):  # some member answers several of these prompts
                    with self._members_ctx(unique):
                        prefix = adapter.run_prefix(prefix_ids.expand(len(unique), -1), inverse)
                    skip = prefix.length
            T = max(len(prompts[j]) for j in job_idx) - skip
            ids = torch.full((len(take), T), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(take), T), dtype=torch.long)
            for b, j in enumerate(job_idx):  # left padding
                p = prompts[j][skip:]
                ids[b, T - len(p):] = torch.as_tensor(p, dtype=torch.long)
                mask[b, T - len(p):] = 1
            with self._members_ctx(members):
                kw = {"prefix": prefix} if prefix is not None else {}
                new = adapter.prefill(state, take, ids.to(device), mask.to(device), **kw)  # (R, V)
            if logits is None:
                logits = new.new_zeros(S, new.shape[-1])
            logits[rows] = new.to(logits.dtype)

        refill()
        end_codes = self._end_codes(logits.shape[-1], device)  # (V,)
        cols = torch.arange(S)
        while True:
            tok = sample_tokens(logits, slot["seed"], slot_pos, slot["temperature"], slot["top_k"],
                                slot["top_p"], slot["greedy"], **flags)  # (S,)
            slot_pos += 1
            # every slot's end as one expression; free slots get 0
            code = (end_codes[tok] + (slot_pos >= max_new_tokens) * END_LENGTH) * live  # (S,)
            tok_h, pos_h, code_h = torch.stack((tok, slot_pos, code)).cpu()  # the step's one host sync
            hist[cols, (pos_h - 1).clamp_(max=max_new_tokens - 1)] = tok_h  # free slots: scratch
            rows = code_h.nonzero().flatten()
            finished = self._finish(rows.tolist(), code_h[rows].tolist(), pos_h[rows].tolist(), hist,
                                    slot_job, out, reasons) if len(rows) else []
            if finished:
                live[torch.tensor(finished, device=device)] = False
                n_live -= len(finished)
                free.extend(finished)
            if not n_live and next_job >= J:
                break
            if n_live:
                with self._members_ctx(slot["member"]):
                    if static and self.population is not None:
                        self.population.gather_rows(factor_dtype)  # the captured hooks only read them
                    logits = adapter.decode(state, tok, step=step)  # (S, V)
            if finished:
                adapter.release(state, finished)
            if next_job < J and free:
                enough = len(free) >= max(1, int(self.refill_fraction * len(slot_job)))
                if not n_live or (self.continuous_batching and enough):
                    refill()
            elif not static and next_job >= J and n_live <= len(slot_job) // 2:
                # the queue is empty: shrink to the live slots so the tail decodes a smaller batch
                kept = [s for s, j in enumerate(slot_job) if j >= 0]
                state = adapter.compact(state, kept)
                keep = torch.tensor(kept, device=device)
                slot = {k: v[keep] for k, v in slot.items()}
                slot_pos, logits, live = slot_pos[keep], logits[keep], live[keep]
                hist, cols = hist[kept], torch.arange(len(kept))
                slot_job = [slot_job[s] for s in kept]
                free.clear()
        return GenerationOutput(out, reasons)

    MIN_SHARED_PREFIX = 4  # tokens; a shorter common prefix is not worth a second forward

    def _shared_prefix(self, prompts: list[list[int]], device) -> torch.Tensor | None:
        """The tokens every prompt starts with, leaving each prompt at least one token of its own
        (``(1, Lp)``), or None when sharing is off, unsupported or the prefix is short."""
        if not self.share_prompt_prefix or not hasattr(self.adapter, "run_prefix") or len(prompts) < 2:
            return None
        common = os.path.commonprefix([list(p) for p in prompts])  # elementwise, for any sequences
        common = common[: min(len(p) for p in prompts) - 1]
        if len(common) < self.MIN_SHARED_PREFIX:
            return None
        return torch.tensor([common], dtype=torch.long, device=device)

    def _finish(self, rows: list[int], codes: list[int], lengths: list[int], hist: torch.Tensor,
                slot_job: list[int], out: list[list[int]], reasons: list[str]) -> list[int]:
        """The slots among ``rows`` (with their end codes and token counts) whose job ends this step:
        on EOS, else on a stop string (decoding only the rows whose newest token may complete one),
        else at ``max_new_tokens``. Writes the jobs' completions and finish reasons."""
        maybe = [i for i, c in enumerate(codes) if c & END_MAY_STOP and not c & END_EOS]
        W = self._stops.window
        hit = self._stops.hits([hist[rows[i], max(0, lengths[i] - W):lengths[i]].tolist() for i in maybe])
        stopped = {rows[i] for i, h in zip(maybe, hit) if h}
        ended = [i for i, (s, c) in enumerate(zip(rows, codes)) if c & (END_EOS | END_LENGTH) or s in stopped]
        tokens = hist[[rows[i] for i in ended]].tolist()  # one conversion for all of them
        for i, toks in zip(ended, tokens):
            s, c, j = rows[i], codes[i], slot_job[rows[i]]
            out[j] = toks[:lengths[i]]
            reasons[j] = FINISH_EOS if c & END_EOS else FINISH_STOP if s in stopped else FINISH_LENGTH
            slot_job[s] = -1
        return [rows[i] for i in ended]
