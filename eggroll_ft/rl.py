"""Reinforcement learning with EGGROLL: population policies, batched rollouts, the ES loop.

EGGROLL (Sarkar et al. 2025, arXiv 2511.16652, Sec. 6.1 and App. "RL") trains 3 x 256 MLP
policies with the activation relu(layernorm(x)) by evolution strategies, and compares low-rank
EGGROLL with full-rank OpenES (Salimans et al. 2017) and PPO (Schulman et al. 2017).

This module is the RL counterpart of the engine and trainer of the language models, and it goes
through exactly the same code path: the policy is built from plain ``nn.Linear`` layers, so
``Population`` perturbs every weight per batch row, ``shape_fitness`` shapes the episode returns
and ``apply_es_update`` moves the weights. Full-rank OpenES is ``NoiseConfig(full_rank=True)``.

* ``PopulationPolicy``: the MLP; ``act(obs)`` is one batched forward for all rows.
* ``make_vector_env``: gymnasium / minigrid vector environments (the native vectorised
  CartPole when there is one, ``SyncVectorEnv`` otherwise; minigrid image observations flattened).
* ``rollout``: run an action function on a vector env until every row has finished a fixed number
  of episodes; the population rollout tags row ``b`` with member ``b`` (one forward per env step).
* ``ESLearner`` / ``train_es``: the ES loop with SGD or Adam, sigma and learning-rate decay.
* ``train_ppo``: the stable-baselines3 PPO baseline under the same step budget and the same
  evaluation. Both trainers call ``log(record)`` with the same record keys.

Higher return is better, and higher fitness is better (see ``shaping``). Environment steps count
only steps that belong to a counted episode: the steps a finished row idles while the slowest row
of the batch finishes are spent wall-clock but not counted.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import numpy as np
import torch
from torch import nn

from .es_update import apply_es_update, is_plain_sgd
from .noise import NoiseConfig
from .population import UNPERTURBED, Population
from .shaping import SHAPINGS, shape_fitness

METHODS = ("eggroll", "openes", "ppo")
RENAMED_FIELDS = {"lr": "learning_rate", "lr_decay": "learning_rate_decay"}  # old config names, refused by name
OPTIMIZERS = ("sgd", "adam")


# ---- config -----------------------------------------------------------------------------------
@dataclass
class RLConfig:
    """One training run of one method on one environment. Validated at construction."""

    env_id: str = "CartPole-v1"
    """gymnasium id (``MiniGrid-*`` ids get their image observation flattened)"""
    method: str = "eggroll"
    """eggroll (low-rank ES), openes (full-rank ES) or ppo (stable-baselines3)"""
    total_env_steps: int = 500_000
    """training budget in environment steps, the same for every method"""
    seed: int = 0
    """seeds the policy init, the noise and the environments"""
    hidden_size: int = 256
    """width of each hidden layer of the policy"""
    num_layers: int = 3
    """number of hidden layers (the paper's 3 x 256)"""
    # ES
    rank: int = 1
    """rank r of the EGGROLL perturbation (ignored by openes and ppo)"""
    population_size: int = 512
    """ES population N (antithetic pairs, so even)"""
    sigma: float = 0.1
    """noise scale at generation 0"""
    sigma_decay: float = 1.0
    """sigma is multiplied by this every generation"""
    learning_rate: float = 0.01
    """ES learning rate at generation 0 (EggrollConfig's name)"""
    learning_rate_decay: float = 1.0
    """the learning rate is multiplied by this every generation"""
    optimizer: str = "adam"
    """sgd (the paper's plain update, fused in place) or adam"""
    fitness_shaping: str = "centered_rank"
    """centered_rank or zscore (see eggroll_ft.shaping)"""
    episodes_per_member: int = 1
    """a member's raw fitness is its mean return over this many episodes"""
    # evaluation (not counted in the budget nor in the wall-clock)
    eval_episodes: int = 16
    """episodes of the deterministic current policy per evaluation"""
    eval_every_steps: int = 20_000
    """evaluate at least this often (ES evaluates after every generation that crosses it)"""
    threshold: float = 475.0
    """return that counts as reached (time-to-threshold in the table)"""
    max_train_cpu_seconds: float | None = None
    """stop earlier when training CPU time passes this (None: the step budget alone decides); CPU
    rather than wall-clock time so that the cap does not depend on other processes' load"""
    ppo: dict = field(default_factory=dict)
    """keyword arguments of stable_baselines3.PPO (plus ``n_envs``)"""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} must be one of {METHODS}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} must be one of {OPTIMIZERS}")
        if self.fitness_shaping not in SHAPINGS:
            raise ValueError(f"fitness_shaping={self.fitness_shaping!r} must be one of {SHAPINGS}")
        if self.population_size < 2 or self.population_size % 2:
            raise ValueError(f"population_size={self.population_size} must be even and >= 2 (antithetic pairs)")
        for name in ("total_env_steps", "hidden_size", "num_layers", "rank", "episodes_per_member",
                     "eval_episodes", "eval_every_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("sigma", "learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("sigma_decay", "learning_rate_decay"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must lie in (0, 1]")
        if self.max_train_cpu_seconds is not None and not self.max_train_cpu_seconds > 0:
            raise ValueError(f"max_train_cpu_seconds={self.max_train_cpu_seconds} must be > 0 or None")

    @classmethod
    def from_dict(cls, d: dict) -> "RLConfig":
        renamed = {k: RENAMED_FIELDS[k] for k in d if k in RENAMED_FIELDS}
        if renamed:
            raise ValueError("RLConfig field(s) renamed, one name per concept across eggroll_ft: "
                             + ", ".join(f"{old} -> {new}" for old, new in renamed.items()))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown RLConfig field(s) {unknown}")
        return cls(**d)

    def noise(self) -> NoiseConfig:
        """The noise of the ES methods: low rank for eggroll, dense for openes."""
        return NoiseConfig(seed=self.seed, rank=self.rank, antithetic=True, full_rank=self.method == "openes")

    def to_dict(self) -> dict:
        return asdict(self)


# ---- environments -----------------------------------------------------------------------------
def _env_wrappers(env_id: str) -> list:
    """Observation wrappers so that every env gives a flat float vector."""
    import gymnasium as gym

    if env_id.startswith("MiniGrid"):
        import minigrid  # noqa: F401  (registers the MiniGrid ids)
        from minigrid.wrappers import ImgObsWrapper

        return [ImgObsWrapper, gym.wrappers.FlattenObservation]
    return []


def make_env(env_id: str, **kwargs):
    """One environment with the same wrappers as ``make_vector_env`` (for reference rollouts)."""
    import gymnasium as gym

    env = gym.make(env_id, **kwargs)
    for w in _env_wrappers(env_id):
        env = w(env)
    return env


def make_vector_env(env_id: str, num_envs: int, native: bool = True):
    """``num_envs`` copies of ``env_id`` stepped as one batch.

    Uses the env's own vectorised implementation when gymnasium has one (CartPole: numpy over all
    rows, no Python loop) and ``native`` is set, else ``SyncVectorEnv``. Seeding through
    ``reset(seed=s)`` gives sub-env ``i`` the seed ``s + i`` in the synchronous case.
    """
    import gymnasium as gym

    wrappers = _env_wrappers(env_id)  # also registers minigrid ids
    if native and not wrappers and gym.spec(env_id).vector_entry_point is not None:
        return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point")
    return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync", wrappers=wrappers or None)


# ---- policy -----------------------------------------------------------------------------------
class PopulationPolicy(nn.Module):
    """MLP policy: ``num_layers`` x (Linear -> LayerNorm -> ReLU), then a linear head.

    Discrete actions: argmax of the logits. Continuous: ``tanh`` squashed into the action box.
    The policy is deterministic, as in ES (the exploration is in the weights). Biases start at zero.
    """

    def __init__(self, obs_dim: int, action_dim: int, discrete: bool, hidden_size: int = 256,
                 num_layers: int = 3, action_low=None, action_high=None):
        super().__init__()
        dims = [obs_dim] + [hidden_size] * num_layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_size) for _ in range(num_layers))
        self.head = nn.Linear(hidden_size, action_dim)
        for lin in [*self.layers, self.head]:
            nn.init.zeros_(lin.bias)
        self.discrete = discrete
        low = torch.as_tensor(-1.0 if action_low is None else action_low, dtype=torch.float32)
        high = torch.as_tensor(1.0 if action_high is None else action_high, dtype=torch.float32)
        self.register_buffer("action_center", (high + low) / 2)
        self.register_buffer("action_scale", (high - low) / 2)

    @classmethod
    def for_env(cls, env, hidden_size: int = 256, num_layers: int = 3) -> "PopulationPolicy":
        """Sized from a (vector) env's single observation and action spaces."""
        from gymnasium import spaces

        obs_space = getattr(env, "single_observation_space", env.observation_space)
        act_space = getattr(env, "single_action_space", env.action_space)
        obs_dim = int(np.prod(obs_space.shape))
        if isinstance(act_space, spaces.Discrete):
            return cls(obs_dim, int(act_space.n), True, hidden_size, num_layers)
        if isinstance(act_space, spaces.Box):
            return cls(obs_dim, int(np.prod(act_space.shape)), False, hidden_size, num_layers,
                       act_space.low.reshape(-1), act_space.high.reshape(-1))
        raise ValueError(f"action space {act_space} is not supported (Discrete or Box)")

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.reshape(obs.shape[0], -1).to(torch.float32)  # (B, obs_dim)
        for lin, norm in zip(self.layers, self.norms):
            x = torch.relu(norm(lin(x)))  # (B, H)
        return self.head(x)  # (B, action_dim): logits or pre-tanh actions

    @torch.no_grad()
    def act(self, obs) -> np.ndarray:
        """Actions for a batch of observations ``(B, ...)``: ``(B,)`` ints or ``(B, action_dim)`` floats."""
        out = self(torch.as_tensor(np.asarray(obs)))
        if self.discrete:
            return out.argmax(dim=-1).numpy()
        return (self.action_center + self.action_scale * torch.tanh(out)).numpy()


# ---- rollouts ---------------------------------------------------------------------------------
@dataclass
class Rollout:
    returns: np.ndarray  # (E,) mean return per row over its episodes
    lengths: np.ndarray  # (E,) total steps of its counted episodes
    env_steps: int  # sum of lengths: the steps the budget is charged
    batch_steps: int  # vector-env steps taken (the slowest row decides)


def rollout(act: Callable[[np.ndarray], np.ndarray], envs, seed: int, episodes: int = 1) -> Rollout:
    """Step ``envs`` with ``act`` until every row has finished ``episodes`` episodes.

    Handles both autoreset modes of gymnasium 1.x: with ``NEXT_STEP`` (the default, and the native
    CartPole) the step after a done is a reset step whose reward belongs to no episode. A row that
    has finished its episodes keeps being stepped (the batch moves together) but counts nothing.
    """
    from gymnasium.vector import AutoresetMode

    mode = envs.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
    if mode not in (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP):
        raise ValueError(f"autoreset_mode={mode} is not supported (NEXT_STEP or SAME_STEP)")
    n = envs.num_envs
    obs, _ = envs.reset(seed=seed)
    returns = np.zeros(n)
    lengths = np.zeros(n, dtype=np.int64)
    finished = np.zeros(n, dtype=np.int64)
    reset_step = np.zeros(n, dtype=bool)
    batch_steps = 0
    while (finished < episodes).any():
        obs, reward, terminated, truncated, _ = envs.step(act(obs))
        batch_steps += 1
        counted = (finished < episodes) & ~reset_step  # (E,)
        returns += np.where(counted, reward, 0.0)
        lengths += counted
        done = np.logical_or(terminated, truncated)
        finished += done & counted
        reset_step = done if mode == AutoresetMode.NEXT_STEP else np.zeros(n, dtype=bool)
    return Rollout(returns / episodes, lengths, int(lengths.sum()), batch_steps)


def population_rollout(policy: PopulationPolicy, pop: Population, envs, seed: int,
                       episodes: int = 1, member_ids: torch.Tensor | None = None) -> Rollout:
    """Row ``b`` of ``envs`` is played by member ``member_ids[b]`` (default ``b``): one forward per step."""
    ids = torch.arange(envs.num_envs) if member_ids is None else torch.as_tensor(member_ids)
    if ids.numel() != envs.num_envs:
        raise ValueError(f"{ids.numel()} member ids for num_envs={envs.num_envs}; give one per env")
    with pop.members(ids):  # one block for the whole rollout: rows keep their members
        return rollout(policy.act, envs, seed, episodes)


# ---- the ES loop ------------------------------------------------------------------------------
class ESLearner:
    """ES on a ``PopulationPolicy``: perturb (Population), roll out, shape, update (apply_es_update).

    Generation ``g`` uses ``sigma_g = sigma * sigma_decay**g`` and ``learning_rate * learning_rate_decay**g``; the
    environments of generation ``g`` are seeded ``seed + (g + 1) * N`` so each generation sees
    fresh episodes and every run with the same seed sees the same ones.
    """

    def __init__(self, policy: PopulationPolicy, config: RLConfig):
        self.policy, self.config = policy, config
        self.pop = Population(policy, config.noise(), config.population_size, config.sigma)
        weights = [p.weight for p in self.pop.params.values()]
        if config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(weights, lr=config.learning_rate)
        else:
            self.optimizer = torch.optim.Adam(weights, lr=config.learning_rate)
        self.generation = 0

    @property
    def sigma(self) -> float:
        return self.config.sigma * self.config.sigma_decay ** self.generation

    @property
    def learning_rate(self) -> float:
        return self.config.learning_rate * self.config.learning_rate_decay ** self.generation

    def step(self, envs) -> dict:
        """One generation on ``envs`` (one env per member). Returns metrics on raw returns."""
        cfg = self.config
        if envs.num_envs != cfg.population_size:
            raise ValueError(f"num_envs={envs.num_envs} must equal population_size={cfg.population_size}")
        self.pop.set_step(self.generation, sigma=self.sigma)
        for group in self.optimizer.param_groups:  # exponential decay, set directly (the fused SGD
            group["lr"] = self.learning_rate       # path never calls optimizer.step())
        res = population_rollout(self.policy, self.pop, envs, seed=cfg.seed + (self.generation + 1) * cfg.population_size,
                                 episodes=cfg.episodes_per_member)
        returns = torch.as_tensor(res.returns, dtype=torch.float32)  # (N,)
        fitness = shape_fitness(returns, cfg.fitness_shaping)  # (N,)
        self.optimizer.zero_grad(set_to_none=True)
        update_norm = apply_es_update(self.pop, fitness, optimizer=self.optimizer)
        if not is_plain_sgd(self.optimizer):
            self.optimizer.step()
        out = {"generation": self.generation, "sigma": self.sigma, "learning_rate": self.learning_rate,
               "train_return": float(returns.mean()), "train_return_max": float(returns.max()),
               "update_norm": update_norm, "env_steps": res.env_steps, "batch_steps": res.batch_steps}
        self.generation += 1
        return out

    def evaluate(self, envs, seed: int) -> float:
        """Mean return of the unperturbed (mean) policy, one episode per env."""
        ids = torch.full((envs.num_envs,), UNPERTURBED)
        return float(population_rollout(self.policy, self.pop, envs, seed, 1, ids).returns.mean())


def _eval_seed(config: RLConfig) -> int:
    return 10_000_000 + config.seed * 1000  # disjoint from the training seeds


def train_es(config: RLConfig, log: Callable[[dict], None] = lambda r: None) -> PopulationPolicy:
    """Train with EGGROLL / OpenES until ``total_env_steps``; ``log`` gets one record per generation.

    ``wall_s`` (and ``cpu_s``, this process's CPU time, robust to load from other processes) is
    training time only, evaluation excluded, so curves over wall-clock compare training cost.
    """
    if config.method not in ("eggroll", "openes"):
        raise ValueError(f"method={config.method!r} is not an ES method")
    torch.manual_seed(config.seed)
    envs = make_vector_env(config.env_id, config.population_size)
    eval_envs = make_vector_env(config.env_id, config.eval_episodes)
    policy = PopulationPolicy.for_env(envs, config.hidden_size, config.num_layers)
    learner = ESLearner(policy, config)
    env_steps, wall, cpu, next_eval = 0, 0.0, 0.0, 0
    cap = config.max_train_cpu_seconds or math.inf
    while env_steps < config.total_env_steps and cpu < cap:
        t0, c0 = time.perf_counter(), time.process_time()
        rec = learner.step(envs)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        env_steps += rec["env_steps"]
        rec.update(method=config.method, env_id=config.env_id, env_steps=env_steps, wall_s=wall, cpu_s=cpu)
        last = env_steps >= config.total_env_steps or cpu >= cap
        if env_steps >= next_eval or last:
            rec["eval_return"] = learner.evaluate(eval_envs, _eval_seed(config))
            next_eval = env_steps + config.eval_every_steps
        log(rec)
    envs.close()
    eval_envs.close()
    learner.pop.remove()
    return policy


# ---- the PPO baseline -------------------------------------------------------------------------
def train_ppo(config: RLConfig, log: Callable[[dict], None] = lambda r: None):
    """stable-baselines3 PPO on the same env, budget and evaluation as ``train_es``.

    ``config.ppo`` holds PPO's keyword arguments plus ``n_envs``; evaluation is the deterministic
    policy on ``eval_episodes`` episodes with the ES evaluation seed, every ``eval_every_steps``.
    """
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    kwargs = dict(config.ppo)
    n_envs = int(kwargs.pop("n_envs", 8))
    wrappers = _env_wrappers(config.env_id)

    def wrap(env):
        for w in wrappers:
            env = w(env)
        return env

    venv = make_vec_env(config.env_id, n_envs=n_envs, seed=config.seed, wrapper_class=wrap if wrappers else None)
    eval_envs = make_vector_env(config.env_id, config.eval_episodes)
    kwargs.setdefault("policy_kwargs", {"net_arch": [config.hidden_size] * config.num_layers})
    model = PPO("MlpPolicy", venv, seed=config.seed, device="cpu", verbose=0, **kwargs)

    class Logger(BaseCallback):
        def _on_training_start(self):
            self.wall, self.cpu, self.next_eval = 0.0, 0.0, 0
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def _on_step(self):  # stop at the CPU-time cap (evaluation time excluded)
            return self.cpu + time.process_time() - self.c0 < (config.max_train_cpu_seconds or math.inf)

        def _on_rollout_end(self):
            steps = self.num_timesteps
            if steps < self.next_eval:
                return
            self.wall += time.perf_counter() - self.t0
            self.cpu += time.process_time() - self.c0
            ep = [e["r"] for e in self.model.ep_info_buffer]
            ret = rollout(lambda o: self.model.predict(o, deterministic=True)[0], eval_envs, _eval_seed(config)).returns
            log({"method": "ppo", "env_id": config.env_id, "env_steps": steps, "wall_s": self.wall, "cpu_s": self.cpu,
                 "train_return": float(np.mean(ep)) if ep else math.nan, "eval_return": float(ret.mean())})
            self.next_eval = steps + config.eval_every_steps
            self.t0, self.c0 = time.perf_counter(), time.process_time()

    cb = Logger()
    model.learn(total_timesteps=config.total_env_steps, callback=cb)
    cb.next_eval = 0
    cb._on_rollout_end()  # the final point, at the end of the budget
    venv.close()
    eval_envs.close()
    return model
