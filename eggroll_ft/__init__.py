"""eggroll_ft: fine-tune language models with evolution strategies (EGGROLL, arXiv 2511.16652).

Public API: ``EggrollConfig`` and ``EggrollTrainer`` (drop-ins for TRL's ``GRPOConfig`` and
``GRPOTrainer``), the building blocks ``NoiseConfig``, ``Population``, the shaping functions and
the ES update, and the generation engine ``PopulationEngine``.
"""
from .config import EggrollConfig
from .engine import PopulationEngine, SamplingParams
from .es_update import apply_es_update, es_directions
from .noise import NoiseConfig
from .population import UNPERTURBED, Population
from .shaping import centered_rank, group_norm, shape_fitness, zscore
from .trainer import EggrollTrainer

__version__ = "0.1.0"

__all__ = ["EggrollConfig", "EggrollTrainer", "NoiseConfig", "Population", "UNPERTURBED", "PopulationEngine",
           "SamplingParams", "apply_es_update", "es_directions", "shape_fitness", "group_norm", "zscore",
           "centered_rank"]
