"""EggrollConfig: the training arguments of an ES run, a drop-in for TRL's ``GRPOConfig``.

It extends ``transformers.TrainingArguments`` (so ``output_dir``, ``max_steps``, ``seed``,
``report_to``, ``logging_steps``, ``save_steps``, ``optim``, ``lr_scheduler_type`` ... work as
users know them) and reuses GRPOConfig's names where the meaning is the same
(``max_completion_length``, ``temperature``, ``top_p``, ``top_k``, ``reward_weights``,
``log_completions`` ...). GRPO-only fields are accepted so that a GRPO script runs unchanged,
and are listed in ``GRPO_ONLY_FIELDS``: they have no meaning for ES and a warning says so.

Every field is validated at construction; errors name the field and its value.

The launch is checked here too, before ``TrainingArguments`` sets up the devices (``launch``
section below): several CPU processes started without ``use_cpu`` join their gloo group instead of
each training alone, and a launch this process cannot join fails with the fix in the message.

Update convention (README, "Mapping onto the paper"): with shaped fitness ``f`` and unit-variance
noise ``E_i``, the ES direction is ``g = 1/(N sigma) sum_i f_i E_i`` and plain SGD does
``W += learning_rate * g``. A paper or code base that writes ``W += alpha/N sum_i f_i E_i``
(no ``1/sigma``) corresponds to ``learning_rate = alpha * sigma``.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

logger = logging.getLogger(__name__)

SHAPINGS = ("group_norm", "zscore", "centered_rank", "none")  # fitness shaping methods (shaping.py)
SIGMA_SCHEDULES = ("constant", "exponential", "linear")
GENERATION_BACKENDS = ("engine", "hf", "vllm")
VLLM_MODES = ("colocate",)  # vLLM runs in the trainer's process (TRL's "server" mode is not supported)

# GRPOConfig fields accepted for drop-in compatibility; ES has no use for them.
GRPO_ONLY_FIELDS = {
    "num_generations": None, "num_generations_eval": None, "beta": 0.0, "num_iterations": 1,
    "epsilon": 0.2, "epsilon_high": None, "loss_type": "dapo", "scale_rewards": "group",
    "mask_truncated_completions": False, "steps_per_generation": None, "generation_batch_size": None,
    "importance_sampling_level": "token", "disable_dropout": False, "top_entropy_quantile": 1.0,
    "use_liger_kernel": False,
    # ES's update needs no memory beyond the weights, so vLLM stays awake between generations
    "vllm_enable_sleep_mode": False,
}


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class EggrollConfig(TrainingArguments):
    """Configuration of ``EggrollTrainer``. Every field has a one-line help (``--help`` prints it)."""

    # ---- ES: population and noise --------------------------------------------------------
    population_size: int = _help("Number of population members N evaluated per ES step (even when antithetic).", default=32)
    sigma: float = _help("Noise scale: member i runs W + sigma * E_i.", default=1e-3)
    rank: int = _help("Rank r of each low-rank perturbation E_i = A_i B_i^T / sqrt(r).", default=1)
    antithetic: bool = _help("Members 2k and 2k+1 share noise with opposite signs (mirrored sampling).", default=True)
    noise_reuse: int = _help("Reuse the same noise for this many consecutive steps.", default=1)
    full_rank: bool = _help("Classic OpenES: dense Gaussian E_i instead of low rank (for comparison; slow).", default=False)
    fitness_shaping: str = _help(f"How rewards become fitness: one of {SHAPINGS}. 'zscore' (of each member's mean "
                                 "reward, as all three reference code bases) keeps es/step_over_sigma about "
                                 "learning_rate / (sigma**2 * sqrt(N)); 'group_norm' (per prompt first) steps about "
                                 "1/sqrt(prompts_per_step) as far.", default="zscore")
    prompts_per_step: int = _help("How many prompts every member answers per ES step.", default=4)
    sigma_schedule: str = _help(f"Sigma over training: one of {SIGMA_SCHEDULES}.", default="constant")
    sigma_decay: float = _help("Per-step factor of the 'exponential' sigma schedule.", default=0.999)
    sigma_final: float | None = _help("Sigma reached at max_steps by the 'linear' schedule (default sigma/10).", default=None)
    perturb_modules: Any = _help("Module names/suffixes (list) or a full-match regex (str) of the linear layers to "
                                 "perturb; default: every linear layer but the embedding and the LM head.", default=None)
    exclude_modules: Any = _help("Module names/suffixes (list) or regex (str) never perturbed.", default=None)
    # ---- generation ----------------------------------------------------------------------
    generation_backend: str = _help(f"Generation backend: one of {GENERATION_BACKENDS}.", default="engine")
    max_sequences_in_flight: int | None = _help("Sequences in flight in the engine (its slots), also the unit of work across "
                                                "processes; default from generation_memory_gb, else all jobs of the step.", default=None)
    generation_memory_gb: float | None = _help("Memory budget (GiB) of the engine's slots when max_sequences_in_flight is unset.", default=None)
    compile_decode: bool = _help("Capture the engine's decode step with torch.compile (CUDA graphs on CUDA); static slot "
                                 "shapes. For GPUs: on CPU it is slower than eager (docs/benchmarks.md).", default=False)
    greedy: bool = _help("Greedy decoding (the paper's and Qiu et al.'s setting: members then differ by their weights "
                         "only); False samples with temperature/top_p/top_k.", default=True)
    common_sampling_noise: bool = _help("When sampling, every member answering a prompt draws the same sampling noise (common "
                                        "random numbers), so members differ by their weights only; False: each antithetic "
                                        "pair draws its own.", default=False)
    stop_strings: list[str] | None = _help("Strings that end a completion (kept in the text).", default=None)
    # ---- GRPOConfig fields with the same meaning -----------------------------------------
    max_prompt_length: int | None = _help("Prompts are truncated on the left to this many tokens.", default=512)
    max_completion_length: int = _help("Most tokens generated per completion.", default=256)
    temperature: float = _help("Sampling temperature.", default=1.0)
    top_p: float = _help("Nucleus sampling: keep the smallest token set of this probability.", default=1.0)
    top_k: int = _help("Keep the k most likely tokens (0 = all).", default=0)
    reward_weights: list[float] | None = _help("Weight of each reward function (default all 1).", default=None)
    model_init_kwargs: dict | None = _help("Keyword arguments of from_pretrained when `model` is a string.", default=None)
    chat_template_kwargs: dict | None = _help("Extra keyword arguments of apply_chat_template.", default=None)
    log_completions: bool = _help("Write a completions table (parquet in output_dir, wandb table) each logging step.", default=False)
    num_completions_to_print: int | None = _help("Completions printed per logging step when log_completions.", default=None)
    use_vllm: bool = _help("TRL's switch: True selects generation_backend='vllm'.", default=False)
    vllm_mode: str = _help(f"vLLM integration: one of {VLLM_MODES} (vLLM in the trainer's process).", default="colocate")
    vllm_gpu_memory_utilization: float = _help("Share of GPU memory vLLM may use (on CPU, of RAM); generation_memory_gb, "
                                               "when set, fixes vLLM's KV cache size instead.", default=0.3)
    vllm_max_model_length: int | None = _help("vLLM's context window (prompt + completion tokens); default from the model "
                                              "config.", default=None)
    vllm_tensor_parallel_size: int = _help("GPUs vLLM shards the model over.", default=1)
    vllm_max_loras: int | None = _help("Population members (LoRA adapters) vLLM runs in one batch; the others queue. "
                                       "Default min(population_size, 64).", default=None)
    es_replay_log: bool = _help("Append each step's sigma, learning rate and fitness to output_dir/es_replay.jsonl, from "
                                "which eggroll_ft.replay rebuilds any step over the base model (docs/replay.md).", default=True)
    es_debug_checksum: bool = _help("Log a checksum of the perturbed weights each logging step (cross-rank check).", default=False)
    # ---- GRPO-only fields: accepted, unused ----------------------------------------------
    num_generations: int | None = _help("GRPO only (group size); ES uses population_size.", default=None)
    num_generations_eval: int | None = _help("GRPO only; unused.", default=None)
    beta: float = _help("GRPO only (KL coefficient); unused.", default=0.0)
    num_iterations: int = _help("GRPO only; unused.", default=1)
    epsilon: float = _help("GRPO only; unused.", default=0.2)
    epsilon_high: float | None = _help("GRPO only; unused.", default=None)
    loss_type: str = _help("GRPO only; unused.", default="dapo")
    scale_rewards: str = _help("GRPO only; use fitness_shaping.", default="group")
    mask_truncated_completions: bool = _help("GRPO only; unused.", default=False)
    steps_per_generation: int | None = _help("GRPO only; unused.", default=None)
    generation_batch_size: int | None = _help("GRPO only; see max_sequences_in_flight.", default=None)
    importance_sampling_level: str = _help("GRPO only; unused.", default="token")
    disable_dropout: bool = _help("GRPO only; ES always runs the model in eval mode.", default=False)
    top_entropy_quantile: float = _help("GRPO only; unused.", default=1.0)
    vllm_enable_sleep_mode: bool = _help("GRPO only (offloads vLLM during the optimizer step); ES's update needs no "
                                         "extra memory, so vLLM stays awake.", default=False)
    # ---- TrainingArguments defaults changed for ES ---------------------------------------
    learning_rate: float = _help("Step size of the ES update W += lr * g (see README for the paper mapping).", default=1e-6)
    optim: str = _help("Optimizer: 'sgd' (the paper's update, applied in place) or any TrainingArguments optim.", default="sgd")
    lr_scheduler_type: str = _help("Learning-rate schedule (transformers names).", default="constant")
    max_grad_norm: float = _help("Clip the ES direction's norm (0 = never, the default).", default=0.0)
    weight_decay: float = _help("Weight decay of the optimizer.", default=0.0)
    logging_steps: float = _help("Log every this many ES steps.", default=1)
    remove_unused_columns: bool = _help("Keep every dataset column: reward functions receive them.", default=False)

    def __post_init__(self):
        if cpu_group_needed(self.use_cpu, os.environ):
            # accelerate joins the launched processes' gloo group only with use_cpu; without it every
            # process would train alone on all jobs (and all write the same output_dir)
            logger.info("WORLD_SIZE=%s processes and no GPU: use_cpu=True, so they share the work over gloo",
                        os.environ.get("WORLD_SIZE"))
            self.use_cpu = True
        super().__post_init__()
        self._validate_es()
        self._check_launch()

    def _validate_es(self):
        def need(cond, name, rule):
            if not cond:
                raise ValueError(f"{name}={getattr(self, name)!r} {rule}")

        # YAML 1.1 reads "1e-5" (no dot) as a string: accept a number written so, name anything else
        for name in ("sigma", "learning_rate", "sigma_decay", "sigma_final", "temperature", "top_p",
                     "generation_memory_gb"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, float(value))
                except ValueError:
                    raise ValueError(f"{name}={value!r} must be a number") from None

        need(isinstance(self.population_size, int) and self.population_size >= 2, "population_size", "must be an int >= 2")
        need(not (self.antithetic and self.population_size % 2), "population_size", "must be even when antithetic=True")
        need(math.isfinite(self.sigma) and self.sigma > 0, "sigma", "must be a finite number > 0")
        need(isinstance(self.rank, int) and self.rank >= 1, "rank", "must be an int >= 1")
        need(isinstance(self.noise_reuse, int) and self.noise_reuse >= 1, "noise_reuse", "must be an int >= 1")
        need(self.fitness_shaping in SHAPINGS, "fitness_shaping", f"must be one of {SHAPINGS}")
        need(isinstance(self.prompts_per_step, int) and self.prompts_per_step >= 1, "prompts_per_step", "must be an int >= 1")
        need(self.sigma_schedule in SIGMA_SCHEDULES, "sigma_schedule", f"must be one of {SIGMA_SCHEDULES}")
        need(0 < self.sigma_decay <= 1, "sigma_decay", "must lie in (0, 1]")
        need(self.sigma_final is None or self.sigma_final > 0, "sigma_final", "must be > 0")
        need(self.generation_backend in GENERATION_BACKENDS, "generation_backend", f"must be one of {GENERATION_BACKENDS}")
        need(self.max_sequences_in_flight is None or self.max_sequences_in_flight >= 1, "max_sequences_in_flight", "must be >= 1")
        need(self.generation_memory_gb is None or self.generation_memory_gb > 0, "generation_memory_gb", "must be > 0")
        need(self.max_completion_length is not None and self.max_completion_length >= 1, "max_completion_length", "must be >= 1")
        need(self.max_prompt_length is None or self.max_prompt_length >= 1, "max_prompt_length", "must be >= 1")
        need(self.temperature > 0, "temperature", "must be > 0 (use greedy=True for greedy decoding)")
        need(0 < self.top_p <= 1, "top_p", "must lie in (0, 1]")
        need(self.top_k >= 0, "top_k", "must be >= 0")
        need(self.learning_rate >= 0, "learning_rate", "must be >= 0")
        need(self.reward_weights is None or all(math.isfinite(w) for w in self.reward_weights), "reward_weights", "must be finite numbers")
        need(not (self.use_vllm and self.generation_backend == "hf"), "use_vllm",
             "conflicts with generation_backend='hf' (use_vllm=True selects generation_backend='vllm')")
        if self.use_vllm:
            self.generation_backend = "vllm"
        self._validate_vllm(need)
        need(self.stop_strings is None or all(isinstance(s, str) and s for s in self.stop_strings), "stop_strings", "must be non-empty strings")
        if self.gradient_accumulation_steps != 1:
            warnings.warn(f"gradient_accumulation_steps={self.gradient_accumulation_steps} has no meaning for ES "
                          "(one update per population evaluation); using 1", stacklevel=3)
            self.gradient_accumulation_steps = 1
        ignored = [k for k, default in GRPO_ONLY_FIELDS.items() if getattr(self, k, default) != default]
        if ignored:
            warnings.warn(f"GRPO-only fields have no effect on EggrollTrainer: {ignored}", stacklevel=3)

    def _check_launch(self):
        launched = launched_world_size(os.environ)
        if launched > 1 and self.world_size != launched:
            raise ValueError(f"WORLD_SIZE={launched} processes were launched but this process joined world_size="
                             f"{self.world_size} (use_cpu={self.use_cpu}): each would train alone on every job. On a "
                             "machine without a GPU accelerate launch needs use_cpu=True (--use_cpu true); on GPUs use "
                             "--multi_gpu with one process per GPU")
        warn_if_cpu_multiprocess_ignored()

    def _validate_vllm(self, need):
        need(self.vllm_mode in VLLM_MODES, "vllm_mode", f"must be one of {VLLM_MODES}: the population's adapters and weight "
             "updates go to a vLLM engine in the trainer's process")
        need(0 < self.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization", "must lie in (0, 1]")
        need(self.vllm_max_model_length is None or self.vllm_max_model_length >= 1, "vllm_max_model_length", "must be >= 1")
        need(isinstance(self.vllm_tensor_parallel_size, int) and self.vllm_tensor_parallel_size >= 1,
             "vllm_tensor_parallel_size", "must be an int >= 1")
        need(self.vllm_max_loras is None or self.vllm_max_loras >= 1, "vllm_max_loras", "must be >= 1")
        if self.generation_backend == "vllm":
            need(not self.full_rank, "full_rank", "cannot run with generation_backend='vllm' (members are low-rank "
                 "LoRA adapters)")

    def sigma_at(self, step: int) -> float:
        """Sigma of ES step ``step`` under the configured schedule."""
        if self.sigma_schedule == "exponential":
            return self.sigma * self.sigma_decay ** step
        if self.sigma_schedule == "linear":
            final = self.sigma / 10 if self.sigma_final is None else self.sigma_final
            total = max(self.max_steps, 1) if self.max_steps and self.max_steps > 0 else 1
            frac = min(step / total, 1.0)
            return self.sigma + (final - self.sigma) * frac
        return self.sigma


# ---- launch: how many processes were started, and whether this one can join them ---------------
def launched_world_size(env) -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` / ``accelerate launch`` (1 when unset)."""
    return int(env.get("WORLD_SIZE", "1") or 1)


def _has_distributed_accelerator() -> bool:
    """A GPU (or another accelerator accelerate runs a process group on) is present."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    if accelerator is not None and hasattr(accelerator, "current_accelerator"):
        device = accelerator.current_accelerator() if accelerator.is_available() else None
        return device is not None and device.type != "mps"  # accelerate runs no process group on MPS
    return torch.cuda.is_available()


def cpu_group_needed(use_cpu: bool, env) -> bool:
    """``accelerate launch --multi_gpu --num_processes K`` (or ``torchrun``) on a machine without GPUs.

    The launcher sets ``WORLD_SIZE=K``, yet accelerate puts the process in the group (gloo) only
    when told to use the CPU; otherwise every process sees ``num_processes == 1`` and runs the whole
    job by itself. True when that would happen.

    >>> cpu_group_needed(False, {"WORLD_SIZE": "2"}) == (not _has_distributed_accelerator())
    True
    >>> cpu_group_needed(False, {}), cpu_group_needed(True, {"WORLD_SIZE": "2"})
    (False, False)
    """
    return (launched_world_size(env) > 1 and not use_cpu and not _accelerate_use_cpu(env)
            and not _has_distributed_accelerator())


def _accelerate_use_cpu(env) -> bool:
    """``accelerate launch --cpu`` (or ``use_cpu: true`` in its config) told the process to use the CPU."""
    return env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1")


def _alone_under_accelerate_cpu(env) -> bool:
    """Launched by ``accelerate launch --cpu`` and told it is the only process."""
    return _accelerate_use_cpu(env) and launched_world_size(env) <= 1


def requested_cpu_processes(env: dict, launcher_argv: list[str]) -> int | None:
    """How many processes ``accelerate launch --cpu --num_processes N`` asked for, when it started one.

    That launcher starts a single process and tells it nothing of N; the only trace is the
    launcher's own command line (the parent process). Returns N > 1 in that case, else None.

    >>> requested_cpu_processes({"ACCELERATE_USE_CPU": "True"}, ["accelerate", "launch", "--cpu", "--num_processes", "2"])
    2
    >>> requested_cpu_processes({"ACCELERATE_USE_CPU": "True", "WORLD_SIZE": "2"}, ["accelerate", "--num_processes=2"])
    """
    if not _alone_under_accelerate_cpu(env):
        return None
    for i, arg in enumerate(launcher_argv):
        for flag in ("--num_processes", "--num-processes"):
            value = arg[len(flag) + 1:] if arg.startswith(flag + "=") else (
                launcher_argv[i + 1] if arg == flag and i + 1 < len(launcher_argv) else None)
            if value is not None and value.isdigit() and int(value) > 1:
                return int(value)
    return None


def warn_if_cpu_multiprocess_ignored() -> bool:
    """``accelerate launch --cpu --num_processes K`` silently starts ONE process. Detect and warn.

    Reads the launcher's command line (Linux ``/proc``); where it cannot be read or names no
    ``--num_processes``, a rendezvous port without a world size is taken as the sign. Returns True
    when the case was detected.
    """
    env = dict(os.environ)
    if not _alone_under_accelerate_cpu(env):
        return False
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        argv = []
    named = any(a.startswith(("--num_processes", "--num-processes")) for a in argv)
    asked = requested_cpu_processes(env, argv) if named else None
    if asked or (not named and "MASTER_PORT" in env):
        warnings.warn(f"`accelerate launch --cpu --num_processes {asked or 'K'}` starts only one process. For several "
                      "CPU processes over gloo use `accelerate launch --multi_gpu --num_processes K` (works without "
                      "GPUs; recipes/accelerate_configs/cpu_2proc.yaml) or `torchrun --nproc_per_node K`.",
                      stacklevel=2)
        return True
    return False
