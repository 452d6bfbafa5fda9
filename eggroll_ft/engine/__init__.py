"""Population generation: prompt ids + member ids -> completion ids (see engine.py, backend.py)."""
from .backend import GenerationBackend, HFGenerateBackend
from .engine import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, GenerationOutput, PopulationEngine
from .sampling import SamplingParams, sample_tokens

__all__ = ["PopulationEngine", "HFGenerateBackend", "GenerationBackend", "GenerationOutput", "SamplingParams",
           "sample_tokens", "FINISH_EOS", "FINISH_STOP", "FINISH_LENGTH"]
