"""eggroll_ft: fine-tune language models with evolution strategies (EGGROLL, arXiv 2511.16652)."""
from .noise import NoiseConfig
from .population import UNPERTURBED, Population
from .shaping import centered_rank, group_norm, shape_fitness, zscore

__version__ = "0.1.0"

__all__ = ["NoiseConfig", "Population", "UNPERTURBED", "shape_fitness", "group_norm", "zscore", "centered_rank"]
