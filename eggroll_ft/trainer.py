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

One step, as ``training_step`` reads: jobs (every member x every prompt, each with its sampling
seed ``noise.job_seed``) -> ``rollout`` (generation by the configured backend and scoring, sharded
over processes by ``distributed.run_sharded``) -> rewards ``(Q, N)`` -> fitness -> ES update.
``evaluate`` runs the same rollout: the unperturbed model, greedy.

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
from .distributed import check_replicas_equal, default_chunk_size, destroy_process_group_at_exit, run_sharded
from .engine import HFGenerateBackend, PopulationEngine, SamplingParams
from .es_update import apply_es_update, is_plain_sgd
from .models.loading import load_causal_lm, load_tokenizer
from .noise import NoiseConfig, job_seed, stream_key
from .population import UNPERTURBED, Population
from .replay import LOG_NAME, ReplayLog, ReplayResume, is_replay_log
from .reward_funcs import RewardLog, call_reward_funcs, combine_rewards, resolve_reward_func, reward_func_name
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
        self._metrics = defaultdict(list)  # per-step training metrics, averaged at each log
        self._reward_log = RewardLog()  # what reward functions pass to log_extra / log_metric
        self._replay_log = ReplayLog(self.population, os.path.join(args.output_dir, LOG_NAME)) if args.es_replay_log else None
        if self._replay_log is not None:
            self.add_callback(self._replay_log)
        self._replay_resume = None  # a ReplayResume while train() resumes from a replay log
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
        self.sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                       greedy=args.greedy)
        self.generation_backend = self._make_generation_backend(model, peft_config)
        self._backend_weights_step = 0  # vLLM: the global step whose weights it holds (the model as it is now)

    def _make_generation_backend(self, model, peft_config=None):
        """The backend named by ``args.generation_backend`` (contract: ``engine/backend.py``)."""
        a, tok = self.args, self.processing_class
        if a.generation_backend == "vllm":  # members as LoRA adapters of a vLLM engine (engine/vllm_backend.py)
            if peft_config is not None:
                raise ValueError("generation_backend='vllm' runs members as LoRA adapters of the base layers; with "
                                 "peft_config ES perturbs adapter matrices, which vLLM cannot: use "
                                 "generation_backend='engine'")
            from .engine.vllm_backend import VLLMPopulationBackend

            return VLLMPopulationBackend(
                model, self.population, eos_token_ids=self.eos_token_ids, tokenizer=tok, stop_strings=a.stop_strings,
                max_loras=a.vllm_max_loras, max_model_len=a.vllm_max_model_length,
                gpu_memory_utilization=a.vllm_gpu_memory_utilization, tensor_parallel_size=a.vllm_tensor_parallel_size,
                kv_cache_memory_bytes=int(a.generation_memory_gb * 2**30) if a.generation_memory_gb else None,
                max_num_seqs=a.max_sequences_in_flight, seed=a.seed)
        if a.generation_backend == "hf":
            return HFGenerateBackend(model, self.population, tok, self.eos_token_ids,
                                     max_batch_size=a.max_sequences_in_flight, stop_strings=a.stop_strings)
        return PopulationEngine(model, self.population, eos_token_ids=self.eos_token_ids, pad_token_id=tok.pad_token_id,
                                max_sequences_in_flight=a.max_sequences_in_flight, tokenizer=tok,
                                stop_strings=a.stop_strings, compile_decode=a.compile_decode,
                                memory_budget_bytes=int(a.generation_memory_gb * 2**30) if a.generation_memory_gb else None)

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
        t1 = time.perf_counter()
        fitness = self._shape_fitness(batch["rewards"])  # (N,)
        update_norm = self._es_update(fitness)
        t2 = time.perf_counter()
        self.state.num_input_tokens_seen += int(sum(batch["prompt_lengths"]) + sum(batch["completion_lengths"]))
        metrics = self._step_metrics(batch, fitness, update_norm, time.perf_counter() - t0)
        metrics.update({"es/rollout_time": t1 - t0, "es/update_time": t2 - t1})
        if metrics["frac_reward_zero_std"] == 1.0:
            self._warn_no_signal(step, num_prompts=batch["rewards"].shape[0])
        for key, value in metrics.items():
            self._metrics[key].append(value)
        if self.args.log_completions:
            self._last_table = self._completions_table(batch)
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

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
        """Every member answers every prompt of ``inputs``: the step's rollout, and its rewards ``(Q, N)``.

        Jobs are member-major: job ``j = member * Q + q``. Antithetic partners share their sampling
        seeds (``noise.job_seed``), and with ``common_sampling_noise`` all members do. Every process
        returns the same global results.
        """
        N, Q = self.args.population_size, len(inputs)
        members = torch.arange(N).repeat_interleave(Q)  # (J,)
        prompt_index = torch.arange(Q).repeat(N)  # (J,)
        noise_index = self.population.noise.noise_index(members)
        if self.args.common_sampling_noise:
            noise_index = torch.zeros_like(noise_index)
        seeds = job_seed(self.args.seed, self.state.global_step, noise_index, prompt_index)
        batch = self.rollout(inputs, prompt_index, members, seeds, self.sampling, keep_texts=self.args.log_completions)
        batch["rewards"] = batch["total_rewards"].view(N, Q).T.contiguous()  # (Q, N)
        return batch

    def rollout(self, inputs: list[dict], prompt_index: torch.Tensor, members: torch.Tensor, seeds: torch.Tensor,
                sampling: SamplingParams, keep_texts: bool = False) -> dict:
        """Generate and score jobs: job ``j`` answers ``inputs[prompt_index[j]]`` as member ``members[j]``
        with sampling seed ``seeds[j]`` (all ``(J,)``). The one rollout of training and evaluation.

        The jobs are cut into chunks of ``max_sequences_in_flight`` and shared among the processes
        (``distributed.run_sharded``); each process generates its chunks (``_generate``), scores
        them in one call (``_calculate_rewards``) and the per-job results are exchanged, so every
        process returns the same results, in job order: ``rewards_per_func (J, F)``,
        ``total_rewards (J,)``, ``completion_lengths``, ``finish_reasons``, ``completions`` (texts,
        "" unless ``keep_texts``), ``extra`` (columns logged by reward functions), ``reward_metrics``
        (their logged metrics, averaged over all processes) and the jobs' ``prompts``, ``members``,
        ``prompt_lengths``.
        """
        prompts = [x["prompt"] for x in inputs]
        prompt_ids = self._tokenize_prompts(self._prompt_texts(prompts))
        q_of = prompt_index.tolist()
        conversational = _is_conversational(prompts[0])

        def run(chunks):  # this process's share of the jobs
            jobs = [j for c in chunks for j in c]
            ids, reasons = [], []
            for chunk in chunks:  # one chunk = one batch: results do not depend on the process count
                idx = list(chunk)
                gen = self._generate([prompt_ids[q_of[j]] for j in idx], members[idx], seeds[idx], sampling)
                ids += gen.completion_ids
                reasons += gen.finish_reasons
            texts = self.processing_class.batch_decode(ids, skip_special_tokens=True)
            completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
            per_func = self._calculate_rewards([inputs[q_of[j]] for j in jobs], [prompts[q_of[j]] for j in jobs],
                                               completions, ids)  # (J_local, F)
            extra, reward_metrics = self._reward_log.flush(len(jobs))
            columns = {"per_func": per_func.tolist(), "length": [len(c) for c in ids], "reason": reasons,
                       **{f"extra/{k}": v for k, v in extra.items()}}
            if keep_texts:
                columns["text"] = texts
            return columns, reward_metrics

        J, world = len(q_of), self.accelerator.num_processes
        chunk_size = default_chunk_size(J, world, self.args.max_sequences_in_flight)
        columns, logged = run_sharded(J, chunk_size, run, world_size=world, rank=self.accelerator.process_index)
        per_func = torch.tensor(columns["per_func"], dtype=torch.float32).reshape(J, len(self.reward_funcs))
        return {
            "prompts": [prompts[q] for q in q_of], "members": members, "prompt_lengths": [len(prompt_ids[q]) for q in q_of],
            "completions": columns["text"] if keep_texts else [""] * J, "completion_lengths": columns["length"],
            "finish_reasons": columns["reason"], "rewards_per_func": per_func,
            "total_rewards": combine_rewards(per_func, self.reward_weights),  # (J,)
            "extra": {k[len("extra/"):]: v for k, v in columns.items() if k.startswith("extra/")},
            "reward_metrics": _mean_of_logged(logged),
        }

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

    def _generate(self, prompt_ids: list[list[int]], members: torch.Tensor, seeds: torch.Tensor,
                  sampling: SamplingParams | None = None):
        """Completions of one chunk of jobs from ``generation_backend`` (``sampling``: the training
        sampling by default); returns a ``GenerationOutput``.

        A backend with its own copy of the weights (vLLM) gets them pushed at the first generation
        after an update changed them, so optimizer steps taken after ``training_step`` count too."""
        if hasattr(self.generation_backend, "sync") and self._backend_weights_step != self.state.global_step:
            self.generation_backend.sync()
            self._backend_weights_step = self.state.global_step
        return self.generation_backend.generate(prompt_ids, members, seeds, self.args.max_completion_length,
                                                sampling or self.sampling)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list) -> torch.Tensor:
        """``(num_completions, num_reward_funcs)`` rewards, NaN where a function returned None."""
        keys = [k for k in inputs[0] if k not in ("prompt", "completion", "completion_ids")]
        columns = {k: [x[k] for x in inputs] for k in keys}
        return call_reward_funcs(self.reward_funcs, self.reward_func_names, prompts, completions,
                                 completion_ids_list, columns, trainer_state=self.state, log=self._reward_log)

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
    def _step_metrics(self, batch: dict, fitness: torch.Tensor, update_norm: float, seconds: float) -> dict:
        """One training step's metrics (GRPO's names, plus ``es/`` and ``fitness/``)."""
        m = _reward_metrics(batch, self.reward_func_names)
        per_member = torch.nanmean(batch["rewards"], dim=0)  # raw fitness, before shaping
        sigma = self.population.sigma
        if is_plain_sgd(self.optimizer):
            # the step's RMS per perturbed weight in units of sigma (lr ||g|| / (sqrt(P) sigma)): how
            # far one update moves the weights compared with the members' own perturbations
            lr = self.optimizer.param_groups[0]["lr"]
            m["es/step_over_sigma"] = lr * update_norm / (math.sqrt(self.population.num_perturbed_parameters()) * sigma)
        m.update({"step_time": seconds, "es/sigma": sigma, "es/update_norm": update_norm,
                  "fitness/raw_mean": float(torch.nanmean(per_member)),
                  "fitness/raw_max": float(per_member.nan_to_num(-math.inf).max()),
                  "fitness/raw_min": float(per_member.nan_to_num(math.inf).min()),
                  "fitness/shaped_std": float(fitness.std(unbiased=False))})
        if self.args.es_debug_checksum:
            checksum = self.weight_checksum()
            check_replicas_equal(checksum, self.accelerator.num_processes)
            m["es/weight_checksum"] = checksum
        return m

    def _completions_table(self, batch: dict) -> dict:
        """The step's completions table (``log_completions``): one row per job, TRL's columns plus
        ``member``, and the columns reward functions logged with ``log_extra``."""
        return {
            "step": [self.state.global_step] * len(batch["prompts"]),
            "member": batch["members"].tolist(),
            "prompt": [str(p) for p in batch["prompts"]],
            "completion": batch["completions"],
            **{name: batch["rewards_per_func"][:, i].tolist() for i, name in enumerate(self.reward_func_names)},
            **batch["extra"],
            "reward": batch["total_rewards"].tolist(),
        }

    def weight_checksum(self) -> float:
        """Sum of all perturbed weights in float64: a cheap cross-rank equality check."""
        return float(sum(p.weight.detach().double().sum() for p in self.population.params.values()))

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """A training record gets the steps' metrics averaged since the last one (NaN skipped, as in
        TRL); an evaluation record (``eval_*`` keys, from ``evaluate``) is logged as given."""
        if not any(k.startswith("eval_") for k in logs):
            averaged = {}
            for key, vals in self._metrics.items():
                valid = [v for v in vals if not math.isnan(v)]
                averaged[key] = sum(valid) / len(valid) if valid else None
            self._metrics.clear()
            logs = {**logs, **averaged, "num_tokens": self.state.num_input_tokens_seen}
            logs.pop("grad_norm", None)  # ES has no gradient; es/update_norm is the direction's norm
            if self.args.log_completions and self._last_table is not None and self.is_world_process_zero():
                self._write_completions_table()
        super().log(logs, start_time)

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
        """Rewards of the unperturbed model on the eval prompts, greedy, logged as ``eval_*``.

        Runs the training rollout (``rollout``): the configured generation backend, the jobs shared
        among the processes, every process returning the same metrics. The per-problem rewards
        ``(num_problems, num_reward_funcs)`` (NaN where a function returned None) are kept in
        ``self.last_eval_rewards``, for paired tests of a change.
        """
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset")
        rows = [dataset[i] for i in range(len(dataset))]
        E = len(rows)
        out = self.rollout(rows, torch.arange(E), torch.full((E,), UNPERTURBED), torch.zeros(E, dtype=torch.long),
                           SamplingParams(greedy=True))
        self.last_eval_rewards = out["rewards_per_func"]
        p = metric_key_prefix
        metrics = {f"{p}_reward": float(torch.nanmean(out["total_rewards"]))}
        for i, name in enumerate(self.reward_func_names):
            metrics[f"{p}_rewards/{name}/mean"] = float(torch.nanmean(out["rewards_per_func"][:, i]))
        metrics[f"{p}_completions/mean_length"] = sum(out["completion_lengths"]) / E
        metrics.update({f"{p}_{name}": v for name, v in out["reward_metrics"].items()})
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def _mean_of_logged(per_process: list[dict[str, tuple[float, int]]]) -> dict[str, float]:
    """Each metric reward functions logged (``log_metric``): the mean of every value any process
    logged (TRL's rule), from each process's ``{name: (sum, count)}``.

    >>> _mean_of_logged([{"hit": (1.0, 2)}, {"hit": (2.0, 2), "len": (3.0, 1)}])
    {'hit': 0.75, 'len': 3.0}
    """
    totals = defaultdict(lambda: [0.0, 0])
    for metrics in per_process:
        for name, (total, count) in metrics.items():
            totals[name][0] += total
            totals[name][1] += count
    return {name: total / count for name, (total, count) in sorted(totals.items()) if count}


def _reward_metrics(batch: dict, reward_func_names: list[str]) -> dict:
    """GRPO's reward and completion metrics of a step, from its rollout and rewards table ``(Q, N)``."""
    total, table = batch["total_rewards"], batch["rewards"]
    valid = ~torch.isnan(total)
    group_std = torch.stack([row[~torch.isnan(row)].std(unbiased=False) if (~torch.isnan(row)).sum() > 0
                             else torch.tensor(math.nan) for row in table])  # (Q,): spread among the members
    m = {"reward": float(total[valid].mean()) if valid.any() else math.nan,
         "reward_std": float(torch.nanmean(group_std)),
         "frac_reward_zero_std": float((group_std < 1e-6).float().mean())}
    for i, name in enumerate(reward_func_names):
        col = batch["rewards_per_func"][:, i]
        col = col[~torch.isnan(col)]
        m[f"rewards/{name}/mean"] = float(col.mean()) if col.numel() else math.nan
        m[f"rewards/{name}/std"] = float(col.std(unbiased=False)) if col.numel() else math.nan
    m.update(batch["reward_metrics"])  # what the reward functions logged with log_metric
    lengths = torch.tensor(batch["completion_lengths"], dtype=torch.float32)
    clipped = torch.tensor([r == "length" for r in batch["finish_reasons"]])
    term = lengths[~clipped]
    m.update({"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
              "completions/max_length": float(lengths.max()),
              "completions/clipped_ratio": float(clipped.float().mean()),
              "completions/mean_terminated_length": float(term.mean()) if term.numel() else 0.0})
    return m
