"""EggrollTrainer: evolution-strategies fine-tuning with TRL's GRPOTrainer interface.

What changes from GRPO, and why (EGGROLL, Sarkar et al. 2025, arXiv 2511.16652):

1. No gradients. Each step evaluates a population of ``N`` perturbed copies of the model; member
   ``i`` runs ``W + sigma * E_i`` with low-rank ``E_i = A_i B_i^T / sqrt(r)`` on every perturbed
   linear layer. The copies are never materialised: each batch row runs its own member
   (``population.Population``), so a population costs about one batched inference.
2. Groups are members, not samples. Every member answers the same ``prompts_per_step`` prompts;
   the "group" of a prompt is the population (GRPO: ``num_generations`` samples of one policy).
3. Fitness replaces advantages. Rewards (same reward functions, same protocol) are shaped per
   prompt (``shaping.py``) and averaged into one fitness per member. Higher is better.
4. The update is the ES estimator ``g = 1/(N sigma) sum_i f_i E_i``, one matmul per weight
   (``es_update.py``), applied through the optimizer and LR scheduler of ``transformers.Trainer``
   (plain SGD ascent by default, in place). No KL term, no reference model, no clipping.
5. Noise is a pure function of ``(seed, step, weight name, pair)``: nothing is stored, every
   process regenerates it, and only fitness scalars cross processes.

Override points for subclasses: ``_generate_and_score_completions``, ``_generate``,
``_calculate_rewards``, ``_shape_fitness``, ``_es_update``.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from collections import defaultdict

import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler
from transformers import Trainer
from transformers.trainer_utils import set_seed

from .config import EggrollConfig
from .distributed import (check_replicas_equal, default_chunk_size, destroy_process_group_at_exit, gather_objects,
                          local_chunks, raise_first_error, stack_rows, warn_if_cpu_multiprocess_ignored)
from .engine import PopulationEngine, SamplingParams
from .es_update import apply_es_update, is_plain_sgd
from .models.loading import load_causal_lm, load_tokenizer
from .noise import NoiseConfig, _splitmix64, stream_key
from .population import Population
from .replay import LOG_NAME, ReplayLog, ReplayResume, is_replay_log
from .reward_funcs import call_reward_funcs, combine_rewards, resolve_reward_func, reward_func_name
from .shaping import shape_fitness

PEFT_PERTURB_MODULES = r".*\.lora_[AB]\.[^.]+"


class _EpochShuffleSampler(Sampler):
    """A permutation of the dataset per epoch, seeded by ``(seed, epoch)``: the same on every
    process (all members answer the same prompts) and after a resume."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(stream_key(self.seed, "prompts", self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


class _EpochBatchSampler(BatchSampler):
    """Batches of the epoch's permutation. Its ``set_epoch`` is how a resumed run reaches the
    sampler: ``transformers.Trainer`` resumes mid-epoch through accelerate's ``skip_first_batches``,
    a new loader that wraps this batch sampler, and calls ``set_epoch`` on the wrapped one."""

    def set_epoch(self, epoch: int):
        self.sampler.set_epoch(epoch)


class _PromptLoader(DataLoader):
    def set_epoch(self, epoch: int):
        self.batch_sampler.set_epoch(epoch)


def _identity(batch):
    return batch


def _is_conversational(prompt) -> bool:
    return isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict) and "role" in prompt[0]


class EggrollTrainer(Trainer):
    """Evolution-strategies trainer with ``trl.GRPOTrainer``'s constructor and reward protocol.

    Args:
        model: a model object, a hub id or a local path (HF causal LM or RWKV-7 checkpoint).
        reward_funcs: a reward function or a list of them (callables, or names/"module:function").
        args: an ``EggrollConfig``.
        train_dataset / eval_dataset: datasets with a ``prompt`` column (text or chat messages).
        processing_class: the tokenizer (loaded from the model's path when omitted).
        peft_config: a PEFT config; ES then perturbs and updates only the adapter matrices.
    """

    _tag_names = ["eggroll", "evolution-strategies"]

    def __init__(self, model, reward_funcs, args: EggrollConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None, callbacks=None,
                 optimizers=(None, None), peft_config=None):
        if args is None:
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "model")
            args = EggrollConfig(f"{str(name).rstrip('/').split('/')[-1]}-Eggroll")
        if not isinstance(args, EggrollConfig):
            raise TypeError(f"args must be an EggrollConfig, got {type(args).__name__}")
        set_seed(args.seed)
        warn_if_cpu_multiprocess_ignored()
        model_id = model if isinstance(model, str) else None
        if isinstance(model, str):
            model = load_causal_lm(model, **(args.model_init_kwargs or {}))
        if peft_config is not None:
            from peft import get_peft_model

            set_seed(args.seed)  # the adapter's initial values depend on the seed alone: replay.load_base rebuilds them
            model = get_peft_model(model, peft_config)
        if processing_class is None:
            processing_class = load_tokenizer(model, model_id)
        if getattr(processing_class, "pad_token_id", None) is None and hasattr(processing_class, "eos_token"):
            processing_class.pad_token = processing_class.eos_token
        self._check_dataset(train_dataset, "train_dataset", required=True)
        self._check_dataset(eval_dataset, "eval_dataset", required=False)

        # reward functions
        if not isinstance(reward_funcs, (list, tuple)):
            reward_funcs = [reward_funcs]
        if not reward_funcs:
            raise ValueError("reward_funcs must name at least one reward function")
        self.reward_funcs = [resolve_reward_func(f) for f in reward_funcs]
        self.reward_func_names = [reward_func_name(f) for f in self.reward_funcs]
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(weights)} entries but there are {len(self.reward_funcs)} "
                             "reward functions")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)

        # the population: hooks on the chosen linear layers; every other parameter frozen
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)  # ES needs no autograd; also keeps accelerate from wrapping in DDP
        perturb = args.perturb_modules
        if perturb is None and peft_config is not None:
            perturb = PEFT_PERTURB_MODULES
        self.population = Population(model, NoiseConfig(seed=args.seed, rank=args.rank, antithetic=args.antithetic,
                                                        noise_reuse=args.noise_reuse, full_rank=args.full_rank),
                                     args.population_size, args.sigma, perturb, args.exclude_modules)

        super().__init__(model=model, args=args, data_collator=_identity, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers)
        self._replay_log = ReplayLog(self.population, os.path.join(args.output_dir, LOG_NAME)) if args.es_replay_log else None
        if self._replay_log is not None:
            self.add_callback(self._replay_log)
        self._replay_resume = None  # a ReplayResume while train() resumes from a replay log
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._last_table = None
        self.last_eval_rewards: torch.Tensor | None = None  # (num_problems, num_reward_funcs) of the last evaluate()
        self._warned_no_signal = False
        if self.accelerator.num_processes > 1:
            destroy_process_group_at_exit()  # else gloo may abort the finished process at exit
        # ES exchanges fitness, never gradients: prepare the model as for evaluation, so accelerate
        # places it but never wraps it in DistributedDataParallel (no gradient hooks, no broadcasts).
        prepare_model = self.accelerator.prepare_model
        self.accelerator.prepare_model = lambda m, device_placement=None, evaluation_mode=False: prepare_model(
            m, device_placement=device_placement, evaluation_mode=True)
        tok = processing_class
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if getattr(tok, "eos_token_id", None) is not None and tok.eos_token_id not in eos:
            eos.insert(0, tok.eos_token_id)
        self.eos_token_ids = eos
        self.engine = PopulationEngine(model, self.population, eos_token_ids=eos, pad_token_id=tok.pad_token_id,
                                       max_sequences_in_flight=args.max_sequences_in_flight, tokenizer=tok,
                                       stop_strings=args.stop_strings, compile_decode=args.compile_decode,
                                       memory_budget_bytes=int(args.generation_memory_gb * 2**30)
                                       if args.generation_memory_gb else None)

    # ---- data -------------------------------------------------------------------------------
    @staticmethod
    def _check_dataset(dataset, name: str, required: bool):
        if dataset is None:
            if required:
                raise ValueError(f"{name} is required: a dataset with a 'prompt' column")
            return
        if isinstance(dataset, dict):
            for k, v in dataset.items():
                EggrollTrainer._check_dataset(v, f"{name}[{k!r}]", required)
            return
        columns = getattr(dataset, "column_names", None)
        if columns is not None and "prompt" not in columns:
            raise ValueError(f"{name} has no 'prompt' column (columns: {columns})")
        if hasattr(dataset, "__len__") and len(dataset) == 0:
            raise ValueError(f"{name} is empty")

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt"]

    def get_train_dataloader(self):
        """``prompts_per_step`` prompts per step, identical on every process."""
        ds = self.train_dataset
        batches = _EpochBatchSampler(_EpochShuffleSampler(len(ds), self.args.seed), self.args.prompts_per_step,
                                     drop_last=False)
        return _PromptLoader(ds, batch_sampler=batches, collate_fn=_identity)

    def create_optimizer(self, model=None):
        """The optimizer over the perturbed weights only (the paper's default: plain SGD)."""
        if self.optimizer is None:
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model or self.model)
            params = [p.weight for p in self.population.params.values()]
            self.optimizer = cls([{"params": params, "weight_decay": self.args.weight_decay}], **kwargs)
        return self.optimizer

    # ---- resuming from a replay log (replay.py) ------------------------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        """``transformers.Trainer.train``; ``resume_from_checkpoint`` may also be a replay log
        (``es_replay.jsonl``) of a run that started from this trainer's model."""
        if not is_replay_log(resume_from_checkpoint):
            return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)
        self._replay_resume = ReplayResume(resume_from_checkpoint, self.args)
        if self._replay_log is not None:
            self._replay_log.resume_history = self._replay_resume.history
        try:
            return super().train(self._replay_resume.checkpoint_dir, trial, ignore_keys_for_eval)
        finally:
            self._replay_resume.close()
            self._replay_resume = None
            if self._replay_log is not None:
                self._replay_log.resume_history = None

    def _resuming_from_log(self, checkpoint) -> bool:
        return self._replay_resume is not None and checkpoint == self._replay_resume.checkpoint_dir

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self._resuming_from_log(resume_from_checkpoint):  # else replayed with the optimizer, below
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if not self._resuming_from_log(checkpoint):
            return super()._load_optimizer_and_scheduler(checkpoint)
        self._replay_resume.replay(self.population, self.model, self.optimizer, self.lr_scheduler, self.args)

    # ---- one ES step --------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        t0 = time.perf_counter()
        step = self.state.global_step
        self.population.set_step(step, self.args.sigma_at(step))
        batch = self._generate_and_score_completions(inputs)
        fitness = self._shape_fitness(batch["rewards"])  # (N,)
        update_norm = self._es_update(fitness)
        self._record_metrics(batch, fitness, update_norm, time.perf_counter() - t0)
        if self._metrics["train"]["frac_reward_zero_std"][-1] == 1.0:
            self._warn_no_signal(step, num_prompts=batch["rewards"].shape[0])
        return torch.tensor(0.0, device=self.args.device)

    def _warn_no_signal(self, step: int, num_prompts: int) -> None:
        """Once per run: a step where no prompt's rewards differed between members. Its fitness then
        carries no information (under ``group_norm``, ``zscore`` and ``centered_rank`` it is zero, and
        so is the update), which neither the reward curve nor a loss would show."""
        if self._warned_no_signal or not self.is_world_process_zero():
            return
        self._warned_no_signal = True
        a = self.args
        decoding = "greedy decoding" if a.greedy else f"temperature={a.temperature}"
        warnings.warn(f"step {step}: all {a.population_size} members got the same reward on each of the {num_prompts} "
                      "prompts (frac_reward_zero_std=1.0): this ES step has no signal to follow. With "
                      f"sigma={self.population.sigma:g} and {decoding}, the members may write identical completions: "
                      "raise sigma, sample (greedy=False, temperature > 0), use more prompts per step, or prompts "
                      "the model sometimes solves. Warned once per run; the logged metric frac_reward_zero_std "
                      "tracks it.", RuntimeWarning, stacklevel=2)

    def _job_seeds(self, members: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        """Sampling seed of each (member, prompt) job. Antithetic partners share it (common random
        numbers), so a pair differs only by the sign of its perturbation; with
        ``common_sampling_noise`` all members share it."""
        noise_idx = self.population.noise.noise_index(members)
        if self.args.common_sampling_noise:
            noise_idx = torch.zeros_like(noise_idx)
        key = stream_key(self.args.seed, "sampling", self.state.global_step)
        return _splitmix64(torch.tensor(key) ^ (noise_idx * 1_000_003 + prompt_index))

    def _prompt_texts(self, prompts) -> list[str]:
        tok = self.processing_class
        if _is_conversational(prompts[0]):
            return [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True,
                                            **(self.args.chat_template_kwargs or {})) for p in prompts]
        return list(prompts)

    def _tokenize_prompts(self, texts: list[str]) -> list[list[int]]:
        ids = self.processing_class(texts, add_special_tokens=False)["input_ids"]
        limit = self.args.max_prompt_length
        return [list(x[-limit:]) if limit else list(x) for x in ids]

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
        """Every member answers every prompt of ``inputs``; returns completions and rewards.

        Jobs are member-major: job ``j = member * Q + q``. Each process generates and scores its
        chunks of jobs (``distributed.local_chunks``); the per-job rewards, lengths and finish
        reasons (and texts when logging completions) are gathered, so every process returns the
        same global ``rewards`` table ``(Q, N)``.
        """
        N, Q = self.args.population_size, len(inputs)
        prompts = [x["prompt"] for x in inputs]
        prompt_ids = self._tokenize_prompts(self._prompt_texts(prompts))
        members = torch.arange(N).repeat_interleave(Q)  # (J,)
        qidx = torch.arange(Q).repeat(N)  # (J,)
        seeds = self._job_seeds(members, qidx)
        q_of = qidx.tolist()
        J, world, rank = N * Q, self.accelerator.num_processes, self.accelerator.process_index
        chunks = local_chunks(J, default_chunk_size(J, world, self.args.max_sequences_in_flight), world, rank)
        local = [j for c in chunks for j in c]
        conversational = _is_conversational(prompts[0])
        result = {"jobs": local}
        try:
            ids, reasons = [], []
            for chunk in chunks:
                idx = list(chunk)
                gen = self._generate([prompt_ids[q_of[j]] for j in idx], members[idx], seeds[idx])
                ids += gen.completion_ids
                reasons += gen.finish_reasons
            texts = self.processing_class.batch_decode(ids, skip_special_tokens=True)
            completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
            per_func = self._calculate_rewards([inputs[q_of[j]] for j in local], [prompts[q_of[j]] for j in local],
                                               completions, ids)  # (J_local, F)
            result.update(per_func=per_func.tolist(), lengths=[len(c) for c in ids], reasons=reasons,
                          texts=texts if self.args.log_completions else None)
        except Exception as e:
            if world == 1:
                raise
            result["error"] = f"{type(e).__name__}: {e}"  # every rank raises it after the gather below
        results = gather_objects(result, world)
        raise_first_error(results)
        order = [j for r in results for j in r["jobs"]]
        F = len(self.reward_funcs)
        per_func = stack_rows([torch.tensor(row, dtype=torch.float32).reshape(F) for r in results for row in r["per_func"]],
                              order, J, F)
        lengths, reasons, texts = [0] * J, [""] * J, [""] * J
        for r in results:
            for k, j in enumerate(r["jobs"]):
                lengths[j], reasons[j] = r["lengths"][k], r["reasons"][k]
                texts[j] = r["texts"][k] if r["texts"] is not None else ""
        total = combine_rewards(per_func, self.reward_weights)  # (J,)
        return {
            "prompts": [prompts[q] for q in q_of], "completions": texts, "completion_lengths": lengths,
            "members": members, "finish_reasons": reasons,
            "prompt_lengths": [len(prompt_ids[q]) for q in q_of],
            "rewards_per_func": per_func, "total_rewards": total,
            "rewards": total.view(N, Q).T.contiguous(),  # (Q, N)
        }

    def _generate(self, prompt_ids: list[list[int]], members: torch.Tensor, seeds: torch.Tensor):
        """Completions for the jobs (engine by default; ``generation_backend='hf'`` uses ``generate``)."""
        a = self.args
        sp = SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, greedy=a.greedy)
        if a.generation_backend == "engine":
            return self.engine.generate(prompt_ids, members=members, seeds=seeds,
                                        max_new_tokens=a.max_completion_length, sampling=sp)
        return self._hf_generate(prompt_ids, members, sp)

    @torch.no_grad()
    def _hf_generate(self, prompt_ids, members, sp: SamplingParams):
        """Fallback: Hugging Face ``generate`` on the population model (global-RNG sampling, seeded per step)."""
        from .engine import GenerationOutput
        from .engine.engine import FINISH_EOS, FINISH_LENGTH

        tok, device = self.processing_class, self.args.device
        chunk = self.args.max_sequences_in_flight or len(prompt_ids)
        ids_out, reasons = [], []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_key(self.args.seed, "hf-sampling", self.state.global_step) % (2**63))
            for s in range(0, len(prompt_ids), chunk):
                batch = tok.pad({"input_ids": prompt_ids[s:s + chunk]}, padding=True, return_tensors="pt")
                with self.population.members(members[s:s + chunk]):
                    out = self.model.generate(
                        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                        max_new_tokens=self.args.max_completion_length, do_sample=not sp.greedy,
                        temperature=sp.temperature if not sp.greedy else None, top_p=sp.top_p if not sp.greedy else None,
                        top_k=sp.top_k if not sp.greedy else None, eos_token_id=self.eos_token_ids,
                        pad_token_id=tok.pad_token_id)
                for row in out[:, batch["input_ids"].shape[1]:].tolist():
                    end = next((i + 1 for i, t in enumerate(row) if t in self.eos_token_ids), None)
                    ids_out.append(row[:end] if end else row)
                    reasons.append(FINISH_EOS if end else FINISH_LENGTH)
        return GenerationOutput(ids_out, reasons)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list) -> torch.Tensor:
        """``(num_completions, num_reward_funcs)`` rewards, NaN where a function returned None."""
        keys = [k for k in inputs[0] if k not in ("prompt", "completion", "completion_ids")]
        columns = {k: [x[k] for x in inputs] for k in keys}
        return call_reward_funcs(self.reward_funcs, self.reward_func_names, prompts, completions,
                                 completion_ids_list, columns, trainer_state=self.state)

    def _shape_fitness(self, rewards: torch.Tensor) -> torch.Tensor:
        """``(num_prompts, N)`` rewards -> ``(N,)`` fitness (higher is better)."""
        return shape_fitness(rewards, self.args.fitness_shaping)

    def _es_update(self, fitness: torch.Tensor) -> float:
        """Apply ``lr * g``: in place for plain SGD, else ``W.grad = -g`` for the Trainer's ``optimizer.step()``."""
        lr = self.optimizer.param_groups[0]["lr"]
        if self._replay_log is not None:  # durable before the update lands
            self._replay_log.write_step(self.state.global_step, self.population.sigma, lr, fitness)
        return apply_es_update(self.population, fitness, self.optimizer, lr=lr)

    # ---- metrics and logging ------------------------------------------------------------------
    def _record_metrics(self, batch, fitness, update_norm, seconds, mode="train"):
        m = self._metrics[mode]
        total = batch["total_rewards"]
        table = batch["rewards"]  # (Q, N)
        valid = ~torch.isnan(total)
        m["reward"].append(float(total[valid].mean()) if valid.any() else math.nan)
        group_std = torch.stack([row[~torch.isnan(row)].std(unbiased=False) if (~torch.isnan(row)).sum() > 0
                                 else torch.tensor(math.nan) for row in table])
        m["reward_std"].append(float(torch.nanmean(group_std)))
        m["frac_reward_zero_std"].append(float((group_std < 1e-6).float().mean()))
        for i, name in enumerate(self.reward_func_names):
            col = batch["rewards_per_func"][:, i]
            col = col[~torch.isnan(col)]
            m[f"rewards/{name}/mean"].append(float(col.mean()) if col.numel() else math.nan)
            m[f"rewards/{name}/std"].append(float(col.std(unbiased=False)) if col.numel() else math.nan)
        lengths = torch.tensor(batch["completion_lengths"], dtype=torch.float32)
        clipped = torch.tensor([r == "length" for r in batch["finish_reasons"]])
        m["completions/mean_length"].append(float(lengths.mean()))
        m["completions/min_length"].append(float(lengths.min()))
        m["completions/max_length"].append(float(lengths.max()))
        m["completions/clipped_ratio"].append(float(clipped.float().mean()))
        term = lengths[~clipped]
        m["completions/mean_terminated_length"].append(float(term.mean()) if term.numel() else 0.0)
        self.state.num_input_tokens_seen += int(sum(batch["prompt_lengths"]) + lengths.sum())
        m["step_time"].append(seconds)
        if mode == "train":
            per_member = torch.nanmean(table, dim=0)  # raw fitness, before shaping
            m["es/sigma"].append(self.population.sigma)
            m["es/update_norm"].append(update_norm)
            m["fitness/raw_mean"].append(float(torch.nanmean(per_member)))
            m["fitness/raw_max"].append(float(per_member.nan_to_num(-math.inf).max()))
            m["fitness/raw_min"].append(float(per_member.nan_to_num(math.inf).min()))
            m["fitness/shaped_std"].append(float(fitness.std(unbiased=False)))
            if self.args.es_debug_checksum:
                checksum = self.weight_checksum()
                check_replicas_equal(checksum, self.accelerator.num_processes)
                m["es/weight_checksum"].append(checksum)
        if self.args.log_completions:
            self._last_table = {
                "step": [self.state.global_step] * len(batch["prompts"]),
                "member": batch["members"].tolist(),
                "prompt": [str(p) for p in batch["prompts"]],
                "completion": batch["completions"],
                **{name: batch["rewards_per_func"][:, i].tolist() for i, name in enumerate(self.reward_func_names)},
                "reward": total.tolist(),
            }

    def weight_checksum(self) -> float:
        """Sum of all perturbed weights in float64: a cheap cross-rank equality check."""
        return float(sum(p.weight.detach().double().sum() for p in self.population.params.values()))

    def log(self, logs: dict, start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        metrics = {}
        for key, vals in self._metrics[mode].items():
            valid = [v for v in vals if not math.isnan(v)]
            metrics[key] = sum(valid) / len(valid) if valid else None
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        if mode == "train":
            metrics["num_tokens"] = self.state.num_input_tokens_seen
        logs = {**logs, **metrics}
        logs.pop("grad_norm", None)  # ES has no gradient; es/update_norm is the direction's norm
        super().log(logs, start_time)
        self._metrics[mode].clear()
        if self.args.log_completions and self._last_table is not None and self.is_world_process_zero():
            self._write_completions_table()

    def _write_completions_table(self):
        import pandas as pd

        df = pd.DataFrame(self._last_table)
        out = os.path.join(self.args.output_dir, "completions")
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"completions_{self.state.global_step:05d}.parquet")
        df.to_parquet(path + ".tmp")
        os.replace(path + ".tmp", path)
        if self.args.num_completions_to_print:
            print(df.head(self.args.num_completions_to_print).to_string())
        if self.args.report_to and "wandb" in self.args.report_to:
            import wandb

            if wandb.run is not None:
                wandb.log({"completions": wandb.Table(dataframe=df)})

    def _save(self, output_dir: str | None = None, state_dict=None):
        """Models with their own ``save_pretrained`` that are not transformers models (RWKV-7) write
        their config with the weights; everything else is saved as ``transformers.Trainer`` does."""
        from transformers import PreTrainedModel
        from transformers.trainer import TRAINING_ARGS_NAME

        model = self.accelerator.unwrap_model(self.model)
        if isinstance(model, PreTrainedModel) or not hasattr(model, "save_pretrained") or hasattr(model, "peft_config"):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir)
        if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Rewards of the unperturbed model on the eval prompts (greedy), logged as ``eval_*``.

        The per-problem rewards ``(num_problems, num_reward_funcs)`` (NaN where a function returned
        None) are kept in ``self.last_eval_rewards``, for paired tests of a change."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset")
        rows = [dataset[i] for i in range(len(dataset))]
        prompts = [r["prompt"] for r in rows]
        prompt_ids = self._tokenize_prompts(self._prompt_texts(prompts))
        gen = self.engine.generate(prompt_ids, members=-1, seeds=0, max_new_tokens=self.args.max_completion_length,
                                   sampling=SamplingParams(greedy=True))
        texts = self.processing_class.batch_decode(gen.completion_ids, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if _is_conversational(prompts[0]) else texts
        per_func = self._calculate_rewards(rows, prompts, completions, gen.completion_ids)
        self.last_eval_rewards = per_func
        total = combine_rewards(per_func, self.reward_weights)
        metrics = {f"{metric_key_prefix}_reward": float(torch.nanmean(total))}
        for i, name in enumerate(self.reward_func_names):
            metrics[f"{metric_key_prefix}_rewards/{name}/mean"] = float(torch.nanmean(per_func[:, i]))
        metrics[f"{metric_key_prefix}_completions/mean_length"] = float(sum(gen.lengths) / max(len(gen.lengths), 1))
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
